"""routing_lm.curves on small synthetic sweep workdirs (metrics.jsonl files; < 2 s)."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from scipy import stats as sp_stats

from routing_lm import curves

STEPS = list(range(2, 41, 2))            # logged every 2 steps, 20 logged steps
SEEDS = (0, 1, 2)
OFFSET = {0: 0.01, 1: -0.02, 2: 0.005}   # a seed's constant part of the gain
SLOPE = -0.001                           # the planted gain grows linearly with the step
WINDOW, EVERY = 4, 10


def dense_loss(step: int, seed: int) -> float:
  return 5.0 - 0.01 * step + 0.1 * seed


def gain(step: int, seed: int) -> float:
  return SLOPE * step + OFFSET[seed]


def write(path: pathlib.Path, rows: list[dict]) -> None:
  path.mkdir(parents=True, exist_ok=True)
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def routed_rows(seed: int, steps=STEPS, agreement: bool = True) -> list[dict]:
  rows = []
  for s in steps:
    row = {"step": s, "loss": dense_loss(s, seed) + gain(s, seed), "grad_norm": 1.0}
    if agreement:   # two routed blocks; their mean is 0.3 + 0.01 s
      row |= {"router/block1/agreement": 0.2 + 0.01 * s,
              "router/block3/agreement": 0.4 + 0.01 * s, "router/block1/entropy": 1.0}
    rows.append(row)
  return rows


@pytest.fixture
def workdir(tmp_path) -> pathlib.Path:
  """s: dense + sbase E=4 (with agreement) + hash E=16 (without), 3 seeds. Seed 0's sbase
  run was resumed: a first attempt logged steps 2..20 (its 14..20 with a wrong loss),
  the rerun logged 14..40 again; the evaluation adds a val_loss line at the last step."""
  root = tmp_path / "sweep"
  for k in SEEDS:
    write(root / f"seed{k}_s_dense", [{"step": s, "loss": dense_loss(s, k)} for s in STEPS]
          + [{"step": STEPS[-1], "val_loss": 9.0}])
    rows = routed_rows(k)
    if k == 0:
      stale = [r | {"loss": 100.0} for r in rows if 14 <= r["step"] <= 20]
      rows = rows[:6] + stale + rows[6:]
    write(root / f"seed{k}_s_sbase_e4", rows + [{"step": STEPS[-1], "val_loss": 9.0}])
    write(root / f"seed{k}_s_hash_e16", routed_rows(k, agreement=False))
  (root / "findings").mkdir()     # not a point: ignored
  (root / "results.csv").write_text("name\n")
  return root


def expected_gain(step: int, window: int = WINDOW) -> np.ndarray:
  """Per seed, the trailing mean of the raw gains over the last `window` logged steps."""
  i = STEPS.index(step)
  return np.array([np.mean([gain(s, k) for s in STEPS[max(0, i - window + 1):i + 1]])
                   for k in SEEDS])


def test_read_run_last_line_per_step_wins(workdir):
  table = curves.read_run(workdir / "seed0_s_sbase_e4" / "metrics.jsonl")
  assert list(table.index) == STEPS          # one row per step, in order
  want = [dense_loss(s, 0) + gain(s, 0) for s in STEPS]
  np.testing.assert_allclose(table["loss"], want)   # not 100.0 and not dropped at step 40
  np.testing.assert_allclose(table["agreement"], [0.3 + 0.01 * s for s in STEPS])
  assert curves.read_run(workdir / "nope" / "metrics.jsonl").empty


def test_gain_table_equals_hand_computed_means(workdir):
  c = curves.compute(workdir, window=WINDOW, every=EVERY)
  assert c.steps == [10, 20, 30, 40]
  cell = curves.Cell("s", "sbase", 4)
  assert set(c.gain) == {cell, curves.Cell("s", "hash", 16)}
  table = c.gain_table[cell]
  t = sp_stats.t.ppf(0.975, len(SEEDS) - 1)
  for _, row in table.iterrows():
    x = expected_gain(int(row["step"]))
    assert row["n_seeds"] == 3
    assert row["mean"] == pytest.approx(x.mean(), abs=1e-9)
    half = t * x.std(ddof=1) / np.sqrt(len(x))
    assert (row["high"] - row["low"]) / 2 == pytest.approx(half, rel=1e-6)
  # The planted linear gain: the trailing mean over 4 logged steps (2 apart) lags 3 steps.
  assert table["mean"].iloc[-1] == pytest.approx(SLOPE * 37 + np.mean(list(OFFSET.values())))
  # Step 10 is the 5th logged step: a full window (4..10); with window 10 it is partial.
  wide = curves.compute(workdir, window=10, every=EVERY).gain_table[cell]
  assert wide["mean"].iloc[0] == pytest.approx(expected_gain(10, 10).mean(), abs=1e-9)
  assert wide["mean"].iloc[0] == pytest.approx(SLOPE * 6 + np.mean(list(OFFSET.values())))
  # The markdown cell for step 40.
  text = curves.markdown(c)
  row40 = table.iloc[-1]
  assert f"{row40['mean']:+.4f} ± {(row40['high'] - row40['low']) / 2:.4f} (3)" in text


def test_agreement_only_for_routers_that_log_it(workdir):
  c = curves.compute(workdir, window=WINDOW, every=EVERY)
  assert set(c.agreement_table) == {curves.Cell("s", "sbase", 4)}
  table = c.agreement_table[curves.Cell("s", "sbase", 4)]
  np.testing.assert_allclose(table["mean"], [0.3 + 0.01 * (s - 3) for s in c.steps])
  assert (table["n_seeds"] == 3).all()


def test_runs_in_progress_count_up_to_their_last_step(workdir):
  write(workdir / "seed2_s_hash_e16", routed_rows(2, steps=STEPS[:12], agreement=False))
  table = curves.compute(workdir, window=WINDOW, every=EVERY).gain_table[
      curves.Cell("s", "hash", 16)]
  assert list(table["n_seeds"]) == [3, 3, 2, 2]    # seed 2 reached step 24
  np.testing.assert_allclose(table["mean"].iloc[-1], expected_gain(40)[:2].mean())


def test_missing_dense_is_a_note_not_a_crash(workdir, tmp_path, capsys):
  write(workdir / "seed0_m_sbase_e4", routed_rows(0))
  write(workdir / "seed1_m_sbase_e4", routed_rows(1))
  write(workdir / "seed3_s_sbase_e4", routed_rows(0))   # seed 3 has no dense run
  (workdir / "seed4_s_sbase_e4").mkdir()                # no metrics.jsonl yet
  c = curves.compute(workdir, window=WINDOW, every=EVERY)
  assert curves.Cell("m", "sbase", 4) not in c.gain
  notes = "\n".join(c.notes)
  assert "size m: no dense run" in notes and "sbase_e4" in notes
  assert "seed3_s_sbase_e4: no dense run seed3_s_dense" in notes
  assert "seed4_s_sbase_e4: no logged training loss" in notes
  # The s cell is unchanged (seed 3 left out), and m's agreement is still reported.
  assert list(c.gain[curves.Cell("s", "sbase", 4)]) == list(SEEDS)
  assert curves.Cell("m", "sbase", 4) in c.agreement_table
  out = tmp_path / "out"
  assert curves.main([f"--workdir={workdir}", f"--out={out}", f"--window={WINDOW}",
                      f"--every={EVERY}"]) == 0
  text = (out / "curves.md").read_text()
  assert "## Notes" in text and "size m: no dense run" in text
  assert text.strip() in capsys.readouterr().out


def test_cli_writes_tables_and_plots(workdir, tmp_path, capsys):
  out = tmp_path / "out"
  assert curves.main([f"--workdir={workdir}", f"--out={out}", "--window=4", "--every=20",
                      "--routers=sbase"]) == 0
  text = (out / "curves.md").read_text()
  lines = [l for l in text.splitlines() if l.startswith("| s |")]
  assert len(lines) == 2 and all("| sbase | 4 |" in l for l in lines)   # hash filtered out
  assert "| step 20 | step 40 |" in text
  for name in ("gain_vs_step.png", "agreement_vs_step.png"):
    assert (out / name).stat().st_size > 1000
  capsys.readouterr()
  assert curves.main([f"--workdir={tmp_path / 'none'}", f"--out={out}"]) == 2
  assert "is not a folder" in capsys.readouterr().err
  assert curves.main([f"--workdir={workdir}", f"--out={out}", "--routers=rlr"]) == 2
  assert "no routed point" in capsys.readouterr().err
  assert curves.main([f"--workdir={workdir}", f"--out={out}", "--window=0"]) == 2
  assert "--window=0" in capsys.readouterr().err


def test_names_and_checkpoints():
  assert curves.parse_name("seed1_m_expert_choice_e16") == (1, "m", "expert_choice", 16)
  assert curves.parse_name("seed0_s_dense") == (0, "s", "dense", 1)
  assert curves.parse_name("results.csv") is None
  assert curves.checkpoint_steps(600, 100) == [100, 200, 300, 400, 500, 600]
  assert curves.checkpoint_steps(250, 100) == [100, 200, 250]
  assert curves.checkpoint_steps(50, 100) == [50]
