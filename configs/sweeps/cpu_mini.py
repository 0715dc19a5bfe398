"""The paper's grid in miniature on 2 CPU cores: 3 dense sizes x E in {1, 2, 4, 8, 16} x
routers {sbase, hash, rlr} (E = 1, the dense model, once per size): 39 runs.

    python -m routing_lm.sweep --sweep=configs/sweeps/cpu_mini.py --workdir=results/cpu_mini
    python -m routing_lm.fit --results=results/cpu_mini/results.csv --out=results/cpu_mini/fit

Setup (docs/sweeps.md has the measured wall time and the results): `stdlib_text` with a
2,048-token sentencepiece vocabulary; sequences of 64 tokens, batches of 16; the same
token budget for every run (TOKENS = 204,800: 200 steps), as the paper trains every model on the
same 130B tokens. The paper's routing choices: every other FFW routed (R = 0.5), K = 1,
capacity factor 2 in training, every token kept at evaluation. AdamW at 3e-3 (tiny.py's
rate, one for all sizes), 30 warmup steps, cosine to 10%. Validation loss over 16 batches
(16,384 tokens) of the held-out split.

Sizes: 2 blocks, the second one routed (R = 0.5), widths 64/96/128 (d_ff = 4 d, heads of
32); N = L (4 d^2 + 2 d d_ff) = 24 d^2:
  s  d_model  64:  N =  98,304
  m  d_model  96:  N = 221,184
  l  d_model 128:  N = 393,216
Sized so the 39 runs take about 30 minutes on 2 shared CPU cores (measured: docs/sweeps.md).
"""

SIZES = {   # name -> (d_model, num_layers, num_heads)
    "s": (64, 2, 2),
    "m": (96, 2, 3),
    "l": (128, 2, 4),
}
EXPERTS = (2, 4, 8, 16)
ROUTERS = ("sbase", "hash", "rlr")
BATCH, SEQ, STEPS = 16, 64, 200
TOKENS = BATCH * SEQ * STEPS


# Every point's overrides (configs/sweeps/cpu_paper.py reuses them).
OVERRIDES = {
    "model.vocab_size": 2048,
    "model.routing.top_k": 1,
    "model.routing.routing_frequency": 0.5,
    "model.routing.capacity_factor": 2.0,
    "data.task": "stdlib_text", "data.seq_len": SEQ, "data.batch_size": BATCH,
    "data.max_chars": 4_000_000,
    "train.learning_rate": 3e-3, "train.warmup_steps": 30,
    "train.eval_every": 100_000, "train.eval_batches": 16,
    "train.checkpoint_every": 100, "train.keep_checkpoints": 1,
    "train.log_every": 2,   # train_loss_smoothed: mean of the last 10% of logged steps
}


def _shape(size):
  d, layers, heads = SIZES[size]
  return {"model.d_model": d, "model.num_layers": layers, "model.num_heads": heads,
          "model.d_ff": 4 * d}


def get_sweep():
  points = []
  for size in SIZES:
    points.append({"name": f"{size}_dense",
                   "overrides": {**_shape(size), "model.routing.num_experts": 1}})
    for router in ROUTERS:
      for e in EXPERTS:
        points.append({"name": f"{size}_{router}_e{e}",
                       "overrides": {**_shape(size), "model.routing.router": router,
                                     "model.routing.num_experts": e}})
  return {"name": "cpu_mini", "config": "configs/tiny.py", "overrides": OVERRIDES,
          "tokens": TOKENS, "points": points}
