"""Where training metrics go: TensorBoard (tensorboardX), `metrics.jsonl`, a progress bar.

Only process 0 writes; other hosts get no-op writers. The workdir may be local or a URL
(`gs://bucket/run`); every file goes through `routing_lm.paths` (etils.epath):

- `metrics.jsonl`: locally appended and flushed at each write; on an object store (where
  an object cannot be appended to) the whole file is uploaded again at each write, one
  atomic object write, so a reader never sees a torn line.
- `summary.json`: `paths.write_atomic` (a sweep never reads half a summary).
- TensorBoard: tensorboardX writes local event files itself; for a URL its events go
  through `_EventFile` (buffered, the file uploaded whole at each flush, every
  `flush_secs` and at close). tensorboardX's own gs:// writer needs
  google-cloud-storage; this one uses whatever epath uses (tf.io.gfile or fsspec).
"""
from __future__ import annotations

import io
import json
import math
from typing import Any

import ml_collections
import tqdm

from routing_lm import paths

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
TENSORBOARD = "tensorboard"


class _EventFile:
  """A tensorboardX event file at a URL: buffered; each flush uploads the whole file."""

  def __init__(self, path: str):
    self.path = path
    self.buffer = io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    paths.write_atomic(self.path, self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EventFiles:
  """tensorboardX writer factory (`record_writer.register_writer_factory`) over epath."""

  def open(self, path: str) -> _EventFile:
    return _EventFile(path)

  def directory_check(self, path: str) -> None:
    paths.as_path(path).mkdir(parents=True, exist_ok=True)


def _tensorboard(logdir: str, start_step: int | None):
  """A tensorboardX SummaryWriter for a local folder or a URL (see the module docstring).
  A run resumed at `start_step` has TensorBoard hide its earlier events of later steps."""
  from tensorboardX import SummaryWriter, record_writer
  if not paths.is_local(logdir):
    record_writer.register_writer_factory(logdir.split(":", 1)[0], _EventFiles())
  return SummaryWriter(logdir, purge_step=None if start_step is None else start_step + 1)


class _JsonLines:
  """`metrics.jsonl`: appended locally; rewritten whole (one object write) at a URL.

  Opened for a run resumed at `start_step`, it first drops the rows of later steps (logged
  after the checkpoint the run resumes from, then lost with the process), so that the
  resumed run's rows follow on from the checkpoint's step without repeating any step."""

  def __init__(self, path: str, start_step: int | None = None):
    self.path = path
    if start_step is not None:
      rows = read_jsonl(path, missing_ok=True)
      kept = [r for r in rows if r["step"] <= start_step]
      if len(kept) < len(rows):
        paths.write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    if paths.is_local(path):
      self.file = paths.as_path(path).open("a")
    else:
      self.file, self.text = None, paths.read_text(path) or ""

  def write(self, line: str) -> None:
    if self.file is not None:
      self.file.write(line)
      self.file.flush()
    else:
      self.text += line
      paths.write_atomic(self.path, self.text)

  def close(self) -> None:
    if self.file is not None:
      self.file.close()


class MetricWriter:
  """Scalars to TensorBoard and to `<workdir>/metrics.jsonl` (one JSON object per step).
  `start_step`: the step a run starts (0) or resumes from: rows of later steps, left by
  the interrupted run after its last checkpoint, are dropped. None keeps every row."""

  def __init__(self, workdir: str, start_step: int | None = None):
    import jax   # here, not at import: sweep and demo read files without loading jax
    self.enabled = jax.process_index() == 0
    self.workdir = str(workdir)
    self.metrics_path = paths.join(self.workdir, METRICS)
    if not self.enabled:
      return
    paths.as_path(self.workdir).mkdir(parents=True, exist_ok=True)
    self.tb = _tensorboard(str(paths.as_path(paths.join(self.workdir, TENSORBOARD))),
                           start_step)
    self.jsonl = _JsonLines(self.metrics_path, start_step)

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

  def last_value(self, key: str, up_to_step: int) -> float:
    """The last logged `key` at or before `up_to_step` (0 if none): resumes continue it."""
    values = [r[key] for r in read_jsonl(self.metrics_path, missing_ok=True)
              if r.get(key) is not None and r["step"] <= up_to_step]
    return float(values[-1]) if values else 0.0

  def write_summary(self, summary: dict[str, Any]) -> None:
    if self.enabled:
      paths.write_atomic(paths.join(self.workdir, SUMMARY), json.dumps(summary, indent=2))

  def close(self) -> None:
    if self.enabled:
      self.tb.close()
      self.jsonl.close()


class Progress:
  """A tqdm bar with step, loss, tokens/s and router-collapse alarms (process 0 only)."""

  def __init__(self, total: int, start: int):
    import jax
    self.bar = tqdm.tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                         disable=jax.process_index() != 0, mininterval=1.0)

  def update(self, step: int, loss: float, tokens_per_s: float,
             collapsed: list[int] = ()) -> None:
    """`collapsed`: blocks with an ongoing router-collapse alarm (`health.CollapseAlarm`),
    shown as `collapse=block 1,3` while it lasts."""
    self.bar.update(step - self.bar.n)
    extra = {"collapse": "block " + ",".join(map(str, collapsed))} if collapsed else {}
    self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", **extra,
                         refresh=False)

  def note(self, text: str) -> None:
    self.bar.write(text)

  def close(self) -> None:
    self.bar.close()


def read_jsonl(path: paths.PathLike, missing_ok: bool = False) -> list[dict[str, Any]]:
  """The rows of a JSON-lines file (local or URL); [] for a missing file if `missing_ok`."""
  text = paths.read_text(path)
  if text is None:
    if missing_ok:
      return []
    raise FileNotFoundError(f"{path} does not exist")
  return [json.loads(line) for line in text.splitlines() if line.strip()]
