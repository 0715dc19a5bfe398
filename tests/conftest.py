"""Shared pytest setup: the `slow` marker.

Nothing here changes jax's device count: the suite runs on 1 device, and the
multi-device checks (tests/test_parallel.py) start their own 8-device process.
"""


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: compiles several models or runs subprocesses (deselect with "
      "-m 'not slow')")
