"""The trainer's one data entry point: `make_pipeline(config.data) -> Pipeline`.

    pipe = data.make_pipeline(config.data)
    pipe.vocab_size                    # pieces in the sentencepiece model used
    pipe.unigram_entropy               # nats/token of the train split's unigram distribution
    pipe.train_batches(start_step)     # endless; item i is global step start_step + i
    pipe.validation_batches(n)         # a fixed list of <= n batches

A batch is this host's share of the global batch (`data.batch_size //
jax.process_count()` rows, taken by `jax.process_index()`), as numpy arrays
[batch, seq_len]: `inputs`, `targets`, `segment_ids` (0 = padding), `positions`
(int32) and `weights` (float32, 0 on padding).

Design: the batch at global step s is a pure function of (config, s), so a resumed
run sees exactly the batches of an uninterrupted one.

- Local corpora (stdlib_text, text_files; `ArrayPipeline`): seqio runs once per
  split (no shuffle, one epoch) and the packed rows are cached as .npz in
  `<cache_dir>/packed/<key>/` (a local folder or a URL, through `routing_lm.paths`),
  keyed by the corpus content, the tokenizer bytes and seq_len. Step s reads rows
  `perm_e[i*B:(i+1)*B]` of epoch e = s // steps_per_epoch, i = s % steps_per_epoch, with
  `perm_e` a permutation seeded by (data.seed, e).
  Resuming is O(1), TensorFlow is off the hot path and, on a cache hit, never loaded.
  The last `rows % batch_size` rows of each epoch's permutation are dropped (a
  different subset each epoch). Validation rows use a fixed permutation that does not
  depend on data.seed, so runs with different seeds are scored on the same batches.
- c4 (`StreamPipeline`): too large to materialise; seqio streams the TFDS files
  (sharded per host by `seqio.ShardInfo`), shuffled with data.seed, and a resume at
  step s skips s batches (O(s), in tf.data). Determinism is as good as seqio/TFDS's
  seeded file interleave and shuffle buffer.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from typing import Iterator

import numpy as np

from routing_lm import paths
from routing_lm.data import corpus as corpus_lib
from routing_lm.data import tokenizer as tokenizer_lib
from routing_lm.data.corpus import DataError

log = logging.getLogger("routing_lm.data")

TASKS = ("stdlib_text", "text_files", "c4")
FORMAT_VERSION = 1
KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")
Batch = dict[str, np.ndarray]


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
  """Entropy in nats of the empirical distribution of `tokens` (any shape)."""
  counts = np.bincount(tokens.reshape(-1), minlength=vocab_size).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


class Pipeline:
  """The interface the trainer uses (see the module docstring)."""
  vocab_size: int
  batch_size: int        # this host's rows per batch

  @property
  def unigram_entropy(self) -> float:
    raise NotImplementedError

  def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
    raise NotImplementedError

  def validation_batches(self, num_batches: int) -> list[Batch]:
    raise NotImplementedError

  def token_counts(self) -> np.ndarray:
    """[vocab_size] int64: how often each token id is a target in the train split (the
    same on every host). For routers fitted to the data (HASH's `frequency` table)."""
    raise NotImplementedError


def _host_share(global_batch: int, process_index: int, process_count: int) -> int:
  if global_batch < 1 or global_batch % process_count:
    raise DataError(
        f"data.batch_size={global_batch} must be a positive multiple of "
        f"jax.process_count()={process_count} (each host reads an equal share). "
        f"Fix: set data.batch_size to a multiple of {process_count}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
  return global_batch // process_count


class ArrayPipeline(Pipeline):
  """Batches served from packed rows held in memory (local corpora)."""

  def __init__(self, train: Batch, validation: Batch, *, vocab_size: int,
               entropy: float, global_batch: int, seed: int,
               process_index: int = 0, process_count: int = 1):
    self.vocab_size = int(vocab_size)
    self._entropy = float(entropy)
    self._train, self._val = train, validation
    self._global_batch = global_batch
    self.batch_size = _host_share(global_batch, process_index, process_count)
    self._lo = process_index * self.batch_size
    self._seed = int(seed)
    rows = len(train["targets"])
    if rows < global_batch:
      raise DataError(
          f"data.batch_size={global_batch} is larger than the {rows} packed train "
          f"sequences of data.seq_len={train['targets'].shape[1]} this corpus gives. "
          "Fix: lower data.batch_size or data.seq_len, or add text (data.files / "
          "data.max_chars).")
    self.steps_per_epoch = rows // global_batch
    self._perm_cache: tuple[int, np.ndarray] | None = None

  @property
  def unigram_entropy(self) -> float:
    return self._entropy

  def token_counts(self) -> np.ndarray:
    t = self._train
    return np.bincount(t["targets"][t["weights"] > 0], minlength=self.vocab_size)

  def arrays(self, split: str) -> Batch:
    """All packed rows of 'train' or 'validation': dict of [rows, seq_len]."""
    return {"train": self._train, "validation": self._val}[split]

  @property
  def num_rows(self) -> dict[str, int]:
    return {"train": len(self._train["targets"]), "validation": len(self._val["targets"])}

  def _perm(self, epoch: int) -> np.ndarray:
    if self._perm_cache is None or self._perm_cache[0] != epoch:
      rng = np.random.default_rng([self._seed, epoch, 0x5EED])
      self._perm_cache = (epoch, rng.permutation(len(self._train["targets"])))
    return self._perm_cache[1]

  def batch_at(self, step: int) -> Batch:
    """This host's batch of global step `step`: dict of [batch, seq]."""
    if step < 0:
      raise ValueError(f"step={step} must be >= 0.")
    epoch, i = divmod(int(step), self.steps_per_epoch)
    rows = self._perm(epoch)[i * self._global_batch:(i + 1) * self._global_batch]
    rows = rows[self._lo:self._lo + self.batch_size]
    return {k: self._train[k][rows] for k in KEYS}

  def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
    step = int(start_step)
    while True:
      yield self.batch_at(step)
      step += 1

  def validation_batches(self, num_batches: int) -> list[Batch]:
    """Up to `num_batches` fixed batches covering the validation rows; the last may
    be padded with all-zero rows (weights 0)."""
    n = len(self._val["targets"])
    order = np.random.default_rng([0x7A1, n]).permutation(n)
    available = math.ceil(n / self._global_batch)
    if num_batches > available:
      log.warning("validation_batches(%d): the validation split has %d rows, enough "
                  "for %d batches of %d; returning %d.", num_batches, n, available,
                  self._global_batch, available)
    out = []
    for k in range(min(int(num_batches), available)):
      rows = order[k * self._global_batch:(k + 1) * self._global_batch]
      rows = rows[self._lo:self._lo + self.batch_size]
      batch = {}
      for key in KEYS:
        a = self._val[key][rows]
        pad = self.batch_size - len(rows)
        batch[key] = np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a
      out.append(batch)
    return out


class StreamPipeline(Pipeline):
  """Batches streamed from a seqio Task (c4): shuffled with the seed, host-sharded."""

  ENTROPY_BATCHES = 64

  def __init__(self, task: str, *, vocab_size: int, seq_len: int, global_batch: int,
               seed: int, process_index: int = 0, process_count: int = 1):
    self.vocab_size = int(vocab_size)
    self.batch_size = _host_share(global_batch, process_index, process_count)
    self._task, self._seq_len, self._seed = task, seq_len, int(seed)
    self._shard = (process_index, process_count)
    self._entropy: float | None = None

  def _ds(self, split: str, shuffle: bool, num_epochs: int | None):
    from routing_lm.data import tasks
    import seqio
    return tasks.dataset(
        self._task, split, self._seq_len, shuffle=shuffle,
        seed=self._seed if shuffle else None, num_epochs=num_epochs,
        shard_info=seqio.ShardInfo(*self._shard), batch_size=self.batch_size)

  def train_batches(self, start_step: int = 0) -> Iterator[Batch]:
    from routing_lm.data import tasks
    ds = self._ds("train", shuffle=True, num_epochs=None).skip(int(start_step))
    return tasks.iterate(ds)

  def validation_batches(self, num_batches: int) -> list[Batch]:
    from routing_lm.data import tasks
    ds = self._ds("validation", shuffle=False, num_epochs=1).take(int(num_batches))
    return list(tasks.iterate(ds))

  def token_counts(self) -> np.ndarray:
    raise DataError(
        f"data.task streams its train split ({self.task}): it has no train-split token "
        "counts, which model.routing.hash.method='frequency' needs. Fix: use method "
        "'balanced' or 'random', or a local corpus (text_files).")

  @property
  def unigram_entropy(self) -> float:
    """Estimated from the first ENTROPY_BATCHES train batches (computed once)."""
    if self._entropy is None:
      it = self.train_batches(0)
      toks = [b["targets"][b["weights"] > 0] for _, b in zip(range(self.ENTROPY_BATCHES), it)]
      self._entropy = unigram_entropy(np.concatenate(toks), self.vocab_size)
    return self._entropy


def _save_npz(path: str, arrays: Batch) -> None:
  buf = io.BytesIO()   # zipfile wants a seekable file; an object upload is one write
  np.savez(buf, **arrays)
  paths.write_atomic(path, buf.getvalue())


def _load_npz(path: str) -> Batch:
  with paths.as_path(path).open("rb") as f, np.load(f) as z:
    return {k: z[k] for k in KEYS}


def _packed(corpus: corpus_lib.Corpus, tok: tokenizer_lib.Tokenizer, seq_len: int,
            cache_dir: str) -> tuple[Batch, Batch, dict]:
  """Packed (train, validation) rows [rows, seq_len] and meta, from cache or seqio."""
  key = hashlib.sha256(json.dumps(
      [FORMAT_VERSION, corpus.fingerprint(), tok.sha256, seq_len]).encode()).hexdigest()[:20]
  folder = paths.join(paths.expand(cache_dir), "packed", key)
  meta_path = paths.join(folder, "meta.json")
  meta_text = paths.read_text(meta_path)
  if meta_text is not None:
    train, val = (_load_npz(paths.join(folder, f"{split}.npz"))
                  for split in ("train", "validation"))
    return train, val, json.loads(meta_text)
  from routing_lm.data import tasks   # TensorFlow + seqio, only on a cache miss
  log.info("Materialising %s (train %.2f M chars, validation %.2f M chars) into packed "
           "rows of %d tokens -> %s", corpus.name, corpus.num_chars("train") / 1e6,
           corpus.num_chars("validation") / 1e6, seq_len, folder)
  t0 = time.time()
  name = tasks.register_local(corpus, tok)
  train = tasks.materialize(name, "train", seq_len)
  val = tasks.materialize(name, "validation", seq_len)
  _save_npz(paths.join(folder, "train.npz"), train)
  _save_npz(paths.join(folder, "validation.npz"), val)
  tokens = train["targets"][train["weights"] > 0]
  meta = {"format": FORMAT_VERSION, "corpus": corpus.name, "seq_len": seq_len,
          "tokenizer": tok.path, "vocab_size": tok.vocab_size,
          "rows": {"train": len(train["targets"]), "validation": len(val["targets"])},
          "train_tokens": int(tokens.size),
          "fill": float(train["weights"].mean()) if tokens.size else 0.0,
          "unigram_entropy": unigram_entropy(tokens, tok.vocab_size),
          "seconds": time.time() - t0}
  paths.write_atomic(meta_path, json.dumps(meta, indent=1))   # last: marks a complete cache
  log.info("Materialised %d train / %d validation rows (%.1f%% tokens, %.2f M train "
           "tokens) in %.1f s", meta["rows"]["train"], meta["rows"]["validation"],
           100 * meta["fill"], meta["train_tokens"] / 1e6, meta["seconds"])
  return train, val, meta


def _check(cfg) -> None:
  if cfg.task not in TASKS:
    raise DataError(f"data.task={cfg.task!r} is not one of {TASKS}. Fix: "
                    "--config.data.task=stdlib_text (offline default).")
  if int(cfg.seq_len) < 2:
    raise DataError(f"data.seq_len={cfg.seq_len} must be >= 2.")


def make_pipeline(cfg, *, process_index: int | None = None,
                  process_count: int | None = None) -> Pipeline:
  """The Pipeline for `config.data` (an ml_collections ConfigDict).

  process_index/process_count default to jax.process_index()/process_count().
  """
  _check(cfg)
  if process_index is None or process_count is None:
    import jax
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  seq_len, batch, seed = int(cfg.seq_len), int(cfg.batch_size), int(cfg.get("seed", 0))
  spm_model = cfg.get("spm_model", "") or ""
  cache_dir = cfg.get("cache_dir", "") or "~/.cache/routing_lm"
  if cfg.task == "c4":
    if not spm_model:
      raise DataError(
          "data.spm_model is empty, but data.task='c4' needs a sentencepiece model with "
          "pad=0, eos=1. Fix: --config.data.spm_model=gs://t5-data/vocabs/cc_all.32000/"
          "sentencepiece.model (or a local .model).")
    tok = tokenizer_lib.load(spm_model)
    from routing_lm.data import tasks
    name = tasks.register_c4(tok, cfg.get("tfds_data_dir", "") or "")
    return StreamPipeline(name, vocab_size=tok.vocab_size, seq_len=seq_len,
                          global_batch=batch, seed=seed, process_index=process_index,
                          process_count=process_count)
  _host_share(batch, process_index, process_count)   # fail fast, before any work
  corpus = corpus_lib.load(cfg)
  if spm_model:
    tok = tokenizer_lib.load(spm_model)
  else:
    tok = tokenizer_lib.get_or_train(corpus, int(cfg.vocab_size), cache_dir)
  if tok.vocab_size != int(cfg.vocab_size):
    log.info("Tokenizer has %d pieces (data.vocab_size=%s).", tok.vocab_size, cfg.vocab_size)
  train, val, meta = _packed(corpus, tok, seq_len, cache_dir)
  return ArrayPipeline(train, val, vocab_size=tok.vocab_size,
                       entropy=meta["unigram_entropy"], global_batch=batch, seed=seed,
                       process_index=process_index, process_count=process_count)
