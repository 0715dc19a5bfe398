"""The loss-free balancing router (routing_lm/routers/lossfree.py): balance without an
auxiliary loss, a selection-only bias, its update from the global load, exact resume,
and batch-independent training forwards."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from routing_lm import routers, train
from routing_lm.checkpoint import Checkpointer
from routing_lm.config import load_module
from routing_lm.model import build as build_model
from routing_lm.routers import lossfree
from test_train import SyntheticPipeline, losses, small_config

base = load_module("configs/base.py")


def make_router(e: int, k: int = 1, **overrides) -> lossfree.LossFreeRouter:
  """A loss-free router with W = I (its logits are its input [T, E])."""
  cfg = base.get_config().model.routing.lossfree.copy_and_resolve_references()
  cfg.update(overrides)
  spec = routers.RouterSpec(e, e, k, 64, cfg)
  lossfree.LossFreeRouter.check_config(spec)
  with nnx.use_eager_sharding(False):
    r = lossfree.LossFreeRouter(spec, rngs=nnx.Rngs(params=0))
  r.w[...] = jnp.eye(e)
  return r


def call(router, x, train=True, **kw):
  gd, state = nnx.split(router)
  f = jax.jit(lambda s, x: nnx.merge(gd, s)(x, jnp.zeros(x.shape[:1], jnp.int32),
                                            train=train, rng=jax.random.key(0), **kw))
  return f(state, x)


def lossfree_config(steps: int, batch: int = 4, seq: int = 32, **routing):
  c = small_config("lossfree", experts=4, steps=steps)
  c.model.routing.capacity_factor = None               # dropless: nothing batch-dependent
  c.model.routing.lossfree.update(routing)
  c.data.update(seq_len=seq, batch_size=batch)
  return c


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
@pytest.mark.parametrize("k", [1, 2])
def test_gate_weights_carry_no_bias(score, k):
  """A large bias changes the choice of most tokens but never their weights."""
  e, t = 4, 64
  logits = jax.random.normal(jax.random.key(1), (t, e))
  r = make_router(e, k, score=score)
  bias = jnp.asarray([0.0, 0.3, -0.2, 0.6])
  r.bias[...] = bias
  out = call(r, logits)
  s = np.asarray(jax.nn.sigmoid(logits) if score == "sigmoid" else jax.nn.softmax(logits))
  ids = np.asarray(out.expert_ids)
  ref_ids = np.argsort(-(s + np.asarray(bias)), axis=1, kind="stable")[:, :k]
  np.testing.assert_array_equal(np.sort(ids, 1), np.sort(ref_ids, 1))
  assert np.mean(np.any(np.sort(ids, 1) != np.sort(np.argsort(-s, 1)[:, :k], 1), 1)) > 0.2, \
      "the bias must change the selection (else this test checks nothing)"
  chosen = np.take_along_axis(s, ids, 1)
  want = chosen if k == 1 else chosen / chosen.sum(1, keepdims=True)
  np.testing.assert_allclose(np.asarray(out.weights), want, rtol=1e-6)
  assert out.aux_losses == {}


def test_bias_step_and_sequence_balance_hand_cases():
  load = jnp.asarray([0.5, 0.25, 0.15, 0.10])
  np.testing.assert_allclose(lossfree.bias_step(jnp.zeros(4), load, 1e-3),
                             [-1e-3, 0.0, 1e-3, 1e-3])       # mean load 0.25: expert 1 stays
  # Two sequences of 2 tokens, E = 2, k = 1. Seq 1: both tokens take expert 0 with
  # scores (.6, .2), (.6, .2) -> s' = (.75, .25); f = (2, 0), P = (.75, .25): 1.5.
  # Seq 2: tokens take 0 then 1, scores (.5, .5), (.2, .6) -> P = (.375, .625), f = (1, 1): 1.
  scores = jnp.asarray([[.6, .2], [.6, .2], [.5, .5], [.2, .6]])
  ids = jnp.asarray([[0], [0], [0], [1]])
  assert float(lossfree.sequence_balance_loss(scores, ids, 2)) == pytest.approx(1.25, rel=1e-6)
  r = make_router(2, score="sigmoid", seq_balance_coef=1e-4)
  logits = jnp.log(scores / (1 - scores))                     # sigmoid(logits) = scores
  out = call(r, logits, seq_len=2)
  np.testing.assert_array_equal(out.expert_ids, ids)
  assert float(out.aux_losses["seq_balance"]) == pytest.approx(1.25e-4, rel=1e-5)
  assert "seq_balance" not in call(r, logits, train=False, seq_len=2).aux_losses


@pytest.mark.slow
def test_bias_moves_with_the_global_load_of_the_step():
  """Two routing groups: the bias update uses the load over every token of the batch
  (both groups), recomputed here from the model's own choices."""
  rate = 0.01
  c = lossfree_config(1, update_rate=rate)
  c.model.routing.num_groups = 2
  s = train.setup(c)
  state = train.init_state(s)
  batch = SyntheticPipeline().batch_at(0)

  @jax.jit
  def expert_ids(params, other, b):
    _, layers = nnx.merge(s.graphdef, params, other)(
        b["inputs"], segment_ids=b["segment_ids"], positions=b["positions"], train=True,
        rng=train.step_rng(c.train.seed, jnp.zeros((), jnp.int32)))
    return layers[0]["expert_ids"]
  ids = np.asarray(expert_ids(state["params"], state["other"], batch)).reshape(-1)
  load = np.bincount(ids, minlength=4) / ids.size
  bias = np.asarray(nnx.merge(s.graphdef, state["params"], state["other"])
                    .blocks[1].ffw.router.bias[...])             # before the step: zeros
  step = train.make_train_step(s)
  with jax.set_mesh(s.mesh):
    state, metrics = step(state, train.to_global(s, batch))
  np.testing.assert_allclose(np.asarray(metrics["layers"][0]["load"]), load, rtol=1e-6)
  new_bias = np.asarray(nnx.merge(s.graphdef, state["params"], state["other"])
                        .blocks[1].ffw.router.bias[...])
  np.testing.assert_array_equal(bias, 0.0)
  np.testing.assert_allclose(new_bias, rate * np.sign(0.25 - load), rtol=1e-6)
  assert np.any(new_bias != 0)


@pytest.mark.slow
def test_balances_without_auxiliary_loss():
  """200 steps, 512 tokens a step, E = 4: over the last 10% of steps the mean of
  max/mean load - 1 is <= 0.10 with no auxiliary loss (measured 0.05; with
  update_rate = 0 the same run gives 0.19, so a bias that does not move fails)."""
  steps = 200
  c = lossfree_config(steps, batch=8, seq=64)
  s = train.setup(c)
  state = train.init_state(s)
  step = train.make_train_step(s)
  pipe = SyntheticPipeline(8, 64)
  excess, aux = [], []
  with jax.set_mesh(s.mesh):
    for i in range(steps):
      state, metrics = step(state, train.to_global(s, pipe.batch_at(i)))
      excess.append(float(metrics["layers"][0]["max_load"]) - 1.0)
      aux.append(metrics["aux"])
  assert all(a == {} for a in aux), "no auxiliary loss"
  assert float(metrics["loss"]) < 1.0, "the model learned"
  assert np.mean(excess[-steps // 10:]) <= 0.10, np.mean(excess[-steps // 10:])
  bias = jax.tree.leaves(state["other"])
  assert len(bias) == 1 and np.ptp(np.asarray(bias[0])) > 0


def other_of(workdir: str, config) -> list[np.ndarray]:
  s = train.setup(config)
  ckpt = Checkpointer(workdir, s.config, 1, 5)
  state = ckpt.restore_latest(s.abstract_state, required=True)
  ckpt.close()
  return [np.asarray(x) for x in jax.tree.leaves(state["other"])]


@pytest.mark.slow
def test_resume_restores_the_bias_bit_for_bit(tmp_path):
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  config = lossfree_config(20, update_rate=0.01)
  train.train(config, full, pipeline=SyntheticPipeline())
  train.train(config, split, pipeline=SyntheticPipeline(), stop_at=10)
  mid = other_of(split, config)
  assert len(mid) == 1 and np.ptp(mid[0]) > 0, "the bias is in the checkpoint and moved"
  train.train(config, split, pipeline=SyntheticPipeline())
  assert losses(split) == losses(full)
  for a, b in zip(other_of(split, config), other_of(full, config), strict=True):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(other_of(full, config)[0], mid[0])


@pytest.mark.parametrize("capacity_factor, independent", [(None, True), (1.0, False)])
def test_training_forward_ignores_the_other_rows(capacity_factor, independent):
  """The last row's training-mode logits do not change when rows 0-2 change (dropless),
  with a nonzero bias. The control: at capacity 1.0 the dispatch keeps the first tokens
  of the group, so the last row's outputs then depend on the rows before it."""
  c = lossfree_config(1)
  c.model.routing.capacity_factor = capacity_factor
  model = build_model(c.model, seed=0)
  for i in model.routed:
    model.blocks[i].ffw.router.bias[...] = jnp.asarray([0.02, -0.01, 0.0, 0.03])
  batch = SyntheticPipeline().batch_at(0)
  changed = dict(batch)
  changed["inputs"] = np.concatenate(
      [np.random.default_rng(0).integers(3, 64, (3, 32), dtype=np.int32), batch["inputs"][-1:]])
  assert not np.array_equal(changed["inputs"][:-1], batch["inputs"][:-1])
  gd, state = nnx.split(model)

  @jax.jit
  def forward(state, b):
    logits, _ = nnx.merge(gd, state)(b["inputs"], segment_ids=b["segment_ids"],
                                     positions=b["positions"], train=True,
                                     rng=jax.random.key(3))
    return logits[-1]
  a = np.asarray(forward(state, batch))
  b = np.asarray(forward(state, changed))
  assert np.array_equal(a, b) == independent
