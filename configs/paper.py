"""A point of the paper's grid from one string (paper_spec.md section 3).

    python -m routing_lm.main --config=configs/paper.py:130m,sbase,64 --workdir=...
    python -m routing_lm.main --config=configs/paper.py:130m,sbase,64,k=2,r=1.0 --workdir=...
    python -m routing_lm.main --config=configs/paper.py:370m,dense --workdir=...

The argument is `<size>[,<router>[,<E>]][,k=<K>][,r=<R>][,g=<G>]`:

- size: one of SIZES (15m 25m 55m 130m 370m 870m 1.3b), the paper's dense ladder with
  the shapes of paper_spec.md section 3 (d_ffw = 4 d_model);
- router: `dense`, or a router of `routing_lm.routers` (sbase hash rlr topk); a size
  alone is the dense model;
- E: experts per routed layer; default 64 for a router (the paper's recommendation),
  1 for `dense`. E = 1 with any router is the dense model (same N, no routed layers);
  `dense` with E > 1 is refused;
- k: experts per token K (default 1), r: routing frequency R (default 0.5, every other
  FFW), g: granularity G (default 1; finegrained_spec.md).

Training setup (published unless noted): C4, sentencepiece 32k vocabulary, sequence 2048,
batch 256, 250k steps (130B tokens for every size), AdamW b1 0.9, b2 0.95, weight decay
0.1, clip 1.0, linear warmup for 1,500 steps then cosine to 10% of the peak, bfloat16
compute with float32 parameters, ZeRO-1. Capacity factor 2.0 in training (S-BASE, per
MegaBlocks on Clark et al.); evaluation keeps every token.

Learning rates [choose; Gopher/Chinchilla style]: the peak falls with size, following the
Gopher family table (Rae et al. 2021, Table 1: 6e-4 at 44M and 117M, 2e-4 at 417M and
1.4B), which the Chinchilla runs also used for these sizes: 6e-4 up to 130m, 2e-4 from
370m (LEARNING_RATES below). Every value stays a config field
(`--config.train.learning_rate=...`).

Memory [choose]: every size trains with `model.remat = "full"` (the backward keeps each
block's input only) and `train.loss_chunk_tokens = 65,536` (the loss never holds the
batch's [tokens, 32k] float32 logits: 256 rows x 256 positions at a time), and
`model.attention = "auto"` is splash attention on TPU (no [2048, 2048] scores). At batch
256 x 2048 the activations, not the parameters, decide whether a step fits the smallest
slices: measured with `--mode=compile`, 130m,sbase,64 on v5e:4x4 (mesh 4,4,1) needs 14.27
GiB per chip with these levers against 18.6 GiB of temporaries alone with remat
(docs/tpu.md). Both are config fields: `--config.model.remat=none` on a slice with room
to spare saves the recompute (about a third more forward FLOPs).

Sizes count N = L (4 d h k + 2 d d_ff): the spec's formula without its relative-position
projection, because this codebase uses rotary positions (no parameters). 130m has
16 heads of 64 (h k = 1024 != d_model = 896) in the spec, set through `model.head_dim`.

Every config is validated when loaded (`routing_lm.config.validate`): a bad size, router,
key or value raises ConfigError naming it and listing what is allowed.
"""
from __future__ import annotations

import ml_collections

from routing_lm import config as config_lib

base = config_lib.load_module("configs/base.py")

# name -> (d_model, num_layers, num_heads, head size, d_ff): paper_spec.md section 3.
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "15m": (384, 8, 6, 64, 1536),
    "25m": (512, 8, 8, 64, 2048),
    "55m": (512, 16, 8, 64, 2048),
    "130m": (896, 12, 16, 64, 3584),
    "370m": (1536, 12, 12, 128, 6144),
    "870m": (2048, 16, 16, 128, 8192),
    "1.3b": (2048, 24, 16, 128, 8192),
}

# Peak learning rate per size (Gopher family, Rae et al. 2021 Table 1) [choose].
LEARNING_RATES: dict[str, float] = {
    "15m": 6e-4, "25m": 6e-4, "55m": 6e-4, "130m": 6e-4,
    "370m": 2e-4, "870m": 2e-4, "1.3b": 2e-4,
}

REMAT = "full"                  # model.remat for every size (see the docstring)
LOSS_CHUNK_TOKENS = 65_536      # train.loss_chunk_tokens: 256 rows x 256 positions

DENSE = "dense"
DEFAULT_ARG = "130m,sbase,64"
DEFAULT_EXPERTS = 64
# key=value options of the argument: name -> (config field, type, meaning)
OPTIONS: dict[str, tuple[str, type, str]] = {
    "k": ("model.routing.top_k", int, "experts per token K, an integer"),
    "r": ("model.routing.routing_frequency", float, "routing frequency R, a number in (0, 1]"),
    "g": ("model.routing.granularity", int, "granularity G, an integer"),
}
USAGE = ("expected '<size>[,<router>[,<E>]][,k=<K>][,r=<R>][,g=<G>]', e.g. "
         f"'{DEFAULT_ARG}' or '130m,sbase,64,k=2,r=1.0'")


def routers() -> list[str]:
  """The router names this config accepts: `dense` and every registered router except
  the benchmark-only `uniform`."""
  from routing_lm.routers import REGISTRY
  return [DENSE] + sorted(r for r in REGISTRY if r != "uniform")


def _experts(text: str) -> int:
  experts = int(text)
  if experts < 1:
    raise ValueError(text)
  return experts


def parse_arg(arg: str | None) -> dict:
  """'130m,sbase,64,k=2' -> {'size': '130m', 'router': 'sbase', 'num_experts': 64, 'k': 2}."""
  point = config_lib.parse_arg(
      arg or DEFAULT_ARG, where="configs/paper.py", usage=USAGE,
      positional=(("size", str.lower, f"one of {', '.join(SIZES)}"),
                  ("router", str.lower, f"one of {', '.join(routers())}"),
                  ("num_experts", _experts, "the number of experts E, an integer >= 1 (1 = dense)")),
      options={k: (kind, meaning) for k, (_, kind, meaning) in OPTIONS.items()})
  if point["size"] not in SIZES:
    raise config_lib.ConfigError(f"configs/paper.py: unknown size {point['size']!r}; allowed "
                                 f"sizes: {', '.join(SIZES)}.")
  router = point.setdefault("router", DENSE)
  allowed = routers()
  if router not in allowed:
    raise config_lib.ConfigError(f"configs/paper.py: unknown router {router!r}; allowed "
                                 f"routers: {', '.join(allowed)}.")
  experts = point.setdefault("num_experts", 1 if router == DENSE else DEFAULT_EXPERTS)
  if router == DENSE and experts != 1:
    raise config_lib.ConfigError(
        f"configs/paper.py: router 'dense' has E=1, got E={experts}; name a router for a "
        f"routed model ({', '.join(allowed[1:])}).")
  return point


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  point = parse_arg(arg)
  size = point["size"]
  d_model, num_layers, num_heads, head_size, d_ff = SIZES[size]
  c = base.get_config()
  m = c.model
  m.vocab_size = 32_000
  m.d_model, m.num_layers, m.d_ff = d_model, num_layers, d_ff
  m.num_heads, m.head_dim = num_heads, head_size
  m.dtype, m.param_dtype = "bfloat16", "float32"
  m.remat = REMAT

  r = m.routing
  r.router = "sbase" if point["router"] == DENSE else point["router"]
  r.num_experts = point["num_experts"]
  r.capacity_factor = 2.0
  for key, (field, _, _) in OPTIONS.items():
    if key in point:
      c.update_from_flattened_dict({field: point[key]})

  c.data.task = "c4"
  c.data.seq_len = 2048
  c.data.batch_size = 256

  t = c.train
  t.num_steps = 250_000
  t.learning_rate = LEARNING_RATES[size]
  t.end_lr_ratio = 0.1
  t.warmup_steps = 1_500
  t.weight_decay = 0.1
  t.b1, t.b2 = 0.9, 0.95
  t.grad_clip = 1.0
  t.zero1 = True
  t.loss_chunk_tokens = LOSS_CHUNK_TOKENS

  label = DENSE if r.num_experts == 1 else f"{point['router']}_e{r.num_experts}"
  extras = "".join(f"_{k}{point[k]}" for k in OPTIONS if k in point)
  c.name = f"paper_{size}_{label}{extras}"
  config_lib.validate(c)
  return c
