"""Training loop: determinism, exact resume, signals, checkpoints, summary, learning."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from routing_lm.config import load_module
from routing_lm import train
from routing_lm.checkpoint import CheckpointError
from routing_lm.metrics import read_jsonl

tiny = load_module("configs/tiny.py")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SyntheticPipeline:
  """A learnable token stream whose batch s is a pure function of s (like the real one)."""
  vocab_size = 64
  unigram_entropy = float(np.log(60))

  def __init__(self, batch: int = 4, seq: int = 32):
    self.batch, self.seq = batch, seq

  def batch_at(self, step: int, split: int = 0) -> dict:
    rng = np.random.default_rng([split, step])
    start = rng.integers(3, 64, size=(self.batch, 1))
    toks = (start + 5 * np.arange(self.seq + 1)[None, :]) % 61 + 3   # a memorisable pattern
    seg = np.ones((self.batch, self.seq), np.int32)
    seg[:, self.seq // 2:] = 2                                       # two packed documents
    pos = np.concatenate([np.arange(self.seq // 2), np.arange(self.seq - self.seq // 2)])
    return {"inputs": toks[:, :-1].astype(np.int32), "targets": toks[:, 1:].astype(np.int32),
            "segment_ids": seg, "positions": np.broadcast_to(pos, seg.shape).astype(np.int32),
            "weights": np.ones(seg.shape, np.float32)}

  def train_batches(self, start_step: int):
    step = start_step
    while True:
      yield self.batch_at(step)
      step += 1

  def validation_batches(self, n: int):
    return [self.batch_at(i, split=1) for i in range(n)]


def small_config(router: str = "sbase", experts: int = 4, steps: int = 20):
  c = tiny.get_config(f"{router},{experts}")
  c.model.update(vocab_size=64, d_model=32, num_layers=2, num_heads=2, d_ff=64)
  c.data.update(seq_len=32, batch_size=4)
  c.train.update(num_steps=steps, warmup_steps=2, log_every=1, eval_every=10, eval_batches=2,
                 checkpoint_every=10, learning_rate=1e-2)
  return c


def losses(workdir: str) -> list[float]:
  return [r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if r.get("loss") is not None]


def params_of(workdir: str, config) -> list[np.ndarray]:
  from routing_lm.checkpoint import Checkpointer
  s = train.setup(config)
  ckpt = Checkpointer(workdir, s.config, 1, 5)
  state = ckpt.restore_latest(s.abstract_state, required=True)
  ckpt.close()
  return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def test_same_seed_same_losses(tmp_path):
  """RL-R samples its experts: the step rng must make even that repeatable."""
  config = small_config("rlr", steps=10)
  train.train(config, str(tmp_path / "a"), pipeline=SyntheticPipeline())
  train.train(config, str(tmp_path / "b"), pipeline=SyntheticPipeline())
  a, b = losses(str(tmp_path / "a")), losses(str(tmp_path / "b"))
  assert len(a) == 10 and a == b
  config.train.seed = 1
  train.train(config, str(tmp_path / "c"), pipeline=SyntheticPipeline())
  assert losses(str(tmp_path / "c")) != a, "the seed must matter"


@pytest.mark.parametrize("router", ["sbase", "rlr", "hash"])
def test_resume_equals_uninterrupted(tmp_path, router):
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  config = small_config(router, steps=20)
  train.train(config, full, pipeline=SyntheticPipeline())
  train.train(config, split, pipeline=SyntheticPipeline(), stop_at=10)   # interrupted ...
  assert losses(split) == losses(full)[:10]
  with open(os.path.join(split, "metrics.jsonl"), "a") as fh:   # logged after the checkpoint,
    fh.write(json.dumps({"step": 11, "loss": -1.0}) + "\n")     # then lost with the process
  summary = train.train(config, split, pipeline=SyntheticPipeline())   # ... then resume
  assert summary["steps"] == 20
  assert losses(split) == losses(full)
  steps = [r["step"] for r in read_jsonl(os.path.join(split, "metrics.jsonl")) if "loss" in r]
  assert steps == sorted(set(steps)), "no step is logged twice"
  # The smoothed loss averages the same steps (the last 10%) as the uninterrupted run's.
  full_summary = json.load(open(os.path.join(full, "summary.json")))
  assert summary["train_loss_smoothed"] == full_summary["train_loss_smoothed"]
  for a, b in zip(params_of(split, config), params_of(full, config)):
    np.testing.assert_array_equal(a, b)


def test_summary_and_metrics(tmp_path):
  config = small_config("topk", steps=10)
  summary = train.train(config, str(tmp_path), pipeline=SyntheticPipeline())
  on_disk = json.load(open(tmp_path / "summary.json"))
  assert on_disk["steps"] == 10 and on_disk["tokens"] == 10 * 4 * 32
  assert on_disk["n_params"] == 2 * (4 * 32 * 32 + 2 * 32 * 64)
  assert on_disk["config"]["model"]["routing"]["router"] == "topk"
  assert np.isclose(on_disk["val_loss"], summary["val_loss"])
  assert 0 < on_disk["val_loss"] < 10 and on_disk["train_loss"] == losses(str(tmp_path))[-1]
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  step_row = next(r for r in rows if "loss" in r)
  loads = [v for k, v in step_row.items() if k.startswith("router/block1/load/")]
  assert len(loads) == 4 and np.isclose(sum(loads), 1.0, atol=1e-5)
  for key in ("router/block1/dropped", "router/block1/entropy", "aux/balance", "aux/z_loss",
              "grad_norm", "learning_rate", "tokens_per_s", "step_time"):
    assert key in step_row, key
  assert any(r.get("val_loss") is not None for r in rows)
  assert os.listdir(tmp_path / "tensorboard"), "TensorBoard events are written"


def test_checkpoint_from_other_config_is_refused(tmp_path):
  train.train(small_config("sbase", steps=10), str(tmp_path), pipeline=SyntheticPipeline())
  other = small_config("sbase", steps=20)
  other.model.d_model = 64
  with pytest.raises(CheckpointError, match=r"config\.model\.d_model is 32 there but 64 now"):
    train.train(other, str(tmp_path), pipeline=SyntheticPipeline())


def test_checkpoint_that_predates_a_field_resumes_at_its_default():
  from routing_lm.checkpoint import _fingerprint, incompatible_fields
  now = _fingerprint(small_config("sbase", steps=10))
  field = "model.routing.router_init_scale"
  old = {k: v for k, v in now.items() if k != field}   # saved before the field existed
  assert incompatible_fields(old, now) == []
  assert incompatible_fields(old, {**now, field: 1.0}) == [field]   # not the default
  assert incompatible_fields(now, {**now, field: 1.0}) == [field]
  assert incompatible_fields({**old, "model.d_model": 64}, now) == ["model.d_model"]


def test_smoothed_loss_window_survives_a_resume_inside_it(tmp_path):
  """Resumed at step 95 of 100: the window (steps 91-100) takes 91-95 from the log."""
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n"
                          for s in range(1, 96)) + json.dumps({"step": 95, "val_loss": 1.0}) + "\n")
  got = train.smoothed_train_loss([96.0, 97.0, 98.0, 99.0, 100.0], 95, 100, str(path))
  assert got == np.mean(np.arange(91, 101))
  assert train.smoothed_train_loss(list(map(float, range(1, 101))), 0, 100, str(path)) == 95.5


def test_corrupted_latest_checkpoint(tmp_path):
  config = small_config("hash", steps=20)
  train.train(config, str(tmp_path), pipeline=SyntheticPipeline())
  ckpt_dir = tmp_path / "checkpoints"
  assert sorted(int(p) for p in os.listdir(ckpt_dir) if p.isdigit()) == [10, 20]
  for root, _, files in os.walk(ckpt_dir / "20" / "state"):
    for f in files:                     # truncated: every file of the state cut in half
      path = os.path.join(root, f)
      os.truncate(path, os.path.getsize(path) // 2)
  config.train.num_steps = 30
  with pytest.raises(CheckpointError, match=r"step 20.*cannot be read.*\[10\]"):
    train.train(config, str(tmp_path), pipeline=SyntheticPipeline())
  assert (ckpt_dir / "10").exists(), "earlier checkpoints are intact"
  shutil.move(str(ckpt_dir / "20"), str(tmp_path / "broken_20"))   # what the error advises
  assert train.train(config, str(tmp_path), pipeline=SyntheticPipeline())["steps"] == 30


def _cli(workdir, *flags):
  return [sys.executable, "-m", "routing_lm.main", "--config=configs/tiny.py",
          f"--workdir={workdir}", "--config.model.d_model=32", "--config.model.num_heads=2",
          "--config.model.d_ff=64", "--config.model.num_layers=2", "--config.data.seq_len=32",
          "--config.data.batch_size=4", "--config.data.max_chars=200000",
          "--config.model.vocab_size=512", "--config.train.log_every=1", *flags]


@pytest.mark.slow
def test_sigterm_saves_and_resumes(tmp_path):
  """SIGTERM mid-run leaves a checkpoint at the current step; rerunning finishes the run."""
  workdir = str(tmp_path / "run")
  cmd = _cli(workdir, "--config.train.num_steps=100000", "--config.train.checkpoint_every=100000")
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while time.time() < deadline and (not os.path.exists(metrics) or len(losses(workdir)) < 5):
    assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=120)[0].decode()
  assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
  steps = sorted(int(p) for p in os.listdir(os.path.join(workdir, "checkpoints")) if p.isdigit())
  assert len(steps) == 1 and steps[0] >= 5
  assert steps[0] == len(losses(workdir)), "the checkpoint is at the step the run reached"
  done = subprocess.run(_cli(workdir, f"--config.train.num_steps={steps[0] + 3}"), cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["steps"] == steps[0] + 3
  evaluated = subprocess.run(_cli(workdir, "--mode=eval"), cwd=REPO, capture_output=True,
                             text=True, timeout=300)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  result = json.loads(evaluated.stdout[evaluated.stdout.index("{"):])
  assert result["step"] == steps[0] + 3
  assert np.isclose(result["val_loss"], summary["val_loss"], rtol=1e-5)


def test_eval_without_checkpoint_is_a_clear_error(tmp_path):
  out = subprocess.run(_cli(str(tmp_path / "empty"), "--mode=eval"), cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0 and "no checkpoint in" in out.stderr


@pytest.mark.slow
def test_tiny_learns_below_unigram_entropy(tmp_path):
  """configs/tiny.py on stdlib_text: validation NLL < the corpus' unigram entropy by step 300."""
  from routing_lm import data
  config = tiny.get_config()
  summary = train.train(config, str(tmp_path))
  entropy = data.make_pipeline(config.data).unigram_entropy
  assert summary["steps"] == 300
  assert summary["val_loss"] < entropy, (summary["val_loss"], entropy)


class SkewedPipeline(SyntheticPipeline):
  """SyntheticPipeline with the train split's token counts (for HASH's `frequency`)."""

  def token_counts(self):
    return np.bincount(np.concatenate([self.batch_at(s)["targets"].ravel() for s in range(8)]),
                       minlength=self.vocab_size)


def test_frequency_hash_table_is_fitted_once_and_restored(tmp_path):
  """A fresh run fits HASH's `frequency` table to the train split's counts; the table is
  saved with the parameters and a resumed run uses the saved one, not a refit."""
  from routing_lm.routers import hash as hash_router
  config = small_config("hash", experts=4, steps=4)
  config.model.routing.hash.method = "frequency"
  config.train.checkpoint_every = 2
  pipe = SkewedPipeline()
  expected = hash_router.frequency_table(pipe.token_counts(), 4, 1, 42)
  work = str(tmp_path / "run")
  train.train(config, work, pipeline=pipe, stop_at=2)

  def tables():
    from routing_lm.checkpoint import Checkpointer
    s = train.setup(config)
    ckpt = Checkpointer(work, s.config, 1, 5)
    state = ckpt.restore_latest(s.abstract_state, required=True)
    ckpt.close()
    return [np.asarray(x) for x in jax.tree.leaves(state["other"]) if x.dtype == np.int32
            and x.ndim == 2]

  saved = tables()
  assert len(saved) == 1                                   # one routed layer (R = 0.5, 2 blocks)
  np.testing.assert_array_equal(saved[0], expected)
  calls = []
  pipe.token_counts = lambda: calls.append(1) or np.ones(64, np.int64)   # would refit differently
  train.train(config, work, pipeline=pipe)
  assert not calls                                         # resumed: no refit
  np.testing.assert_array_equal(tables()[0], expected)
