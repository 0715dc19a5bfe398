"""Memory levers: splash attention (Pallas, interpreted on CPU) against XLA attention, the
chunked loss against the whole-batch loss, and gradient accumulation against the
full-batch update (model/transformer.py, train.py)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import base, tiny
from routing_lm import config as config_lib, parallel, train
from routing_lm.model import transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- attention
def packed_segments(rows: list[list[int]]) -> jnp.ndarray:
  """[B, S] segment ids from per-row segment lengths (segment k of a row has id k + 1)."""
  return jnp.asarray([np.repeat(np.arange(1, len(r) + 1), r) for r in rows], jnp.int32)


def positions_of(seg: jnp.ndarray) -> jnp.ndarray:
  """Positions restart at 0 in each segment, as the packer writes them."""
  seg = np.asarray(seg)
  pos = np.zeros_like(seg)
  for i in range(1, seg.shape[1]):
    pos[:, i] = np.where(seg[:, i] == seg[:, i - 1], pos[:, i - 1] + 1, 0)
  return jnp.asarray(pos)


def attention_layer(head_dim: int, num_heads: int) -> transformer.Attention:
  m = base.get_config().model
  m.update(d_model=64, num_heads=num_heads, head_dim=head_dim, dtype="float32")
  with nnx.use_eager_sharding(False):
    return transformer.Attention(m, rngs=nnx.Rngs(params=0))


def attention_value_and_grads(layer, impl, x, seg, pos):
  """The layer's output, and the gradient of a scalar of it wrt x and every parameter."""
  layer.impl = impl
  gd, params = nnx.split(layer)

  def f(params, x):
    out = nnx.merge(gd, params)(x, seg, pos)
    return jnp.sum(jnp.sin(out) * jnp.arange(out.shape[-1])), out

  (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, x)
  return out, grads


# 256 positions with the smallest block (128): several q and kv blocks, so the kernel's
# causal block skipping and partial-block masks are both exercised. Segments cross the
# block boundary at 128.
SEGMENTS = [[100, 60, 96], [30, 200, 26]]


@pytest.mark.parametrize("head_dim,num_heads", [
    (64, 1), pytest.param(64, 2, marks=pytest.mark.slow),
    pytest.param(128, 1, marks=pytest.mark.slow)])
def test_splash_equals_xla_attention_forward_and_grad(head_dim, num_heads):
  """Splash (Pallas interpret mode) == jax.nn.dot_product_attention, packed segments."""
  seg = packed_segments(SEGMENTS)
  pos = positions_of(seg)
  x = jax.random.normal(jax.random.key(1), (2, 256, 64), jnp.float32)
  layer = attention_layer(head_dim, num_heads)
  out_x, (gp_x, gx_x) = attention_value_and_grads(layer, "xla", x, seg, pos)
  out_s, (gp_s, gx_s) = attention_value_and_grads(layer, "splash", x, seg, pos)
  scale = float(jnp.max(jnp.abs(out_x)))
  np.testing.assert_allclose(out_s, out_x, atol=2e-5 * scale, rtol=0)
  np.testing.assert_allclose(gx_s, gx_x, atol=2e-5 * float(jnp.max(jnp.abs(gx_x))), rtol=0)
  for name in ("q", "k", "v", "o"):
    a, b = np.asarray(gp_s[name][...]), np.asarray(gp_x[name][...])
    assert np.abs(b).max() > 0
    np.testing.assert_allclose(a, b, atol=2e-5 * np.abs(b).max(), rtol=0, err_msg=name)


def test_segments_isolate_packed_documents():
  """Changing segment 1 of a row leaves segment 2's splash output unchanged: the mask is
  the segment mask, not only causal."""
  seg = packed_segments([[128, 128]])
  pos = positions_of(seg)
  layer = attention_layer(64, 1)
  layer.impl = "splash"
  x = jax.random.normal(jax.random.key(2), (1, 256, 64), jnp.float32)
  f = jax.jit(lambda x: layer(x, seg, pos))
  a, b = f(x), f(x.at[:, :128].add(1.0))
  assert float(jnp.max(jnp.abs(a[:, 128:] - b[:, 128:]))) == 0.0
  assert float(jnp.max(jnp.abs(a[:, :128] - b[:, :128]))) > 1e-3


def test_auto_attention_is_xla_off_tpu_and_splash_for_tpu(monkeypatch):
  assert parallel.target_platform() == "cpu"
  assert transformer.resolve_attention("auto", 2048) == "xla"
  assert transformer.resolve_attention("splash", 2048) == "splash"
  monkeypatch.setattr(parallel, "target_platform", lambda: "tpu")
  assert transformer.resolve_attention("auto", 2048) == "splash"
  assert transformer.resolve_attention("auto", 100) == "xla"   # not a multiple of 128
  assert [transformer.splash_block(s) for s in (128, 256, 384, 2048)] == [128, 256, 128, 512]
  with pytest.raises(ValueError, match="multiple of 128"):
    transformer.splash_block(200)


SHARDED_SPLASH = r"""
import os, re
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax, jax.numpy as jnp
from routing_lm import parallel
from routing_lm.model import transformer as tr
mesh = parallel.make_mesh(dict(data=2, expert=1, model=2))
q = jax.ShapeDtypeStruct((2, 128, 2, 64), jnp.float32)
seg = jax.ShapeDtypeStruct((2, 128), jnp.int32)
loss = lambda q, k, v, s: jnp.sum(tr.splash_attention(q, k, v, s, interpret=True))
step = jax.jit(parallel.on_mesh(mesh, jax.grad(loss, argnums=(0, 1, 2))))
txt = step.lower(q, q, q, seg).as_text()
print(sorted(set(re.findall(r"sdy\.manual_computation|tensor<1x128x1x64xf32>", txt))))
"""


def test_splash_runs_under_shard_map_on_a_mesh():
  """On 4 devices (batch over data, heads over model) the splash forward and backward
  lower to a manual (shard_map) computation on per-device [1, 128, 1, 64] blocks.

  Lowering only: XLA:CPU cannot run the interpreted kernel inside shard_map ("No
  registered implementation for untyped custom call to xla.sdy.GlobalToLocalShape for
  Host"); the numbers are checked on one device above, and the TPU compile check
  compiles the sharded kernel for real."""
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", SHARDED_SPLASH], env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stdout + r.stderr
  assert "['sdy.manual_computation', 'tensor<1x128x1x64xf32>']" in r.stdout, r.stdout


# ---------------------------------------------------------------- config
def small_config(router: str = "topk", experts: int = 4, **train_kw):
  c = tiny.get_config(f"{router},{experts}")
  c.model.update(vocab_size=64, d_model=32, num_layers=2, num_heads=2, d_ff=64)
  c.model.routing.capacity_factor = float(experts)      # C = tokens per group: no drops
  c.data.update(seq_len=30, batch_size=4)
  # No warmup: the first step's learning rate is the peak, not 0 (a zero step would make
  # every update comparison vacuous).
  c.train.update(num_steps=10, warmup_steps=0, learning_rate=1e-2, **train_kw)
  return c


@pytest.mark.parametrize("field,value,needle", [
    ("model.attention", "flash", "one of ('auto', 'xla', 'splash')"),
    ("model.attention", "splash", "not a multiple of it"),          # seq_len 30
    ("train.loss_chunk_tokens", 3, "at least data.batch_size=4"),
    ("train.loss_chunk_tokens", -1, "at least data.batch_size=4"),
    ("train.microbatches", 3, "it must divide data.batch_size=4"),
    ("train.microbatches", 0, "an integer >= 1"),
])
def test_memory_fields_are_validated(field, value, needle):
  c = small_config()
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=f"config.{field}=") as e:
    config_lib.validate(c)
  assert needle in str(e.value)


def test_microbatch_must_split_over_devices():
  c = small_config(microbatches=4)
  fake_mesh = types.SimpleNamespace(shape={"data": 2, "expert": 1, "model": 1})
  with pytest.raises(config_lib.ConfigError, match="config.train.microbatches=4") as e:
    train.validate_microbatches(c, fake_mesh)
  assert "1 sequences per microbatch" in str(e.value) and "multiple of microbatches x 2" in str(e.value)
  c.train.microbatches = 2
  train.validate_microbatches(c, fake_mesh)


# ---------------------------------------------------------------- chunked loss
def synthetic_batch(b: int = 4, s: int = 30, vocab: int = 64, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  seg = np.ones((b, s), np.int32)
  seg[:, s // 3:] = 2
  seg[1, 2 * s // 3:] = 3
  w = np.ones((b, s), np.float32)
  w[0, -5:] = 0.0                                     # padding at the end of a row
  return {"inputs": rng.integers(0, vocab, (b, s)).astype(np.int32),
          "targets": rng.integers(0, vocab, (b, s)).astype(np.int32),
          "segment_ids": seg, "positions": np.asarray(positions_of(jnp.asarray(seg))),
          "weights": w}


def whole_batch_loss(model, batch, rng):
  """The loss as it was before chunking: logits [B, S, V] from `__call__`, then NLL."""
  logits, _ = model(batch["inputs"], segment_ids=batch["segment_ids"],
                    positions=batch["positions"], train=True, rng=rng)
  nll = train.token_nll(logits, batch["targets"])
  return nll


@pytest.mark.parametrize("chunk", [8 * 7, 8 * 16, 8])
def test_chunked_nll_equals_whole_nll_value_and_grad(chunk):
  """chunked_token_nll on [8, 30, 16] hidden states, V=40: 7, 16 and 1 positions per chunk
  (the first two do not divide 30). Same NLL [B, S]; same gradient wrt h and unembed."""
  kh, kw, kt = jax.random.split(jax.random.key(0), 3)
  h = jax.random.normal(kh, (8, 30, 16), jnp.float32)
  w = jax.random.normal(kw, (16, 40), jnp.float32)
  t = jax.random.randint(kt, (8, 30), 0, 40)
  weights = jnp.linspace(0.0, 1.0, 8 * 30).reshape(8, 30)

  def f(chunk):
    nll = lambda h, w: train.chunked_token_nll(h, w, t, chunk)
    loss = lambda h, w: jnp.sum(nll(h, w) * weights)
    return jax.jit(nll)(h, w), jax.jit(jax.grad(loss, argnums=(0, 1)))(h, w)

  (nll0, g0), (nll1, g1) = f(0), f(chunk)
  np.testing.assert_allclose(nll0, train.token_nll(transformer.unembed_logits(h, w), t))
  np.testing.assert_allclose(nll1, nll0, rtol=1e-6, atol=2e-6)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_nll_holds_one_chunk_of_logits():
  """The backward keeps no [tokens, V] array: in the jaxpr of the gradient, the largest
  vocab-sized float32 intermediate is one chunk's [B, c, V] (here [4, 8, 512])."""
  h = jnp.ones((4, 64, 16), jnp.float32)
  w = jnp.ones((16, 512), jnp.float32)
  t = jnp.zeros((4, 64), jnp.int32)
  grad = jax.grad(lambda h, w: jnp.sum(train.chunked_token_nll(h, w, t, 32)), argnums=(0, 1))
  compiled = jax.jit(grad).lower(h, w).compile()
  whole = jax.jit(jax.grad(lambda h, w: jnp.sum(train.chunked_token_nll(h, w, t, 0)),
                           argnums=(0, 1))).lower(h, w).compile()
  chunk_bytes = compiled.memory_analysis().temp_size_in_bytes
  whole_bytes = whole.memory_analysis().temp_size_in_bytes
  assert whole_bytes >= 4 * 64 * 512 * 4            # at least the whole logits
  assert chunk_bytes < whole_bytes / 3, (chunk_bytes, whole_bytes)


@pytest.mark.slow
def test_chunked_loss_equals_whole_batch_loss():
  """Chunks of 4 x 7 tokens over S=30 (5 chunks, the last padded): same per-token NLL,
  same loss and the same gradient for every parameter. RL-R, because its REINFORCE
  surrogate takes the per-token NLL as reward."""
  c = small_config("rlr")
  s = train.setup(c)
  state = train.init_state(s)
  batch = {k: jnp.asarray(v) for k, v in synthetic_batch().items()}
  rng = jax.random.key(5)

  def loss_and_grads(chunk):
    def f(params):
      model = nnx.merge(s.graphdef, params, state["other"])
      return train.compute_loss(model, batch, rng, train=True, loss_chunk_tokens=chunk)
    return jax.jit(jax.value_and_grad(f, has_aux=True))(state["params"])

  def per_token(chunk):
    model = nnx.merge(s.graphdef, state["params"], state["other"])
    h, _ = model.hidden(batch["inputs"], segment_ids=batch["segment_ids"],
                        positions=batch["positions"], train=True, rng=rng)
    return train.chunked_token_nll(h, model.unembed[...], batch["targets"], chunk)

  model = nnx.merge(s.graphdef, state["params"], state["other"])
  ref_nll = whole_batch_loss(model, batch, rng)
  assert per_token(28).shape == (4, 30)
  for chunk in (28, 64, 4):                       # 7, 16 and 1 positions per chunk
    np.testing.assert_allclose(per_token(chunk), ref_nll, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(per_token(0), ref_nll)
  (l0, o0), g0 = loss_and_grads(0)
  for chunk in (28,):
    (l1, o1), g1 = loss_and_grads(chunk)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    np.testing.assert_allclose(o1["nll_sum"], o0["nll_sum"], rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g0)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max() + 1e-30),
                                 err_msg=jax.tree_util.keystr(path))
  assert float(jnp.max(jnp.abs(g0["unembed"][...]))) > 0


# ---------------------------------------------------------------- microbatches
def one_step(c, batch, sgd: bool = True):
  """One train step with clipping + plain SGD instead of AdamW: Adam's first step is
  lr * g / (|g| + eps), which turns float32 noise in gradients near 0 into large update
  differences, so comparing its parameters tests nothing but that noise."""
  s = train.setup(c)
  if sgd:
    tx = optax.chain(optax.clip_by_global_norm(c.train.grad_clip),
                     optax.sgd(c.train.learning_rate))
    replicated = jax.sharding.NamedSharding(s.mesh, jax.P())
    opt_sh = jax.tree.map(lambda _: replicated,
                          jax.eval_shape(tx.init, s.abstract_state["params"]))
    s = dataclasses.replace(s, tx=tx, state_shardings={**s.state_shardings, "opt": opt_sh})
  state = train.init_state(s)
  with jax.set_mesh(s.mesh):
    new, metrics = train.make_train_step(s)(state, train.to_global(s, batch))
  return jax.device_get(new), jax.device_get(metrics)


@pytest.mark.slow
@pytest.mark.parametrize("router,experts,microbatches", [("topk", 1, 2), ("hash", 4, 4)])
def test_microbatched_update_equals_full_batch(router, experts, microbatches):
  """Dense and HASH (per-token choices, nothing dropped): one step with the batch in
  2 or 4 microbatches gives the full-batch parameters, loss and gradient norm. The chunked
  loss is on in both, so the two levers compose."""
  batch = synthetic_batch()
  full, mf = one_step(small_config(router, experts, loss_chunk_tokens=8), batch)
  micro, mm = one_step(small_config(router, experts, loss_chunk_tokens=8,
                                    microbatches=microbatches), batch)
  np.testing.assert_allclose(mm["loss"], mf["loss"], rtol=1e-6)
  np.testing.assert_allclose(mm["grad_norm"], mf["grad_norm"], rtol=1e-5)
  before = jax.tree.leaves(train.init_state(train.setup(small_config(router, experts)))["params"])
  moved = 0
  for a, b, p in zip(jax.tree.leaves(micro["params"]), jax.tree.leaves(full["params"]), before):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    moved += int(np.any(np.asarray(b) != np.asarray(p)))
  assert moved == len(before)          # the step changed every parameter


@pytest.mark.slow
def test_microbatches_one_is_the_unchanged_step():
  """microbatches=1 (default) and loss_chunk_tokens=0: bit-identical to the step written
  from `__call__`'s logits, as train.py computed it before these levers existed."""
  c = small_config("topk", 4)
  batch = synthetic_batch()
  new, metrics = one_step(c, batch, sgd=False)
  s = train.setup(c)
  state = train.init_state(s)
  from routing_lm.routers import reinforce_surrogate  # noqa: F401 (the old loss imported it)

  @jax.jit
  def reference(state, batch):
    rng = train.step_rng(c.train.seed, state["step"])

    def loss_fn(params):
      model = nnx.merge(s.graphdef, params, state["other"])
      logits, layers = model(batch["inputs"], segment_ids=batch["segment_ids"],
                             positions=batch["positions"], train=True, rng=rng)
      w = batch["weights"]
      nll = train.token_nll(logits, batch["targets"])
      loss = jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
      aux = jnp.zeros((), jnp.float32)
      for layer in layers:
        for value in layer["aux_losses"].values():
          aux += value
      return loss + aux

    grads = jax.grad(loss_fn)(state["params"])
    updates, _ = s.tx.update(grads, state["opt"], state["params"])
    return jax.tree.map(lambda p, u: p + u, state["params"], updates)

  ref = jax.device_get(reference(state, {k: jnp.asarray(v) for k, v in batch.items()}))
  for a, b in zip(jax.tree.leaves(new["params"]), jax.tree.leaves(ref)):
    np.testing.assert_array_equal(a, b)
