"""routing_lm/hugepages.py: when the entry points re-run themselves, and with what."""
import sys

import pytest

from routing_lm import hugepages


@pytest.fixture
def linux_glibc(monkeypatch, tmp_path):
  """A Linux/glibc process whose kernel THP mode is what the test writes to the file."""
  monkeypatch.setattr(hugepages, "_glibc", lambda: True)
  setting = tmp_path / "enabled"
  monkeypatch.setattr(hugepages, "THP_SETTING", str(setting))
  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  monkeypatch.delenv("ROUTING_LM_HUGEPAGES", raising=False)
  return setting


@pytest.mark.parametrize("mode, expected", [("always [madvise] never", True),
                                            ("[always] madvise never", False),
                                            ("always madvise [never]", False)])
def test_wanted_only_where_the_kernel_needs_madvise(linux_glibc, mode, expected):
  linux_glibc.write_text(mode + "\n")
  assert hugepages.wanted() is expected


def test_not_wanted_when_set_or_turned_off(linux_glibc, monkeypatch):
  linux_glibc.write_text("always [madvise] never\n")
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
  assert not hugepages.wanted()
  assert hugepages.status() == f"on ({hugepages.TUNABLE})"
  monkeypatch.delenv("GLIBC_TUNABLES")
  monkeypatch.setenv("ROUTING_LM_HUGEPAGES", "0")
  assert not hugepages.wanted() and hugepages.status() == "off (kernel: madvise)"
  monkeypatch.setattr(hugepages, "_glibc", lambda: False)
  monkeypatch.delenv("ROUTING_LM_HUGEPAGES")
  assert not hugepages.wanted()


def test_reexec_keeps_the_command_and_other_tunables(linux_glibc, monkeypatch):
  linux_glibc.write_text("always [madvise] never\n")
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
  monkeypatch.setattr(sys, "orig_argv", ["python3", "-m", "routing_lm.demo", "--steps=5"])
  calls = []
  monkeypatch.setattr(hugepages.os, "execve", lambda *a: calls.append(a))
  hugepages.reexec()
  (path, argv, env), = calls
  assert path == sys.executable and argv == [sys.executable, "-m", "routing_lm.demo",
                                             "--steps=5"]
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  monkeypatch.setenv("GLIBC_TUNABLES", env["GLIBC_TUNABLES"])   # the re-run process
  hugepages.reexec()
  assert len(calls) == 1
