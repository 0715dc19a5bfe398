"""The Transformer (model/transformer.py), parameter counts (model/counting.py) and config
validation (config.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from routing_lm.config import load_module
from routing_lm import config as config_lib, routers
from routing_lm.model import build, counting, routed_layer_indices

base = load_module("configs/base.py")
tiny = load_module("configs/tiny.py")


def model_cfg(router="topk", num_experts=4, num_layers=2, routing_frequency=1.0, **kw):
  m = base.get_config().model
  m.update(dict(vocab_size=64, d_model=32, num_layers=num_layers, num_heads=2, d_ff=64,
                dtype="float32"))
  m.update({k: v for k, v in kw.items() if k in m})
  m.routing.update(dict(router=router, num_experts=num_experts,
                        routing_frequency=routing_frequency))
  m.routing.update({k: v for k, v in kw.items() if k in m.routing})
  return m


def forward(model, train):
  """Jitted (tokens, segment_ids, positions) -> logits."""
  gd, state = nnx.split(model)

  @jax.jit
  def f(state, tokens, segment_ids, positions):
    logits, _ = nnx.merge(gd, state)(tokens, segment_ids=segment_ids, positions=positions,
                                     train=train, rng=jax.random.key(3))
    return logits

  def call(tokens, segment_ids=None, positions=None):
    b, s = tokens.shape
    segment_ids = jnp.ones((b, s), jnp.int32) if segment_ids is None else segment_ids
    positions = (jnp.broadcast_to(jnp.arange(s), (b, s)) if positions is None else positions)
    return np.asarray(f(state, tokens, segment_ids, positions))

  return call


# ---- causality and packing ----

CAUSAL_CASES = [("dense", False), ("sbase", False), ("hash", False), ("rlr", False),
                ("topk", False), ("uniform", False), ("hash", True), ("uniform", True)]


@pytest.mark.parametrize("router,train", CAUSAL_CASES)
def test_causal(router, train):
  """Changing token t+1 never changes the logits at positions <= t (and does change t+1)."""
  s, cuts = 12, [0, 4, 7, 10]
  m = model_cfg(router=router if router != "dense" else "topk",
                num_experts=1 if router == "dense" else 4)
  f = forward(build(m), train)
  base_tok = jax.random.randint(jax.random.key(0), (1, s), 0, 64)
  variants = [base_tok.at[0, t + 1].set((base_tok[0, t + 1] + 1 + i) % 64)
              for i, t in enumerate(cuts)]
  if train:          # capacity is shared by the batch: one sequence per call
    ref = f(base_tok)[0]
    outs = [f(v)[0] for v in variants]
  else:              # evaluation is dropless: rows are independent, batch them
    logits = f(jnp.concatenate([base_tok] + variants))
    ref, outs = logits[0], logits[1:]
  for t, out in zip(cuts, outs):
    np.testing.assert_allclose(out[:t + 1], ref[:t + 1], rtol=1e-5, atol=1e-5)
    assert np.abs(out[t + 1] - ref[t + 1]).max() > 1e-3


@pytest.mark.parametrize("router,experts", [("topk", 1), ("topk", 4), ("hash", 4)])
def test_packing_no_attention_across_segments(router, experts):
  """Two packed segments: the second's logits equal those of running it alone, and do
  not change when the first segment's tokens change."""
  f = forward(build(model_cfg(router=router, num_experts=experts)), train=False)
  a = jax.random.randint(jax.random.key(1), (1, 6), 0, 64)
  b = jax.random.randint(jax.random.key(2), (1, 6), 0, 64)
  seg = jnp.asarray([[1] * 6 + [2] * 6])
  pos = jnp.asarray([list(range(6)) * 2])
  packed = f(jnp.concatenate([a, b], 1), seg, pos)
  packed2 = f(jnp.concatenate([(a + 5) % 64, b], 1), seg, pos)
  alone_b, alone_a = f(b), f(a)
  np.testing.assert_allclose(packed[0, 6:], alone_b[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[0, :6], alone_a[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed2[0, 6:], packed[0, 6:], rtol=1e-5, atol=1e-5)
  assert np.abs(packed2[0, :6] - packed[0, :6]).max() > 1e-3
  # Without segment ids the second half does see the first.
  unpacked = f(jnp.concatenate([a, b], 1))
  assert np.abs(unpacked[0, 6:] - alone_b[0]).max() > 1e-3


# ---- routed layers ----

def test_routed_layer_indices():
  assert routed_layer_indices(8, 0.5, 8) == [1, 3, 5, 7]
  assert routed_layer_indices(8, 1.0, 8) == list(range(8))
  assert routed_layer_indices(8, 0.25, 8) == [3, 7]
  assert routed_layer_indices(12, 0.25, 64) == [3, 7, 11]
  assert routed_layer_indices(6, 0.5, 2) == [1, 3, 5]
  assert routed_layer_indices(8, 0.5, 1) == []                        # E = 1: dense
  model = build(model_cfg(num_layers=4, routing_frequency=0.5))
  assert [b.routed for b in model.blocks] == [False, True, False, True]


# ---- counting ----

def flat_params(model):
  return {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def categorise(model):
  """Parameter counts from the built model: embeddings, norms, router, the rest."""
  out = {"embedding": 0, "norm": 0, "router": 0, "body": 0}
  for path, v in flat_params(model).items():
    if path in ("embed", "unembed"):
      out["embedding"] += v.size
    elif path.endswith("scale"):
      out["norm"] += v.size
    elif "router" in path:
      out["router"] += v.size
    else:
      out["body"] += v.size
  return out


SMALL = dict(vocab_size=64, d_model=32, num_layers=4, num_heads=2, d_ff=128)


def small_cfg(**routing):
  m = base.get_config().model
  m.update(dict(SMALL, dtype="float32"))
  m.routing.update(dict(dict(router="topk", num_experts=4, top_k=1, routing_frequency=0.5,
                             granularity=1), **routing))
  return m


def test_counts_hand_computed():
  # d = 32, L = 4, d_ff = 128, E = 4, K = 1, R = 0.5 (2 routed layers), S = 16.
  # attention 4 d^2 = 4096, FFW 2 d d_ff = 8192 per block: N = 4 * 12288 = 49152.
  # P = N + 2 * (3 * 8192 + 4 * 32) = 49152 + 49152 + 256 = 98560.
  # F = 2 N + 2 * 256 + 2 L S d = 98304 + 512 + 4096 = 102912; train 6 N + 14 * 256.
  c = counting.count(small_cfg(), seq_len=16)
  assert c.n_params == 49152
  assert c.num_routed_layers == 2
  assert c.router_params == 256
  assert c.total_params == 98560
  assert c.total_params_nonemb == 98304
  assert c.active_params_nonemb == 49152
  assert c.embedding_params == 2 * 64 * 32
  assert c.flops_per_token == 102912
  assert c.train_flops_per_token == 6 * 49152 + 14 * 256
  # K = 2, G = 2: 8 experts of width 64, 4 per token; the same expert parameters.
  # active = N + 2 routed * (K - 1) * 8192 = 65536; router 2 * 4 * 2 * 32 = 512.
  c2 = counting.count(small_cfg(top_k=2, granularity=2), seq_len=16)
  assert c2.n_params == 49152
  assert c2.active_params_nonemb == 65536
  assert c2.router_params == 512
  assert c2.total_params == 49152 + 49152 + 512
  assert c2.total_params_nonemb == 98304
  assert c2.flops_per_token == 2 * 65536 + 2 * 512 + 4096
  assert c2.train_flops_per_token == 6 * 65536 + 14 * 512
  # E = 1: dense, P = N, no router.
  c1 = counting.count(small_cfg(num_experts=1), seq_len=16)
  assert (c1.total_params, c1.router_params, c1.num_routed_layers) == (49152, 0, 0)


def test_flops_use_the_attention_width_not_d_model():
  """F's attention-score term is 2 L S h k (Kaplan's d_attn = heads x head size), which
  differs from d_model when model.head_dim is set: d = 32, 4 heads of 16 (h k = 64)."""
  m = small_cfg()
  m.num_heads, m.head_dim = 4, 16
  c = counting.count(m, seq_len=16)
  # attention 4 d h k = 4 * 32 * 64 = 8192, FFW 8192 per block: N = 4 * 16384 = 65536.
  assert c.n_params == 65536
  # F = 2 N + 2 router (2 layers * 4 * 32 = 256) + 2 L S (h k) = 131072 + 512 + 8192.
  assert c.flops_per_token == 131072 + 512 + 2 * 4 * 16 * 64
  assert c.flops_per_token != 131072 + 512 + 2 * 4 * 16 * 32          # the d_model count


def test_hash_has_no_router_term():
  """HASH routes by a fixed table: no router weights in P, no router matmul in F."""
  c = counting.count(small_cfg(router="hash"), seq_len=16)
  learned = counting.count(small_cfg(router="topk"), seq_len=16)
  assert c.router_params == 0
  assert c.total_params == learned.total_params - learned.router_params == 49152 + 49152
  assert c.flops_per_token == 2 * 49152 + 2 * 4 * 16 * 32
  assert c.train_flops_per_token == 6 * 49152
  assert categorise(build(small_cfg(router="hash")))["router"] == 0


@pytest.mark.parametrize("routing", [dict(), dict(top_k=2, granularity=2, router="sbase"),
                                     dict(routing_frequency=1.0, router="rlr"),
                                     dict(num_experts=1)])
def test_counts_equal_built_model(routing):
  m = small_cfg(**routing)
  c = counting.count(m, seq_len=16)
  got = categorise(build(m))
  assert got["embedding"] == c.embedding_params
  assert got["router"] == c.router_params
  assert got["body"] == c.total_params_nonemb
  assert got["body"] + got["router"] == c.total_params
  assert got["norm"] == (2 * m.num_layers + 1) * m.d_model
  dense = categorise(build(small_cfg(num_experts=1)))
  assert dense["body"] == c.n_params                                    # N: the dense size


# paper_spec.md section 3: name, d_model, layers, heads, head size, d_ffw, N (table).
PAPER_SHAPES = [("15m", 384, 8, 6, 64, 1536, 15.3e6), ("25m", 512, 8, 8, 64, 2048, 27.3e6),
                ("55m", 512, 16, 8, 64, 2048, 54.5e6), ("370m", 1536, 12, 12, 128, 6144, 368.1e6),
                ("870m", 2048, 16, 16, 128, 8192, 872.4e6),
                ("1.3b", 2048, 24, 16, 128, 8192, 1308.6e6)]


def paper_cfg(d, layers, heads, d_ff, **routing):
  m = base.get_config().model
  m.update(dict(d_model=d, num_layers=layers, num_heads=heads, d_ff=d_ff))
  m.routing.update(routing)
  return m


@pytest.mark.parametrize("name,d,layers,heads,head_size,d_ff,n_table", PAPER_SHAPES)
def test_paper_model_sizes(name, d, layers, heads, head_size, d_ff, n_table):
  """Our N = L (4 d^2 + 2 d d_ff) (rotary: no position projection) is the table's N,
  which counts a Transformer-XL relative-position projection, minus L d^2."""
  assert heads * head_size == d
  n = counting.count(paper_cfg(d, layers, heads, d_ff), seq_len=2048).n_params
  assert n == layers * (4 * d * d + 2 * d * d_ff)
  assert abs(n / (n_table - layers * d * d) - 1) < 0.02, (name, n)


def test_paper_130m_attention_width():
  """The 130m row has 16 heads x 64 = 1024-wide attention on d_model 896 (model.head_dim):
  attention counts 4 d h k, and N is the table's 132.1M minus its relative-position
  projection L d (h k), within 2%."""
  m = base.get_config().model                                          # the 130m shape
  m.head_dim = 64
  assert (m.d_model, m.num_layers, m.num_heads, m.d_ff) == (896, 12, 16, 3584)
  n = counting.count(m, seq_len=2048).n_params
  assert n == 12 * (4 * 896 * 1024 + 2 * 896 * 3584) == 121_110_528
  assert abs(n / (132.1e6 - 12 * 896 * 1024) - 1) < 0.02
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: build(m))
  assert model.blocks[0].attn.q.shape == (896, 16, 64)


def test_paper_total_params_512_experts():
  """paper_spec: 1.3B with E = 512 at R = 0.5 has about 207B parameters."""
  c = counting.count(paper_cfg(2048, 24, 16, 8192, num_experts=512, routing_frequency=0.5),
                     seq_len=2048)
  assert c.num_routed_layers == 12
  assert abs(c.total_params / 207e9 - 1) < 0.02, c.total_params


def test_finegrained_64x100m():
  """finegrained_spec: total N = d^2 (8E + 4) n_blocks at R = 1, active 12 d^2 n_blocks;
  `64 x 100M` is about 4.3B. d_model 768, 14 blocks: 99.1M active, 4.26B total."""
  d, blocks = 768, 14
  for g in (1, 8):
    c = counting.count(paper_cfg(d, blocks, 12, 4 * d, num_experts=64, routing_frequency=1.0,
                                 granularity=g), seq_len=256)
    assert c.active_params_nonemb == 12 * d * d * blocks
    assert c.total_params_nonemb == d * d * (8 * 64 + 4) * blocks
    assert abs(c.active_params_nonemb / 100e6 - 1) < 0.01
    assert abs(c.total_params_nonemb / 4.3e9 - 1) < 0.02, c.total_params_nonemb
    assert c.router_params == d * 64 * g * blocks
    assert c.train_flops_per_token == 6 * 12 * d * d * blocks + 14 * d * 64 * g * blocks


# ---- bad input ----

BAD = [
    ("model.routing.router", "switch", None),
    ("model.routing.num_experts", 0, None),
    ("model.routing.num_experts", -3, None),
    ("model.routing.top_k", 9, "num_experts=8"),
    ("model.routing.routing_frequency", 0.0, "(0, 1]"),
    ("model.routing.routing_frequency", 1.5, "(0, 1]"),
    ("model.routing.routing_frequency", -0.5, "(0, 1]"),
    ("model.routing.capacity_factor", 0.0, None),
    ("model.routing.capacity_factor", -1.0, None),
    ("model.routing.eval_capacity_factor", 0.0, None),
    ("model.num_heads", 3, "d_model=128"),
    ("model.routing.granularity", 3, "d_ff=512"),
    ("model.routing.granularity", 0, None),
    ("model.d_model", 0, ">= 1"),
    ("model.num_layers", -1, ">= 1"),
    ("model.vocab_size", 0, ">= 1"),
    ("data.seq_len", 0, ">= 1"),
    ("data.batch_size", -4, ">= 1"),
    ("train.num_steps", 0, ">= 1"),
    ("model.remat", "yes", "'none', 'full', 'dots'"),
    ("model.routing.sbase.temperature", 0.0, "> 0"),            # checked by the router
    ("model.routing.sbase.scope", "all", "'global'"),
    ("model.routing.hash.method", "md5", "'frequency'"),
]


@pytest.mark.parametrize("field,value,hint", BAD)
def test_bad_input_names_field_and_value(field, value, hint):
  c = tiny.get_config()
  section = field.split(".")[2] if field.startswith("model.routing.") else None
  if section in routers.REGISTRY:                       # a router's own field: select it
    c.model.routing.router = section
  config_lib.validate(c)                                # the unmodified config is valid
  node = c
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(c)
  msg = str(err.value)
  assert f"{field}={value!r}" in msg, msg
  if hint:
    assert hint in msg, msg


@pytest.mark.parametrize("top_k,granularity", [(1, 2), (2, 1)])
def test_rlr_rejects_more_than_one_expert_per_token(top_k, granularity):
  c = tiny.get_config()
  c.model.routing.update(dict(router="rlr", top_k=top_k, granularity=granularity))
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(c)
  msg = str(err.value)
  assert f"model.routing.top_k={top_k!r}" in msg, msg
  assert f"top_k * granularity = {top_k * granularity}" in msg, msg
  assert "rlr" in msg
