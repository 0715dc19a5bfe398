"""Parallelism (issue 4): one code path over a (data, expert, model) mesh.

The multi-device checks need 8 simulated CPU devices, and the rest of the suite runs on
1 device in the same pytest process, so they run in `tests/parallel_checks.py` (two
processes at once, which set XLA_FLAGS themselves). The fixture starts them once per
session, also under pytest-xdist (a file lock), and every test below asserts one record
of their JSON output. A check that raised shows its traceback; a wrong number shows the
numbers. The first tests are in-process 1-device checks of the helpers.
"""
import fcntl
import json
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from routing_lm import parallel
from routing_lm.config import ConfigError

pytestmark = pytest.mark.slow

HERE = os.path.dirname(os.path.abspath(__file__))
MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 8, 1))
ROUTERS = ("sbase", "hash", "rlr", "topk")
TOL = 1e-5
# Two processes at once (compilation is single-threaded; CI has 2 cores).
GROUPS = (("equivalence", "lossfree_bias", "dropless"),
          ("bad_input", "param_specs", "activation_specs", "eval", "collectives", "zero1",
           "checkpoint"))
TIMEOUT_S = 1200


# ---------------------------------------------------------------- 1 device, in process
def test_logical_rules():
  assert parallel.logical_to_spec(("batch", "length", "embed")) == P(("data", "expert"), None, None)
  assert parallel.logical_to_spec(("expert", "embed", "mlp")) == P("expert", None, "model")
  assert parallel.logical_to_spec(("vocab", None)) == P("model", None)
  with pytest.raises(ValueError, match="no rule in routing_lm.parallel.RULES"):
    parallel.logical_to_spec(("batch", "embd"))


def test_one_device_is_a_no_op():
  mesh_cfg = ml_collections.ConfigDict(dict(data=-1, expert=1, model=1))
  mesh = parallel.make_mesh(mesh_cfg, devices=jax.devices()[:1])
  assert mesh.shape == {"data": 1, "expert": 1, "model": 1}
  x = np.ones((4, 8), np.float32)
  with jax.set_mesh(mesh):
    y = jax.jit(lambda a: parallel.constrain(a * 2, ("batch", "embed")))(x)
  np.testing.assert_array_equal(np.asarray(y), 2 * x)
  with pytest.raises(ConfigError, match="needs 2 devices but 1 are present"):
    parallel.make_mesh(ml_collections.ConfigDict(dict(data=2, expert=1, model=1)),
                       devices=jax.devices()[:1])


# ---------------------------------------------------------------- 8 devices, subprocess
def _shared_dir(tmp_path_factory):
  base = tmp_path_factory.getbasetemp()
  # Under xdist every worker has its own basetemp below one shared session folder.
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _run_groups(folder) -> dict:
  procs = []
  for i, names in enumerate(GROUPS):
    out, log = folder / f"checks_{i}.json", folder / f"checks_{i}.log"
    with open(log, "w") as log_f:
      procs.append((names, out, log, subprocess.Popen(
          [sys.executable, os.path.join(HERE, "parallel_checks.py"), "--out", str(out),
           "--only", ",".join(names)], stdout=log_f, stderr=subprocess.STDOUT,
          cwd=os.path.dirname(HERE))))
  results = {}
  for names, out, log, proc in procs:
    try:
      rc = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      proc.kill()
      rc = "timeout"
    got = json.loads(out.read_text()) if out.exists() else {}
    tail = log.read_text()[-4000:]
    for name in names:
      results[name] = got.get(name) or {
          "ok": False, "error": f"parallel_checks.py --only {','.join(names)} exited with "
                                f"{rc} before finishing '{name}'; its output:\n{tail}"}
    results.setdefault("device_count", got.get("device_count"))
  return results


@pytest.fixture(scope="module")
def checks(tmp_path_factory):
  folder = _shared_dir(tmp_path_factory)
  merged = folder / "parallel_checks.json"
  with open(folder / "parallel_checks.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)        # one run per session, even under xdist
    if not merged.exists():
      merged.write_text(json.dumps(_run_groups(folder)))
  return json.loads(merged.read_text())


def record(checks, name):
  rec = checks[name]
  assert rec.get("error") is None, f"check '{name}' raised:\n{rec['error']}"
  return rec


def test_eight_devices(checks):
  assert checks["device_count"] == 8


@pytest.mark.parametrize("router", ROUTERS + ("sbase-global",))
def test_loss_and_grads_equal_one_device(checks, router):
  """Every mesh: loss and every gradient within 1e-5 of a 1-device run that routes the
  same token groups (num_groups = data x expert)."""
  cases = record(checks, "equivalence")["cases"]
  meshes = ((2, 4, 1), (2, 2, 2)) if router == "sbase-global" else MESHES
  bad = []
  for mesh in meshes:
    key = f"{router}@{mesh}"
    assert key in cases, f"{key} was not run"
    c = cases[key]
    if c.get("error"):
      bad.append(f"{key} raised:\n{c['error']}")
      continue
    assert c["dropped"] == [0.0] and c["ref_dropped"] == [0.0], (key, c)
    if not c["ok"]:
      bad.append(f"{key} (num_groups={c['num_groups']}): loss {c['loss']:.7f} vs 1 device "
                 f"{c['ref_loss']:.7f} (diff {c['loss_diff']:.2e}); max gradient diff "
                 f"{c['grad_diff']:.2e} at {c['grad_diff_at']}; router metrics diff "
                 f"{c['metrics_diff']:.2e}; aux losses diff {c['aux_diff']:.2e}; tolerance {TOL}")
  assert not bad, "\n".join(bad)


def test_eval_step_equals_one_device(checks):
  """The eval step (dropless: ragged_dot, experts sharded) on every mesh."""
  cases = record(checks, "eval")["cases"]
  bad = [f"{mesh}: {c.get('error') or c}" for mesh, c in cases.items() if not c["ok"]]
  assert not bad, "\n".join(bad)
  assert len(cases) == 1 + len(MESHES)


def test_dropless_path_equals_one_device(checks):
  """capacity_factor=None trains through the grouped-matmul path under shard_map (all-gather
  exchange over `expert`): loss and gradients equal 1 device on every mesh, with
  ragged_dot and with megablox gmm (interpreted)."""
  cases = record(checks, "dropless")["cases"]
  assert len(cases) == len(MESHES) + 2
  bad = [f"{k}: {c.get('error') or c}" for k, c in cases.items() if not c["ok"]]
  assert not bad, "\n".join(bad)
  assert all(c["dropped"] == [0.0] for c in cases.values())


def test_parameter_partition_specs(checks):
  """Audit: the resolved PartitionSpec of every parameter on the (2,2,2) mesh."""
  specs = record(checks, "param_specs")["specs"]
  expected = {
      "['embed']": ["model"],                                 # vocab -> model
      "['unembed']": [None, "model"],
      "['final_norm']['scale']": [],
  }
  for b in (0, 1):
    blk = f"['blocks'][{b}]"
    expected.update({
        f"{blk}['attn']['q']": [None, "model"], f"{blk}['attn']['k']": [None, "model"],
        f"{blk}['attn']['v']": [None, "model"], f"{blk}['attn']['o']": ["model"],
        f"{blk}['attn_norm']['scale']": [], f"{blk}['ffw_norm']['scale']": []})
  expected.update({
      "['blocks'][0]['ffw']['wi']": [None, "model"],           # dense: d_ff over model
      "['blocks'][0]['ffw']['wo']": ["model"],
      "['blocks'][1]['ffw']['experts']['wi']": ["expert", None, "model"],
      "['blocks'][1]['ffw']['experts']['wo']": ["expert", "model"],
      "['blocks'][1]['ffw']['router']['w']": [],
  })
  got = {k.removesuffix(".value"): v for k, v in specs.items()}
  assert got == expected, "\n".join(
      f"{k}: got {got.get(k)}, expected {expected.get(k)}"
      for k in sorted(set(got) | set(expected)) if got.get(k) != expected.get(k))
  assert not any("data" in str(v) for v in got.values()), "parameters split over data"


def test_routed_activation_constraints(checks):
  """The routed layer splits tokens over data x expert, and its dispatch buffer
  [G, E, C, d] moves from groups to (data, expert) and back."""
  found = record(checks, "activation_specs")["constraints"]
  specs = [(tuple(c["shape"]), c["spec"]) for c in found]
  buf = (4, 8, 32, 32)                                          # G=4, E=8, C=32, d=32
  tokens = [["data", "expert"], None, None]
  assert (buf, tokens + [None]) in specs, specs
  assert (buf, ["data", "expert", None, None]) in specs, specs
  assert ((8, 16, 32), tokens) in specs, specs                 # [batch, length, embed]
  assert ((4, 32, 32), tokens) in specs, specs                 # [groups, tokens, embed]


def test_expert_mesh_step_has_all_to_all(checks):
  """The compiled train step (lowered without jax.set_mesh) exchanges the dispatch
  buffer with all-to-alls on expert meshes (2 forward, 2 backward) and needs none
  without an expert axis."""
  meshes = record(checks, "collectives")["meshes"]
  for mesh in ("(2, 2, 2)", "(1, 8, 1)", "(2, 4, 1)"):
    assert meshes[mesh]["all-to-all"] >= 2, (mesh, meshes[mesh])
  assert meshes["(8, 1, 1)"]["all-to-all"] == 0, meshes["(8, 1, 1)"]


def test_lossfree_bias_follows_the_global_load(checks):
  """The loss-free bias after two steps on an expert mesh equals 1 device's (same groups)."""
  rec = record(checks, "lossfree_bias")
  assert rec["bias_diff"] <= TOL and rec["load_diff"] <= TOL, rec
  bias = np.asarray(rec["bias"])
  assert np.any(bias != 0) and np.all(np.abs(bias) <= 2 * 0.01 + 1e-7), bias


def test_zero1_shards_optimizer_state_over_data(checks):
  meshes = record(checks, "zero1")["meshes"]
  for mesh, m in meshes.items():
    n = m["data"]
    assert m["opt_array_leaves"] > 0
    assert m["opt_leaves_without_data"] == [], (mesh, m["opt_leaves_without_data"])
    assert m["param_leaves_with_data"] == [], (mesh, m["param_leaves_with_data"])
    assert m["param_leaves_with_data_after_steps"] == [], mesh
    assert m["opt_shardings_kept_after_steps"], mesh
    # each device's optimizer shard is a slice of its own parameter shard, so the update
    # needs no other device's gradient (a data-major split of the expert axis did)
    assert m["zero1_leaves_split_over_data"] > 0, mesh
    assert m["zero1_shards_outside_param_shards"] == [], (mesh, m)
    # per-device optimizer bytes ~ 1/data of the replicated case (scalars stay replicated)
    assert abs(m["ratio"] - 1 / n) < 0.02 / n, (mesh, m["ratio"], 1 / n)
    assert m["param_bytes_zero1"] == m["param_bytes_replicated"], mesh
    # the sharded update computes the same parameters
    assert m["params_after_2_steps_diff"] <= TOL, (mesh, m["params_after_2_steps_diff"])


def test_checkpoint_restores_onto_another_mesh(checks):
  r = record(checks, "checkpoint")
  assert r["params_diff"] == 0.0 and r["opt_diff"] == 0.0 and r["other_diff"] == 0.0, r
  assert r["other_leaves"] == 1, "the HASH table is not in the checkpoint"
  assert r["step"] == 1
  assert r["restored_on_target_mesh"], "restored arrays do not carry (8,1,1) shardings"
  assert np.isfinite(r["loss_after_restore"])


@pytest.mark.parametrize("case, needles", [
    ("experts_not_divisible", ["num_experts=6", "mesh.expert=4", "multiple of the expert axis"]),
    ("batch_not_divisible", ["batch_size=6", "mesh.data x mesh.expert = 4", "multiple of 4"]),
    ("mesh_product", ["needs 4 devices but 8 are present", "= 8 or set one axis to -1"]),
    ("mesh_fill_not_dividing", ["do not divide the 8 devices"]),
    ("mesh_two_fills", ["more than one -1"]),
    ("heads_not_divisible", ["num_heads=2", "mesh.model=4"]),
])
def test_bad_input_is_a_clear_config_error(checks, case, needles):
  c = record(checks, "bad_input")["cases"][case]
  assert c["raised"] == "ConfigError", c
  for needle in needles:
    assert needle in c["message"], (needle, c["message"])


def test_minus_one_fills_the_mesh(checks):
  assert record(checks, "bad_input")["fill"] == [2, 2, 2]
