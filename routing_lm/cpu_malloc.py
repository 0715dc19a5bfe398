"""malloc settings for the CPU backend (Linux with glibc, hosts without accelerators).

XLA:CPU allocates its large buffers (activations, gradients: GBs per step at E = 512)
with malloc on every step. By default glibc maps each from the kernel afresh and unmaps
it on free, so every step page-faults all of them in again, 4 KiB at a time: up to half
of a step, and very variable (a quarter of a benchmark's CPU time was in the kernel).
`TUNABLES` make glibc keep freed memory for reuse (one arena, no mmap, no trimming: the
process keeps its peak memory, as tcmalloc does) and back it with 2 MiB transparent huge
pages. Measured on a 2-core VM: tiny train step 9,200 -> 11,700 tokens/s; forward+backward
at 32,768 tokens: dense FFW 835 -> 650 ms, routed FFW at E = 512 1.5-1.9 s -> 0.93-0.97 s.

glibc reads tunables only at process start, so `reexec()` re-runs the current command
once with them, before any work is done. It does nothing where it does not apply
(another OS or C library, an accelerator host or `JAX_PLATFORMS` other than cpu,
transparent huge pages off), when GLIBC_TUNABLES already sets malloc, or when
`ROUTING_LM_CPU_MALLOC=0`.
"""
from __future__ import annotations

import glob
import os
import platform
import sys

TUNABLES = ("glibc.malloc.hugetlb=1", "glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
            f"glibc.malloc.trim_threshold={1 << 40}", f"glibc.malloc.top_pad={256 << 20}")
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"
ACCELERATORS = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")


def _thp_mode() -> str:
  """The kernel's transparent huge page mode: always, madvise, never or unknown."""
  try:
    with open(THP_SETTING) as f:
      return f.read().split("[", 1)[1].split("]", 1)[0]
  except (OSError, IndexError):
    return "unknown"


def _glibc() -> bool:
  return sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def _cpu_backend() -> bool:
  """Whether JAX will run on the CPU: JAX_PLATFORMS says so, or no accelerator exists."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms == "cpu"
  return not any(glob.glob(pattern) for pattern in ACCELERATORS)


def active() -> bool:
  """Whether this process runs with `TUNABLES` (glibc keeps freed memory for reuse)."""
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  return all(t in tunables for t in TUNABLES)


def status() -> str:
  """'on' or 'off' with the reason, for benchmark headers."""
  if active():
    return "on"
  return (f"off (GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, "
          f"transparent huge pages {_thp_mode()})")


def wanted() -> bool:
  """Whether re-running with `TUNABLES` applies and has not happened yet."""
  return (os.environ.get("ROUTING_LM_CPU_MALLOC", "1") != "0" and _glibc()
          and "glibc.malloc" not in os.environ.get("GLIBC_TUNABLES", "")
          and _thp_mode() in ("always", "madvise") and _cpu_backend())


def reexec() -> None:
  """Re-runs this process's command line with `GLIBC_TUNABLES` extended by `TUNABLES`."""
  if not wanted():
    return
  tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES"), *TUNABLES) if t)
  print("routing_lm: re-running with malloc settings for XLA:CPU (routing_lm/cpu_malloc.py; "
        "ROUTING_LM_CPU_MALLOC=0 turns this off)", file=sys.stderr, flush=True)
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
            dict(os.environ, GLIBC_TUNABLES=tunables))
