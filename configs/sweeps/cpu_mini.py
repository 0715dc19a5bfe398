"""The paper's grid in miniature on 2 CPU cores: 3 dense sizes x E in {1, 2, 4, 8, 16} x
routers {sbase, hash, rlr} (E = 1, the dense model, once per size): 39 runs.

    python -m routing_lm.sweep --sweep=configs/sweeps/cpu_mini.py --workdir=results/cpu_mini
    python -m routing_lm.fit --results=results/cpu_mini/results.csv --out=results/cpu_mini/fit

Setup (docs/sweeps.md has the measured wall time and the results): `stdlib_text` with a
2,048-token sentencepiece vocabulary; sequences of 64 tokens, batches of 16; the same
token budget for every run (TOKENS: 300 steps), as the paper trains every model on the
same 130B tokens. The paper's routing choices: every other FFW routed (R = 0.5), K = 1,
capacity factor 2 in training, every token kept at evaluation. AdamW at 3e-3 (tiny.py's
rate, one for all sizes), 30 warmup steps, cosine to 10%. Validation loss over 16 batches
(16,384 tokens) of the held-out split.

Sizes (N = L (4 d^2 + 2 d d_ff), d_ff = 4 d, head size 32):
  s  d_model  64, 2 layers (1 routed):  N =  98,304
  m  d_model  96, 3 layers (1 routed):  N = 331,776
  l  d_model 128, 4 layers (2 routed):  N = 786,432
"""

SIZES = {   # name -> (d_model, num_layers, num_heads)
    "s": (64, 2, 2),
    "m": (96, 3, 3),
    "l": (128, 4, 4),
}
EXPERTS = (2, 4, 8, 16)
ROUTERS = ("sbase", "hash", "rlr")
BATCH, SEQ, STEPS = 16, 64, 300
TOKENS = BATCH * SEQ * STEPS


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
  return {
      "name": "cpu_mini",
      "config": "configs/tiny.py",
      "overrides": {
          "model.vocab_size": 2048,
          "model.routing.top_k": 1,
          "model.routing.routing_frequency": 0.5,
          "model.routing.capacity_factor": 2.0,
          "data.task": "stdlib_text", "data.seq_len": SEQ, "data.batch_size": BATCH,
          "data.max_chars": 4_000_000,
          "train.learning_rate": 3e-3, "train.warmup_steps": 30,
          "train.eval_every": 100_000, "train.eval_batches": 16,
          "train.checkpoint_every": 100, "train.keep_checkpoints": 1,
          "train.log_every": 25,
      },
      "tokens": TOKENS,
      "points": points,
  }
