"""Expert Choice routing (routing_lm/routers/expert_choice.py) through the shared dispatch.

Training: every expert takes exactly its top C tokens of the group (a numpy reference
loop, ties to the earlier token), the dispatch places those and nothing else. Evaluation:
token choice top-K, causal and independent of the other rows of the batch.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from routing_lm import config as config_lib, routers
from routing_lm.config import ConfigError, load_module
from routing_lm.model import build as build_model, dispatch
from routing_lm.model.routed_ffw import RoutedFFW
from routing_lm.routers import expert_choice
from test_dispatch import reference, run_layer

base = load_module("configs/base.py")


def reference_choice(scores, cap, k_max):
  """For each expert: stable argsort of its column, top `cap` tokens. Then per token its
  chosen experts by score (ties: lower expert id), at most k_max, padded with E / 0."""
  t, e = scores.shape
  chosen = np.zeros((t, e), bool)
  for j in range(e):
    chosen[np.argsort(-scores[:, j], kind="stable")[:cap], j] = True
  ids, gates = np.full((t, k_max), e, np.int32), np.zeros((t, k_max), np.float32)
  for i in range(t):
    mine = sorted(np.flatnonzero(chosen[i]), key=lambda j: (-scores[i, j], j))[:k_max]
    ids[i, :len(mine)] = mine
    gates[i, :len(mine)] = scores[i, mine]
  return ids, gates, chosen


CASES = [(16, 4, 1, 2.0, 0), (32, 8, 2, 1.0, 0), (24, 6, 1, 1.25, 3), (8, 4, 4, 2.0, 0),
         (40, 8, 1, 0.5, 2)]    # (T, E, K, capacity factor, max_experts_per_token)


@pytest.mark.parametrize("t,e,k,cf,max_per_token", CASES)
@pytest.mark.parametrize("ties", [False, True])
def test_choice_equals_reference_loop_and_dispatch_places_exactly_it(t, e, k, cf,
                                                                     max_per_token, ties):
  rng = np.random.default_rng(t * e + ties)
  scores = (rng.integers(0, 4, (t, e)) / 4 if ties else rng.random((t, e))).astype(np.float32)
  cap = dispatch.capacity(t, e, k, cf)
  k_max = min(e, max_per_token or e)
  ids, gates = jax.jit(expert_choice.choose, static_argnums=(1, 2))(scores, cap, k_max)
  want_ids, want_gates, chosen = reference_choice(scores, cap, k_max)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_array_equal(gates, want_gates)
  assert (chosen.sum(0) == cap).all()                    # every expert exactly full
  # The dispatch: every expert's buffer holds its chosen tokens (all of them when a
  # token's choices fit in k_max), nothing else, and never more than C.
  p = jax.jit(dispatch.plan, static_argnums=(1, 2))(ids, e, cap)
  counts, slot_token = np.asarray(p.counts), np.asarray(p.slot_token)
  assert (counts <= cap).all() and float(p.dropped) == 0.0
  kept = np.zeros((t, e), bool)
  for i in range(t):
    kept[i, want_ids[i][want_ids[i] < e]] = True
  for j in range(e):
    assert sorted(slot_token[j][slot_token[j] < t]) == list(np.flatnonzero(kept[:, j]))
  if k_max == e:
    np.testing.assert_array_equal(kept, chosen)
  else:                               # the cap only removes a token's worst-score choices
    assert (kept <= chosen).all() and (kept.sum(1) == np.minimum(chosen.sum(1), k_max)).all()


def layer_cfg(e=4, k=1, g=1, cf=2.0, **ec):
  m = base.get_config().model
  m.update(dict(vocab_size=64, d_model=16, num_heads=2, d_ff=32, dtype="float32"))
  m.routing.update(dict(router="expert_choice", num_experts=e, top_k=k, granularity=g,
                        capacity_factor=cf))
  m.routing.expert_choice.update(ec)
  return m


@pytest.mark.parametrize("k,g,max_per_token", [(1, 1, 0), (2, 1, 0), (1, 2, 3)])
def test_routed_layer_equals_per_token_loop(k, g, max_per_token):
  """The whole layer in training: y_t = sum over the experts that chose t of score *
  expert(x_t), with C slots per expert, nothing dropped; gradients reach the router."""
  m = layer_cfg(k=k, g=g, max_experts_per_token=max_per_token)
  with nnx.use_eager_sharding(False):
    layer = RoutedFFW(m, rngs=nnx.Rngs(params=0))
  layer.router.w[...] = 3.0 * layer.router.w[...]       # sharper scores: uneven choices
  x = jax.random.normal(jax.random.key(0), (2, 12, 16))
  tok = jnp.zeros((2, 12), jnp.int32)
  y, aux, ids, w = run_layer(layer, x, tok, train=True)
  e = layer.num_experts
  assert ids.shape == (24, min(e, max_per_token or e))
  cap = dispatch.capacity(24, e, k * g, 2.0)
  assert (np.bincount(np.asarray(ids).ravel(), minlength=e + 1)[:e] <= cap).all()
  want = reference(x.reshape(24, 16), np.asarray(ids), w, layer.experts.wi[...],
                   layer.experts.wo[...], keep=np.asarray(ids) < e)
  np.testing.assert_allclose(np.asarray(y).reshape(24, 16), want, rtol=1e-5, atol=1e-5)
  assert float(aux["metrics"]["dropped"]) == 0.0
  load = np.asarray(aux["metrics"]["load"])
  assert load.sum() == pytest.approx(1.0)
  if not max_per_token:                                  # every expert exactly C tokens
    np.testing.assert_allclose(load, np.full(e, 1 / e), rtol=1e-6)
  assert float(aux["metrics"]["experts_per_token"]) == pytest.approx(
      float(np.mean(np.sum(np.asarray(ids) < e, axis=1))))

  gd, params, rest = nnx.split(layer, nnx.Param, ...)
  loss = lambda p: jnp.sum(jnp.sin(nnx.merge(gd, p, rest)(x, tok, train=True,
                                                          rng=jax.random.key(1))[0]))
  grads = jax.jit(jax.grad(loss))(params)
  assert float(jnp.abs(grads["router"]["w"][...]).sum()) > 0


def test_eval_is_token_choice_topk():
  m = layer_cfg(k=2)
  with nnx.use_eager_sharding(False):
    layer = RoutedFFW(m, rngs=nnx.Rngs(params=0))
  x = jax.random.normal(jax.random.key(0), (2, 8, 16))
  _, _, ids, w = run_layer(layer, x, jnp.zeros((2, 8), jnp.int32), train=False)
  scores = jax.nn.softmax(x.reshape(16, 16) @ layer.router.w[...], axis=-1)
  want_w, want_ids = jax.lax.top_k(scores, 2)
  np.testing.assert_array_equal(ids, want_ids)
  np.testing.assert_allclose(w, want_w, rtol=1e-6)


def logits_fn(model, train):
  """One jitted tokens [B, S] -> logits [B, S, V] (numpy), compiled once."""
  gd, state = nnx.split(model)
  f = jax.jit(lambda s, t: nnx.merge(gd, s)(t, train=train, rng=jax.random.key(3))[0])
  return lambda tokens: np.asarray(f(state, tokens))


@pytest.mark.slow
def test_eval_is_batch_independent_and_causal_training_is_not():
  m = layer_cfg(e=4, cf=1.0)
  m.update(dict(num_layers=2))
  m.routing.routing_frequency = 1.0
  model = build_model(m)
  for block in model.blocks:                            # sharp scores: choices matter
    block.ffw.router.w[...] = 5.0 * block.ffw.router.w[...]
  tokens = jax.random.randint(jax.random.key(0), (4, 12), 0, 64)
  others = tokens.at[1:].set(jax.random.randint(jax.random.key(1), (3, 12), 0, 64))
  later = tokens.at[:, 7:].set((tokens[:, 7:] + 1) % 64)   # every row's later tokens
  evaluate, train = logits_fn(model, False), logits_fn(model, True)
  ev = evaluate(tokens)
  np.testing.assert_array_equal(evaluate(others)[0], ev[0])
  ev_later = evaluate(later)
  np.testing.assert_array_equal(ev_later[:, :7], ev[:, :7])
  assert np.abs(ev_later[:, 7:] - ev[:, 7:]).max() > 1e-4
  # The training rule compares tokens across the group: the same checks would fail.
  tr = train(tokens)
  assert np.abs(train(others)[0] - tr[0]).max() > 1e-4
  assert np.abs(train(later)[:, :7] - tr[:, :7]).max() > 1e-4


def test_config_checks():
  def validate(**routing):
    c = load_module("configs/tiny.py").get_config("expert_choice")
    c.model.routing.update(routing)
    config_lib.validate(c)

  validate()                                             # tiny's capacity factor 1.25
  validate(granularity=2, top_k=2)
  with pytest.raises(ConfigError, match=r"config\.model\.routing\.capacity_factor=None is "
                     r"invalid: .*not supported"):
    validate(capacity_factor=None)
  with pytest.raises(ConfigError, match=r"max_experts_per_token=-1 is invalid"):
    validate(expert_choice=dict(max_experts_per_token=-1))
  spec = routers.RouterSpec.from_model_config(layer_cfg(cf=1.5))
  assert spec.capacity_factor == 1.5
