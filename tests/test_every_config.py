"""Every config the validation accepts runs; every other one is refused with a clear error.

Every router x remat x granularity x capacity (dropless or not), the last three as the rows
of an orthogonal array (every pair of their values with every router), x mesh (1 device;
experts split over 2 devices) runs in `tests/every_config_checks.py`, one
process per mesh (they need their own device count), at tiny shapes: each point
either trains 2 steps and evaluates, or is refused by validation naming the field.
"""
import json
import math
import os
import subprocess
import sys

import pytest

from routing_lm import routers

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))


def run_checks(mesh, tmp_path):
  out = tmp_path / f"{mesh}.json"
  proc = subprocess.run([sys.executable, os.path.join(HERE, "every_config_checks.py"),
                         "--mesh", mesh, "--out", str(out)], capture_output=True, text=True,
                        timeout=1500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text())


@pytest.mark.parametrize("mesh", ["one", "expert"])
def test_every_accepted_config_trains(mesh, tmp_path):
  records = run_checks(mesh, tmp_path)
  assert len(records) == 4 * len(routers.REGISTRY)
  crashed = [(r["point"], r["error"][-600:]) for r in records if r["outcome"] == "crashed"]
  assert not crashed, crashed
  for r in records:
    p = r["point"]
    if r["outcome"] == "refused":
      err = r["error"]
      assert err.startswith("config.") and "is invalid" in err or "not supported" in err, err
      # What is refused, and why: RL-R takes one expert per token (G = 2 means 2);
      # expert choice needs a capacity.
      expected = ((p["router"] == "rlr" and p["granularity"] > 1)
                  or (p["router"] == "expert_choice" and p["capacity_factor"] is None))
      assert expected, (p, err)
    else:
      assert r["steps"] == 2
      assert all(math.isfinite(x) for x in r["losses"]), r
      assert math.isfinite(r["val"]) or p["capacity_factor"] is None, r
      assert r["losses"][1] != r["losses"][0]                # the first update changed the model
  trained = sum(r["outcome"] == "trained" for r in records)
  # 7 routers: 24 train on each mesh (RL-R with G = 2 and expert choice without a
  # capacity are refused twice each); dropless rows train on the expert mesh too.
  assert trained == 24
