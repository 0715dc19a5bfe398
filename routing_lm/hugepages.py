"""Transparent huge pages for the CPU backend's large buffers (Linux with glibc).

XLA:CPU allocates its large buffers with malloc on every step, and glibc maps each one
freshly from the kernel, one 4 KiB page fault at a time. With glibc's tunable
`glibc.malloc.hugetlb=1`, malloc asks for 2 MiB transparent huge pages instead. Measured
on a 2-core CPU: the tiny train step 1.3x faster, the dense FFW's forward+backward at
32,768 tokens 1.25x, the routed FFW at E = 512 1.5x; a large array copy reaches 27 GB/s
instead of 6.

glibc reads tunables only at process start, so `reexec()` re-runs the current command
once with the tunable added, before any work is done. It does nothing where it cannot
help: another OS or C library, huge pages off or already on for every mapping, the
tunable already set, or `ROUTING_LM_HUGEPAGES=0`.
"""
from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_setting() -> str:
  """The kernel's transparent huge page mode: always, madvise, never or unknown."""
  try:
    with open(THP_SETTING) as f:
      return f.read().split("[", 1)[1].split("]", 1)[0]
  except (OSError, IndexError):
    return "unknown"


def _glibc() -> bool:
  return sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def status() -> str:
  """'on' or 'off' with the reason, for benchmark headers."""
  thp = _thp_setting()
  if thp == "always":
    return "on (kernel: always)"
  if thp == "madvise" and _glibc() and "glibc.malloc.hugetlb=1" in os.environ.get(
      "GLIBC_TUNABLES", ""):
    return f"on ({TUNABLE})"
  return f"off (kernel: {thp})"


def wanted() -> bool:
  """Whether re-running with `TUNABLE` would give malloc huge pages it lacks now."""
  return (os.environ.get("ROUTING_LM_HUGEPAGES", "1") != "0" and _glibc()
          and "glibc.malloc.hugetlb" not in os.environ.get("GLIBC_TUNABLES", "")
          and _thp_setting() == "madvise")


def reexec() -> None:
  """Re-runs this process's command line with `GLIBC_TUNABLES` extended by `TUNABLE`."""
  if not wanted():
    return
  tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES"), TUNABLE) if t)
  print(f"routing_lm: re-running with GLIBC_TUNABLES={tunables} (huge pages for XLA:CPU "
        "buffers; ROUTING_LM_HUGEPAGES=0 turns this off)", file=sys.stderr, flush=True)
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
            dict(os.environ, GLIBC_TUNABLES=tunables))
