"""Routers (routing_lm/routers/*): S-BASE, HASH, RL-R, top-k and the shared metrics."""
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import scipy.optimize
import scipy.special
from flax import nnx

from routing_lm.config import load_module
from routing_lm import routers
from routing_lm.model import build as build_model
from routing_lm.routers import hash as hash_router
from routing_lm.routers import sbase

base = load_module("configs/base.py")

SB = base.get_config().model.routing.sbase          # temperature 0.1, 30 iters, 8 rounds


def make_router(name, d, e, k=1, vocab=64, seed=0, **overrides):
  routing = base.get_config().model.routing
  cfg = (routing[name].copy_and_resolve_references() if name in routing
         else ml_collections.ConfigDict())
  cfg.update(overrides)
  spec = routers.RouterSpec(d, e, k, vocab, cfg, capacity_factor=2.0)
  routers.get(name).check_config(spec)
  with nnx.use_eager_sharding(False):
    return routers.get(name)(spec, rngs=nnx.Rngs(params=seed))


def identity_router(name, e, k=1, **overrides):
  """A router with W = I, so its logits are its input x [T, E]."""
  r = make_router(name, e, e, k, **overrides)
  r.w[...] = jnp.eye(e)
  return r


def call(router, x, token_ids=None, train=True, rng=jax.random.key(0)):
  """Jitted router call (functional split/merge)."""
  gd, state = nnx.split(router)
  token_ids = jnp.zeros(x.shape[:1], jnp.int32) if token_ids is None else token_ids
  f = jax.jit(lambda s, x, i, r: nnx.merge(gd, s)(x, i, train=train, rng=r))
  return f(state, x, token_ids, rng)


# ---- S-BASE ----

@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def sbase_assign(logits, temperature, iters, rounds):
  balanced, _ = sbase.sinkhorn(logits / temperature, iters)
  return sbase.balanced_assignment(balanced, rounds)


def optimal_score(logits):
  """Optimum of the balanced assignment (each expert T/E tokens) by linear_sum_assignment."""
  t, e = logits.shape
  cost = -np.repeat(np.asarray(logits, np.float64), t // e, axis=1)     # [T, T] expert slots
  rows, cols = scipy.optimize.linear_sum_assignment(cost)
  return -cost[rows, cols].sum()


CASES = [(32, 4), (64, 8), (128, 16), (256, 8), (96, 12)] * 2     # 10 cases, 5 shapes


def test_sbase_balanced_and_near_optimal():
  """Training assignment with the base config: every expert gets exactly T/E tokens, and
  the total router score is within 1% of the optimal balanced assignment on every case
  (mean within 0.5%).

  Sinkhorn (temperature 0.1, 30 iterations) gives near-optimal dual prices; the greedy
  rounding alone loses 1-2% on some cases (0.98 worst over 30 random N(0, 1) cases), the
  pairwise-swap rounds that follow it bring every case above 0.998 (mean 0.9998).
  """
  rng = np.random.default_rng(0)
  ratios = []
  for t, e in CASES:
    logits = rng.standard_normal((t, e)).astype(np.float32)
    ids = np.asarray(sbase_assign(logits, SB.temperature, SB.sinkhorn_iters, SB.balance_rounds))
    np.testing.assert_array_equal(np.bincount(ids, minlength=e), t // e)
    ratios.append(logits[np.arange(t), ids].sum() / optimal_score(logits))
  assert min(ratios) > 0.99, ratios
  assert np.mean(ratios) > 0.995, ratios
  assert max(ratios) <= 1 + 1e-5, ratios                   # the optimum is an upper bound


def test_sbase_router_train_path_matches_and_balances_uneven():
  """The router's training path is sinkhorn + balanced_assignment; loads are T/E +- 1
  when E does not divide T, also on skewed logits where argmax would be very unbalanced."""
  rng = np.random.default_rng(1)
  for t, e in [(100, 8), (37, 9)]:
    logits = (rng.standard_normal((t, e)) + 3 * rng.standard_normal(e)).astype(np.float32)
    r = identity_router("sbase", e)
    out = call(r, jnp.asarray(logits))
    ids = np.asarray(out.expert_ids[:, 0])
    np.testing.assert_array_equal(
        ids, sbase_assign(logits, SB.temperature, SB.sinkhorn_iters, SB.balance_rounds))
    load = np.bincount(ids, minlength=e)
    assert load.min() >= t // e and load.max() <= -(-t // e), load
    assert np.bincount(logits.argmax(1), minlength=e).max() > 2 * t / e    # skewed input
    np.testing.assert_allclose(out.weights[:, 0], jax.nn.sigmoid(logits[np.arange(t), ids]),
                               rtol=1e-6)
    assert float(out.metrics["sinkhorn_error"]) < 0.1


def logsumexp_sinkhorn(log_k, num_iters):
  """Reference: log-space Sinkhorn, two logsumexps over [T, E] per iteration."""
  t, e = log_k.shape
  u, v = np.zeros(t), np.zeros(e)
  for _ in range(num_iters):
    u = -np.log(t) - scipy.special.logsumexp(log_k + v[None, :], axis=1)
    v = -np.log(e) - scipy.special.logsumexp(log_k + u[:, None], axis=0)
  return log_k + u[:, None] + v[None, :]


@pytest.mark.parametrize("t, e, spread, iters", [
    (256, 8, 1, 30), (1024, 64, 3, 10), (1024, 64, 3, 30),
    (2048, 512, 10, 30),        # logits ~1000 temperatures apart: needs the re-forming
    (1000, 7, 30, 60), (64, 8, 1e4, 7)])
def test_sinkhorn_equals_logsumexp_iterations(t, e, spread, iters):
  """The scaling-form Sinkhorn (matrix-vector products, kernel re-formed every
  ABSORB_EVERY iterations) reproduces log-space iterations run in float64, for logits up
  to 1e5 temperatures apart, and its column sums are the last update's 1/E."""
  rng = np.random.default_rng(e)
  logits = spread * (rng.standard_normal((t, e)) + 3 * rng.standard_normal(e))
  log_k = (logits / SB.temperature).astype(np.float32)
  ours, row_error = jax.jit(sbase.sinkhorn, static_argnums=1)(jnp.asarray(log_k), iters)
  ref = logsumexp_sinkhorn(log_k.astype(np.float64), iters)
  p, p_ref = np.exp(np.asarray(ours, np.float64)), np.exp(ref)
  assert np.all(np.isfinite(np.asarray(ours)))
  assert np.max(np.abs(p - p_ref)) * t < 0.03                 # per token mass: 1 = all of it
  assert np.mean(np.argmax(p, 1) == np.argmax(p_ref, 1)) > 0.998
  np.testing.assert_allclose(p.sum(0) * e, 1.0, atol=1e-4)
  ref_error = np.max(np.abs(p_ref.sum(1) * t - 1.0))
  assert abs(float(row_error) - ref_error) <= 0.01 * ref_error + 1e-4


def test_greedy_rounds_on_the_unplaced_equal_rounds_on_all():
  """Rounds after most tokens are placed run on the unplaced tokens alone: the result
  equals every round on all tokens, also when many stay unplaced (skewed scores)."""
  rng = np.random.default_rng(4)
  unplaced_after_one = []
  for t, e, skew in [(4096, 64, 0.0), (4096, 64, 3.0), (1000, 7, 5.0)]:
    logits = (rng.standard_normal((t, e)) + skew * rng.standard_normal(e)) / SB.temperature
    balanced, _ = sbase.sinkhorn(jnp.asarray(logits, jnp.float32), 10)
    start = (jnp.full((t,), -1, jnp.int32), jnp.full((e,), t // e))

    def all_tokens(b):
      return jax.lax.fori_loop(0, 8, lambda _, s: sbase._greedy_round(b, *s), start)

    ours = jax.jit(lambda b: sbase._greedy_rounds(b, *start, 8))(balanced)
    ref = jax.jit(all_tokens)(balanced)
    np.testing.assert_array_equal(ours[0], ref[0])
    np.testing.assert_array_equal(ours[1], ref[1])
    after_one = jax.jit(lambda b: sbase._greedy_round(b, *start))(balanced)[0]
    unplaced_after_one.append(float(jnp.mean(after_one < 0)))
  # Both paths ran: compaction right after round 1, and further rounds on all tokens.
  assert 0 < min(unplaced_after_one) < 1 / 8 < max(unplaced_after_one), unplaced_after_one


def test_swap_rounds_keep_loads_and_never_lose_score():
  rng = np.random.default_rng(6)
  for t, e in [(512, 8), (1003, 16)]:
    scores = jnp.asarray(rng.standard_normal((t, e)), jnp.float32)
    ids = jnp.asarray(rng.permutation(np.arange(t) % e), jnp.int32)   # balanced, poor
    total = lambda i: float(jnp.sum(jnp.take_along_axis(scores, i[:, None], 1)))
    swapped = [jax.jit(lambda s, i, n=n: sbase._swap_rounds(s, i, n))(scores, ids)
               for n in range(4)]
    for a, b in zip(swapped, swapped[1:]):
      np.testing.assert_array_equal(np.bincount(b, minlength=e), np.bincount(ids, minlength=e))
      assert total(b) >= total(a) - 1e-3
    assert total(swapped[-1]) > total(ids) + 1.0                  # swaps happened


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_sbase_finite_for_huge_logits(scale):
  rng = np.random.default_rng(2)
  t, e = 64, 8
  x = jnp.asarray(scale * np.sign(rng.standard_normal((t, e))), jnp.float32)
  r = identity_router("sbase", e)
  gd, params, rest = nnx.split(r, nnx.Param, ...)

  def loss(params, x):
    out = nnx.merge(gd, params, rest)(x, jnp.zeros(t, jnp.int32), train=True,
                                      rng=jax.random.key(0))
    return jnp.sum(out.weights), out

  (_, out), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)
  for a in jax.tree.leaves((out, g)):
    assert np.all(np.isfinite(np.asarray(a, np.float64))), a
  ids = np.asarray(out.expert_ids[:, 0])
  assert ids.min() >= 0 and ids.max() < e
  np.testing.assert_array_equal(np.bincount(ids, minlength=e), t // e)


def test_sbase_eval_is_plain_topk():
  rng = np.random.default_rng(3)
  t, e = 50, 8
  logits = jnp.asarray(rng.standard_normal((t, e)) + 3 * rng.standard_normal(e), jnp.float32)
  out = call(identity_router("sbase", e), logits, train=False)
  np.testing.assert_array_equal(out.expert_ids[:, 0], jnp.argmax(logits, 1))
  np.testing.assert_allclose(out.weights[:, 0], jax.nn.sigmoid(jnp.max(logits, 1)), rtol=1e-6)
  out2 = call(identity_router("sbase", e, k=2), logits, train=False)
  top_p, top_i = jax.lax.top_k(jax.nn.softmax(logits), 2)
  np.testing.assert_array_equal(out2.expert_ids, top_i)
  np.testing.assert_allclose(out2.weights, top_p, rtol=1e-6)
  assert "sinkhorn_error" not in out.metrics


# ---- HASH ----

@pytest.mark.parametrize("method", ["balanced", "random"])
def test_hash_is_fixed_and_balanced_over_vocab(method):
  vocab, e, d = 32_000, 8, 4
  r1 = make_router("hash", d, e, vocab=vocab, method=method)
  r2 = make_router("hash", d, e, vocab=vocab, method=method, seed=123)    # params seed unused
  table = np.asarray(r1.table[...])[:, 0]
  np.testing.assert_array_equal(table, np.asarray(r2.table[...])[:, 0])  # rebuilt: same map
  load = np.bincount(table, minlength=e) / vocab
  assert np.all(np.abs(load * e - 1) < 0.1), load
  if method == "balanced":
    assert np.ptp(np.bincount(table, minlength=e)) <= 1
  # A token id always goes to the same expert: across positions, calls and train/eval.
  rng = np.random.default_rng(0)
  tok = jnp.asarray(np.concatenate([rng.integers(0, vocab, 100), [7] * 20]), jnp.int32)
  x = jnp.asarray(rng.standard_normal((120, d)), jnp.float32)
  outs = [call(r1, x, tok, train=tr, rng=jax.random.key(s)) for tr, s in [(True, 0), (False, 1)]]
  outs.append(call(r2, -x, tok, train=True, rng=jax.random.key(2)))
  for out in outs:
    np.testing.assert_array_equal(out.expert_ids[:, 0], table[np.asarray(tok)])
    np.testing.assert_array_equal(out.weights, 1.0)
  assert len(set(np.asarray(outs[0].expert_ids[100:, 0]).tolist())) == 1
  # A different hash seed gives a different map.
  other = hash_router.make_table(vocab, e, 1, method, seed=43)[:, 0]
  assert np.mean(other != table) > 0.5


def test_hash_same_in_rebuilt_model():
  m = base.get_config().model
  m.update(dict(vocab_size=128, d_model=16, num_layers=2, num_heads=2, d_ff=32,
                dtype="float32"))
  m.routing.update(dict(router="hash", num_experts=4, routing_frequency=1.0))
  t1 = build_model(m, seed=0).blocks[0].ffw.router.table[...]
  t2 = build_model(m, seed=5).blocks[0].ffw.router.table[...]
  np.testing.assert_array_equal(t1, t2)


# ---- RL-R ----

def test_rlr_learns_the_better_expert():
  """Two token classes; expert 2 is clearly best for class A (loss 0 vs 1), class B is
  indifferent. REINFORCE with reward = -loss routes class A to expert 2 with p > 0.9."""
  d, e, t = 8, 4, 64
  rng = np.random.default_rng(0)
  cls = (np.arange(t) % 2).astype(bool)                                  # True = class A
  centres = rng.standard_normal((2, d)) * 2
  x = jnp.asarray(np.where(cls[:, None], centres[0], centres[1])
                  + 0.3 * rng.standard_normal((t, d)), jnp.float32)
  expert_loss = np.ones((t, e), np.float32)
  expert_loss[cls, 2] = 0.0
  expert_loss[~cls] = 0.5
  expert_loss = jnp.asarray(expert_loss)
  router = make_router("rlr", d, e)
  gd, params, rest = nnx.split(router, nnx.Param, ...)
  opt = optax.adam(0.01)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, key):
    def loss(params):
      out = nnx.merge(gd, params, rest)(x, jnp.zeros(t, jnp.int32), train=True, rng=key)
      rewards = -jnp.take_along_axis(expert_loss, out.expert_ids, 1)[:, 0]
      return routers.reinforce_surrogate(out.log_probs, rewards)
    g = jax.grad(loss)(params)
    updates, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  def p_a_to_2(params):
    logits = x @ params["w"][...]
    return float(jax.nn.softmax(logits)[cls, 2].mean())

  start = p_a_to_2(params)
  assert start < 0.5
  for i in range(300):
    params, opt_state = step(params, opt_state, jax.random.key(i))
    if p_a_to_2(params) > 0.9:
      break
  assert p_a_to_2(params) > 0.9, (i, p_a_to_2(params))      # about 20 steps needed


def test_rlr_router_gets_no_gradient_from_the_lm_loss():
  m = base.get_config().model
  m.update(dict(vocab_size=64, d_model=16, num_layers=2, num_heads=2, d_ff=32,
                dtype="float32"))
  m.routing.update(dict(router="rlr", num_experts=4, routing_frequency=1.0))
  model = build_model(m)
  gd, params, rest = nnx.split(model, nnx.Param, ...)
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, 64)

  def nll(params):
    logits, aux = nnx.merge(gd, params, rest)(tokens[:, :-1], train=True,
                                               rng=jax.random.key(1))
    assert len(aux) == 2 and aux[0]["log_probs"].shape == (2, 15, 1)
    lp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1))

  grads = jax.jit(jax.grad(nll))(params)
  flat = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}
  router = [k for k in flat if k.endswith("router/w")]
  assert len(router) == 2
  for k in router:
    assert np.all(flat[k] == 0.0), k
  others = [k for k in flat if k not in router]
  assert any("experts/wi" in k for k in others)
  for k in others:
    assert np.abs(flat[k]).sum() > 0, k


def test_reinforce_surrogate_expected_gradient_is_the_policy_gradient():
  """On a policy over 3 tokens x 3 experts, sum over all 27 joint samples of
  p(sample) * grad surrogate equals the exact gradient of -mean_t E[r_t]: the
  leave-one-out baseline does not bias it. A baseline that includes the token's own
  reward (the plain batch mean) would scale it by (1 - 1/T): the check can tell."""
  t, e = 3, 3
  rng = np.random.default_rng(0)
  theta = jnp.asarray(rng.standard_normal((t, e)), jnp.float32)
  reward = jnp.asarray(rng.standard_normal((t, e)) + 2.0, jnp.float32)    # r(token, expert)

  def exact(theta):
    return -jnp.mean(jnp.sum(jax.nn.softmax(theta) * reward, axis=1))

  def sample_terms(theta, sample):
    lp = jnp.take_along_axis(jax.nn.log_softmax(theta), sample[:, None], 1)
    return lp, jnp.take_along_axis(reward, sample[:, None], 1)[:, 0]

  def surrogate(theta, sample):
    return routers.reinforce_surrogate(*sample_terms(theta, sample))

  def mean_baseline(theta, sample):
    lp, r = sample_terms(theta, sample)
    return -jnp.mean(jax.lax.stop_gradient(r - jnp.mean(r)) * lp[:, 0])

  samples = jnp.asarray(list(itertools.product(range(e), repeat=t)), jnp.int32)  # [27, 3]
  pi = jax.nn.softmax(theta)
  prob = jnp.prod(pi[jnp.arange(t)[None], samples], axis=1)
  assert float(prob.sum()) == pytest.approx(1.0, abs=1e-5)
  expect = lambda f: jnp.einsum("s,sij->ij", prob,
                                jax.vmap(jax.grad(f), in_axes=(None, 0))(theta, samples))
  exact_grad = jax.grad(exact)(theta)
  assert float(jnp.abs(exact_grad).max()) > 0.01
  np.testing.assert_allclose(expect(surrogate), exact_grad, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(expect(mean_baseline), (1 - 1 / t) * exact_grad,
                             rtol=1e-4, atol=1e-6)


# ---- top-k ----

def test_topk_balance_and_z_loss_hand_case():
  """Logits rows (ln 3, 0) x3 and (0, ln 3): probs (.75, .25) x3, (.25, .75).
  Top-1 picks 0, 0, 0, 1: f = (.75, .25); mean probs p = (.625, .375);
  balance = E sum f p = 2 (.75 * .625 + .25 * .375) = 1.125.
  Every row's logsumexp is ln 4: z = (ln 4)^2."""
  l3 = math.log(3.0)
  logits = jnp.asarray([[l3, 0.0], [l3, 0.0], [l3, 0.0], [0.0, l3]], jnp.float32)
  r = identity_router("topk", 2, balance_coef=0.01, z_loss_coef=0.001)
  out = call(r, logits)
  np.testing.assert_array_equal(out.expert_ids[:, 0], [0, 0, 0, 1])
  np.testing.assert_allclose(out.weights[:, 0], 0.75, rtol=1e-6)
  assert float(routers.topk.balance_loss(jax.nn.softmax(logits), out.expert_ids)) == \
      pytest.approx(1.125, rel=1e-6)
  assert float(routers.topk.z_loss(logits)) == pytest.approx(math.log(4) ** 2, rel=1e-6)
  assert float(out.aux_losses["balance"]) == pytest.approx(0.01 * 1.125, rel=1e-6)
  assert float(out.aux_losses["z_loss"]) == pytest.approx(0.001 * math.log(4) ** 2, rel=1e-6)
  # Metrics: load fractions sum to 1; entropy of (.75, .25) per token; max_load = .75 * E.
  np.testing.assert_allclose(out.metrics["load"], [0.75, 0.25])
  h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
  assert float(out.metrics["entropy"]) == pytest.approx(h, rel=1e-5)
  assert float(out.metrics["max_load"]) == pytest.approx(1.5)
  assert float(out.metrics["dead_experts"]) == 0.0


def test_topk_balance_is_one_when_uniform_and_topk2():
  e = 4
  logits = jnp.zeros((8, e)) + jnp.asarray([[0.1, 0.0, 0.0, 0.0], [0.0, 0.1, 0.0, 0.0],
                                            [0.0, 0.0, 0.1, 0.0], [0.0, 0.0, 0.0, 0.1]] * 2)
  out = call(identity_router("topk", e, k=2), logits)
  assert out.expert_ids.shape == (8, 2)
  assert np.all(np.asarray(out.expert_ids[:, 0]) != np.asarray(out.expert_ids[:, 1]))
  np.testing.assert_allclose(out.metrics["load"].sum(), 1.0, rtol=1e-6)
  p = jax.nn.softmax(logits)
  f = np.bincount(np.asarray(out.expert_ids).ravel(), minlength=e) / 16
  assert float(out.aux_losses["balance"]) == pytest.approx(
      0.01 * e * float(np.sum(f * np.asarray(p.mean(0)))), rel=1e-6)


@pytest.mark.parametrize("name", sorted(routers.REGISTRY))
def test_metrics_every_router(name):
  t, d, e = 64, 8, 4
  x = jax.random.normal(jax.random.key(0), (t, d))
  tok = jnp.arange(t, dtype=jnp.int32)
  r = make_router(name, d, e, vocab=64)
  # Expert choice picks a variable number of experts per token in training; evaluation
  # (top-k of the same scores) has the token-choice shape every router shares.
  out = call(r, x, tok, train=name != "expert_choice")
  load = np.asarray(out.metrics["load"])
  assert load.shape == (e,)
  assert load.sum() == pytest.approx(1.0, abs=1e-6)
  np.testing.assert_allclose(load, np.bincount(np.asarray(out.expert_ids).ravel(), minlength=e) / t)
  assert float(out.metrics["max_load"]) == pytest.approx(load.max() * e)
  ent = float(out.metrics["entropy"])
  assert 0.0 <= ent <= math.log(e) + 1e-6
  if name in ("hash", "uniform"):
    assert ent == 0.0
  else:
    assert ent > 0.5                                     # small-init router: near uniform
  assert out.expert_ids.dtype == jnp.int32 and out.weights.shape == (t, 1)


def test_agreement_is_the_share_routed_as_evaluation_would():
  """S-BASE's `agreement`: the share of tokens whose balanced (training) expert is the
  top-1 of the raw scores. Scores that already balance agree fully; scores that all
  prefer expert 0 can agree for at most 1/E of the tokens."""
  e, t = 4, 64
  balanced = jnp.tile(jnp.eye(e) * 5.0, (t // e, 1))                  # token t prefers t % e
  out = call(identity_router("sbase", e), balanced)
  assert float(out.metrics["agreement"]) == 1.0
  skewed = balanced.at[:, 0].add(10.0)                                 # everyone prefers 0
  out = call(identity_router("sbase", e), skewed)
  ids = np.asarray(out.expert_ids[:, 0])
  assert float(out.metrics["agreement"]) == pytest.approx(np.mean(ids == 0)) == 1 / e
  assert "agreement" not in call(identity_router("sbase", e), balanced, train=False).metrics


def test_frequency_hash_balances_token_counts():
  """`frequency` HASH (Roller et al.): each expert's share of the training tokens is
  within max(count)/total of 1/E (the longest-processing-time bound; 1e-3 absolute
  here), on Zipf-like counts where the id-balanced table is 0.05 off."""
  vocab, e = 2048, 8
  counts = (1e6 / np.arange(1, vocab + 1) ** 0.8).astype(np.int64)
  counts = counts[np.random.default_rng(0).permutation(vocab)]        # ids not sorted by count
  total = counts.sum()
  tol = counts.max() / total
  for k in (1, 2):
    table = hash_router.frequency_table(counts, e, k, seed=42)
    assert table.shape == (vocab, k) and table.dtype == np.int32
    share = np.bincount(table[:, 0], weights=counts, minlength=e) / total
    assert np.all(np.abs(share - 1 / e) <= min(tol, 1e-3)), share
    assert np.all(table[:, 1:] == (table[:, :1] + np.arange(1, k)) % e)
  by_ids = hash_router.make_table(vocab, e, 1, "balanced", 42)[:, 0]
  share_ids = np.bincount(by_ids, weights=counts, minlength=e) / total
  assert np.max(np.abs(share_ids - 1 / e)) > 0.04                    # what `balanced` gives
  router = make_router("hash", 8, e, vocab=vocab, method="frequency")
  assert router.wants_token_counts
  np.testing.assert_array_equal(np.asarray(router.table[...]), hash_router.make_table(
      vocab, e, 1, "balanced", 42))                                   # until fitted
  router.fit_to_data(counts)
  np.testing.assert_array_equal(np.asarray(router.table[...]),
                                hash_router.frequency_table(counts, e, 1, 42))
