"""Data pipeline: tokenizer cache, packing, split, determinism/resume, bad input."""
import itertools
import json
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from routing_lm import data
from routing_lm.config import load_module
from routing_lm.data import corpus as corpus_lib
from routing_lm.data import tokenizer as tokenizer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
base = load_module("configs/base.py")

WORDS = ("the model routes each token to one expert while a balanced router keeps "
         "every expert busy def return class import self value index layer sum "
         "train loss step batch gradient shard mesh data cache token vocab").split()
SEQ, BATCH, VOCAB = 32, 4, 160


def write_corpus(folder, n_files=48, seed=0):
  """n_files small text documents (20..1800 chars), half shorter than SEQ tokens."""
  rng = random.Random(seed)
  os.makedirs(folder, exist_ok=True)
  for i in range(n_files):
    lines = []
    for _ in range(rng.choice([1, 1, 1, 2, 8, 30])):
      lines.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))))
    with open(os.path.join(folder, f"doc_{i:02d}.txt"), "w") as f:
      f.write(f"doc {i}\n" + "\n".join(lines) + "\n")
  return os.path.join(folder, "*.txt")


def make_cfg(files, cache_dir, **kw):
  c = base.get_config().data
  c.task, c.files, c.cache_dir = "text_files", files, str(cache_dir)
  c.seq_len, c.batch_size, c.vocab_size = SEQ, BATCH, VOCAB
  c.validation_fraction, c.max_chars, c.seed = 0.25, 0, 0
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(config, pipeline) for a 48-file corpus; built once for the module."""
  root = tmp_path_factory.mktemp("tiny")
  cfg = make_cfg(write_corpus(str(root / "corpus")), root / "cache")
  return cfg, data.make_pipeline(cfg, process_index=0, process_count=1)


def check_packed(b, eos=1, padding_rows=0):
  """Invariants of LM-packed rows: shapes, shift within segments, segments, positions.
  The last `padding_rows` rows must be all-zero padding (weights 0)."""
  for k in ("inputs", "targets", "segment_ids", "positions"):
    assert b[k].dtype == np.int32 and b[k].shape == (BATCH, SEQ), k
  assert b["weights"].dtype == np.float32 and b["weights"].shape == (BATCH, SEQ)
  seg, pos, inp, tgt = b["segment_ids"], b["positions"], b["inputs"], b["targets"]
  np.testing.assert_array_equal(b["weights"], (seg > 0).astype(np.float32))
  assert (tgt[seg == 0] == 0).all()
  joins = 0
  for r in range(BATCH - padding_rows, BATCH):
    assert all((b[k][r] == 0).all() for k in b), f"padding row {r} is not all zeros"
  for r in range(BATCH - padding_rows):
    n = int((seg[r] > 0).sum())
    assert (seg[r, :n] > 0).all() and (seg[r, n:] == 0).all()   # padding only at the end
    assert seg[r, 0] == 1 and pos[r, 0] == 0 and inp[r, 0] == 0
    for t in range(1, n):
      if seg[r, t] == seg[r, t - 1]:                            # inside a segment
        assert pos[r, t] == pos[r, t - 1] + 1
        assert inp[r, t] == tgt[r, t - 1]                       # shifted by one
      else:                                                     # a join
        assert seg[r, t] == seg[r, t - 1] + 1
        assert pos[r, t] == 0 and inp[r, t] == 0
        joins += 1
  return joins


# ---- tokenizer ---------------------------------------------------------------------

def test_tokenizer_trained_once_reused_and_retrained_on_change(tmp_path):
  files = write_corpus(str(tmp_path / "c"))
  cache = str(tmp_path / "cache")
  corpus = corpus_lib.text_files(files, validation_fraction=0.25)
  calls = tokenizer_lib.TRAIN_CALLS
  tok = tokenizer_lib.get_or_train(corpus, VOCAB, cache)
  assert tokenizer_lib.TRAIN_CALLS == calls + 1
  mtime = os.stat(tok.path).st_mtime_ns
  sp = spm.SentencePieceProcessor(model_file=tok.path)
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert 0 < tok.vocab_size <= VOCAB == sp.get_piece_size()

  again = tokenizer_lib.get_or_train(
      corpus_lib.text_files(files, validation_fraction=0.25), VOCAB, cache)
  assert tokenizer_lib.TRAIN_CALLS == calls + 1                 # not retrained
  assert again == tok and os.stat(tok.path).st_mtime_ns == mtime

  other = tokenizer_lib.get_or_train(corpus, VOCAB - 20, cache)  # changed setting
  assert tokenizer_lib.TRAIN_CALLS == calls + 2 and other.path != tok.path

  victim = tmp_path / corpus.train[0].key                        # changed corpus
  with open(victim, "a") as f:
    f.write("an extra line of training text\n")
  changed = tokenizer_lib.get_or_train(
      corpus_lib.text_files(files, validation_fraction=0.25), VOCAB, cache)
  assert tokenizer_lib.TRAIN_CALLS == calls + 3 and changed.path not in (tok.path, other.path)
  assert os.stat(tok.path).st_mtime_ns == mtime                   # old model untouched


# ---- split -------------------------------------------------------------------------

def test_split_by_path_hash_is_disjoint_and_stable(tmp_path):
  files = write_corpus(str(tmp_path / "c"), n_files=60)
  a = corpus_lib.text_files(files, validation_fraction=0.25)
  train, val = {d.key for d in a.train}, {d.key for d in a.validation}
  assert train and val and not train & val
  assert train | val == {f"c/{p.name}" for p in (tmp_path / "c").glob("*.txt")}
  for k in train | val:
    assert corpus_lib.split_of(k, 0.25) == ("train" if k in train else "validation")
  b = corpus_lib.text_files(files, validation_fraction=0.25)
  assert a == b
  write_corpus(str(tmp_path / "c2"), n_files=10, seed=1)          # more files elsewhere
  c = corpus_lib.text_files(f"{files},{tmp_path}/c2/*.txt", validation_fraction=0.25)
  assert train <= {d.key for d in c.train} and val <= {d.key for d in c.validation}


def test_split_survives_moving_the_corpus(tmp_path):
  """Keys are relative to each pattern's literal head, so a copy elsewhere splits alike."""
  write_corpus(str(tmp_path / "a" / "c" / "en"), n_files=30)
  write_corpus(str(tmp_path / "a" / "c" / "de"), n_files=30, seed=1)
  shutil.copytree(tmp_path / "a", tmp_path / "moved" / "deeper")
  here = corpus_lib.text_files(f"{tmp_path}/a/c/**/*.txt", validation_fraction=0.25)
  there = corpus_lib.text_files(f"{tmp_path}/moved/deeper/c/**/*.txt",
                                validation_fraction=0.25)
  assert here == there and here.fingerprint() == there.fingerprint()
  assert {d.key for d in here.validation} and all(
      d.key.startswith(("c/en/doc_", "c/de/doc_")) for d in here.train + here.validation)


def test_document_keys_per_pattern(tmp_path, monkeypatch):
  write_corpus(str(tmp_path / "c" / "sub"), n_files=3)
  monkeypatch.chdir(tmp_path)
  keys = lambda files: sorted(corpus_lib.expand_files(files))  # noqa: E731
  assert keys("c/sub/doc_00.txt") == ["sub/doc_00.txt"]                 # a literal file
  assert keys(f"{tmp_path}/c/s*b/doc_0[01].txt") == ["c/sub/doc_00.txt", "c/sub/doc_01.txt"]
  # A file matched twice takes its longest key, in either order of the patterns.
  both = ["c/sub/doc_00.txt", "c/sub/doc_01.txt", "c/sub/doc_02.txt"]
  assert keys("c/sub/doc_00.txt,c/**/*.txt") == keys("c/**/*.txt,c/sub/doc_00.txt") == both
  assert corpus_lib.expand_files("c/**/*.txt")["c/sub/doc_01.txt"] == str(
      tmp_path / "c" / "sub" / "doc_01.txt")
  write_corpus(str(tmp_path / "d" / "sub"), n_files=1)                 # d/sub/doc_00.txt
  with pytest.raises(corpus_lib.DataError, match="both get the document key 'sub/doc_00.txt'"):
    corpus_lib.expand_files("c/sub/*.txt,d/sub/*.txt")


# ---- packing -----------------------------------------------------------------------

def test_packed_batches_shift_segments_positions(tiny):
  cfg, pipe = tiny
  steps = pipe.steps_per_epoch
  joins = sum(check_packed(b) for b in itertools.islice(pipe.train_batches(0), steps))
  assert joins > 0                                               # documents were packed together
  n_val = pipe.num_rows["validation"]
  batches = pipe.validation_batches(3)
  assert len(batches) == min(3, -(-n_val // BATCH))
  for k, b in enumerate(batches):   # only a last batch past the rows is padded
    check_packed(b, padding_rows=max(0, (k + 1) * BATCH - n_val))


def test_validation_batches_pad_past_the_rows(tiny):
  """5 validation rows in batches of 4: every row once, then 3 all-zero rows."""
  _, pipe = tiny
  val = {k: v[:5] for k, v in pipe.arrays("validation").items()}
  assert len(val["targets"]) == 5, "the tiny corpus needs at least 5 validation rows"
  mk = lambda i, n: data.ArrayPipeline(  # noqa: E731
      pipe.arrays("train"), val, vocab_size=pipe.vocab_size, entropy=1.0,
      global_batch=BATCH, seed=0, process_index=i, process_count=n)
  batches = mk(0, 1).validation_batches(3)
  assert len(batches) == 2
  check_packed(batches[0])
  check_packed(batches[1], padding_rows=3)
  seen = np.concatenate([batches[0]["targets"], batches[1]["targets"][:1]])
  assert sorted(map(bytes, seen)) == sorted(map(bytes, val["targets"]))
  hosts = [mk(i, 2).validation_batches(2) for i in range(2)]   # the same rows and padding,
  for one, *parts in zip(batches, *hosts):                     # split by host
    for k in val:
      np.testing.assert_array_equal(one[k], np.concatenate([p[k] for p in parts]))


def test_packed_rows_hold_exactly_the_train_documents(tiny):
  cfg, pipe = tiny
  corpus = corpus_lib.load(cfg)
  tok = tokenizer_lib.get_or_train(corpus, cfg.vocab_size, cfg.cache_dir)
  sp = spm.SentencePieceProcessor(model_file=tok.path)
  for split in ("train", "validation"):
    rows = pipe.arrays(split)
    docs = getattr(corpus, split)
    expected = np.bincount(np.concatenate([sp.encode(d.text) + [1] for d in docs]),
                           minlength=pipe.vocab_size)
    got = np.bincount(rows["targets"][rows["weights"] > 0], minlength=pipe.vocab_size)
    np.testing.assert_array_equal(got, expected)                # nothing lost, nothing foreign
    assert (rows["targets"] == 1).sum() == len(docs)            # one EOS per document


# ---- determinism and resume --------------------------------------------------------

def test_same_config_same_batches_and_exact_resume(tiny, tmp_path):
  cfg, pipe = tiny
  calls = tokenizer_lib.TRAIN_CALLS
  same = data.make_pipeline(cfg, process_index=0, process_count=1)   # warm cache
  assert tokenizer_lib.TRAIN_CALLS == calls
  fresh_cfg = make_cfg(cfg.files, tmp_path / "other_cache")
  fresh = data.make_pipeline(fresh_cfg, process_index=0, process_count=1)  # cold cache
  n = 2 * pipe.steps_per_epoch + 3
  ref = list(itertools.islice(pipe.train_batches(0), n))
  for other in (same, fresh):
    for a, b in zip(ref, itertools.islice(other.train_batches(0), n)):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
  for k0 in (1, pipe.steps_per_epoch - 1, pipe.steps_per_epoch, pipe.steps_per_epoch + 2):
    for a, b in zip(ref[k0:], itertools.islice(pipe.train_batches(k0), n - k0)):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
  v1, v2 = pipe.validation_batches(2), fresh.validation_batches(2)
  assert len(v1) == 2 and all((a[k] == b[k]).all() for a, b in zip(v1, v2) for k in a)
  # Another seed: other training order, same validation batches.
  seeded = data.make_pipeline(make_cfg(cfg.files, cfg.cache_dir, seed=7),
                              process_index=0, process_count=1)
  assert any((a["targets"] != b["targets"]).any()
             for a, b in zip(ref, seeded.train_batches(0)))
  assert all((a[k] == b[k]).all() for a, b in zip(v1, seeded.validation_batches(2)) for k in a)


def test_hosts_split_the_global_batch(tiny):
  cfg, pipe = tiny
  hosts = [data.make_pipeline(cfg, process_index=i, process_count=2) for i in range(2)]
  assert hosts[0].batch_size == BATCH // 2
  for step in (0, 5, pipe.steps_per_epoch + 1):
    whole = pipe.batch_at(step)
    parts = [h.batch_at(step) for h in hosts]
    for k in whole:
      np.testing.assert_array_equal(whole[k], np.concatenate([p[k] for p in parts]))


def test_warm_cache_does_not_load_tensorflow(tiny):
  cfg, _ = tiny
  code = ("import json, sys, ml_collections; from routing_lm import data;"
          "c = ml_collections.ConfigDict(json.loads(sys.argv[1]));"
          "p = data.make_pipeline(c, process_index=0, process_count=1);"
          "next(p.train_batches(0)); assert 'tensorflow' not in sys.modules, 'TF loaded';"
          "print(p.vocab_size)")
  out = subprocess.run([sys.executable, "-c", code, json.dumps(cfg.to_dict())], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert int(out.stdout.split()[-1]) == tiny[1].vocab_size


def test_stream_pipeline_resume_and_c4_registration(tiny):
  """The c4 code path (seqio streaming, shuffle seed, skip) on a local Task."""
  from routing_lm.data import tasks
  import seqio
  cfg, pipe = tiny
  corpus = corpus_lib.load(cfg)
  tok = tokenizer_lib.get_or_train(corpus, cfg.vocab_size, cfg.cache_dir)
  name = tasks.register_local(corpus, tok)
  assert tasks.register_local(corpus, tok) == name
  mk = lambda: data.StreamPipeline(name, vocab_size=tok.vocab_size, seq_len=SEQ,  # noqa: E731
                                   global_batch=BATCH, seed=3)
  ref = list(itertools.islice(mk().train_batches(0), 8))
  for b in ref:
    check_packed(b)
  tail = list(itertools.islice(mk().train_batches(5), 3))
  assert all((a[k] == b[k]).all() for a, b in zip(ref[5:], tail) for k in a)
  v = mk().validation_batches(2)
  assert all((a[k] == b[k]).all() for a, b in zip(v, mk().validation_batches(2)) for k in a)
  assert 0 < mk().unigram_entropy < np.log(tok.vocab_size)
  c4 = tasks.register_c4(tok, "/nonexistent/tfds")
  vocab = seqio.get_mixture_or_task(c4).output_features["targets"].vocabulary
  assert vocab.vocab_size == tok.vocab_size and vocab.eos_id == 1


# ---- bad input ---------------------------------------------------------------------

def _raises(cfg, *needles):
  with pytest.raises(ValueError) as e:
    data.make_pipeline(cfg, process_index=0, process_count=1)
  msg = str(e.value)
  assert isinstance(e.value, data.DataError)
  for s in needles:
    assert s in msg, (s, msg)
  return msg


def test_empty_corpus_is_a_clear_error(tmp_path):
  (tmp_path / "c").mkdir()
  for i in range(3):
    (tmp_path / "c" / f"{i}.txt").write_text("" if i else "  \n\n")
  files = str(tmp_path / "c" / "*.txt")
  _raises(make_cfg(files, tmp_path / "cache"), "data.files", files, "no text", "Fix")
  _raises(make_cfg("", tmp_path / "cache"), "data.files", "Fix")


def test_glob_matching_nothing_is_a_clear_error(tmp_path):
  files = write_corpus(str(tmp_path / "c"))
  bad = str(tmp_path / "nope" / "*.txt")
  _raises(make_cfg(f"{files},{bad}", tmp_path / "cache"), "data.files", bad,
          "matches no files", "Fix")


def test_undecodable_text_is_a_clear_error(tmp_path):
  files = write_corpus(str(tmp_path / "c"))
  bad = tmp_path / "c" / "latin1.txt"
  bad.write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
  _raises(make_cfg(files, tmp_path / "cache"), "data.files", str(bad), "UTF-8", "Fix")


def test_binary_file_is_a_clear_error(tmp_path):
  files = write_corpus(str(tmp_path / "c"))
  bad = tmp_path / "c" / "image.bin.txt"
  bad.write_bytes(bytes(range(256)) * 4)
  _raises(make_cfg(files, tmp_path / "cache"), "data.files", str(bad), "UTF-8", "Fix")


def test_other_bad_configs_are_clear_errors(tiny, tmp_path):
  cfg, pipe = tiny
  rows = pipe.num_rows["train"]
  _raises(make_cfg(cfg.files, cfg.cache_dir, batch_size=rows + 1), "data.batch_size",
          str(rows + 1), "Fix")
  with pytest.raises(data.DataError, match="data.batch_size=3"):
    data.make_pipeline(make_cfg(cfg.files, cfg.cache_dir, batch_size=3),
                       process_index=0, process_count=2)
  _raises(make_cfg(cfg.files, cfg.cache_dir, task="c4"), "data.spm_model", "Fix")
  _raises(make_cfg(cfg.files, cfg.cache_dir, spm_model=str(tmp_path / "x.model")),
          "data.spm_model", "x.model")
  _raises(make_cfg(cfg.files, cfg.cache_dir, task="wiki"), "data.task", "wiki")
  one = tmp_path / "one.txt"
  one.write_text("a single document\n")
  _raises(make_cfg(str(one), cfg.cache_dir), "data.files", "at least 2")


# ---- the offline default -----------------------------------------------------------

def test_stdlib_text_smoke(tmp_path):
  c = base.get_config().data
  c.task, c.cache_dir, c.max_chars = "stdlib_text", str(tmp_path), 300_000
  c.seq_len, c.batch_size, c.vocab_size = 64, 8, 512
  corpus = corpus_lib.load(c)
  keys = [d.key for d in corpus.train + corpus.validation]
  assert corpus.validation and all(k.startswith("stdlib/") and k.endswith(".py") for k in keys)
  assert not any(p in ("test", "tests", "site-packages") for k in keys for p in k.split("/"))
  assert 295_000 < sum(len(d.text) for d in corpus.train + corpus.validation) <= 300_000
  pipe = data.make_pipeline(c, process_index=0, process_count=1)
  assert pipe.vocab_size == 512
  b = next(pipe.train_batches(0))
  assert b["targets"].shape == (8, 64) and b["weights"].mean() > 0.9
  assert 2.0 < pipe.unigram_entropy < np.log(512)
