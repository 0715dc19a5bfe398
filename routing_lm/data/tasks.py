"""seqio Tasks for LM pretraining, and reading them into numpy.

Importing this module loads TensorFlow (with its GPUs hidden, so TF never takes
accelerator memory from JAX) and seqio; `pipeline.py` imports it only when it has
to run seqio (a cache miss, or c4).

Every task maps text to `{"targets": int32 [len]}` with a `seqio.SentencePieceVocabulary`,
then `split_to_length`: EOS is appended to each *document* (not to each chunk) and the
document is cut into chunks of at most `seq_len` tokens. `seqio.LMFeatureConverter(pack=True)`
then concatenates consecutive chunks into rows of exactly `seq_len`, with
`decoder_segment_ids` / `decoder_positions` marking where documents join, and
`decoder_input_tokens` = targets shifted right by one within each segment (0 at a
segment start). seqio has no concatenate-and-split preprocessor (T5's lives in the
`t5` package); this one splits and lets seqio's packer do the concatenation, so
attention can be kept inside documents via the segment ids.

Tasks:
- `register_local(corpus, tokenizer)`: a FunctionDataSource over the corpus's
  documents (splits "train" / "validation"), named `routing_lm.<corpus>.<hash>`.
- `register_c4(tokenizer, tfds_data_dir)`: `seqio.TfdsDataSource("c4/en:3.*.*")`,
  named `routing_lm.c4.<hash>`.
Registering the same thing twice returns the existing name.
"""
from __future__ import annotations

import hashlib
import logging
from typing import Iterator

import numpy as np
import tensorflow as tf

try:   # keep TF off the accelerators: JAX owns them
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:   # TF was initialised elsewhere first; its devices are fixed
  logging.getLogger("routing_lm.data").warning(
      "TensorFlow was initialised before routing_lm.data.tasks; it may use GPU memory.")
import seqio  # noqa: E402

from routing_lm.data.corpus import Corpus  # noqa: E402
from routing_lm.data.tokenizer import Tokenizer  # noqa: E402

C4_TFDS_NAME = "c4/en:3.*.*"

# seqio converter keys -> the trainer's batch keys.
BATCH_KEYS = {"decoder_input_tokens": "inputs", "decoder_target_tokens": "targets",
              "decoder_segment_ids": "segment_ids", "decoder_positions": "positions",
              "decoder_loss_weights": "weights"}


def split_to_length(dataset: tf.data.Dataset, sequence_length, output_features
                    ) -> tf.data.Dataset:
  """Appends EOS to each document's targets and splits it into <= seq_len chunks.

  [doc_len] -> ceil((doc_len + 1) / seq_len) examples of [<= seq_len] tokens.
  """
  n = int(sequence_length["targets"])
  feature = output_features["targets"]
  eos = tf.constant([feature.vocabulary.eos_id] if feature.add_eos else [], tf.int32)

  def chunks(x):
    t = tf.concat([tf.cast(x["targets"], tf.int32), eos], axis=0)
    starts = tf.range(0, tf.size(t, out_type=tf.int64), n, dtype=tf.int64)
    rows = tf.RaggedTensor.from_row_starts(t, starts)
    return tf.data.Dataset.from_tensor_slices(rows).map(lambda c: {"targets": c})

  return dataset.flat_map(chunks)


@seqio.map_over_dataset
def _text_to_targets(text):
  return {"targets": text}


def _rekey_text(ds: tf.data.Dataset) -> tf.data.Dataset:
  return seqio.preprocessors.rekey(ds, {"targets": "text"})


def _features(tok: Tokenizer) -> dict:
  vocab = seqio.SentencePieceVocabulary(tok.path, extra_ids=0)
  return {"targets": seqio.Feature(vocab, add_eos=True, dtype=tf.int32)}


def _name(*parts: str) -> str:
  return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def register_local(corpus: Corpus, tok: Tokenizer) -> str:
  """Registers (once) a Task over a local Corpus; returns its name."""
  name = f"routing_lm.{corpus.name}.{_name(corpus.fingerprint(), tok.sha256)}"
  if name in seqio.TaskRegistry.names():
    return name
  texts = {"train": [d.text for d in corpus.train],
           "validation": [d.text for d in corpus.validation]}

  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None):
    del shuffle_files, seed   # order is fixed; pipeline.py shuffles packed rows
    return tf.data.Dataset.from_tensor_slices(tf.constant(texts[split], tf.string))

  seqio.TaskRegistry.add(
      name,
      source=seqio.FunctionDataSource(
          dataset_fn, splits=("train", "validation"),
          num_input_examples={k: len(v) for k, v in texts.items()}),
      preprocessors=[_text_to_targets, seqio.preprocessors.tokenize, split_to_length],
      output_features=_features(tok), metric_fns=[])
  return name


def register_c4(tok: Tokenizer, tfds_data_dir: str = "") -> str:
  """Registers (once) the c4/en Task for a tokenizer; returns its name."""
  name = f"routing_lm.c4.{_name(tok.path, tok.sha256, tfds_data_dir)}"
  if name in seqio.TaskRegistry.names():
    return name
  seqio.TaskRegistry.add(
      name,
      source=seqio.TfdsDataSource(C4_TFDS_NAME, tfds_data_dir=tfds_data_dir or None),
      preprocessors=[_rekey_text, seqio.preprocessors.tokenize, split_to_length],
      output_features=_features(tok), metric_fns=[])
  return name


def dataset(task: str, split: str, seq_len: int, *, shuffle: bool = False,
            seed: int | None = None, num_epochs: int | None = 1,
            shard_info: seqio.ShardInfo | None = None,
            batch_size: int | None = None) -> tf.data.Dataset:
  """Packed LM examples of a Task: dicts of [seq_len] (or [batch, seq_len]) arrays."""
  return seqio.get_dataset(
      task, task_feature_lengths={"targets": seq_len},
      feature_converter=seqio.LMFeatureConverter(pack=True), dataset_split=split,
      shuffle=shuffle, seed=seed, num_epochs=num_epochs, shard_info=shard_info,
      batch_size=batch_size, verbose=False)


def to_batch(ex: dict) -> dict[str, np.ndarray]:
  """seqio converter output -> the trainer's batch dict (int32, weights float32)."""
  out = {v: np.asarray(ex[k], np.int32) for k, v in BATCH_KEYS.items()}
  out["weights"] = out["weights"].astype(np.float32)
  return out


def materialize(task: str, split: str, seq_len: int) -> dict[str, np.ndarray]:
  """One unshuffled epoch of a Task's split as arrays [num_rows, seq_len]."""
  parts: dict[str, list] = {}
  ds = dataset(task, split, seq_len).batch(1024)
  for b in ds.as_numpy_iterator():
    for k, v in to_batch(b).items():
      parts.setdefault(k, []).append(v)
  if not parts:
    return {k: np.zeros((0, seq_len), np.float32 if k == "weights" else np.int32)
            for k in BATCH_KEYS.values()}
  return {k: np.concatenate(v) for k, v in parts.items()}


def iterate(ds: tf.data.Dataset) -> Iterator[dict[str, np.ndarray]]:
  for b in ds.as_numpy_iterator():
    yield to_batch(b)
