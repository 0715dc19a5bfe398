"""Command line: train or evaluate one config.

    python -m routing_lm.main --config=configs/tiny.py --workdir=/tmp/tiny
    python -m routing_lm.main --config=configs/paper.py:130m,sbase,64 \
        --config.train.num_steps=1000 --workdir=gs://bucket/runs/130m_sbase_64
    python -m routing_lm.main --mode=eval --config=configs/tiny.py --workdir=/tmp/tiny

Running `train` again with the same workdir resumes from its latest checkpoint.
The console script `routing-lm` is the same program.
"""
from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from routing_lm import cpu_malloc

FLAGS = flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for checkpoints, "
                            "TensorBoard logs, metrics.jsonl and summary.json.")
MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (resumes if the workdir "
                         "has a checkpoint) or eval (the latest checkpoint on validation).")
CONFIG = config_flags.DEFINE_config_file("config", None, "A config file, e.g. "
                                         "configs/tiny.py or configs/paper.py:130m,sbase,64.",
                                         lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed.initialize() before anything else: 'auto' when JAX detects a cluster "
    "(Cloud TPU slices, Slurm, Kubernetes), 'on' always (errors surface), 'off' never.")


def initialize_distributed(mode: str) -> None:
  """Joins the multi-host job on TPU pod slices; a no-op on one machine."""
  import jax
  if mode == "off":
    return
  try:
    jax.distributed.initialize()
  except ValueError:   # no cluster detected (a laptop, one CPU or GPU box)
    if mode == "on":
      raise


def quiet_libraries() -> None:
  """Keeps orbax/jax INFO chatter (absl logging) out of the progress output."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)


def main(argv: list[str]) -> None:
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  quiet_libraries()
  initialize_distributed(DISTRIBUTED.value)
  from routing_lm import train
  from routing_lm.checkpoint import CheckpointError
  from routing_lm.config import ConfigError
  from routing_lm.data import DataError
  try:
    if MODE.value == "train":
      result = train.train(CONFIG.value, FLAGS.value)
      result = {k: v for k, v in result.items() if k != "config"}
    else:
      result = train.evaluate_checkpoint(CONFIG.value, FLAGS.value)
  except (ConfigError, DataError, CheckpointError) as e:
    sys.exit(f"error: {e}")
  import jax
  if jax.process_index() == 0:
    print(json.dumps(result, indent=2))


def run() -> None:
  """Entry point of the `routing-lm` console script."""
  cpu_malloc.reexec()
  app.run(main)


if __name__ == "__main__":
  run()
