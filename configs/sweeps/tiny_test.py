"""A 4-point sweep small enough for tests (tests/test_sweep.py): a few steps per point.

    python -m routing_lm.sweep --sweep=configs/sweeps/tiny_test.py --workdir=/tmp/tiny_sweep

Dense, S-BASE E=4, HASH E=4 and RL-R E=2 on `stdlib_text`; 6 steps of 8 x 64 tokens,
checkpoints every 2 steps (so an interrupted point resumes mid-run).
"""

STEPS = 6
BATCH, SEQ = 8, 64


def get_sweep():
  return {
      "name": "tiny_test",
      "config": "configs/tiny.py",
      "overrides": {
          "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2,
          "model.d_ff": 128,
          "data.seq_len": SEQ, "data.batch_size": BATCH,
          "train.warmup_steps": 2, "train.eval_every": 1000, "train.eval_batches": 2,
          "train.checkpoint_every": 2, "train.keep_checkpoints": 3, "train.log_every": 2,
      },
      "tokens": STEPS * BATCH * SEQ,
      "points": [
          {"name": "dense", "overrides": {"model.routing.num_experts": 1}},
          {"name": "sbase_e4", "overrides": {"model.routing.router": "sbase",
                                             "model.routing.num_experts": 4}},
          {"name": "hash_e4", "overrides": {"model.routing.router": "hash",
                                            "model.routing.num_experts": 4}},
          {"name": "rlr_e2", "overrides": {"model.routing.router": "rlr",
                                           "model.routing.num_experts": 2}},
      ],
  }
