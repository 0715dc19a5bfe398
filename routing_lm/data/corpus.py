"""Local text corpora: documents, a deterministic train/validation split, a size cap.

A *document* is one file (a `Document(key, text)`); packing later joins and splits
documents, never crosses the split.

- `stdlib_text`: the `.py` sources of the running interpreter's standard library
  (`sysconfig.get_paths()["stdlib"]`), without test directories, `site-packages`
  and `__pycache__`. Keys are `stdlib/<path relative to the stdlib root>`, so the
  split is the same on every machine with the same Python version.
- `text_files`: the comma-separated paths or globs of `data.files` (`**` recurses), local
  or URLs (`gs://bucket/corpus/*/*.txt`, read through `routing_lm.paths`; one `*` per
  directory level there, no `**`).
  Keys are paths relative to the parent of each pattern's literal directory, so they
  keep that directory's name: `/data/c4/**/*.txt` keys `/data/c4/en/a.txt` as
  `c4/en/a.txt`, `books/part-0.txt` keys itself. The split thus stays the same when the
  corpus is copied to another directory, machine or bucket. A file matched by several patterns
  takes its longest key (whatever the patterns' order); two files with one key are an
  error.

Split: a document goes to validation when `sha256("split:" + key)`, read as a number
in [0, 1), is below `validation_fraction`. A file's side therefore depends on its own
key only: adding or removing other files never moves it. (If the hash leaves one
side empty, the file with the smallest / largest hash moves over, so a corpus of a
few files still has both splits.)

Cap: `max_chars > 0` keeps documents in the order of a second, independent hash
(`sha256("order:" + key)`) until the cap, truncating the last one. The cap thus
samples across the whole library instead of its alphabetical head, and keeps the
validation share near `validation_fraction`.

Errors are `DataError` (a `ValueError`) naming the config field, its value and the
fix. Undecodable (non-UTF-8) text in `text_files` is an error, not a silent skip: a
binary file matched by a glob is almost always a mistake in the glob. In the
standard library (which the user cannot fix) such a file is skipped with a warning.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import os
import posixpath
import sysconfig

from routing_lm import paths

log = logging.getLogger("routing_lm.data")

_EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


class DataError(ValueError):
  """A data problem; the message names the config field, the value and the fix."""


@dataclasses.dataclass(frozen=True)
class Document:
  key: str    # stable identity used for the split and the cap order
  text: str


@dataclasses.dataclass(frozen=True)
class Corpus:
  """A named corpus already split into train and validation documents."""
  name: str
  train: tuple[Document, ...]
  validation: tuple[Document, ...]

  def fingerprint(self, split: str | None = None) -> str:
    """sha256 hex over the (key, text) of one split (or of both, when None)."""
    h = hashlib.sha256(self.name.encode())
    for s in ([split] if split else ["train", "validation"]):
      for d in getattr(self, s):
        h.update(f"\0{s}\0{d.key}\0{len(d.text)}\0".encode())
        h.update(d.text.encode("utf-8"))
    return h.hexdigest()

  def num_chars(self, split: str) -> int:
    return sum(len(d.text) for d in getattr(self, split))


def _unit_hash(tag: str, key: str) -> float:
  """A deterministic number in [0, 1) from `tag` and `key`."""
  digest = hashlib.sha256(f"{tag}:{key}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(key: str, validation_fraction: float) -> str:
  """'validation' or 'train' for a document key, by hash of the key alone."""
  return "validation" if _unit_hash("split", key) < validation_fraction else "train"


def _check_fraction(validation_fraction: float) -> None:
  if not 0.0 < validation_fraction < 1.0:
    raise DataError(
        f"data.validation_fraction={validation_fraction!r} must be in (0, 1); "
        "fix: set e.g. --config.data.validation_fraction=0.05.")


def _decode(path: str, raw: bytes, field: str) -> str:
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(
        f"{field}: {path} is not valid UTF-8 text (byte {raw[e.start]:#04x} at offset "
        f"{e.start}). Fix: convert it (e.g. `iconv -f latin1 -t utf-8`), or change "
        f"{field} so it no longer matches this file.") from None
  return text.replace("\r\n", "\n")


def _select(keys: list[str], read, max_chars: int) -> list[Document]:
  """Documents in cap order, non-empty, truncated at `max_chars` (0 = no cap)."""
  docs, total = [], 0
  for key in sorted(keys, key=lambda k: (_unit_hash("order", k), k)):
    text = read(key)
    if text is None or not text.strip():
      continue
    if max_chars and total + len(text) > max_chars:
      text = text[:max_chars - total]
      if text.strip():
        docs.append(Document(key, text))
      break
    docs.append(Document(key, text))
    total += len(text)
  return docs


def _split(name: str, docs: list[Document], validation_fraction: float,
           field: str, value: str) -> Corpus:
  if len(docs) < 2:
    raise DataError(
        f"{field}={value!r} gives {len(docs)} non-empty document(s); train and "
        "validation need different documents, so at least 2 are required. Fix: add "
        f"files to {field} (or raise data.max_chars).")
  train = [d for d in docs if split_of(d.key, validation_fraction) == "train"]
  val = [d for d in docs if split_of(d.key, validation_fraction) == "validation"]
  by_hash = lambda d: _unit_hash("split", d.key)  # noqa: E731
  if not val:
    move = min(train, key=by_hash)
    train.remove(move)
    val.append(move)
  elif not train:
    move = max(val, key=by_hash)
    val.remove(move)
    train.append(move)
  return Corpus(name, tuple(train), tuple(val))


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def stdlib_text(max_chars: int = 0, validation_fraction: float = 0.05) -> Corpus:
  """The standard library's .py files (no tests, no site-packages) as a Corpus."""
  _check_fraction(validation_fraction)
  root = stdlib_root()
  files = {}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS)
    for f in filenames:
      if f.endswith(".py"):
        full = os.path.join(dirpath, f)
        files["stdlib/" + os.path.relpath(full, root).replace(os.sep, "/")] = full

  def read(key: str) -> str | None:
    with open(files[key], "rb") as fh:
      raw = fh.read()
    try:
      return raw.decode("utf-8").replace("\r\n", "\n")
    except UnicodeDecodeError:
      log.warning("stdlib_text: skipping %s (not UTF-8)", files[key])
      return None

  docs = _select(list(files), read, max_chars)
  if not docs:
    raise DataError(
        f"data.task='stdlib_text': no .py files found under the standard library "
        f"{root!r}. Fix: use data.task='text_files' with data.files=<your text files>.")
  return _split("stdlib_text", docs, validation_fraction, "data.task",
                f"stdlib_text ({root})")


def _key_root(pattern: str) -> str:
  """The directory a pattern's keys are relative to: the parent of its literal head.

  The literal head is the pattern's directory up to its first component with a glob
  character: `/data/c4/**/*.txt` -> `/data/c4` -> root `/data`.
  """
  head = os.path.dirname(pattern)
  while glob.has_magic(head):
    head = os.path.dirname(head)
  return os.path.dirname(os.path.abspath(head))


def _split_url(url: str) -> tuple[str, str]:
  """'gs://bucket/a/b.txt' -> ('gs://bucket', '/a/b.txt'): the store and a posix path."""
  scheme, _, rest = url.partition("://")
  bucket, _, inside = rest.partition("/")
  return f"{scheme}://{bucket}", "/" + inside


def _expand_url(pattern: str) -> tuple[list[str], str]:
  """(matching file URLs, the URL their keys are relative to) for a gs:// pattern.

  `**` is refused: on an object store every directory level is a listing request.
  """
  if "**" in pattern:
    raise DataError(
        f"data.files: {pattern!r} uses '**', which a URL pattern does not support (each "
        "directory level would be a listing request). Fix: use one '*' per level, e.g. "
        "'gs://bucket/corpus/*/*.txt'.")
  store, inside = _split_url(pattern)
  head = posixpath.dirname(inside)
  while glob.has_magic(head):
    head = posixpath.dirname(head)
  if glob.has_magic(inside):
    found = list(paths.as_path(store + head).glob(posixpath.relpath(inside, head)))
  else:
    literal = paths.as_path(pattern)
    if literal.is_dir():
      raise DataError(
          f"data.files: {pattern!r} is a directory. Fix: name its files with a glob, e.g. "
          f"'{pattern.rstrip('/')}/*.txt'.")
    found = [literal] if literal.exists() else []
  files = sorted(os.fspath(m) for m in found if not m.is_dir())
  return files, store + posixpath.dirname(head)


def _expand_local(pattern: str) -> tuple[list[str], str]:
  """(matching absolute file paths, the folder their keys are relative to)."""
  expanded = os.path.expanduser(pattern)
  if os.path.isdir(expanded):
    raise DataError(
        f"data.files: {pattern!r} is a directory. Fix: name its files with a glob, e.g. "
        f"'{pattern.rstrip('/')}/**/*.txt'.")
  files = [os.path.abspath(m) for m in sorted(glob.glob(expanded, recursive=True))
           if os.path.isfile(m)]
  return files, _key_root(expanded)


def _relative(path: str, root: str) -> str:
  """`path` below `root`, with '/' separators (a document key)."""
  if paths.is_local(path):
    return os.path.relpath(path, root).replace(os.sep, "/")
  return path[len(root):].lstrip("/")


def expand_files(files: str) -> dict[str, str]:
  """{key: absolute path or URL} for comma-separated paths, URLs (gs://) or globs (keys:
  module docstring)."""
  patterns = [p.strip() for p in (files or "").split(",") if p.strip()]
  if not patterns:
    raise DataError(
        f"data.files={files!r} is empty but data.task='text_files' needs text. Fix: "
        "--config.data.files='/path/to/*.txt,/other/file.md' (comma-separated paths "
        "or globs).")
  keys: dict[str, str] = {}                       # absolute path -> key
  for p in patterns:
    files_only, root = _expand_local(p) if paths.is_local(p) else _expand_url(p)
    if not files_only:
      raise DataError(
          f"data.files: {p!r} matches no files (working directory {os.getcwd()!r}). "
          "Fix: check the path; globs follow Python's glob with `**` for subdirectories.")
    for path in files_only:
      doc_key = _relative(path, root)
      keys[path] = max(keys.get(path, doc_key), doc_key, key=lambda k: (k.count("/"), k))
  out: dict[str, str] = {}
  for path, key in sorted(keys.items()):
    if key in out:
      raise DataError(
          f"data.files={files!r}: {out[key]!r} and {path!r} both get the document key "
          f"{key!r} (the path below the parent of each pattern's literal directory; "
          "the key decides the train/validation split). Fix: match both with one glob "
          "over a common parent directory, or rename one of them.")
    out[key] = path
  return out


def text_files(files: str, max_chars: int = 0,
               validation_fraction: float = 0.05) -> Corpus:
  """The files named by `data.files` (comma-separated paths/globs) as a Corpus."""
  _check_fraction(validation_fraction)
  files_by_key = expand_files(files)

  def read(key: str) -> str:
    path = files_by_key[key]
    return _decode(path, paths.as_path(path).read_bytes(), "data.files")

  docs = _select(list(files_by_key), read, max_chars)
  if not docs:
    raise DataError(
        f"data.files={files!r} matches {len(files_by_key)} file(s) but they hold no text "
        "(empty or whitespace only). Fix: point data.files at non-empty UTF-8 files.")
  return _split("text_files", docs, validation_fraction, "data.files", files)


def load(cfg) -> Corpus:
  """The Corpus for a `config.data` of task stdlib_text or text_files."""
  max_chars = int(cfg.get("max_chars", 0) or 0)
  if max_chars < 0:
    raise DataError(f"data.max_chars={max_chars} must be >= 0 (0 = no cap).")
  frac = float(cfg.get("validation_fraction", 0.05))
  if cfg.task == "stdlib_text":
    return stdlib_text(max_chars, frac)
  if cfg.task == "text_files":
    return text_files(cfg.get("files", ""), max_chars, frac)
  raise DataError(f"data.task={cfg.task!r} has no local corpus.")
