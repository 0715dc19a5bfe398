"""malloc settings for the CPU backend (Linux with glibc, hosts without accelerators).

XLA:CPU allocates its large buffers (activations, gradients: GBs per step at E = 512)
with malloc on every step. By default glibc maps each from the kernel afresh and unmaps
it on free, so every step page-faults all of them in again, 4 KiB at a time: up to half
of a step, and very variable. `TUNABLES` make glibc keep freed memory for reuse (one
arena, no mmap, no trimming: the process keeps its peak memory, as tcmalloc does) and
back it with 2 MiB transparent huge pages. Measured numbers: docs/benchmarks.md.

glibc reads tunables only at process start, so this is a choice the user makes before
starting Python, never something the package does by itself:

    export GLIBC_TUNABLES=$(python -m routing_lm.cpu_malloc)    # prints the setting

The command prints the value to set (the current GLIBC_TUNABLES plus `TUNABLES`), or
the current value unchanged where the settings do not apply: another OS or C library,
transparent huge pages off. The benchmarks print `status()` in their header.
"""
from __future__ import annotations

import os
import platform
import sys

TUNABLES = ("glibc.malloc.hugetlb=1", "glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
            f"glibc.malloc.trim_threshold={1 << 40}", f"glibc.malloc.top_pad={256 << 20}")
THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_mode() -> str:
  """The kernel's transparent huge page mode: always, madvise, never or unknown."""
  try:
    with open(THP_SETTING) as f:
      return f.read().split("[", 1)[1].split("]", 1)[0]
  except (OSError, IndexError):
    return "unknown"


def applies() -> bool:
  """Whether the settings can take effect here: Linux, glibc, transparent huge pages."""
  return (sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
          and _thp_mode() in ("always", "madvise"))


def active() -> bool:
  """Whether this process runs with `TUNABLES` (glibc keeps freed memory for reuse)."""
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  return all(t in tunables for t in TUNABLES)


def status() -> str:
  """'on' or 'off' with how to turn them on, for benchmark headers."""
  if active():
    return "on"
  if not applies():
    return "off (not applicable on this host)"
  return "off (export GLIBC_TUNABLES=$(python -m routing_lm.cpu_malloc) to turn on)"


def tunables_value() -> str:
  """The GLIBC_TUNABLES value to run with: the current one, plus `TUNABLES` where they apply."""
  current = os.environ.get("GLIBC_TUNABLES", "")
  if not applies() or active():
    return current
  kept = [t for t in current.split(":") if t and not t.startswith("glibc.malloc.")]
  return ":".join(kept + list(TUNABLES))


if __name__ == "__main__":
  print(tunables_value())
