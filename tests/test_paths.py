"""Files at a URL: metrics, summary, sweep results, corpora and data caches on `gs://`.

`gs://` is served here by an in-memory fsspec filesystem (`fake_gcs`): epath, the
library every file goes through (routing_lm/paths.py), picks its fsspec backend for
gs:// and the fixture hands it the memory store instead of gcsfs. No network, and the
same code path as a real bucket up to the store itself. Every test also checks that
nothing was written into a local folder named `gs:`.
"""
from __future__ import annotations

import json
import os
import pathlib
import random
import re
import struct

import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem

from routing_lm import metrics, paths, sweep
from routing_lm import train as train_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP = "configs/sweeps/tiny_test.py"


class _FakeGcs(MemoryFileSystem):
  """An in-memory object store that names objects like gcsfs: 'bucket/dir/file'."""
  protocol = ("gs", "gcs")
  root_marker = ""

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    return (path[len("gs://"):] if path.startswith("gs://") else path).strip("/")


@pytest.fixture
def fake_gcs(monkeypatch, tmp_path):
  """A fresh in-memory gs://; the working directory is an empty tmp folder."""
  store = type("Store", (_FakeGcs,), {"store": {}, "pseudo_dirs": [""]})(
      skip_instance_cache=True)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)   # fsspec, not tf.io.gfile
  monkeypatch.setattr(epath_backend.fsspec_backend, "fs", lambda path: store)
  assert epath.Path("gs://b/x")._backend is epath_backend.fsspec_backend
  monkeypatch.chdir(tmp_path)
  yield store
  assert not (tmp_path / "gs:").exists(), "a gs:// path was written to a local folder"


def _objects(store, prefix=""):
  return sorted(k for k in store.store if k.startswith(prefix))


# ---------------------------------------------------------------- routing_lm.paths
def test_path_helpers():
  assert paths.join("gs://b/sweeps/", "p1") == "gs://b/sweeps/p1"
  assert paths.join("~/runs", "p1") == "~/runs/p1"            # printed as written
  assert paths.expand("~/runs") == os.path.expanduser("~/runs")
  assert paths.absolute("gs://b/run") == "gs://b/run"
  assert paths.absolute("run") == os.path.join(os.getcwd(), "run")
  assert paths.is_local("/tmp/x") and not paths.is_local("gs://b/x")


def test_write_atomic_renames_locally_and_writes_objects_in_place(fake_gcs, tmp_path):
  local = tmp_path / "d" / "f.json"
  paths.write_atomic(str(local), "old")                       # creates the folder
  inode = local.stat().st_ino
  paths.write_atomic(str(local), b"new")
  assert local.read_text() == "new" and os.listdir(local.parent) == ["f.json"]
  assert local.stat().st_ino != inode                         # a new file renamed over
  paths.write_atomic("gs://b/d/f.json", "old")
  paths.write_atomic("gs://b/d/f.json", "new")
  assert _objects(fake_gcs) == ["b/d/f.json"]                 # no temporary object
  assert paths.read_text("gs://b/d/f.json") == "new"
  assert paths.read_text("gs://b/d/missing.json") is None
  assert paths.read_text(str(tmp_path / "missing")) is None


# ---------------------------------------------------------------- metrics
def _events(raw: bytes) -> list:
  """The Event protos of a TFRecord event file."""
  from tensorboardX.proto import event_pb2
  out, i = [], 0
  while i < len(raw):
    (n,) = struct.unpack("Q", raw[i:i + 8])
    out.append(event_pb2.Event.FromString(raw[i + 12:i + 12 + n]))
    i += 12 + n + 4
  return out


def test_metric_writer_on_gcs(fake_gcs):
  w = metrics.MetricWriter("gs://b/run")
  w.write(1, {"loss": 3.0, "wall_seconds": 1.0})
  w.write(2, {"loss": float("nan"), "wall_seconds": 2.0})
  w.write_summary({"val_loss": 2.5})
  w.close()
  assert metrics.read_jsonl("gs://b/run/metrics.jsonl") == [
      {"step": 1, "loss": 3.0, "wall_seconds": 1.0},
      {"step": 2, "loss": None, "wall_seconds": 2.0}]
  assert json.loads(paths.read_text("gs://b/run/summary.json")) == {"val_loss": 2.5}
  (event_file,) = _objects(fake_gcs, "b/run/tensorboard/")
  scalars = [(e.step, v.tag, v.simple_value) for e in _events(fake_gcs.cat(event_file))
             for v in e.summary.value]
  assert (1, "loss", 3.0) in scalars and (2, "wall_seconds", 2.0) in scalars
  # A run resumed from step 1 continues the file and the wall clock; step 2's row (logged
  # after that checkpoint) is dropped, so that no step is logged twice.
  again = metrics.MetricWriter("gs://b/run", start_step=1)
  assert again.last_value("wall_seconds", up_to_step=1) == 1.0
  assert again.last_value("wall_seconds", up_to_step=5) == 1.0
  again.write(2, {"loss": 1.0})
  again.close()
  assert [r["step"] for r in metrics.read_jsonl("gs://b/run/metrics.jsonl")] == [1, 2]
  assert metrics.read_jsonl("gs://b/other.jsonl", missing_ok=True) == []
  with pytest.raises(FileNotFoundError):
    metrics.read_jsonl("gs://b/other.jsonl")


# ---------------------------------------------------------------- sweep results
def _summary(point, val_loss):
  return {"config": point.config.to_dict(), "n_params": 10, "total_params": 10,
          "steps": 6, "tokens": 3072, "val_loss": val_loss, "train_loss": 7.0,
          "train_loss_smoothed": 7.1, "wall_seconds": 1.5}


def test_sweep_results_on_gcs(fake_gcs, monkeypatch, capsys):
  points = sweep.load_sweep(SWEEP).points
  work = "gs://b/sweeps/tiny"
  for p, loss in zip(points[:2], (7.25, 6.5)):
    assert sweep.point_dir(work, p) == f"{work}/{p.name}"
    paths.write_atomic(f"{work}/{p.name}/summary.json", json.dumps(_summary(p, loss)))
  assert sweep.read_summary(f"{work}/{points[2].name}/summary.json") is None
  rows = sweep.collect(points, work)
  assert [r["name"] for r in rows] == [p.name for p in points[:2]]
  csv_text = paths.read_text(f"{work}/results.csv")
  lines = csv_text.splitlines()
  assert lines[0].split(",") == list(sweep.COLUMNS) and len(lines) == 3
  assert ",7.25," in lines[1] and f",{work}/{points[0].name}" in lines[1]
  # The run loop: finished points are skipped, a point with checkpoints resumes.
  paths.write_atomic(f"{work}/{points[2].name}/checkpoints/4/meta", "{}")
  trained = []

  def fake_train(config, workdir, pipeline=None):
    trained.append(workdir)
    return _summary(points[0], 5.0)

  monkeypatch.setattr(train_lib, "train", fake_train)
  assert sweep.run_points(points, work, points) == []
  assert trained == [f"{work}/{p.name}" for p in points[2:]]
  err = capsys.readouterr().err
  assert err.count("skipped, finished earlier") == 2
  assert f"3/4 {points[2].name}: resuming" in err and f"4/4 {points[3].name}: running" in err


# ---------------------------------------------------------------- data
WORDS = "expert router token balance shard layer cache vocab batch step loss".split()


def _write_docs(write, n=12):
  """`n` small documents written with write(name, text); returns nothing."""
  rng = random.Random(1)
  for i in range(n):
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
             for _ in range(rng.randint(1, 12))]
    write(f"d{i % 2}/doc_{i:02d}.txt", f"doc {i}\n" + "\n".join(lines) + "\n")


def test_tokenizer_imports_nothing_from_tasks():
  """tasks.py imports tokenizer.py (for Tokenizer); the reverse would be a cycle."""
  source = (ROOT / "routing_lm" / "data" / "tokenizer.py").read_text()
  imports = re.findall(r"^\s*((?:from|import)\s.*)$", source, re.M)
  assert "from routing_lm.data.corpus import Corpus, DataError" in imports   # the pattern works
  assert not [i for i in imports if "tasks" in i or "tensorflow" in i], imports


def test_corpus_from_gcs_matches_a_local_copy(fake_gcs, tmp_path):
  from routing_lm.data import corpus as corpus_lib

  def both(name, text):
    paths.write_atomic(f"gs://b/data/c/{name}", text)
    paths.write_atomic(str(tmp_path / "local" / "c" / name), text)

  _write_docs(both)
  remote = corpus_lib.text_files("gs://b/data/c/*/*.txt", validation_fraction=0.25)
  local = corpus_lib.text_files(f"{tmp_path}/local/c/**/*.txt", validation_fraction=0.25)
  assert remote == local and remote.fingerprint() == local.fingerprint()
  assert corpus_lib.expand_files("gs://b/data/c/d0/doc_00.txt") == {
      "d0/doc_00.txt": "gs://b/data/c/d0/doc_00.txt"}
  with pytest.raises(corpus_lib.DataError, match=r"'\*\*'.*Fix"):
    corpus_lib.expand_files("gs://b/data/**/*.txt")
  with pytest.raises(corpus_lib.DataError, match="matches no files"):
    corpus_lib.expand_files("gs://b/data/c/*/*.md")
  with pytest.raises(corpus_lib.DataError, match="is a directory"):
    corpus_lib.expand_files("gs://b/data/c/d0")


@pytest.mark.slow
def test_tokenizer_and_packed_caches_on_gcs(fake_gcs, tmp_path, monkeypatch):
  from configs import base
  from routing_lm import data
  from routing_lm.data import corpus as corpus_lib
  from routing_lm.data import tasks
  from routing_lm.data import tokenizer as tokenizer_lib
  _write_docs(lambda name, text: paths.write_atomic(f"gs://b/data/c/{name}", text), n=24)
  cfg = base.get_config().data
  cfg.task, cfg.files, cfg.cache_dir = "text_files", "gs://b/data/c/*/*.txt", "gs://b/cache"
  cfg.seq_len, cfg.batch_size, cfg.vocab_size, cfg.validation_fraction = 16, 2, 64, 0.25
  corpus = corpus_lib.load(cfg)
  calls = tokenizer_lib.TRAIN_CALLS
  tok = tokenizer_lib.get_or_train(corpus, cfg.vocab_size, cfg.cache_dir)
  assert tokenizer_lib.TRAIN_CALLS == calls + 1
  key = tokenizer_lib.cache_key(corpus, cfg.vocab_size)
  assert tok.path == f"gs://b/cache/spm/{key}/spm.model"
  assert _objects(fake_gcs, "b/cache/spm/") == [f"b/cache/spm/{key}/meta.json",
                                                f"b/cache/spm/{key}/spm.model"]
  assert tokenizer_lib.get_or_train(corpus, cfg.vocab_size, cfg.cache_dir) == tok
  assert tokenizer_lib.TRAIN_CALLS == calls + 1                      # a cache hit
  assert tokenizer_lib.load(tok.path) == tok
  with pytest.raises(data.DataError, match="data.spm_model='gs://b/none.model' is not a file"):
    tokenizer_lib.load("gs://b/none.model")
  # seqio reads the model through tf.io.gfile, which cannot see the memory store: give it a
  # local copy of the same bytes (the packed cache's key holds the bytes' hash, not the path).
  local_model = tmp_path / "spm.model"
  local_model.write_bytes(fake_gcs.cat(f"b/cache/spm/{key}/spm.model"))
  cfg.spm_model = str(local_model)
  pipe = data.make_pipeline(cfg, process_index=0, process_count=1)
  packed = [k for k in _objects(fake_gcs, "b/cache/packed/")]
  assert [k.rsplit("/", 1)[1] for k in packed] == ["meta.json", "train.npz", "validation.npz"]

  def no_seqio(*args, **kw):
    raise AssertionError("the packed cache at gs:// was not used")

  monkeypatch.setattr(tasks, "materialize", no_seqio)
  again = data.make_pipeline(cfg, process_index=0, process_count=1)
  for a, b in zip(pipe.validation_batches(2), again.validation_batches(2)):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  assert pipe.num_rows == again.num_rows and pipe.num_rows["train"] > 0
