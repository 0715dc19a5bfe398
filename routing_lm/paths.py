"""Local paths and URLs (`gs://bucket/...`) behind one API: `etils.epath`, orbax's path library.

Every file the project reads or writes besides checkpoints (metrics, summaries, sweep
results, data caches, corpora) goes through here, so a `gs://` workdir or cache_dir
writes to the bucket, not into a local folder named `gs:`.

Backends (chosen by epath from the path): a local path uses `os`; `gs://`, `s3://`,
`az://`, `hf://` use `tf.io.gfile` when TensorFlow is installed (it is: seqio needs it),
else fsspec (gcsfs for gs://). Only such a URL imports TensorFlow here, and `tf.io.gfile`
does not initialise TF's devices, so `routing_lm.data.tasks` can still hide its GPUs.

Atomic writes (`write_atomic`): a local file is written to `<name>.tmp<pid>` and renamed
over the target (os.replace), so a reader sees the old or the new file, never a part.
On an object store one object upload is already atomic (readers see the old or the new
object), while a rename is a copy and a delete; so objects are written in place.
"""
from __future__ import annotations

import os

from etils import epath

PathLike = str | os.PathLike


def is_local(path: PathLike) -> bool:
  """True for a local path, False for a URL such as `gs://bucket/dir`."""
  return "://" not in os.fspath(path)


def expand(path: PathLike) -> str:
  """A local path with `~` expanded; a URL unchanged."""
  return os.path.expanduser(os.fspath(path)) if is_local(path) else os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
  """An `epath.Path` to read or write `path` (a local `~` is expanded)."""
  return epath.Path(expand(path))


def absolute(path: PathLike) -> str:
  """A local path made absolute (`~` expanded); a URL unchanged (orbax wants either)."""
  return os.path.abspath(expand(path)) if is_local(path) else os.fspath(path)


def join(path: PathLike, *parts: str) -> str:
  """`path/part/...` as a string, URL or local, with nothing expanded (for printing)."""
  return os.fspath(epath.Path(path).joinpath(*parts))


def write_atomic(path: PathLike, data: bytes | str) -> None:
  """Writes `data` so that no reader ever sees a partial file (see the module docstring).

  The parent folder is created if missing.
  """
  p = as_path(path)
  p.parent.mkdir(parents=True, exist_ok=True)
  raw = data.encode("utf-8") if isinstance(data, str) else data
  if not is_local(path):
    p.write_bytes(raw)   # one object upload: atomic on GCS/S3
    return
  tmp = p.parent / f"{p.name}.tmp{os.getpid()}"
  tmp.write_bytes(raw)
  tmp.replace(p)


def read_text(path: PathLike) -> str | None:
  """The UTF-8 text at `path`, or None when there is no such file."""
  p = as_path(path)
  try:
    return p.read_text(encoding="utf-8")
  except FileNotFoundError:
    return None
