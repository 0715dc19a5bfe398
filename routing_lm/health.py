"""Router health at each log step: the largest expert's share, the share of tokens whose
expert changed, and the collapse alarm.

- `max_share`: the fraction of the step's tokens that chose the busiest expert,
  max_e load_e * K (load: fraction of the (token, choice) assignments; 1/E balanced, 1 when
  every token takes that expert). Logged as `router/block<L>/max_share`.
- `switched`: the share of a fixed probe batch's tokens (the first validation batch,
  routed in evaluation mode, so deterministic and independent of the training batch)
  whose set of experts differs from the previous log step's (or, at the first log of an
  invocation, from the start of that invocation). Logged as `router/block<L>/switched`.
  Evaluation-mode routing is the router's own preference (S-BASE without Sinkhorn, RL-R
  greedy, the loss-free router with its bias), so it measures the router's drift.
- `CollapseAlarm`: a layer whose busiest expert takes more than `train.collapse_share`
  of the tokens at `train.collapse_intervals` consecutive log steps raises one warning
  (again only after it recovers and collapses anew); the alarms go to the log, the
  progress bar and `summary.json` (`collapse_alarms`).
"""
from __future__ import annotations

import re
from typing import Any, Iterable

import numpy as np

from routing_lm.errors import require

SHARE_KEY = "router/block{}/max_share"
SWITCHED_KEY = "router/block{}/switched"


def max_share(load: np.ndarray, top_k: int) -> float:
  """load [E] (assignment fractions, sum 1) -> the busiest expert's share of tokens."""
  return float(np.max(np.asarray(load)) * top_k)


def switched_share(previous: np.ndarray, current: np.ndarray,
                   mask: np.ndarray | None = None) -> float:
  """Expert ids [B, S, K] at two log steps -> share of tokens whose set of experts
  changed, over tokens with mask [B, S] > 0 (all if None)."""
  changed = np.any(np.sort(previous, axis=-1) != np.sort(current, axis=-1), axis=-1)
  keep = np.ones(changed.shape, bool) if mask is None else np.asarray(mask) > 0
  return float(np.sum(changed & keep) / max(np.sum(keep), 1))


class CollapseAlarm:
  """Counts, per layer, consecutive log steps whose `max_share` exceeds `share`; at
  `intervals` of them it records an alarm and returns its message."""

  def __init__(self, share: float, intervals: int):
    require(isinstance(share, (int, float)) and 0 < share <= 1, "train.collapse_share",
            share, "a fraction in (0, 1]: the busiest expert's share of tokens that counts "
            "as a collapse (1 never fires)")
    require(isinstance(intervals, int) and intervals >= 1, "train.collapse_intervals",
            intervals, "an integer >= 1: consecutive log steps before the alarm")
    self.share, self.intervals = float(share), intervals
    self.streak: dict[int, int] = {}
    self.alarms: list[dict[str, Any]] = []

  def update(self, step: int, shares: dict[int, float]) -> list[str]:
    """shares: {block index: max_share} of one log step -> messages of new alarms."""
    messages = []
    for layer, value in sorted(shares.items()):
      self.streak[layer] = self.streak.get(layer, 0) + 1 if value > self.share else 0
      if self.streak[layer] == self.intervals:
        alarm = {"layer": layer, "step": step, "share": float(value),
                 "intervals": self.intervals, "threshold": self.share}
        self.alarms.append(alarm)
        messages.append(self.message(alarm))
    return messages

  @staticmethod
  def message(alarm: dict[str, Any]) -> str:
    return (f"router collapse in block {alarm['layer']}: one expert took "
            f"{alarm['share']:.0%} of the tokens (> {alarm['threshold']:.0%}) for "
            f"{alarm['intervals']} consecutive log steps, up to step {alarm['step']}")

  def active(self) -> list[int]:
    """Blocks whose collapse is ongoing (alarmed and not recovered)."""
    return [layer for layer, n in sorted(self.streak.items()) if n >= self.intervals]

  def replay(self, rows: Iterable[dict[str, Any]], up_to_step: int) -> None:
    """Restores the streaks and alarms of a resumed run from its `metrics.jsonl` rows
    (the last row of each step at or before `up_to_step`), silently."""
    pattern = re.compile(SHARE_KEY.format(r"(\d+)") + "$")
    by_step: dict[int, dict[int, float]] = {}
    for row in rows:
      if row.get("step", up_to_step + 1) > up_to_step:
        continue
      shares = {int(m.group(1)): v for k, v in row.items()
                if (m := pattern.match(k)) and v is not None}
      if shares:
        by_step[row["step"]] = shares
    for step in sorted(by_step):
      self.update(step, by_step[step])
