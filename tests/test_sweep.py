"""routing_lm.sweep on configs/sweeps/tiny_test.py (4 points, 6 steps each): end to end,
skipping finished points, resuming after a kill, and one correct results.csv row per point.

The end-to-end tests are marked slow (they train; about a minute on 2 CPU cores).
"""
import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import pytest

from routing_lm import sweep
from routing_lm import train as train_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SWEEP = "configs/sweeps/tiny_test.py"
NAMES = ["dense", "sbase_e4", "hash_e4", "rlr_e2"]
STEPS = 6


def summary(work, name):
  path = pathlib.Path(work) / name / "summary.json"
  return json.loads(path.read_text()) if path.exists() else None


def read_csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


class Spy:
  """Wraps train.train to record which points actually trained."""

  def __init__(self, monkeypatch):
    self.names = []
    real = train_lib.train

    def spy(config, workdir, pipeline=None):
      self.names.append(os.path.basename(workdir))
      return real(config, workdir, pipeline)

    monkeypatch.setattr(train_lib, "train", spy)


# ---------------------------------------------------------------- fast: no training
def test_sweep_file_points_and_budget():
  s = sweep.load_sweep(SWEEP)
  assert [p.name for p in s.points] == NAMES
  for p in s.points:
    assert p.num_steps == STEPS and p.tokens == STEPS * 8 * 64
  assert [p.config.model.routing.num_experts for p in s.points] == [1, 4, 4, 2]
  sweep.check_points(s.points)


def test_print_commands_reproduce_each_config(tmp_path, capsys):
  """Each printed command, parsed as routing_lm.main parses it, builds the point's config."""
  from absl import flags
  from routing_lm import main
  work = tmp_path / "w"
  assert sweep.main([f"--sweep={SWEEP}", f"--workdir={work}", "--print-commands"]) == 0
  out = capsys.readouterr()
  lines = out.out.splitlines()
  assert len(lines) == 4 and all(l.startswith("python -m routing_lm.main ") for l in lines)
  assert "[sweep]" in out.err
  assert not work.exists()   # printing touches no workdir (it may be gs://)
  points = sweep.load_sweep(SWEEP).points
  for line, point in zip(lines, points):
    argv = ["prog"] + line.split()[3:]
    assert argv[-1] == f"--workdir={work / point.name}"
    fv = flags.FlagValues()
    fv(main.define_config_flag(argv[:-1], fv))
    assert fv.config.to_dict() == point.config.to_dict()


def test_only_selects_points(tmp_path, capsys):
  assert sweep.main([f"--sweep={SWEEP}", f"--workdir={tmp_path}", "--print-commands",
                     "--only=hash"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 1 and lines[0].endswith("/hash_e4")
  assert sweep.main([f"--sweep={SWEEP}", f"--workdir={tmp_path}", "--only=nope"]) == 2
  assert "matches none" in capsys.readouterr().err


def test_bad_sweep_files(tmp_path, capsys):
  cases = {
      "dup": "[{'name': 'a'}, {'name': 'a'}]",
      "slash": "[{'name': 'a/b'}]",
      "key": "[{'name': 'a', 'overide': {}}]",
  }
  for label, points in cases.items():
    f = tmp_path / f"{label}.py"
    f.write_text(f"def get_sweep():\n  return {{'config': 'configs/tiny.py', 'points': {points}}}\n")
    assert sweep.main([f"--sweep={f}", f"--workdir={tmp_path / 'w'}"]) == 2
  err = capsys.readouterr().err
  assert "used twice" in err and "only letters" in err and "unknown keys ['overide']" in err


def test_result_row_from_summary():
  config = sweep.load_sweep(SWEEP).points[0].config
  s = {"config": config.to_dict(), "n_params": 10, "total_params": 10,
       "active_params_nonemb": 10, "total_params_nonemb": 10, "router_params": 0,
       "embedding_params": 5, "flops_per_token": 30, "train_flops_per_token": 60,
       "num_routed_layers": 0, "steps": 6, "tokens": 3072, "train_flops": 184320,
       "train_loss": 7.0, "train_loss_smoothed": 7.1, "val_loss": 7.2, "wall_seconds": 1.5}
  row = sweep.result_row("dense", s)
  assert row["router"] == "dense" and row["num_experts"] == 1 and row["granularity"] == 1
  assert all(k in row for k in sweep.RESULT_COLUMNS)
  assert row["val_loss"] == 7.2 and row["train_flops"] == 184320


# ---------------------------------------------------------------- slow: training
@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory):
  """Starts the sweep as a subprocess, kills it (SIGKILL) once the first point's summary
  appears, then reruns it in this process. Returns (workdir, names trained by the rerun,
  summaries present at the kill)."""
  work = tmp_path_factory.mktemp("sweep") / "run"
  log = open(work.parent / "first.log", "w")
  proc = subprocess.Popen([sys.executable, "-m", "routing_lm.sweep", f"--sweep={SWEEP}",
                           f"--workdir={work}"], cwd=ROOT, stdout=log, stderr=log)
  deadline = time.time() + 300
  try:
    while summary(work, NAMES[0]) is None:
      assert proc.poll() is None, (work.parent / "first.log").read_text()[-3000:]
      assert time.time() < deadline, "the first point did not finish in 300 s"
      time.sleep(0.1)
  finally:
    proc.kill()
    proc.wait()
    log.close()
  at_kill = [n for n in NAMES if summary(work, n) is not None]
  mp = pytest.MonkeyPatch()
  spy = Spy(mp)
  try:
    assert sweep.main([f"--sweep={SWEEP}", f"--workdir={work}"]) == 0
  finally:
    mp.undo()
  return work, spy.names, at_kill


@pytest.mark.slow
def test_killed_sweep_resumes_and_completes(killed_then_resumed):
  work, rerun, at_kill = killed_then_resumed
  assert at_kill[0] == "dense" and len(at_kill) < len(NAMES), "the kill hit mid-sweep"
  assert rerun == [n for n in NAMES if n not in at_kill]   # finished points are skipped
  for name in NAMES:
    s = summary(work, name)
    assert s is not None and s["steps"] == STEPS and s["tokens"] == STEPS * 8 * 64


@pytest.mark.slow
def test_results_csv_has_one_correct_row_per_point(killed_then_resumed):
  work, _, _ = killed_then_resumed
  rows = read_csv(work / "results.csv")
  assert [r["name"] for r in rows] == NAMES
  assert list(rows[0]) == list(sweep.COLUMNS)
  for row in rows:
    s = summary(work, row["name"])
    r = s["config"]["model"]["routing"]
    assert row["router"] == ("dense" if r["num_experts"] == 1 else r["router"])
    for col in ("num_experts", "top_k", "granularity"):
      assert int(row[col]) == r[col]
    assert float(row["routing_frequency"]) == r["routing_frequency"]
    for col in ("n_params", "total_params", "flops_per_token", "total_params_nonemb",
                "active_params_nonemb", "train_flops", "steps", "tokens"):
      assert int(row[col]) == s[col], col
    for col in ("val_loss", "train_loss", "train_loss_smoothed", "wall_seconds"):
      assert float(row[col]) == s[col], col
  assert [r["router"] for r in rows] == ["dense", "sbase", "hash", "rlr"]
  assert int(rows[0]["total_params"]) == int(rows[0]["n_params"])
  assert int(rows[1]["total_params"]) > int(rows[1]["n_params"])


@pytest.mark.slow
def test_second_invocation_runs_nothing_new(killed_then_resumed, monkeypatch, capsys):
  work, _, _ = killed_then_resumed
  before = (work / "results.csv").read_text()
  mtimes = {n: (work / n / "summary.json").stat().st_mtime for n in NAMES}
  spy = Spy(monkeypatch)
  assert sweep.main([f"--sweep={SWEEP}", f"--workdir={work}"]) == 0
  assert spy.names == []
  assert capsys.readouterr().err.count("skipped, finished earlier") == 4
  assert (work / "results.csv").read_text() == before
  assert mtimes == {n: (work / n / "summary.json").stat().st_mtime for n in NAMES}


@pytest.mark.slow
def test_unfinished_point_resumes_from_its_checkpoint(killed_then_resumed, tmp_path,
                                                      monkeypatch, capsys):
  src, _, _ = killed_then_resumed
  work = tmp_path / "run"
  shutil.copytree(src, work)
  point = work / "hash_e4"
  done = summary(work, "hash_e4")
  (point / "summary.json").unlink()          # as if killed after step 4's checkpoint
  ckpts = point / "checkpoints"
  shutil.rmtree(ckpts / str(STEPS))
  assert (ckpts / "4").is_dir()
  spy = Spy(monkeypatch)
  assert sweep.main([f"--sweep={SWEEP}", f"--workdir={work}"]) == 0
  assert spy.names == ["hash_e4"]
  assert "3/4 hash_e4: resuming" in capsys.readouterr().err
  again = summary(work, "hash_e4")
  assert again["steps"] == STEPS
  # batches and rngs are functions of the step: the resumed run repeats the first one
  assert again["val_loss"] == pytest.approx(done["val_loss"], rel=1e-4)
  assert len(read_csv(work / "results.csv")) == 4


@pytest.mark.slow
def test_collect_only_on_partial_workdir(killed_then_resumed, tmp_path):
  src, _, _ = killed_then_resumed
  work = tmp_path / "run"
  for name in NAMES[:2]:
    (work / name).mkdir(parents=True)
    shutil.copy(src / name / "summary.json", work / name / "summary.json")
  assert sweep.main([f"--sweep={SWEEP}", f"--workdir={work}", "--collect"]) == 0
  assert [r["name"] for r in read_csv(work / "results.csv")] == NAMES[:2]
