"""Where training metrics go: TensorBoard (tensorboardX), `metrics.jsonl`, a progress bar.

Only process 0 writes; other hosts get no-op writers.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import ml_collections
import tqdm


class MetricWriter:
  """Scalars to TensorBoard and to `<workdir>/metrics.jsonl` (one JSON object per step)."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self.workdir = workdir
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter
    os.makedirs(workdir, exist_ok=True)
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write_config(self, config: ml_collections.ConfigDict, counts: dict[str, int]) -> None:
    if self.enabled:
      self.tb.add_text("config", "```\n" + config.to_json(indent=2) + "\n```", 0)
      self.tb.add_text("counts", json.dumps(counts), 0)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.enabled:
      return
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    clean = {k: (v if math.isfinite(v) else None) for k, v in scalars.items()}
    self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
    self.jsonl.flush()

  def last_value(self, key: str, up_to_step: int) -> float:
    """The last logged `key` at or before `up_to_step` (0 if none): resumes continue it."""
    path = os.path.join(self.workdir, "metrics.jsonl")
    if not os.path.exists(path):
      return 0.0
    values = [r[key] for r in read_jsonl(path)
              if r.get(key) is not None and r["step"] <= up_to_step]
    return float(values[-1]) if values else 0.0

  def write_summary(self, summary: dict[str, Any]) -> None:
    if not self.enabled:
      return
    path = os.path.join(self.workdir, "summary.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)   # atomic: a sweep never reads half a summary

  def close(self) -> None:
    if self.enabled:
      self.tb.close()
      self.jsonl.close()


class Progress:
  """A tqdm bar with step, loss and tokens/s (process 0 only)."""

  def __init__(self, total: int, start: int):
    self.bar = tqdm.tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                         disable=jax.process_index() != 0, mininterval=1.0)

  def update(self, step: int, loss: float, tokens_per_s: float) -> None:
    self.bar.update(step - self.bar.n)
    self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)

  def note(self, text: str) -> None:
    self.bar.write(text)

  def close(self) -> None:
    self.bar.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
