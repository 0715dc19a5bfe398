"""routing_lm/cpu_malloc.py: when the entry points re-run themselves, and with what."""
import sys

import pytest

from routing_lm import cpu_malloc


@pytest.fixture
def cpu_host(monkeypatch, tmp_path):
  """A Linux/glibc host with no accelerator; the test writes the kernel's THP mode."""
  monkeypatch.setattr(cpu_malloc, "_glibc", lambda: True)
  monkeypatch.setattr(cpu_malloc, "ACCELERATORS", (str(tmp_path / "accel*"),))
  setting = tmp_path / "enabled"
  setting.write_text("always [madvise] never\n")
  monkeypatch.setattr(cpu_malloc, "THP_SETTING", str(setting))
  for var in ("GLIBC_TUNABLES", "ROUTING_LM_CPU_MALLOC", "JAX_PLATFORMS"):
    monkeypatch.delenv(var, raising=False)
  return tmp_path


@pytest.mark.parametrize("mode, expected", [("always [madvise] never", True),
                                            ("[always] madvise never", True),
                                            ("always madvise [never]", False)])
def test_wanted_where_huge_pages_can_be_had(cpu_host, mode, expected):
  (cpu_host / "enabled").write_text(mode + "\n")
  assert cpu_malloc.wanted() is expected


def test_not_wanted_on_accelerator_hosts_unless_jax_runs_on_cpu(cpu_host, monkeypatch):
  (cpu_host / "accel0").write_text("")
  assert not cpu_malloc.wanted()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert cpu_malloc.wanted()
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert not cpu_malloc.wanted()


def test_not_wanted_when_set_turned_off_or_not_glibc(cpu_host, monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
  assert not cpu_malloc.wanted()
  monkeypatch.delenv("GLIBC_TUNABLES")
  monkeypatch.setenv("ROUTING_LM_CPU_MALLOC", "0")
  assert not cpu_malloc.wanted() and cpu_malloc.status().startswith("off")
  monkeypatch.delenv("ROUTING_LM_CPU_MALLOC")
  monkeypatch.setattr(cpu_malloc, "_glibc", lambda: False)
  assert not cpu_malloc.wanted()


def test_reexec_keeps_the_command_and_other_tunables(cpu_host, monkeypatch):
  monkeypatch.setenv("GLIBC_TUNABLES", "glibc.rtld.optional_static_tls=4096")
  monkeypatch.setattr(sys, "orig_argv", ["python3", "-m", "routing_lm.demo", "--steps=5"])
  calls = []
  monkeypatch.setattr(cpu_malloc.os, "execve", lambda *a: calls.append(a))
  cpu_malloc.reexec()
  (path, argv, env), = calls
  assert path == sys.executable and argv == [sys.executable, "-m", "routing_lm.demo",
                                             "--steps=5"]
  assert env["GLIBC_TUNABLES"] == ":".join(("glibc.rtld.optional_static_tls=4096",
                                            *cpu_malloc.TUNABLES))
  assert not cpu_malloc.active()
  monkeypatch.setenv("GLIBC_TUNABLES", env["GLIBC_TUNABLES"])   # the re-run process
  assert cpu_malloc.active() and cpu_malloc.status() == "on"
  monkeypatch.setenv("GLIBC_TUNABLES", ":".join(cpu_malloc.TUNABLES[:-1]))   # one missing
  assert not cpu_malloc.active()
  monkeypatch.setenv("GLIBC_TUNABLES", env["GLIBC_TUNABLES"])
  cpu_malloc.reexec()
  assert len(calls) == 1


def test_a_real_reexec_runs_the_command_again_with_the_tunables():
  """End to end on this host: the re-run process has the tunables iff `wanted()`."""
  import os
  import subprocess
  env = {k: v for k, v in os.environ.items()
         if k not in ("ROUTING_LM_CPU_MALLOC", "GLIBC_TUNABLES")}
  code = ("from routing_lm import cpu_malloc; cpu_malloc.reexec(); import os; "
          "print(os.environ.get('GLIBC_TUNABLES'))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, check=True)
  with pytest.MonkeyPatch.context() as mp:
    mp.delenv("ROUTING_LM_CPU_MALLOC", raising=False)
    mp.delenv("GLIBC_TUNABLES", raising=False)
    expected = ":".join(cpu_malloc.TUNABLES) if cpu_malloc.wanted() else "None"
  assert out.stdout.strip() == expected
  assert ("re-running" in out.stderr) == (expected != "None")
