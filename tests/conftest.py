"""Shared pytest setup: the repo root on sys.path (for `configs/`), the `slow` marker, and
no malloc re-exec (routing_lm/cpu_malloc.py) in tests or the commands they start.

Nothing here changes jax's device count: the suite runs on 1 device, and the
multi-device checks (tests/test_parallel.py) start their own 8-device process.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:   # configs/ is a folder at the repo root, not an installed package
  sys.path.insert(0, REPO)
os.environ.setdefault("ROUTING_LM_CPU_MALLOC", "0")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: compiles several models or runs subprocesses (deselect with "
      "-m 'not slow')")
