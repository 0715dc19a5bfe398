"""The router's learning rate and initialisation scale (`train.router_lr_scale`,
`model.routing.router_init_scale`): what each changes, and only that."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from routing_lm import config as config_lib
from routing_lm import routers, train
from routing_lm.errors import ConfigError
from routing_lm.model.transformer import Transformer


def _config(**overrides):
  return config_lib.load("configs/tiny.py:sbase,8", overrides)


def _model(cfg) -> Transformer:
  with nnx.use_eager_sharding(False):
    return Transformer(cfg.model, rngs=nnx.Rngs(0))


def _router_weights(model) -> list[np.ndarray]:
  _, params = nnx.split(model, nnx.Param)
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return [np.asarray(v) for p, v in leaves if train.is_router_param(p, v)]


def test_init_scale_sets_the_router_projection_spread():
  stds = {}
  for scale in (0.01, 1.0):
    cfg = _config(**{"model.routing.router_init_scale": scale})
    w = _router_weights(_model(cfg))
    assert w and all(x.shape == (cfg.model.d_model, 8) for x in w)
    stds[scale] = np.mean([x.std() for x in w])
    # truncated normal (at 2 sigma) of variance scale / fan_in: std ~0.88 * sqrt(scale / d)
    expected = 0.88 * np.sqrt(scale / cfg.model.d_model)
    np.testing.assert_allclose(stds[scale], expected, rtol=0.2)
  np.testing.assert_allclose(stds[1.0] / stds[0.01], 10.0, rtol=0.05)


def test_router_lr_scale_scales_only_the_router_updates():
  cfg = _config()
  model = _model(cfg)
  _, params = nnx.split(model, nnx.Param)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.01), params)
  cfg.train.warmup_steps = 0   # a non-zero learning rate at step 0

  def update(scale):
    cfg.train.router_lr_scale = scale
    tx = train.make_optimizer(cfg.train)
    u, _ = tx.update(grads, tx.init(params), params)
    return jax.tree_util.tree_leaves_with_path(u)

  base, scaled = update(1.0), update(3.0)
  n_router = 0
  for (path, a), (_, b) in zip(base, scaled):
    if train.is_router_param(path, a):
      n_router += 1
      np.testing.assert_allclose(np.asarray(b), 3.0 * np.asarray(a), rtol=1e-6)
    else:
      np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
  assert n_router >= 1


@pytest.mark.parametrize("field,value", [("model.routing.router_init_scale", 0.0),
                                         ("train.router_lr_scale", -1.0)])
def test_knobs_refuse_non_positive_values(field, value):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    config_lib.validate(_config(**{field: value}))


def test_spec_carries_the_init_scale():
  cfg = _config(**{"model.routing.router_init_scale": 0.5})
  assert routers.RouterSpec.from_model_config(cfg.model).init_scale == 0.5
