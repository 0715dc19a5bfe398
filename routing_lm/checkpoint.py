"""Orbax checkpoints in `<workdir>/checkpoints`: periodic, atomic, keep the last k.

Each step directory holds the train state (sharded arrays) and `meta` (the model and
data config that produced it). Restoring builds the target from the current mesh's
abstract state, so a checkpoint saved on one mesh shape restores onto another. A
workdir whose checkpoint came from a different model is refused, naming the field; a
field the checkpoint predates (added to configs/base.py since) is accepted at its default.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import ml_collections
import orbax.checkpoint as ocp

from routing_lm import paths

log = logging.getLogger("routing_lm")

# Fields that must match to resume: the parameters' shapes and the data stream.
COMPATIBLE_FIELDS = ("model", "data.task", "data.seq_len", "data.batch_size", "data.seed",
                     "train.seed")


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used; the message says which and what to do."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def _fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  flat = _flatten(json.loads(config.to_json()))
  # num_groups follows the mesh; a checkpoint restores onto any mesh.
  return {k: v for k, v in flat.items()
          if any(k == f or k.startswith(f + ".") for f in COMPATIBLE_FIELDS)
          and k != "model.routing.num_groups"}


def incompatible_fields(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
  """The fingerprint fields that differ between a checkpoint's and the current config. A
  field the checkpoint lacks (added to configs/base.py later) counts only when its current
  value is not configs/base.py's default, the behaviour the checkpoint was trained with."""
  defaults = None
  diff = []
  for k in sorted(set(saved) | set(now)):
    if saved.get(k) == now.get(k):
      continue
    if k not in saved:
      if defaults is None:
        from routing_lm import config as config_lib
        defaults = _fingerprint(config_lib.load("configs/base.py"))
      if k in defaults and now[k] == defaults[k]:
        continue
    diff.append(k)
  return diff


class Checkpointer:
  def __init__(self, workdir: str, config: ml_collections.ConfigDict, every: int, keep: int):
    self.directory = paths.join(paths.absolute(workdir), "checkpoints")
    self.every = every
    self.fingerprint = _fingerprint(config)
    self.manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=True))

  def _args(self, state: dict[str, Any]) -> ocp.args.Composite:
    return ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(self.fingerprint))

  def maybe_save(self, step: int, state: dict[str, Any], force: bool = False) -> None:
    if force or step % self.every == 0 or self.manager.reached_preemption(step):
      self.save_now(step, state)

  def save_now(self, step: int, state: dict[str, Any]) -> None:
    if step not in self.manager.all_steps():
      self.manager.save(step, args=self._args(state), force=True)
    self.manager.wait_until_finished()

  def restore_latest(self, abstract_state: dict[str, Any],
                     required: bool = False) -> dict[str, Any] | None:
    """The latest checkpoint restored into `abstract_state`'s shapes and shardings."""
    step = self.manager.latest_step()
    if step is None:
      if required:
        raise CheckpointError(f"no checkpoint in {self.directory}; train first, or pass the "
                              "--workdir of a finished run.")
      return None
    try:
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # noqa: BLE001 - any read failure means the step is unusable
      raise self._corrupt(step, e) from e
    diff = incompatible_fields(meta, self.fingerprint)
    if diff:
      k = diff[0]
      raise CheckpointError(
          f"the checkpoint at step {step} in {self.directory} comes from an incompatible "
          f"config: config.{k} is {meta.get(k)!r} there but {self.fingerprint.get(k)!r} now "
          f"({len(diff)} field(s) differ: {', '.join(diff[:5])}). Use a new --workdir, or "
          "restore the old value.")
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    except Exception as e:  # noqa: BLE001
      raise self._corrupt(step, e) from e
    log.info("restored step %d from %s", step, self.directory)
    return restored["state"]

  def _corrupt(self, step: int, error: Exception) -> CheckpointError:
    earlier = [s for s in self.manager.all_steps() if s < step]
    return CheckpointError(
        f"the latest checkpoint (step {step}) in {self.directory} cannot be read: "
        f"{type(error).__name__}: {str(error)[:300]}. Earlier checkpoints are untouched: "
        f"{earlier or 'none'}. To resume from the previous one, move "
        f"{paths.join(self.directory, str(step))} out of the way and rerun.")

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
