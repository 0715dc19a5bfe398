"""routing_lm/cpu_malloc.py: the GLIBC_TUNABLES value it prints, and where it applies."""
import os
import subprocess
import sys

import pytest

from routing_lm import cpu_malloc


@pytest.fixture
def glibc_host(monkeypatch, tmp_path):
  """A Linux/glibc host; the test writes the kernel's transparent huge page mode."""
  monkeypatch.setattr(cpu_malloc.sys, "platform", "linux")
  monkeypatch.setattr(cpu_malloc.platform, "libc_ver", lambda: ("glibc", "2.36"))
  setting = tmp_path / "enabled"
  setting.write_text("always [madvise] never\n")
  monkeypatch.setattr(cpu_malloc, "THP_SETTING", str(setting))
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  return setting


@pytest.mark.parametrize("mode, expected", [("always [madvise] never", True),
                                            ("[always] madvise never", True),
                                            ("always madvise [never]", False)])
def test_applies_where_huge_pages_can_be_had(glibc_host, mode, expected):
  glibc_host.write_text(mode + "\n")
  assert cpu_malloc.applies() is expected
  value = cpu_malloc.tunables_value()
  assert (value == ":".join(cpu_malloc.TUNABLES)) is expected
  assert (value == "") is not expected


def test_not_on_other_c_libraries(glibc_host, monkeypatch):
  monkeypatch.setattr(cpu_malloc.platform, "libc_ver", lambda: ("musl", ""))
  assert not cpu_malloc.applies() and cpu_malloc.tunables_value() == ""
  assert cpu_malloc.status() == "off (not applicable on this host)"


def test_keeps_other_tunables_and_replaces_malloc_ones(glibc_host, monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.rtld.x=1:glibc.malloc.arena_max=2")
  value = cpu_malloc.tunables_value()
  assert value.split(":") == ["glibc.rtld.x=1", *cpu_malloc.TUNABLES]
  assert "off (export GLIBC_TUNABLES" in cpu_malloc.status()
  monkeypatch.setenv("GLIBC_TUNABLES", value)
  assert cpu_malloc.active() and cpu_malloc.status() == "on"
  assert cpu_malloc.tunables_value() == value          # already on: unchanged


def test_the_command_prints_the_value_and_changes_nothing():
  """`python -m routing_lm.cpu_malloc` prints one line (what to export) and exits 0."""
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  out = subprocess.run([sys.executable, "-m", "routing_lm.cpu_malloc"], env=env, check=True,
                       capture_output=True, text=True).stdout
  assert out.count("\n") == 1
  assert out.strip() in ("", ":".join(cpu_malloc.TUNABLES))
