"""Each router can learn: a 2-layer d_model=64 model memorises a fixed sequence.

The train step is jitted with a functional nnx.split / nnx.merge. The loss is the mean
NLL plus the routers' auxiliary losses; for RL-R also the REINFORCE surrogate with
reward = -per-token NLL (log_probs from each routed block), so its router learns too.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from routing_lm.config import load_module
from routing_lm import routers
from routing_lm.model import build

base = load_module("configs/base.py")

STEPS = 100


def model_cfg(router, routing_frequency):
  m = base.get_config().model
  m.update(dict(vocab_size=64, d_model=64, num_layers=2, num_heads=4, d_ff=256,
                dtype="float32"))
  m.routing.update(dict(router=router, num_experts=4, routing_frequency=routing_frequency))
  return m


def train(router, routing_frequency, steps=STEPS):
  model = build(model_cfg(router, routing_frequency))
  gd, params, rest = nnx.split(model, nnx.Param, ...)
  data = jax.random.randint(jax.random.key(0), (2, 33), 0, 64)
  inputs, targets = data[:, :-1], data[:, 1:]
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 20, steps, 1e-3),
                    weight_decay=0.0)
  opt_state = opt.init(params)

  def loss_fn(params, key):
    logits, aux = nnx.merge(gd, params, rest)(inputs, train=True, rng=key)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    loss = jnp.mean(nll)
    for block in aux:
      loss = loss + sum(block["aux_losses"].values(), jnp.zeros(()))
      if block["log_probs"] is not None:
        loss = loss + routers.reinforce_surrogate(block["log_probs"].reshape(-1, 1),
                                                  -nll.reshape(-1))
    return loss, (jnp.mean(nll), aux)

  @jax.jit
  def step(params, opt_state, key):
    (_, (nll, aux)), g = jax.value_and_grad(loss_fn, has_aux=True)(params, key)
    updates, opt_state = opt.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, nll, aux

  router_w0 = [np.asarray(v[...]) for p, v in nnx.to_flat_state(params) if "router" in str(p)]
  losses = []
  for i in range(steps):
    params, opt_state, nll, aux = step(params, opt_state, jax.random.key(i))
    losses.append(float(nll))
  router_w = [np.asarray(v[...]) for p, v in nnx.to_flat_state(params) if "router" in str(p)]
  return np.asarray(losses), aux, router_w0, router_w


@pytest.mark.parametrize("router,routing_frequency", [("sbase", 0.5), ("hash", 1.0),
                                                      ("rlr", 1.0), ("topk", 0.5)])
def test_router_learns_memorisable_sequence(router, routing_frequency):
  losses, aux, w0, w = train(router, routing_frequency)
  assert losses[0] > 3.5                                   # ~ln 64 at the start
  assert np.mean(losses[-5:]) < 0.1, losses[-10:]
  assert np.all(np.isfinite(losses))
  assert len(aux) == (1 if routing_frequency == 0.5 else 2)
  if router != "hash":                                     # the router itself trained
    assert any(np.abs(a - b).max() > 1e-3 for a, b in zip(w0, w))
