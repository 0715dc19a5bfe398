"""routing_lm.ablation on small results tables with planted effects (no training; < 1 s)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sp_stats

from routing_lm import ablation

SEEDS = (0, 1, 2, 3)
# Run-to-run offsets shared by a seed's runs (same init, same batches): 0.07 nats spread.
SHARED = (0.0, 0.08, -0.06, 0.03, 0.01)
NOISE = 0.002        # each run's own noise


def results(effects: dict[str, float], seeds=SEEDS, rng_seed: int = 0) -> pd.DataFrame:
  """results.csv rows: variant v's loss at seed k = 4 + SHARED[k] + effects[v] + own noise."""
  rng = np.random.default_rng(rng_seed)
  rows = []
  for k in seeds:
    for v, effect in effects.items():
      val = 4.0 + SHARED[k] + effect + NOISE * rng.standard_normal()
      rows.append({"name": f"seed{k}_{v}", "seed": k, "router": "sbase", "val_loss": val,
                   "train_loss_smoothed": val + 0.1})
  return pd.DataFrame(rows)


def by_variant(rows: list[ablation.Comparison]) -> dict[str, ablation.Comparison]:
  return {r.variant: r for r in rows}


@pytest.fixture(scope="module")
def planted() -> pd.DataFrame:
  return results({"default": 0.0, "better": -0.05, "same": 0.0})


def test_planted_effect_is_found_paired_by_seed(planted):
  out = ablation.ablation(planted, "default")
  assert list(out) == ["val_loss", "train_loss_smoothed"]
  rows = by_variant(out["val_loss"])
  assert list(rows) == ["default", "better", "same"]   # the baseline first
  better = rows["better"]
  assert better.verdict == "better < default"
  assert better.interval.low <= better.difference <= better.interval.high < 0
  # The paired difference by hand: mean and t interval of the per-seed differences.
  df = planted.set_index("name")["val_loss"]
  d = np.array([df[f"seed{k}_better"] - df[f"seed{k}_default"] for k in SEEDS])
  half = sp_stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
  assert better.difference == pytest.approx(d.mean(), abs=1e-12)
  assert better.interval.high - better.difference == pytest.approx(half, rel=1e-9)
  assert better.n_seeds == better.n_common == 4
  # Unpaired, the seed spread (0.07) would swamp the effect: pairing is what finds it.
  welch = ablation.stats.difference_interval(
      [df[f"seed{k}_better"] for k in SEEDS], [df[f"seed{k}_default"] for k in SEEDS])
  assert welch.high > 0
  # The mean ± interval of the variant alone.
  x = np.array([df[f"seed{k}_better"] for k in SEEDS])
  assert better.mean == pytest.approx(x.mean())
  assert better.mean_interval.low < x.mean() < better.mean_interval.high
  # Both loss columns carry the same planted difference (train = val + 0.1).
  train = by_variant(out["train_loss_smoothed"])["better"]
  assert train.difference == pytest.approx(better.difference, abs=1e-12)


def test_no_effect_is_not_an_ordering(planted):
  same = by_variant(ablation.ablation(planted, "default")["val_loss"])["same"]
  assert same.verdict in ("not distinguishable", "equivalent within 0.01")
  assert same.interval.low <= 0 <= same.interval.high
  wide = by_variant(ablation.ablation(planted, "default", margin=0.05)["val_loss"])["same"]
  assert wide.verdict == "equivalent within 0.05"


def test_row_order_does_not_matter(planted):
  shuffled = planted.sample(frac=1.0, random_state=3).reset_index(drop=True)
  assert not shuffled["name"].equals(planted["name"])
  assert ablation.ablation(shuffled, "default") == ablation.ablation(planted, "default")


def test_a_seed_missing_from_the_variant_is_left_out_of_the_pairing(planted):
  dropped = planted[planted["name"] != "seed1_better"]
  better = by_variant(ablation.ablation(dropped, "default")["val_loss"])["better"]
  assert better.n_seeds == better.n_common == 3
  df = planted.set_index("name")["val_loss"]
  d = [df[f"seed{k}_better"] - df[f"seed{k}_default"] for k in (0, 2, 3)]
  assert better.difference == pytest.approx(np.mean(d), abs=1e-12)
  # A failed run (NaN loss) is left out the same way.
  failed = planted.copy()
  failed.loc[failed["name"] == "seed1_better", "val_loss"] = np.nan
  assert by_variant(ablation.ablation(failed, "default")["val_loss"])["better"] == better


def test_fewer_than_two_common_seeds_cannot_be_told(planted):
  one = planted[~planted["name"].isin(["seed1_better", "seed2_better", "seed3_better"])]
  better = by_variant(ablation.ablation(one, "default")["val_loss"])["better"]
  assert better.n_common == 1 and better.interval is None and better.mean_interval is None
  assert better.verdict.startswith("cannot be told")
  text = ablation.markdown({"val_loss": [better]}, "default")
  assert "cannot be told" in text


def test_missing_baseline_and_bad_names_raise(planted):
  with pytest.raises(ValueError, match=r"--baseline='nope'.*better.*default"):
    ablation.ablation(planted, "nope")
  bad = pd.concat([planted, pd.DataFrame([{"name": "s_dense", "val_loss": 4.0,
                                           "train_loss_smoothed": 4.1}])])
  with pytest.raises(ValueError, match=r"s_dense.*seed<k>_<variant>"):
    ablation.ablation(bad, "default")
  with pytest.raises(ValueError, match=r"\['val_los'\].*--loss_column"):
    ablation.ablation(planted, "default", ["val_los"])
  dup = pd.concat([planted, planted.iloc[:1]])
  with pytest.raises(ValueError, match="repeat a"):
    ablation.ablation(dup, "default")


def test_cli_prints_and_writes_tables(planted, tmp_path, capsys):
  planted.to_csv(tmp_path / "results.csv", index=False)
  out = tmp_path / "out"
  assert ablation.main([f"--results={tmp_path / 'results.csv'}", "--baseline=default",
                        "--loss_column=val_loss", f"--out={out}"]) == 0
  text = (out / "ablation.md").read_text()
  assert text.strip() in capsys.readouterr().out
  assert "## val_loss" in text and "## train_loss_smoothed" not in text
  better = [line for line in text.splitlines() if line.startswith("| better |")]
  assert len(better) == 1 and "better < default" in better[0] and "| 4 |" in better[0]
  assert ablation.main([f"--results={tmp_path / 'results.csv'}", "--baseline=nope"]) == 2
  assert "--baseline='nope'" in capsys.readouterr().err
