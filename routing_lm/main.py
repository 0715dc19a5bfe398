"""Command line: train or evaluate one config.

    python -m routing_lm.main --config=configs/tiny.py --workdir=/tmp/tiny
    python -m routing_lm.main --config=configs/paper.py:130m,sbase,64 \
        --config.train.num_steps=1000 --workdir=gs://bucket/runs/130m_sbase_64
    python -m routing_lm.main --mode=eval --config=configs/tiny.py --workdir=/tmp/tiny
    python -m routing_lm.main --mode=compile --config=configs/paper.py:130m,sbase,64 \
        --config.mesh.data=4 --config.mesh.expert=4 --topology=v5e:4x4

Running `train` again with the same workdir resumes from its latest checkpoint.
`--mode=compile` compiles the train and eval steps for the TPU slice `--topology` on any
host (libtpu, no TPU; `routing_lm.tpu_compile`), prints per-chip memory, FLOPs,
collectives and a roofline, and exits non-zero when the config does not fit.
The console script `routing-lm` is the same program.

`--config=<file>[:<arg>]` is read by `routing_lm.config.load` (a `configs/...` path is
found in the working directory or, failing that, in the installed package); every
`--config.<field>=<value>` then overrides one field, type-checked by ml_collections.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Sequence

from absl import app, flags
import ml_collections
from ml_collections import config_flags

from routing_lm import config as config_lib

FLAGS = flags.DEFINE_string("workdir", None, "Directory (or gs:// path) for checkpoints, "
                            "TensorBoard logs, metrics.jsonl and summary.json.")
MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "compile"],
                         "train (resumes if the workdir has a checkpoint), eval (the latest "
                         "checkpoint on validation) or compile (compile for --topology and "
                         "report memory, FLOPs, collectives; no workdir).")
TOPOLOGY = flags.DEFINE_string("topology", None, "--mode=compile: the TPU slice, e.g. v5e:4x4, "
                               "v5p:2x2x4 (one chip: v5e:2x2 with a 1-device mesh).")
CONFIG_HELP = ("A config file and its argument, e.g. configs/tiny.py or "
               "configs/paper.py:130m,sbase,64; --config.<field>=<value> overrides a field.")
flags.register_multi_flags_validator(
    ["workdir", "mode", "topology"],
    lambda f: (f["workdir"] is not None) if f["mode"] != "compile" else f["topology"] is not None,
    "--workdir is required (train, eval); --mode=compile needs --topology instead.")


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


def compile_check(config: ml_collections.ConfigDict, topology: str) -> None:
  """`--mode=compile`: the report of `tpu_compile.check`; exits 1 when it does not fit."""
  from routing_lm import tpu_compile
  try:
    report = tpu_compile.check(config, topology)
  except (config_lib.ConfigError, tpu_compile.CompileCheckError) as e:
    sys.exit(f"error: {e}")
  print("\n".join(tpu_compile.format_report(report)), flush=True)
  if not report.fits:
    sys.exit(1)


def main(argv: list[str]) -> None:
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  quiet_libraries()
  if MODE.value == "compile":
    compile_check(flags.FLAGS.config, TOPOLOGY.value)
    return
  initialize_distributed(DISTRIBUTED.value)
  from routing_lm import train
  from routing_lm.checkpoint import CheckpointError
  from routing_lm.data import DataError
  config = flags.FLAGS.config
  try:
    if MODE.value == "train":
      result = train.train(config, FLAGS.value)
      result = {k: v for k, v in result.items() if k != "config"}
    else:
      result = train.evaluate_checkpoint(config, FLAGS.value)
  except (config_lib.ConfigError, DataError, CheckpointError) as e:
    sys.exit(f"error: {e}")
  import jax
  if jax.process_index() == 0:
    print(json.dumps(result, indent=2))


def pop_config_spec(argv: Sequence[str]) -> tuple[str | None, list[str]]:
  """Finds `--config=<spec>` (or `--config <spec>`) in argv; returns it and the rest."""
  rest, spec, args = [], None, list(argv)
  while args:
    a = args.pop(0)
    if a in ("--config", "-config") and args:
      spec = args.pop(0)
    elif a.startswith(("--config=", "-config=")):
      spec = a.split("=", 1)[1]
    else:
      rest.append(a)
  return spec, rest


def define_config_flag(argv: Sequence[str],
                       flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """Loads `--config=<file>[:<arg>]` with `config.load` and defines the `config` flag on
  `flag_values`, so that parsing the returned argv (argv without `--config=...`) applies
  every `--config.<field>=<value>` override, type-checked by ml_collections."""
  spec, rest = pop_config_spec(argv)
  if spec is None and not any(a in ("--help", "-h", "--helpfull") for a in rest):
    raise config_lib.ConfigError("--config is required, e.g. --config=configs/tiny.py or "
                                 "--config=configs/paper.py:130m,sbase,64")
  config = config_lib.load(spec) if spec else ml_collections.ConfigDict()
  kept = []
  for arg in rest:                     # a misspelt field: name it and the closest one
    if arg.startswith(("--config.", "-config.")):
      key, _, value = arg.split("config.", 1)[1].partition("=")
      config_lib.check_field(config, key, f"--config={spec}")
      if value.lower() == "none":      # ml_collections' flags cannot parse None for a number
        config_lib.apply_overrides(config, {key: None}, f"--config={spec}")
        continue
    kept.append(arg)
  rest = kept
  config_flags.DEFINE_config_dict("config", config, CONFIG_HELP, flag_values=flag_values,
                                  sys_argv=rest)
  return rest


def run(argv: Sequence[str] | None = None) -> None:
  """Entry point of `python -m routing_lm.main` and the `routing-lm` console script."""
  try:
    argv = define_config_flag(list(sys.argv if argv is None else argv))
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  app.run(main, argv=argv)


if __name__ == "__main__":
  run()
