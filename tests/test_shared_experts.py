"""Shared experts (`model.routing.shared_experts`, DeepSeekMoE): counts and the dense limit.

A routed layer with S shared experts of width d_ff/G adds a dense FFW of width S*d_ff/G
to its routed output. With S = G (width d_ff) and the routed part switched off (every
routed expert's output projection zero), the model is the dense model (E = 1) with the
same weights: logits and every gradient equal.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from routing_lm import config as config_lib, sweep
from routing_lm.config import ConfigError, load_module
from routing_lm.model import build, counting
from test_model import categorise, flat_params, small_cfg


def test_counts_hand_computed():
  # d = 32, L = 4, d_ff = 128, E = 4, K = 1, R = 0.5 (2 routed layers), G = 2, S = 3, seq 16.
  # Dense: attention 4 d^2 = 4096 + FFW 2 d d_ff = 8192 per block -> 4 * 12288 = 49152.
  # Shared: 2 routed layers * 3 experts * 2 d (d_ff / G) = 2 * 3 * 2 * 32 * 64 = 24576.
  # N = 49152 + 24576 = 73728 (a token of a routed layer uses 1 + S/G FFWs' worth at K=1).
  # Router: 2 * E G d = 2 * 8 * 32 = 512. Routed experts beyond one FFW: 2 * 3 * 8192 = 49152.
  # P = 73728 + 49152 + 512 = 123392; total_nonemb = 122880; active (K = 1) = N.
  # F = 2 * 73728 + 2 * 512 + 2 L S d (= 4096) = 152576; train 6 * 73728 + 14 * 512 = 449536.
  c = counting.count(small_cfg(granularity=2, shared_experts=3), seq_len=16)
  assert c.shared_params == 24576
  assert c.n_params == 73728
  assert c.router_params == 512
  assert c.total_params == 123392
  assert c.total_params_nonemb == 122880
  assert c.active_params_nonemb == 73728
  assert c.flops_per_token == 152576
  assert c.train_flops_per_token == 449536
  # K = 2 (G = 2: 4 of 8 routed experts per token): active adds one routed FFW per layer.
  c2 = counting.count(small_cfg(granularity=2, top_k=2, shared_experts=3), seq_len=16)
  assert c2.active_params_nonemb == 73728 + 2 * 8192
  assert c2.train_flops_per_token == 6 * (73728 + 2 * 8192) + 14 * 512
  # S = 0 is the layer without shared experts; E = 1 has no routed layer, so none.
  assert counting.count(small_cfg(granularity=2), seq_len=16).n_params == 49152
  assert counting.count(small_cfg(num_experts=1, shared_experts=3), seq_len=16).n_params == 49152


@pytest.mark.parametrize("routing", [dict(granularity=2, shared_experts=3),
                                     dict(shared_experts=1, top_k=2, router="expert_choice")])
def test_counts_equal_built_model(routing):
  m = small_cfg(**routing)
  c = counting.count(m, seq_len=16)
  model = build(m)
  got = categorise(model)
  assert got["body"] == c.total_params_nonemb
  assert got["router"] == c.router_params
  shared = sum(v.size for p, v in flat_params(model).items() if "/shared/" in p)
  assert shared == c.shared_params > 0


def test_results_row_carries_the_counts():
  """Both laws' columns come from the counts (sweep.result_row reads summary.json)."""
  c = load_module("configs/tiny.py").get_config("topk")
  c.model.routing.shared_experts = 2
  counts = counting.count(c.model, c.data.seq_len)
  summary = {"config": c.to_dict(), **counts.as_dict(), "train_flops": 7.0}
  row = sweep.result_row("p", summary)
  for key in ("n_params", "total_params", "active_params_nonemb", "total_params_nonemb",
              "shared_params"):
    assert row[key] == getattr(counts, key)
  assert row["shared_params"] == 2 * 2 * c.model.d_model * c.model.d_ff * len(
      range(1, c.model.num_layers, 2))


def params_and_grads(model, tokens):
  gd, params, rest = nnx.split(model, nnx.Param, ...)

  def loss(p):
    logits, _ = nnx.merge(gd, p, rest)(tokens, train=True, rng=jax.random.key(2))
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  flat = {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(grads)}
  return np.asarray(logits), flat


@pytest.mark.slow
@pytest.mark.parametrize("router", ["topk", "expert_choice"])
def test_routed_part_off_equals_dense_model(router):
  """S = G = 2 shared experts (width d_ff) + routed experts whose wo is zero == the dense
  model (E = 1) with the same weights, in logits and in every gradient."""
  dense_cfg = small_cfg(num_experts=1)
  routed_cfg = small_cfg(router=router, num_experts=4, granularity=2, shared_experts=2,
                         routing_frequency=1.0)
  dense_cfg.num_layers = routed_cfg.num_layers = 2
  dense, routed = build(dense_cfg, seed=0), build(routed_cfg, seed=1)
  dense_params = flat_params(dense)
  state = nnx.state(routed, nnx.Param)
  mapped = 0
  for path, var in nnx.to_flat_state(state):
    name = "/".join(map(str, path))
    if "/experts/wo" in name:
      var[...] = jnp.zeros_like(var[...])
    elif "/shared/" in name:
      var[...] = dense_params[name.replace("/shared/", "/")]
      mapped += 1
    elif name in dense_params:
      var[...] = dense_params[name]
  nnx.update(routed, state)
  assert mapped == 2 * dense_cfg.num_layers
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0, dense_cfg.vocab_size)
  logits_d, grads_d = params_and_grads(dense, tokens)
  logits_r, grads_r = params_and_grads(routed, tokens)
  np.testing.assert_allclose(logits_r, logits_d, rtol=1e-5, atol=1e-5)
  for name, g in grads_d.items():
    twin = name if name in grads_r else name.replace("/ffw/", "/ffw/shared/")
    np.testing.assert_allclose(grads_r[twin], g, rtol=1e-4, atol=1e-6, err_msg=name)
  assert float(np.abs(grads_d["blocks/0/ffw/wi"]).sum()) > 0
  # The routed experts do matter once switched on: the equivalence above is not vacuous.
  wo = routed.blocks[0].ffw.experts.wo
  wo[...] = jax.random.normal(jax.random.key(5), wo[...].shape) * 0.1
  logits_on, _ = routed(tokens, train=True, rng=jax.random.key(2))
  assert np.abs(np.asarray(logits_on) - logits_d).max() > 1e-3


def test_shared_experts_validation():
  c = load_module("configs/tiny.py").get_config("topk")
  c.model.routing.shared_experts = 1
  config_lib.validate(c)
  c.model.routing.shared_experts = -1
  with pytest.raises(ConfigError, match=r"config\.model\.routing\.shared_experts=-1 is invalid"):
    config_lib.validate(c)
