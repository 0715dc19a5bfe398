"""The base config: the paper's training setup (paper_spec.md section 3).

Every other config starts from `get_config()` here and overrides fields. Every field
is documented in README.md ("Config reference") and validated by
`routing_lm.config.validate` when a run starts.
"""
import ml_collections
from ml_collections import config_dict

from routing_lm import routers


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "base"

  # ---- model (paper_spec.md section 3: 130m shape) ----
  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 32_000
  c.model.d_model = 896
  c.model.num_layers = 12
  c.model.num_heads = 16
  c.model.head_dim = config_dict.placeholder(int)   # None = d_model // num_heads
  c.model.d_ff = 3584
  c.model.dtype = "bfloat16"        # compute dtype; router math is always float32
  c.model.param_dtype = "float32"
  c.model.rope_base = 10_000.0      # rotary positions (no extra projection; see README)
  c.model.remat = "none"            # backward keeps: none | full (block inputs) | dots
  # Attention kernel: "auto" = Pallas splash attention when compiling for TPU and seq_len is
  # a multiple of 128 (never stores [S, S] scores), XLA's dot_product_attention elsewhere;
  # "xla" or "splash" force one (splash off TPU runs in the slow Pallas interpreter).
  c.model.attention = "auto"

  # ---- routing (paper_spec.md sections 1, 4; finegrained_spec.md section 1) ----
  r = c.model.routing = ml_collections.ConfigDict()
  r.router = "sbase"                # a name in routing_lm.routers.REGISTRY (uniform: benchmarks)
  r.num_experts = 64                # E; 1 = the dense model (same N)
  r.top_k = 1                       # K
  r.routing_frequency = 0.5         # R: fraction of FFW blocks routed (every 1/R-th)
  # Training capacity factor (2.0: MegaBlocks on Clark et al.); None = dropless.
  r.capacity_factor = config_dict.FieldReference(2.0, field_type=float)
  # Evaluation capacity factor; None (default) keeps every token (dropless).
  r.eval_capacity_factor = config_dict.placeholder(float)
  # Dropless grouped matmul (routing_lm/model/grouped.py): "auto" = megablox gmm when
  # compiling for TPU, ragged_dot elsewhere; or "gmm" / "ragged_dot".
  r.grouped_matmul = "auto"
  r.granularity = 1                 # G: E*G experts of width d_ff/G, K*G per token
  r.output_norm = False             # LayerNorm on the routed FFW's output
  # Learned routers' [d_model, E] projection: truncated normal, variance scale / d_model
  # (0.1: Switch's small init; measured against 0.01 and 1.0 in docs/sweeps.md).
  r.router_init_scale = 0.1
  r.shared_experts = 0              # S always-on experts of width d_ff/G per routed layer
  r.num_groups = 1                  # token groups routed independently (set by the mesh)
  # One section per router with fields, `model.routing.<name>`: each router declares its
  # own (`defaults` in routing_lm/routers/<name>.py, documented there and in README.md).
  for name, router in sorted(routers.REGISTRY.items()):
    if router.defaults:
      r[name] = ml_collections.ConfigDict(dict(router.defaults))

  # ---- data ----
  c.data = ml_collections.ConfigDict()
  c.data.task = "c4"                # stdlib_text | text_files | c4
  c.data.seq_len = 2048
  c.data.batch_size = 256           # global batch, sequences
  c.data.vocab_size = c.model.get_ref("vocab_size")
  c.data.spm_model = ""             # an existing sentencepiece .model (local or gs://)
  c.data.files = ""                 # text_files: comma-separated paths or globs
  c.data.cache_dir = "~/.cache/routing_lm"
  c.data.validation_fraction = 0.05
  c.data.max_chars = 0              # cap on corpus characters (0 = all)
  c.data.tfds_data_dir = ""         # c4: TFDS data dir (gs:// on TPU VMs)
  c.data.seed = 0

  # ---- train (paper_spec.md section 3) ----
  t = c.train = ml_collections.ConfigDict()
  t.num_steps = 250_000
  t.learning_rate = 2e-4
  t.end_lr_ratio = 0.1              # cosine decays to 10% of peak
  t.warmup_steps = 1_500
  t.weight_decay = 0.1
  t.b1 = 0.9
  t.b2 = 0.95
  t.grad_clip = 1.0
  # The router projections' learning rate is router_lr_scale x the schedule (their AdamW
  # update is scaled; measured against 0.3 and 3 in docs/sweeps.md).
  t.router_lr_scale = 1.0
  t.zero1 = True                    # shard the optimizer state over `data`
  # The loss projects hidden states to logits at most this many tokens at a time (whole
  # sequence chunks of batch rows x loss_chunk_tokens // rows positions; the backward
  # recomputes each chunk's logits). 0 = the whole batch at once.
  t.loss_chunk_tokens = 0
  t.microbatches = 1                # gradient accumulation: the batch in this many pieces
  t.eval_every = 1_000
  t.eval_batches = 16
  t.checkpoint_every = 1_000
  t.keep_checkpoints = 3
  t.log_every = 50
  # Router collapse alarm (routing_lm/health.py): a warning when one expert takes more
  # than collapse_share of a layer's tokens at collapse_intervals consecutive log steps.
  t.collapse_share = 0.5
  t.collapse_intervals = 3
  t.seed = 0

  # ---- mesh (data, expert, model); -1 fills the remaining devices ----
  c.mesh = ml_collections.ConfigDict(dict(data=-1, expert=1, model=1))
  return c
