"""Fine-grained experts on 2 CPU cores (finegrained_spec.md): one active shape, E = 8,
G in {1, 2, 4, 8}, at two token budgets, each run with its own cosine schedule: 8 runs.

    python -m routing_lm.sweep --sweep=configs/sweeps/cpu_granularity.py \\
        --workdir=results/cpu_granularity
    python -m routing_lm.fit --law=granular --results=results/cpu_granularity/results.csv \\
        --out=results/cpu_granularity/fit

Shape: Krajewski et al.'s rule d_model = 64 n_blocks with n_blocks = 2 (d_model 128,
4 heads of 32, d_ff 512); every FFW routed (R = 1, as in the spec), E = 8, K = 1. At
granularity G a routed FFW holds 8 G experts of width 512 / G and each token uses G of
them, so active parameters stay N_act = 12 d^2 n_blocks = 393,216 (total non-embedding
N = d^2 (8E + 4) n_blocks = 2,228,224) while the router grows with G (Eq. 10).

Router: `topk` (softmax, top-K*G, Switch balance loss and z-loss). S-BASE also routes K*G
experts (top-K*G of the Sinkhorn matrix), but at K*G = 1 it switches to a sigmoid gate and
a greedy balanced assignment, so G = 1 and G > 1 would differ in gate and balancing as
well as granularity; top-k keeps one mechanism at every G and is the token-choice analogue
of Krajewski's softmax router. A LayerNorm on every routed FFW's output (output_norm, the
spec's "crucial for G > 1"), at every G so that G = 1 differs only in granularity.
Capacity factor 2 in training, dropless evaluation.

Data and optimiser as configs/sweeps/cpu_mini.py: `stdlib_text`, 2,048-token vocabulary,
16 x 64 tokens per step, AdamW 3e-3 with 5% warmup and cosine to 10%; budgets BUDGETS
(200 and 600 steps:
204,800 and 614,400 tokens). Validation loss over 32 batches (32,768 tokens).
"""

D_MODEL, N_BLOCKS, HEADS = 128, 2, 4
EXPERTS = 8
GRANULARITIES = (1, 2, 4, 8)
BATCH, SEQ = 16, 64
BUDGETS = {"t205k": 200 * BATCH * SEQ, "t614k": 600 * BATCH * SEQ}   # name -> tokens


def get_sweep():
  points = []
  for budget, tokens in BUDGETS.items():
    steps = tokens // (BATCH * SEQ)
    for g in GRANULARITIES:
      points.append({"name": f"{budget}_g{g}", "tokens": tokens,
                     "overrides": {"model.routing.granularity": g,
                                   "train.warmup_steps": max(1, steps // 20)}})
  return {
      "name": "cpu_granularity",
      "config": "configs/tiny.py",
      "overrides": {
          "model.vocab_size": 2048,
          "model.d_model": D_MODEL, "model.num_layers": N_BLOCKS, "model.num_heads": HEADS,
          "model.d_ff": 4 * D_MODEL,
          "model.routing.router": "topk",
          "model.routing.num_experts": EXPERTS,
          "model.routing.top_k": 1,
          "model.routing.routing_frequency": 1.0,
          "model.routing.output_norm": True,
          "model.routing.capacity_factor": 2.0,
          "data.task": "stdlib_text", "data.seq_len": SEQ, "data.batch_size": BATCH,
          "data.max_chars": 4_000_000,
          "train.learning_rate": 3e-3,
          "train.eval_every": 100_000, "train.eval_batches": 32,
          "train.checkpoint_every": 200, "train.keep_checkpoints": 1,
          "train.log_every": 2,   # train_loss_smoothed: mean of the last 10% of logged steps
      },
      "points": points,
  }
