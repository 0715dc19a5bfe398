"""The default run: a dense model and its S-BASE routed counterpart (same N) on CPU.

    python -m routing_lm.demo --workdir=/tmp/routing_lm_demo

Trains `configs/tiny.py` twice on the offline `stdlib_text` corpus (dense: E = 1;
routed: S-BASE, E = 8, every other FFW routed), prints both final validation losses and
their difference, and saves `<workdir>/demo.png`: both loss curves and the routed model's
expert loads over training.
"""
from __future__ import annotations

import argparse
import json
import logging
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from routing_lm import config as config_lib  # noqa: E402
from routing_lm.metrics import read_jsonl  # noqa: E402


def plot(workdir: str, runs: dict[str, str]) -> str:
  """Loss curves of every run and the expert loads of the routed one -> demo.png."""
  fig, (ax_loss, ax_load) = plt.subplots(1, 2, figsize=(11, 4))
  for label, run_dir in runs.items():
    rows = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    train_rows = [r for r in rows if r.get("loss") is not None]
    val_rows = [r for r in rows if r.get("val_loss") is not None]
    line, = ax_loss.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows],
                         alpha=0.6, label=f"{label} train")
    ax_loss.plot([r["step"] for r in val_rows], [r["val_loss"] for r in val_rows], "o-",
                 color=line.get_color(), label=f"{label} validation")
  ax_loss.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
  ax_loss.legend()
  routed_rows = [r for r in read_jsonl(os.path.join(runs["S-BASE"], "metrics.jsonl"))
                 if r.get("loss") is not None]
  keys = sorted({k for r in routed_rows for k in r if "/load/" in k})
  first_block = keys[0].split("/load/")[0]
  keys = sorted((k for k in keys if k.startswith(first_block + "/load/")),
                key=lambda k: int(k.rsplit("/", 1)[1]))
  loads = np.array([[r[k] for k in keys] for r in routed_rows])
  ax_load.stackplot([r["step"] for r in routed_rows], loads.T,
                    labels=[f"expert {k.rsplit('/', 1)[1]}" for k in keys])
  ax_load.set(xlabel="step", ylabel="fraction of tokens", ylim=(0, 1),
              title=f"S-BASE expert loads ({first_block.split('/')[1]})")
  ax_load.legend(fontsize=7, ncol=2, loc="lower right")
  fig.tight_layout()
  path = os.path.join(workdir, "demo.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="/tmp/routing_lm_demo")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--experts", type=int, default=8)
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)
  from routing_lm.main import quiet_libraries
  quiet_libraries()
  from routing_lm import train
  results, runs = {}, {}
  for label, arg in (("dense", "sbase,1"), ("S-BASE", f"sbase,{args.experts}")):
    config = config_lib.load(f"configs/tiny.py:{arg}", {"train.num_steps": args.steps})
    runs[label] = os.path.join(args.workdir, label.lower().replace("-", ""))
    print(f"== training {label} ({arg}) in {runs[label]}")
    results[label] = train.train(config, runs[label])
  dense, routed = results["dense"]["val_loss"], results["S-BASE"]["val_loss"]
  print(f"dense   N={results['dense']['n_params']:,}  validation loss {dense:.4f}")
  print(f"S-BASE  N={results['S-BASE']['n_params']:,}  P={results['S-BASE']['total_params']:,}"
        f"  validation loss {routed:.4f}")
  print(f"routed - dense = {routed - dense:+.4f} nats/token")
  path = plot(args.workdir, runs)
  print(f"plot: {path}")
  with open(os.path.join(args.workdir, "demo.json"), "w") as f:
    json.dump({"dense_val_loss": dense, "sbase_val_loss": routed,
               "difference": routed - dense}, f, indent=2)


if __name__ == "__main__":
  main()
