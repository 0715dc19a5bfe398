"""A decoder-only Transformer whose every R-th FFW is routed (paper_spec.md section 3).

    tokens [B, S] -> embed -> L x Block -> RMSNorm -> unembed -> logits [B, S, V]
    Block: h += Attention(RMSNorm(h)); h += FFW(RMSNorm(h)), FFW dense or RoutedFFW

Choices (documented in README "Design"): pre-norm RMSNorm; rotary positions (no
position parameters, so N counts attention + FFW weights only); GELU FFW with
d_ff = 4 d_model; untied output layer; no biases. Parameters carry logical axis names
(`parallel.RULES` maps them to the mesh).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from routing_lm import config as config_lib, parallel
from routing_lm.model.routed_ffw import DTYPES, RoutedFFW, gelu


def routed_layer_indices(num_layers: int, routing_frequency: float,
                         num_experts: int) -> list[int]:
  """Blocks whose FFW is routed: evenly spaced, a fraction R of them, the last one included.

  R = 0.5 -> blocks 1, 3, 5, ... (every other, as GShard/Switch); R = 1 -> all; E = 1 -> none.
  """
  if num_experts == 1:
    return []
  r = routing_frequency
  return [i for i in range(num_layers) if int((i + 1) * r + 1e-9) > int(i * r + 1e-9)]


# model.remat -> what the backward keeps of each block (jax.checkpoint policies).
REMAT_POLICIES = {
    "none": None,                                              # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,          # keep only block inputs
    "dots": jax.checkpoint_policies.checkpoint_dots,           # keep matmul outputs
}


def head_dim(m: ml_collections.ConfigDict) -> int:
  """`model.head_dim`, or d_model // num_heads when it is None."""
  return m.get("head_dim") or m.d_model // m.num_heads


class RMSNorm(nnx.Module):
  def __init__(self, d: int, *, rngs: nnx.Rngs):
    self.scale = nnx.Param(jnp.ones((d,), jnp.float32), out_sharding=("embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6)
    return (y * self.scale[...]).astype(x.dtype)


def rotary(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotary position embedding of x [B, S, H, D] at positions [B, S]."""
  half = x.shape[-1] // 2
  freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle = positions[..., None, None].astype(jnp.float32) * freq          # [B, S, 1, D/2]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


# The splash kernel tiles q and kv in blocks that are multiples of the TPU lane width
# (128, `splash_attention_kernel.NUM_LANES`), and a block must divide the sequence.
SPLASH_MIN_BLOCK = config_lib.SPLASH_BLOCK
SPLASH_MAX_BLOCK = 512


def resolve_attention(impl: str, seq_len: int) -> str:
  """`model.attention` -> "xla" or "splash".

  "auto" is splash when compiling for TPU and seq_len is a multiple of 128 (the kernel's
  smallest block), XLA otherwise (CPU, GPU, short or odd sequences).
  """
  if impl == "auto":
    ok = parallel.target_platform() == "tpu" and seq_len % SPLASH_MIN_BLOCK == 0
    return "splash" if ok else "xla"
  return impl


def splash_block(seq_len: int) -> int:
  """The largest block in {512, 256, 128} that divides seq_len."""
  for block in (SPLASH_MAX_BLOCK, 256, SPLASH_MIN_BLOCK):
    if seq_len % block == 0:
      return block
  raise ValueError(f"splash attention needs a sequence length that is a multiple of "
                   f"{SPLASH_MIN_BLOCK}, got {seq_len}; set config.model.attention='xla'")


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                  segment_ids: jax.Array) -> jax.Array:
  """q, k, v [B, S, H, D] -> [B, S, H, D]; materialises the [B, H, S, S] scores."""
  s = q.shape[1]
  causal = jnp.tril(jnp.ones((s, s), bool))
  mask = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array, *,
                     interpret: bool = False) -> jax.Array:
  """Causal, segment-masked attention with the Pallas splash kernel (flash-style: the
  backward recomputes scores block by block, nothing [S, S] is stored).

  q, k, v [B, S, H, D], segment_ids [B, S] -> [B, S, H, D]. Mosaic kernels are not
  partitioned automatically, so on a multi-device mesh the kernel runs under
  `jax.shard_map`: batch split like `batch` and heads like `heads` in `parallel.RULES`
  (the sequence must not be split; the kernel cannot shard kv). `interpret` runs the
  kernel in the Pallas interpreter (any backend, slow; for tests).
  """
  from jax.experimental.pallas.ops.tpu import splash_attention as sa

  scale = q.shape[-1] ** -0.5

  def local(q, k, v, seg):
    _, s, h, _ = q.shape
    block = splash_block(s)
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    mask = sa.MultiHeadMask([sa.CausalMask((s, s))] * h)
    kernel = sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)                    # [B, H, S, D]
    one = lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sa.SegmentIds(s1, s1))
    out = jax.vmap(one)(heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k),
                        heads_first(v), seg)
    return heads_first(out)

  mesh = parallel.active_mesh()
  if mesh is None:
    return local(q, k, v, segment_ids)
  qkv = parallel.logical_to_spec(("batch", "length", "heads", "kv"))
  seg = parallel.logical_to_spec(("batch", "length"))
  if qkv[1] is not None:
    raise ValueError(f"splash attention cannot split the sequence (parallel.RULES maps "
                     f"'length' to {qkv[1]!r}); set config.model.attention='xla'")
  return jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, seg), out_specs=qkv,
                       check_vma=False)(q, k, v, segment_ids)


class Attention(nnx.Module):
  """Causal multi-head self-attention; packed sequences attend within their segment.

  `model.attention` picks the kernel: "xla" (`jax.nn.dot_product_attention` with a
  [B, 1, S, S] mask; its backward keeps the [B, H, S, S] scores), "splash" (the Pallas
  TPU kernel, `splash_attention`; interpreted off TPU), or "auto" (the default): splash
  when compiling for TPU and seq_len is a multiple of 128, XLA elsewhere, so CPU and GPU
  runs keep the XLA path. Both compute the same function (tests/test_memory.py).
  """

  def __init__(self, m: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, h, k = m.d_model, m.num_heads, head_dim(m)
    pd = DTYPES[m.param_dtype]
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                             in_axis=0, out_axis=(1, 2))
    out_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                 in_axis=(0, 1), out_axis=2)
    qkv_axes = ("embed", "heads", "kv")
    self.q = nnx.Param(init(rngs.params(), (d, h, k), pd), out_sharding=qkv_axes)
    self.k = nnx.Param(init(rngs.params(), (d, h, k), pd), out_sharding=qkv_axes)
    self.v = nnx.Param(init(rngs.params(), (d, h, k), pd), out_sharding=qkv_axes)
    self.o = nnx.Param(out_init(rngs.params(), (h, k, d), pd), out_sharding=("heads", "kv", "embed"))
    self.rope_base = m.rope_base
    self.impl = m.attention

  def __call__(self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array) -> jax.Array:
    """x [B, S, d] -> [B, S, d]."""
    proj = lambda w: jnp.einsum("bsd,dhk->bshk", x, w[...].astype(x.dtype))
    q = rotary(proj(self.q), positions, self.rope_base)
    k = rotary(proj(self.k), positions, self.rope_base)
    v = proj(self.v)
    if resolve_attention(self.impl, x.shape[1]) == "splash":
      out = splash_attention(q, k, v, segment_ids, interpret=parallel.target_platform() != "tpu")
    else:
      out = xla_attention(q, k, v, segment_ids)                            # [B, S, H, D]
    return jnp.einsum("bshk,hkd->bsd", out, self.o[...].astype(x.dtype))


class DenseFFW(nnx.Module):
  """wi [d_model, d_ff], wo [d_ff, d_model], GELU."""

  def __init__(self, m: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    pd = DTYPES[m.param_dtype]
    self.wi = nnx.Param(init(rngs.params(), (m.d_model, m.d_ff), pd), out_sharding=("embed", "mlp"))
    self.wo = nnx.Param(init(rngs.params(), (m.d_ff, m.d_model), pd), out_sharding=("mlp", "embed"))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., d] -> [..., d]; the matmuls run on [tokens, d] (2x faster on XLA:CPU)."""
    flat = x.reshape(-1, x.shape[-1])
    h = gelu(flat @ self.wi[...].astype(x.dtype))
    return (h @ self.wo[...].astype(x.dtype)).reshape(x.shape)


class Block(nnx.Module):
  def __init__(self, m: ml_collections.ConfigDict, routed: bool, *, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(m.d_model, rngs=rngs)
    self.attn = Attention(m, rngs=rngs)
    self.ffw_norm = RMSNorm(m.d_model, rngs=rngs)
    self.ffw = RoutedFFW(m, rngs=rngs) if routed else DenseFFW(m, rngs=rngs)
    self.routed = routed

  def __call__(self, h, token_ids, segment_ids, positions, train, rng):
    h = h + self.attn(self.attn_norm(h), segment_ids, positions)
    h = parallel.constrain(h, ("batch", "length", "embed"))
    x = self.ffw_norm(h)
    if self.routed:
      y, aux = self.ffw(x, token_ids, train=train, rng=rng)
    else:
      y, aux = self.ffw(x), None
    return parallel.constrain(h + y, ("batch", "length", "embed")), aux


class Transformer(nnx.Module):
  """The language model. `__call__` returns logits [B, S, V] (float32) and, for each
  routed block, a dict {aux_losses, metrics, log_probs}."""

  def __init__(self, m: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    pd = DTYPES[m.param_dtype]
    self.dtype = DTYPES[m.dtype]
    self.routed = routed_layer_indices(m.num_layers, m.routing.routing_frequency,
                                       m.routing.num_experts)
    self.embed = nnx.Param(nnx.initializers.normal(1.0)(rngs.params(), (m.vocab_size, m.d_model), pd),
                           out_sharding=("vocab", "embed"))
    self.blocks = nnx.List([Block(m, i in self.routed, rngs=rngs) for i in range(m.num_layers)])
    self.final_norm = RMSNorm(m.d_model, rngs=rngs)
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
    self.unembed = nnx.Param(init(rngs.params(), (m.d_model, m.vocab_size), pd),
                             out_sharding=("embed", "vocab"))
    self.remat = m.remat

  def routers(self) -> list[Any]:
    """The router of every routed block, in block order."""
    return [block.ffw.router for block in self.blocks if block.routed]

  def _block(self, block: Block, h, token_ids, segment_ids, positions, train, rng):
    """One block, rematerialised in the backward pass per `model.remat`.

    Remat wraps a pure function of the block's state (nnx.split / nnx.merge) in
    `jax.checkpoint`, so it applies to every block alike, whatever variables it holds
    (HASH's fixed table included).
    """
    policy = REMAT_POLICIES[self.remat]
    if self.remat == "none":
      return block(h, token_ids, segment_ids, positions, train, rng)
    graphdef, state = nnx.split(block)

    def pure(state, h, rng):
      return nnx.merge(graphdef, state)(h, token_ids, segment_ids, positions, train, rng)
    return jax.checkpoint(pure, policy=policy)(state, h, rng)

  def __call__(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, train: bool = False,
               rng: jax.Array | None = None) -> tuple[jax.Array, list[dict[str, Any]]]:
    """tokens [B, S] int32 -> (logits [B, S, V] float32, [per routed block aux])."""
    h, aux = self.hidden(tokens, segment_ids=segment_ids, positions=positions, train=train,
                         rng=rng)
    return self.logits_from(h), aux

  def logits_from(self, h: jax.Array) -> jax.Array:
    """Final hidden states h [..., d] -> logits [..., V] float32."""
    return unembed_logits(h, self.unembed[...])

  def hidden(self, tokens: jax.Array, *, segment_ids: jax.Array | None = None,
             positions: jax.Array | None = None, train: bool = False,
             rng: jax.Array | None = None) -> tuple[jax.Array, list[dict[str, Any]]]:
    """tokens [B, S] int32 -> (final hidden states [B, S, d] after the last RMSNorm, in the
    compute dtype; [per routed block aux]). `logits_from` turns them into logits; the loss
    does that chunk by chunk (train.chunked_token_nll)."""
    b, s = tokens.shape
    if segment_ids is None:
      segment_ids = jnp.ones((b, s), jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    rng = jax.random.key(0) if rng is None else rng
    h = self.embed[...].astype(self.dtype)[tokens]
    h = parallel.constrain(h, ("batch", "length", "embed"))
    aux = []
    for i, block in enumerate(self.blocks):
      h, block_aux = self._block(block, h, tokens, segment_ids, positions, train,
                                 jax.random.fold_in(rng, i))
      if block_aux is not None:
        aux.append(block_aux)
    return self.final_norm(h), aux


def unembed_logits(h: jax.Array, unembed: jax.Array) -> jax.Array:
  """h [..., d] (compute dtype) @ unembed [d, V] -> logits [..., V] float32."""
  logits = jnp.einsum("...d,dv->...v", h, unembed.astype(h.dtype))
  return logits.astype(jnp.float32)


def build(m: ml_collections.ConfigDict, seed: int = 0) -> Transformer:
  """Builds the model on the host without sharding (see `parallel` for sharded creation)."""
  with nnx.use_eager_sharding(False):
    return Transformer(m, rngs=nnx.Rngs(params=seed))
