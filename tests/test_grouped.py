"""The dropless grouped-matmul path (routing_lm/model/grouped.py) on one device: megablox
gmm (Pallas interpreter) equals ragged_dot equals the per-token loop, forward and
gradient; the local-expert split that the all-gather exchange uses sums to the whole.
The same path on meshes is the `dropless` parallel check (tests/test_parallel.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from routing_lm.model import dispatch, grouped
from routing_lm.model.routed_ffw import gelu
from tests.test_dispatch import random_routing, random_weights, reference

TOL = dict(rtol=2e-5, atol=2e-5)


def case(k: int, t: int = 40, e: int = 4, d: int = 16, f: int = 24, seed: int = 3):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((t, d)).astype(np.float32)
  ids, w = random_routing(rng, t, k, e, skew=4.0)
  wi, wo = random_weights(rng, e, d, f)
  return x, ids, w, wi, wo


def layer(kernel: str):
  """x [T, d] -> [T, d] through dropless_ffw (one token group)."""
  return lambda x, ids, w, wi, wo: grouped.dropless_ffw(
      x[None], ids[None], w[None], wi, wo, gelu, kernel)[0]


@pytest.mark.parametrize("kernel", ["ragged_dot", "gmm"])
@pytest.mark.parametrize("k", [1, 2])
def test_forward_equals_the_per_token_loop(kernel, k):
  x, ids, w, wi, wo = case(k)
  y = jax.jit(layer(kernel))(x, ids, w, wi, wo)
  np.testing.assert_allclose(y, reference(x, ids, w, wi, wo), **TOL)


def test_gmm_gradients_equal_ragged_dot():
  x, ids, w, wi, wo = case(2)
  loss = lambda kernel: lambda *a: jnp.sum(layer(kernel)(*a) ** 2)
  args = (x, ids, w, wi, wo)
  g_gmm = jax.jit(jax.grad(loss("gmm"), argnums=(0, 2, 3, 4)))(*args)
  g_ref = jax.jit(jax.grad(loss("ragged_dot"), argnums=(0, 2, 3, 4)))(*args)
  for name, a, b in zip(("x", "weights", "wi", "wo"), g_gmm, g_ref):
    assert float(jnp.max(jnp.abs(b))) > 1e-3, name     # a gradient that can be wrong
    np.testing.assert_allclose(a, b, **TOL, err_msg=name)


def test_gmm_rows_past_the_groups_are_zero():
  """gmm leaves row tiles past the last group unwritten; the path must zero them."""
  rng = np.random.default_rng(0)
  lhs = rng.standard_normal((300, 16)).astype(np.float32)
  rhs = rng.standard_normal((3, 16, 8)).astype(np.float32)
  sizes = jnp.array([50, 0, 70], jnp.int32)          # 120 of 300 rows in a group
  out = jax.jit(lambda *a: grouped.grouped_matmul(*a, "gmm"))(lhs, rhs, sizes)
  np.testing.assert_allclose(out[:50], lhs[:50] @ rhs[0], **TOL)
  np.testing.assert_allclose(out[50:120], lhs[50:120] @ rhs[2], **TOL)
  assert float(jnp.max(jnp.abs(out[120:]))) == 0.0


@pytest.mark.parametrize("kernel", ["ragged_dot", "gmm"])
def test_local_expert_shares_sum_to_the_layer(kernel):
  """What each of 2 expert devices computes (its 2 experts, `first_expert` 0 and 2) sums
  to the whole layer; assignments to the other device's experts contribute nothing."""
  x, ids, w, wi, wo = map(jnp.asarray, case(2))
  ffw = lambda wi, wo: lambda xs, sizes: grouped.grouped_ffw(xs, sizes, wi, wo, gelu, kernel)
  share = lambda lo: dispatch.dropless(x, ids, w, ffw(wi[lo:lo + 2], wo[lo:lo + 2]), 2, lo)
  parts = [jax.jit(lambda lo=lo: share(lo))() for lo in (0, 2)]
  assert float(jnp.max(jnp.abs(parts[0]))) > 0 and float(jnp.max(jnp.abs(parts[1]))) > 0
  np.testing.assert_allclose(parts[0] + parts[1], reference(x, ids, w, wi, wo), **TOL)
  only_first = np.where(np.asarray(ids) < 2, 1.0, 0.0) * np.asarray(w)
  np.testing.assert_allclose(parts[0], reference(x, ids, only_first, wi, wo), **TOL)


def test_auto_kernel_is_gmm_for_tpu_only(monkeypatch):
  from routing_lm import parallel
  assert grouped.resolve_kernel("auto") == "ragged_dot"
  monkeypatch.setattr(parallel, "target_platform", lambda: "tpu")
  assert grouped.resolve_kernel("auto") == "gmm"
  assert grouped.resolve_kernel("ragged_dot") == "ragged_dot"
  with pytest.raises(ValueError, match="grouped_matmul"):
    grouped.resolve_kernel("megablox")
