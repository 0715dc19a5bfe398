"""Dispatch (model/dispatch.py) and the routed FFW (model/routed_ffw.py) against a
per-token reference loop `y_i = sum_k w_ik * expert[e_ik](x_i)`.

Every layer call is jitted (functional nnx.split / nnx.merge): eager op-by-op dispatch
would compile each primitive separately and dominate the run time.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jcore

from routing_lm.config import load_module
from routing_lm import cpu_malloc
from routing_lm.model import dispatch, grouped
from routing_lm.model.routed_ffw import Experts, RoutedFFW, gelu
from routing_lm.model.transformer import DenseFFW

base = load_module("configs/base.py")

TOL = dict(rtol=1e-5, atol=1e-5)


def model_cfg(router="topk", num_experts=4, top_k=1, granularity=1, capacity_factor=2.0,
              d_model=16, d_ff=32):
  m = base.get_config().model
  m.update(dict(vocab_size=64, d_model=d_model, num_heads=2, d_ff=d_ff, dtype="float32"))
  m.routing.update(dict(router=router, num_experts=num_experts, top_k=top_k,
                        granularity=granularity))
  m.routing.capacity_factor = capacity_factor
  return m


def build(cls, m, seed=0):
  with nnx.use_eager_sharding(False):
    return cls(m, rngs=nnx.Rngs(params=seed))


def run_layer(layer, x, tok, train, capacity_factor="config"):
  """Jitted layer call -> (y, aux, expert_ids [T, k], weights [T, k]); the routing is
  recomputed the way the layer routes (one group, same rng)."""
  gd, state = nnx.split(layer)
  b, s, d = x.shape

  @jax.jit
  def f(state, x, tok):
    mod = nnx.merge(gd, state)
    if capacity_factor != "config":
      mod.capacity_factor = capacity_factor
    y, aux = mod(x, tok, train=train, rng=jax.random.key(1))
    r = mod.route(x.reshape(1, b * s, d), tok.reshape(1, b * s), train, jax.random.key(1))
    return y, aux, r.expert_ids[0], r.weights[0]

  return f(state, x, tok)


def _apply_plan(x, ids, w, wi, wo, cap):
  p = dispatch.plan(ids, wi.shape[0], cap)
  h = jax.nn.gelu(jnp.einsum("ecd,edf->ecf", dispatch.gather_in(x, p), wi), approximate=True)
  return dispatch.gather_out(jnp.einsum("ecf,efd->ecd", h, wo), p, w), p


def apply_plan(x, ids, w, wi, wo, cap):
  """plan -> gather_in -> experts -> gather_out for an explicit routing, jitted."""
  return jax.jit(_apply_plan, static_argnums=5)(x, ids, w, wi, wo, cap)


def np_gelu(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def reference(x, ids, weights, wi, wo, keep=None):
  """The per-token loop (float64); keep[t, k] False drops that assignment."""
  x, ids, weights = np.asarray(x, np.float64), np.asarray(ids), np.asarray(weights, np.float64)
  wi, wo = np.asarray(wi, np.float64), np.asarray(wo, np.float64)
  y = np.zeros_like(x)
  for t in range(x.shape[0]):
    for k in range(ids.shape[1]):
      if keep is None or keep[t, k]:
        e = ids[t, k]
        y[t] += weights[t, k] * (np_gelu(x[t] @ wi[e]) @ wo[e])
  return y


def random_routing(rng, t, k, e, skew=1.0):
  """Distinct experts per token, positive weights; skew > 1 loads the first experts."""
  p = np.linspace(skew, 1, e) / np.linspace(skew, 1, e).sum()
  ids = np.stack([rng.choice(e, k, replace=False, p=p) for _ in range(t)]).astype(np.int32)
  return ids, rng.uniform(0.1, 1.0, (t, k)).astype(np.float32)


def random_weights(rng, e, d, f):
  return (rng.standard_normal((e, d, f)).astype(np.float32) / np.sqrt(d),
          rng.standard_normal((e, f, d)).astype(np.float32) / np.sqrt(f))


# ---- dispatch functions ----

@pytest.mark.parametrize("t,k,e", [(24, 1, 4), (30, 3, 5)])
def test_capacity_path_equals_reference_when_nothing_dropped(t, k, e):
  rng = np.random.default_rng(t + k + e)
  d, f = 8, 12
  x = rng.standard_normal((t, d)).astype(np.float32)
  ids, w = random_routing(rng, t, k, e, skew=3.0)
  wi, wo = random_weights(rng, e, d, f)
  cap = dispatch.capacity(t, e, k, 100.0)
  assert cap == t
  y, p = apply_plan(x, ids, w, wi, wo, cap)
  assert y.shape == (t, d)
  np.testing.assert_allclose(y, reference(x, ids, w, wi, wo), **TOL)
  assert float(p.dropped) == 0.0
  np.testing.assert_array_equal(p.counts, np.bincount(ids.ravel(), minlength=e))


@pytest.mark.parametrize("k", [1, 2])
def test_ragged_dropless_path_equals_reference(k):
  rng = np.random.default_rng(7)
  t, e, d, f = 20, 4, 8, 12
  x = rng.standard_normal((t, d)).astype(np.float32)
  ids, w = random_routing(rng, t, k, e, skew=4.0)
  with nnx.use_eager_sharding(False):
    ex = Experts(e, d, f, jnp.float32, rngs=nnx.Rngs(params=0))
  y = jax.jit(lambda x, ids, w: grouped.dropless_ffw(
      x[None], ids[None], w[None], ex.wi[...], ex.wo[...], gelu, "ragged_dot")[0])(x, ids, w)
  np.testing.assert_allclose(y, reference(x, ids, w, ex.wi[...], ex.wo[...]), **TOL)


def test_capacity_formula():
  assert dispatch.capacity(100, 8, 1, 1.0) == 13          # ceil(12.5)
  assert dispatch.capacity(100, 8, 2, 2.0) == 50
  assert dispatch.capacity(10, 2, 1, 5.0) == 10           # never above T
  assert dispatch.capacity(4, 64, 1, 1.0) == 1            # at least 1


def expected_keep(ids, cap):
  """The documented priority: choice-major, then token order; first `cap` per expert kept."""
  t, k = ids.shape
  keep = np.zeros((t, k), bool)
  used = {}
  for j in range(k):
    for i in range(t):
      e = int(ids[i, j])
      if used.get(e, 0) < cap:
        keep[i, j] = True
        used[e] = used.get(e, 0) + 1
  return keep


def test_over_capacity_hand_case():
  # 6 tokens, 2 choices, 3 experts, 2 slots each. First choices 0,0,0,1,1,2: token 2 is
  # expert 0's third, dropped. Second choices come after every first choice: token 0 -> e1
  # (its third: drop), token 1 -> e2 (its second: keep), tokens 2..5 -> e1, e0, e2, e0 (full).
  ids = np.array([[0, 1], [0, 2], [0, 1], [1, 0], [1, 2], [2, 0]], np.int32)
  keep = np.array([[1, 0], [1, 1], [0, 0], [1, 0], [1, 0], [1, 0]], bool)
  np.testing.assert_array_equal(expected_keep(ids, 2), keep)
  p = jax.jit(dispatch.plan, static_argnums=(1, 2))(ids, 3, 2)
  np.testing.assert_array_equal(np.asarray(p.token_slot) < 3 * 2, keep)
  assert float(p.dropped) == pytest.approx(6 / 12)
  np.testing.assert_array_equal(p.counts, [5, 4, 3])
  # Kept assignments: distinct slots of their expert, holding that token; empty slots = T.
  slot_token = np.asarray(p.slot_token).ravel()
  slots = np.asarray(p.token_slot)[keep]
  assert len(set(slots.tolist())) == keep.sum()
  for i, j in zip(*np.nonzero(keep)):
    assert slot_token[p.token_slot[i, j]] == i
    assert p.token_slot[i, j] // 2 == ids[i, j]
  np.testing.assert_array_equal(np.asarray(p.slot_token), [[0, 1], [3, 4], [5, 1]])


@pytest.mark.parametrize("t,k,e,cf", [(40, 1, 4, 0.5), (40, 2, 5, 0.6), (33, 3, 6, 1.0)])
def test_small_capacity_drops_exactly_the_documented_assignments(t, k, e, cf):
  rng = np.random.default_rng(t * k)
  d, f = 8, 12
  x = rng.standard_normal((t, d)).astype(np.float32)
  ids, w = random_routing(rng, t, k, e, skew=3.0)
  wi, wo = random_weights(rng, e, d, f)
  cap = dispatch.capacity(t, e, k, cf)
  keep = expected_keep(ids, cap)
  assert 0 < keep.sum() < t * k, "the case must drop something"
  y, p = apply_plan(x, ids, w, wi, wo, cap)
  np.testing.assert_array_equal(np.asarray(p.token_slot) < e * cap, keep)
  assert float(p.dropped) == pytest.approx(1 - keep.mean())
  np.testing.assert_allclose(y, reference(x, ids, w, wi, wo, keep), **TOL)


# ---- the routed FFW ----

def test_routed_ffw_reports_dropped_fraction():
  # hash router, one repeated token id: every token goes to one expert; C = ceil(T/E) = 8.
  layer = build(RoutedFFW, model_cfg(router="hash", num_experts=4, capacity_factor=1.0))
  x = jax.random.normal(jax.random.key(0), (2, 16, 16))
  y, aux, _, _ = run_layer(layer, x, jnp.full((2, 16), 5, jnp.int32), True)
  assert float(aux["metrics"]["dropped"]) == pytest.approx(0.75)
  # Dropped tokens output zero (residual only): the first 8 of the 32 tokens are kept.
  nonzero = np.abs(np.asarray(y).reshape(32, 16)).sum(-1) > 0
  assert nonzero.sum() == 8 and nonzero[:8].all()


@pytest.mark.parametrize("router,k", [("topk", 1), ("topk", 2), ("sbase", 1), ("hash", 2)])
def test_routed_ffw_equals_reference(router, k):
  """Train: capacity path (factor large enough to keep all); eval: dropless ragged path."""
  layer = build(RoutedFFW, model_cfg(router=router, num_experts=4, top_k=k, capacity_factor=8.0))
  x = jax.random.normal(jax.random.key(0), (2, 8, 16))
  tok = jax.random.randint(jax.random.key(2), (2, 8), 0, 64)
  for train in (True, False):
    y, aux, ids, w = run_layer(layer, x, tok, train)
    assert ids.shape == (16, k)
    assert all(len(set(row)) == k for row in np.asarray(ids).tolist())
    ref = reference(x.reshape(16, 16), ids, w, layer.experts.wi[...], layer.experts.wo[...])
    np.testing.assert_allclose(np.asarray(y).reshape(16, 16), ref, **TOL)
    assert float(aux["metrics"]["dropped"]) == 0.0


def test_ragged_and_capacity_paths_have_equal_grads():
  layer = build(RoutedFFW, model_cfg(router="topk", num_experts=4, top_k=2, capacity_factor=8.0))
  x = jax.random.normal(jax.random.key(0), (2, 8, 16))
  tok = jnp.zeros((2, 8), jnp.int32)
  gd, params, rest = nnx.split(layer, nnx.Param, ...)

  def grads(capacity_factor):
    def loss(params, x):
      mod = nnx.merge(gd, params, rest)
      mod.capacity_factor = capacity_factor
      y, _ = mod(x, tok, train=True, rng=jax.random.key(1))
      return jnp.sum(jnp.sin(y))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

  g_cap, g_rag = grads(8.0), grads(None)
  for a, b in zip(jax.tree.leaves(g_cap), jax.tree.leaves(g_rag)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert float(jnp.abs(g_cap[0]["router"]["w"][...]).sum()) > 0


@pytest.mark.parametrize("router", ["uniform", "topk"])
def test_single_expert_equals_dense_mlp(router):
  """E = 1: the routed layer is the dense FFW, in values and gradients."""
  m = model_cfg(router=router, num_experts=1, capacity_factor=1.0)
  routed, dense = build(RoutedFFW, m), build(DenseFFW, m, seed=1)
  routed.experts.wi[...] = dense.wi[...][None]
  routed.experts.wo[...] = dense.wo[...][None]
  x = jax.random.normal(jax.random.key(0), (2, 8, 16))
  tok = jnp.zeros((2, 8), jnp.int32)
  gd_r, p_r, rest_r = nnx.split(routed, nnx.Param, ...)
  gd_d, p_d = nnx.split(dense, nnx.Param)

  def f_routed(params, x):
    y, aux = nnx.merge(gd_r, params, rest_r)(x, tok, train=True, rng=jax.random.key(1))
    return jnp.sum(jnp.sin(y)), (y, aux["metrics"]["dropped"])

  def f_dense(params, x):
    y = nnx.merge(gd_d, params)(x)
    return jnp.sum(jnp.sin(y)), (y, 0.0)

  vg = lambda f, p: jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))(p, x)
  (_, (y_r, dropped)), g_r = vg(f_routed, p_r)
  (_, (y_d, _)), g_d = vg(f_dense, p_d)
  np.testing.assert_allclose(y_r, y_d, rtol=1e-5, atol=1e-6)
  assert float(dropped) == 0.0
  for name in ("wi", "wo"):
    np.testing.assert_allclose(g_r[0]["experts"][name][...][0], g_d[0][name][...],
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g_r[1], g_d[1], rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(g_d[1]).sum()) > 0


# ---- granularity ----

def param_shapes(layer):
  return {"/".join(map(str, path)): v.shape
          for path, v in nnx.to_flat_state(nnx.state(layer, nnx.Param))}


def test_granularity_one_is_the_issue2_layer():
  """G = 1: [E, d, d_ff] experts, a [d, E] router, top-K per token: the same parameters
  and outputs as a config that never sets granularity, and the reference loop."""
  e, k, d, f = 4, 2, 16, 32
  m1 = model_cfg(router="topk", num_experts=e, top_k=k, granularity=1, capacity_factor=8.0)
  m0 = base.get_config().model
  m0.update(dict(vocab_size=64, d_model=d, num_heads=2, d_ff=f, dtype="float32"))
  m0.routing.update(dict(router="topk", num_experts=e, top_k=k))
  m0.routing.capacity_factor = 8.0
  assert m0.routing.granularity == 1                        # the default: never set
  l1, l0 = build(RoutedFFW, m1), build(RoutedFFW, m0)
  shapes = param_shapes(l1)
  assert shapes == {"router/w": (d, e), "experts/wi": (e, d, f), "experts/wo": (e, f, d)}
  assert shapes == param_shapes(l0)
  for a, b in zip(jax.tree.leaves(nnx.state(l1)), jax.tree.leaves(nnx.state(l0))):
    np.testing.assert_array_equal(a, b)
  x = jax.random.normal(jax.random.key(0), (2, 8, d))
  tok = jnp.zeros((2, 8), jnp.int32)
  y1, _, ids, w = run_layer(l1, x, tok, True)
  y0, _, _, _ = run_layer(l0, x, tok, True)
  np.testing.assert_array_equal(y1, y0)
  assert ids.shape == (16, k)
  ref = reference(x.reshape(16, d), ids, w, l1.experts.wi[...], l1.experts.wo[...])
  np.testing.assert_allclose(np.asarray(y1).reshape(16, d), ref, **TOL)


@pytest.mark.parametrize("router,k,g", [("topk", 1, 4), ("topk", 2, 2), ("sbase", 1, 4),
                                        ("hash", 1, 4)])
def test_granularity_dispatch_equals_reference(router, k, g):
  """G > 1: E*G experts of width d_ff/G, K*G distinct experts per token (train and eval)."""
  e, d, f = 4, 16, 32
  m = model_cfg(router=router, num_experts=e, top_k=k, granularity=g, capacity_factor=16.0)
  layer = build(RoutedFFW, m)
  assert param_shapes(layer)["experts/wi"] == (e * g, d, f // g)
  assert param_shapes(layer)["experts/wo"] == (e * g, f // g, d)
  x = jax.random.normal(jax.random.key(0), (2, 8, d))
  tok = jax.random.randint(jax.random.key(2), (2, 8), 0, 64)
  for train in (True, False):
    y, aux, ids, w = run_layer(layer, x, tok, train)
    ids = np.asarray(ids)
    assert ids.shape == (16, k * g) and ids.max() < e * g
    assert all(len(set(row)) == k * g for row in ids.tolist())
    ref = reference(x.reshape(16, d), ids, w, layer.experts.wi[...], layer.experts.wo[...])
    np.testing.assert_allclose(np.asarray(y).reshape(16, d), ref, **TOL)
    assert float(aux["metrics"]["dropped"]) == 0.0


# ---- structure: no [T, E, C] intermediate ----

def all_shapes(jaxpr):
  """Every array shape in a jaxpr, sub-jaxprs (jit, loops, custom_vjp) included."""
  shapes = []

  def visit(j):
    j = getattr(j, "jaxpr", j)
    for v in list(j.invars) + list(j.outvars) + list(j.constvars):
      if hasattr(getattr(v, "aval", None), "shape"):
        shapes.append(tuple(v.aval.shape))
    for eqn in j.eqns:
      for v in list(eqn.invars) + list(eqn.outvars):
        if hasattr(getattr(v, "aval", None), "shape"):
          shapes.append(tuple(v.aval.shape))
      for p in eqn.params.values():
        for q in (p if isinstance(p, (list, tuple)) else [p]):
          if isinstance(q, (jcore.Jaxpr, jcore.ClosedJaxpr)):
            visit(q)

  visit(jaxpr)
  return shapes


def onehot_dispatch(x, ids, e, cap):
  """GShard-style dispatch with a [T, E, C] one-hot tensor: what the check must catch."""
  onehot = jax.nn.one_hot(ids[:, 0], e)                                  # [T, E]
  pos = ((jnp.cumsum(onehot, axis=0) - 1) * onehot).astype(jnp.int32)
  mask = onehot[:, :, None] * jax.nn.one_hot(pos, cap)                   # [T, E, C]
  return jnp.einsum("tec,td->ecd", mask, x)


@pytest.mark.parametrize("router", ["topk", "sbase"])
def test_no_tokens_by_experts_by_capacity_intermediate(router):
  """The jaxpr of the jitted forward+backward holds no array near T*E*C elements."""
  t, e, d, f = 512, 16, 8, 16
  layer = build(RoutedFFW, model_cfg(router=router, num_experts=e, capacity_factor=1.0,
                                     d_model=d, d_ff=f))
  cap = dispatch.capacity(t, e, 1, 1.0)
  limit = t * e * cap                                                      # 262,144
  gd, params, rest = nnx.split(layer, nnx.Param, ...)
  tok = jnp.zeros((1, t), jnp.int32)

  def loss(params, x):
    y, _ = nnx.merge(gd, params, rest)(x, tok, train=True, rng=jax.random.key(0))
    return jnp.sum(y ** 2)

  x = jnp.zeros((1, t, d))
  jaxpr = jax.make_jaxpr(jax.jit(jax.grad(loss, argnums=(0, 1))))(params, x)
  sizes = [math.prod(s) for s in all_shapes(jaxpr)]
  assert len(sizes) > 50                                 # the walk saw the whole program
  assert max(sizes) < limit // 4, max(sizes)             # largest: [T, E] or [E, C, d_ff]
  bad = jax.make_jaxpr(onehot_dispatch, static_argnums=(2, 3))(
      x[0], jnp.zeros((t, 1), jnp.int32), e, cap)
  assert max(math.prod(s) for s in all_shapes(bad)) >= limit


def test_experts_one_group_equals_several_groups():
  """Experts on one group (its unit leading dim dropped for the matmuls) and on several
  groups agree in values and in every gradient."""
  with nnx.use_eager_sharding(False):
    ex = Experts(4, 8, 12, jnp.float32, rngs=nnx.Rngs(params=0))
  gd, params = nnx.split(ex)
  x = jax.random.normal(jax.random.key(0), (1, 4, 5, 8))

  def run(x):
    f = lambda p, x: jnp.sum(jnp.sin(nnx.merge(gd, p)(x)))
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x)

  one = run(x)
  grouped = run(jnp.concatenate([x, 2 * x]))      # group 0 is x itself
  np.testing.assert_allclose(grouped[1][1][0], one[1][1][0], rtol=1e-5, atol=1e-6)
  wi = np.asarray(params["wi"][...])
  h = jax.nn.gelu(np.einsum("ecd,edf->ecf", x[0], wi), approximate=True)
  expected = np.einsum("ecf,efd->ecd", h, np.asarray(params["wo"][...]))
  np.testing.assert_allclose(nnx.merge(gd, params)(x)[0], expected, rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(one[1][0]["wi"][...]))) > 0      # gradients not all zero


def test_model_program_ignores_the_host_environment(monkeypatch):
  """The model runs one program whatever the environment: the routed FFW's jaxpr is the
  same with and without the CPU malloc settings (routing_lm.cpu_malloc)."""
  m = base.get_config().model
  m.d_model, m.d_ff, m.routing.num_experts = 16, 32, 4
  with nnx.use_eager_sharding(False):
    layer = RoutedFFW(m, rngs=nnx.Rngs(params=0))
  gd, params, rest = nnx.split(layer, nnx.Param, ...)
  x = jnp.ones((1, 8, 16))

  def jaxpr():
    f = lambda p, x: jnp.sum(nnx.merge(gd, p, rest)(x, jnp.zeros((1, 8), jnp.int32), train=True,
                                                     rng=jax.random.key(0))[0])
    return str(jax.make_jaxpr(jax.grad(f))(params, x))

  monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
  plain = jaxpr()
  monkeypatch.setenv("GLIBC_TUNABLES", ":".join(cpu_malloc.TUNABLES))
  assert cpu_malloc.active()
  assert jaxpr() == plain


def test_gather_transposes_equal_autodiff():
  """The hand-written VJPs of gather_in / gather_out equal autodiff of the plain gathers,
  with dropped assignments and empty slots present."""
  rng = np.random.default_rng(5)
  t, k, e, d = 40, 2, 5, 6
  ids, w = random_routing(rng, t, k, e, skew=4.0)
  cap = dispatch.capacity(t, e, k, 0.8)
  p = jax.jit(dispatch.plan, static_argnums=(1, 2))(ids, e, cap)
  assert float(p.dropped) > 0 and bool((p.slot_token == t).any())
  x = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((e, cap, d)), jnp.float32)
  pad = lambda a: jnp.concatenate([a, jnp.zeros((1, d))])
  plain_in = lambda x: pad(x)[p.slot_token]
  plain_out = lambda y, w: jnp.einsum("tkd,tk->td", pad(y.reshape(-1, d))[p.token_slot], w)
  ct_in = jnp.asarray(rng.standard_normal((e, cap, d)), jnp.float32)
  ct_out = jnp.asarray(rng.standard_normal((t, d)), jnp.float32)
  for ours, plain, args, ct in [
      (lambda x: dispatch.gather_in(x, p), plain_in, (x,), ct_in),
      (lambda y, w: dispatch.gather_out(y, p, w), plain_out, (y, w), ct_out)]:
    out_a, vjp_a = jax.vjp(jax.jit(ours), *args)
    out_b, vjp_b = jax.vjp(plain, *args)
    np.testing.assert_allclose(out_a, out_b, rtol=1e-6, atol=1e-6)
    for ga, gb in zip(vjp_a(ct), vjp_b(ct)):
      np.testing.assert_allclose(ga, gb, rtol=1e-5, atol=1e-6)
