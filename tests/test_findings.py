"""routing_lm.findings on seeded tables with planted effects (no training; a few seconds)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from routing_lm import config as config_lib, findings, scaling
from routing_lm.scaling import laws

SIZES = (1e6, 1e7, 1e8)
EXPERTS = (4, 16, 64)
NOISE = 0.002            # relative, per run: about 0.008 nats at these losses
N_BOOTSTRAP = 40
# Routing helps less as N grows (c > 0): S-BASE's published law with HASH shifted 3% up
# (a large planted gap). GROWS has c < 0: its gain grows with N. HURTS makes loss rise with E.
GROWS = laws.RoutedCoeffs(a=-0.082, b=-0.02, c=-0.009, d=1.104, e_start=1.847, e_max=314.5)
HURTS = laws.RoutedCoeffs(a=-0.082, b=0.02, c=0.0, d=1.104, e_start=1.847, e_max=314.5)


def seeded_table(routers: dict[str, tuple[laws.RoutedCoeffs, float]], seeds=range(4),
                 noise: float = NOISE, sizes=SIZES, rng_seed: int = 0) -> pd.DataFrame:
  """results.csv rows: router r's loss = dense(N) * L_r(N, E) / L_r(N, 1) * (1 + shift_r).

  Each law's shape over E comes from `scaling.synthetic_routed_table`; every router shares
  one dense run per (size, seed) (S-BASE's law at E = 1). Each run gets its own noise
  (1 + noise * N(0, 1)).
  """
  rng = np.random.default_rng(rng_seed)
  dense = scaling.synthetic_routed_table(laws.SBASE, n_params=sizes, experts=(1,))
  dense = dense.set_index("n_params")["val_loss"]
  rows = []
  for seed in seeds:
    for n in sizes:
      rows.append({"router": "dense", "num_experts": 1, "n_params": n, "seed": seed,
                   "val_loss": dense[n] * (1 + noise * rng.standard_normal())})
    for router, (coeffs, shift) in routers.items():
      law = scaling.synthetic_routed_table(coeffs, n_params=sizes, experts=(1, *EXPERTS))
      law = law.set_index(["n_params", "num_experts"])["val_loss"]
      for n in sizes:
        for e in EXPERTS:
          loss = dense[n] * law[(n, e)] / law[(n, 1)] * (1 + shift)
          rows.append({"router": router, "num_experts": e, "n_params": n, "seed": seed,
                       "val_loss": loss * (1 + noise * rng.standard_normal())})
  return pd.DataFrame(rows)


def analyse(df: pd.DataFrame, **kw) -> findings.Report:
  return findings.analyse(findings.load_table(df), n_bootstrap=N_BOOTSTRAP, **kw)


def verdicts(report: findings.Report) -> list[str]:
  return [f.verdict for f in report.findings]


@pytest.fixture(scope="module")
def paper_like() -> findings.Report:
  """S-BASE best by a planted 3% gap over HASH, and RL-R tied with S-BASE."""
  return analyse(seeded_table({"sbase": (laws.SBASE, 0.0), "hash": (laws.SBASE, 0.03),
                               "rlr": (laws.SBASE, 0.0)}))


def test_planted_gains_are_found_and_paired(paper_like):
  f1 = paper_like.findings[0]
  assert f1.verdict == findings.HOLDS
  assert f1.per_router == {"hash": "holds", "rlr": "holds", "sbase": "holds"}
  assert len(paper_like.gain) == 3 * len(SIZES) * len(EXPERTS)
  for (n, router, e), d in paper_like.gain.items():
    assert d.paired and d.n_a == d.n_b == 4
    assert d.interval.low <= d.estimate <= d.interval.high < 0
  # The mean ± interval table covers every cell, with 4 seeds each.
  assert len(paper_like.cells) == len(SIZES) * (1 + 3 * len(EXPERTS))
  assert (paper_like.cells["n_seeds"] == 4).all()


def test_c_positive_is_found(paper_like):
  f2 = paper_like.findings[1]
  assert f2.verdict == findings.HOLDS, f2.reasons
  for router in ("sbase", "hash", "rlr"):
    fit = paper_like.fits[router].fit
    lo, hi = fit.intervals["c"]
    assert 0 < lo <= fit.c <= hi
    if router != "hash":   # HASH's planted 3% step at E > 1 is not Eq. 1 with S-BASE's law
      assert abs(fit.c - laws.SBASE.c) < 0.002
    # The gain at E = 64 rises towards zero from the smallest to the largest size.
    assert paper_like.trend[router].interval.low > 0


def test_large_gap_is_an_ordering_and_tie_is_not(paper_like):
  f3 = paper_like.findings[2]
  assert f3.per_router["hash"] == findings.HOLDS
  assert paper_like.pooled["hash"].verdict == "sbase < hash"
  # Planted 3% of ~3-4 nats: the pooled estimate is about -0.1.
  assert -0.15 < paper_like.pooled["hash"].estimate < -0.07
  tie = paper_like.pooled["rlr"]
  assert tie.verdict in ("not distinguishable", "equivalent within 0.01")
  assert tie.interval.low <= 0 <= tie.interval.high
  assert f3.per_router["rlr"] == findings.UNKNOWN
  assert f3.verdict == findings.UNKNOWN   # one router is not shown worse than S-BASE
  assert all(d.verdict == "sbase < hash" for (o, _, _), d in paper_like.per_cell.items()
             if o == "hash")


def test_tie_reads_equivalent_with_a_wide_margin(paper_like):
  table = findings.load_table(seeded_table({"sbase": (laws.SBASE, 0.0),
                                            "rlr": (laws.SBASE, 0.0)}))
  pooled, _ = findings.router_comparisons(table, margin=0.05)
  assert pooled["rlr"].verdict == "equivalent within 0.05"


def test_later_routers_are_reported_apart_from_the_paper_findings(paper_like):
  """A router after the paper gets the same tests in its own section and leaves the
  paper's findings as they were."""
  df = seeded_table({"sbase": (laws.SBASE, 0.0), "hash": (laws.SBASE, 0.03),
                     "rlr": (laws.SBASE, 0.0), "lossfree": (HURTS, 0.0)})
  report = analyse(df)
  assert [f.per_router for f in report.findings] == \
      [f.per_router for f in paper_like.findings]
  later = {f.number: f for f in report.later_findings}
  assert later[1].per_router == {"lossfree": findings.FAILS}
  assert later[3].per_router == {"lossfree": findings.HOLDS}   # sbase below lossfree
  text = report.markdown()
  assert "## Routers after the paper" in text and "lossfree" in text


def test_opposite_effects_fail():
  report = analyse(seeded_table({"sbase": (laws.SBASE, 0.01), "hash": (laws.SBASE, 0.0),
                                 "rlr": (HURTS, 0.0)}))
  f1, _, f3 = report.findings
  assert f1.verdict == findings.FAILS and f1.per_router["rlr"] == findings.FAILS
  assert f1.per_router["sbase"] == findings.HOLDS
  assert f3.verdict == findings.FAILS and f3.per_router["hash"] == findings.FAILS
  assert report.pooled["hash"].verdict == "sbase > hash"
  # RL-R never helps: no gain to shrink, so finding 2 cannot be told for it.
  assert report.findings[1].per_router["rlr"] == findings.UNKNOWN


def test_gain_growing_with_n_fails_finding_2():
  report = analyse(seeded_table({"sbase": (GROWS, 0.0)}))
  f2 = report.findings[1]
  assert f2.verdict == findings.FAILS, f2.reasons
  assert report.fits["sbase"].fit.intervals["c"][1] < 0
  assert report.trend["sbase"].interval.high < 0


def test_one_seed_cannot_be_told():
  report = analyse(seeded_table({"sbase": (laws.SBASE, 0.0), "hash": (laws.SBASE, 0.03)},
                                seeds=[0]))
  assert verdicts(report) == [findings.UNKNOWN] * 3
  assert report.cells["low"].isna().all()
  assert all(d.interval is None and "fewer than 2 seeds" in d.verdict
             for d in report.gain.values())
  text = report.markdown()
  assert "cannot be told" in text and "±" not in text.split("## val_loss")[1].split(
      "## Gain")[0].replace("mean ±", "")


def test_unpaired_seeds_use_welch():
  df = seeded_table({"sbase": (laws.SBASE, 0.0)})
  dense = df["router"] == "dense"
  df.loc[dense, "seed"] += 10          # no dense run shares a seed with a routed one
  report = analyse(df)
  assert all(not d.paired and d.interval is not None for d in report.gain.values())
  assert report.findings[0].verdict == findings.HOLDS


def test_bad_tables_name_the_fix():
  df = seeded_table({"sbase": (laws.SBASE, 0.0)}, seeds=[0, 1])
  with pytest.raises(ValueError, match=r"no 'seed' column.*--collect"):
    findings.load_table(df.drop(columns="seed"))
  with pytest.raises(ValueError, match=r"repeat a \(n_params, router, num_experts, seed\)"):
    findings.load_table(pd.concat([df, df.iloc[:1]]))
  with pytest.raises(ValueError, match="no dense rows"):
    findings.load_table(df[df["router"] != "dense"])
  with pytest.raises(ValueError, match="'seed' must hold integers"):
    findings.load_table(df.assign(seed=df["seed"] + 0.5))


def test_fit_on_a_bound_is_flagged(paper_like):
  # HASH's planted step at E > 1 drives E_max to the box's lower edge (16).
  assert findings._bound_note(paper_like.fits["hash"].fit) == "E_max on a bound: not identified"
  assert findings._bound_note(paper_like.fits["sbase"].fit) == ""


def test_one_size_has_no_fit():
  report = analyse(seeded_table({"sbase": (laws.SBASE, 0.0)}, sizes=(1e7,)))
  assert report.fits["sbase"].fit is None and "2 sizes" in report.fits["sbase"].reason
  assert report.findings[1].verdict == findings.UNKNOWN
  assert report.findings[0].verdict == findings.HOLDS


def test_cli_writes_report_and_plots(tmp_path, capsys):
  df = seeded_table({"sbase": (laws.SBASE, 0.0), "hash": (laws.SBASE, 0.03)}, seeds=[0, 1, 2])
  df.to_csv(tmp_path / "results.csv", index=False)
  out = tmp_path / "out"
  assert findings.main([f"--results={tmp_path / 'results.csv'}", f"--out={out}",
                        "--n_bootstrap=10"]) == 0
  text = (out / "findings.md").read_text()
  # HASH's planted 3% nearly cancels its gain at the largest N, E = 4: finding 1 is open.
  assert "1. **routing helps at every size, for every router: cannot be told.**" in text
  assert "3. **sbase is the best router (lower loss than each other router): holds.**" in text
  assert "sbase - hash" in text and text.strip() in capsys.readouterr().out
  data = json.loads((out / "findings.json").read_text())
  assert [f["verdict"] for f in data["findings"]] == ["cannot be told", "holds", "holds"]
  assert data["fits"]["sbase"]["n_bootstrap"] == 10
  for name in ("sbase_loss_vs_experts.png", "hash_loss_vs_experts.png", "gain_vs_params.png"):
    assert (out / name).stat().st_size > 1000
  df.drop(columns="seed").to_csv(tmp_path / "old.csv", index=False)
  assert findings.main([f"--results={tmp_path / 'old.csv'}", f"--out={out}"]) == 2
  assert "no 'seed' column" in capsys.readouterr().err


def test_cpu_paper_points_and_parts():
  sweep = config_lib.load_module("configs/sweeps/cpu_paper.py")
  spec = sweep.get_sweep()
  names = [p["name"] for p in spec["points"]]
  assert len(names) == len(set(names)) == 3 * 2 * (1 + 3 * 3)
  assert spec["tokens"] == 16 * 64 * 600
  for p in spec["points"]:
    o = p["overrides"]
    assert o["train.seed"] == o["data.seed"] == int(p["name"].split("_")[0][4:])
  # The documented parts: one seed is 20 runs; one size of one seed is 10.
  assert sum("seed0_" in n for n in names) == 20
  assert sum("seed1_m_" in n for n in names) == 10
  assert sum("_e64" in n for n in names) == 18
  assert sum(n.endswith("_dense") for n in names) == 6


def test_after_paper_extends_cpu_paper_with_the_same_names():
  paper = config_lib.load_module("configs/sweeps/cpu_paper.py").get_sweep()
  after = config_lib.load_module("configs/sweeps/cpu_after_paper.py").get_sweep()
  names = [p["name"] for p in after["points"]]
  assert len(names) == len(set(names)) == 60 + 2 * 2 * 1 * 3
  # cpu_paper's points come first and unchanged, so its finished runs are reused.
  assert after["points"][:60] == paper["points"] and after["overrides"] == paper["overrides"]
  ec = [p["overrides"] for p in after["points"] if "_expert_choice_" in p["name"]]
  assert len(ec) == 6 and all(o["model.routing.capacity_factor"] == 1.0 for o in ec)


@pytest.mark.parametrize("sweep,router,baseline,variants", [
    ("cpu_router_knobs", "sbase", "default", ("temperature", "iters", "router_lr",
                                              "router_init")),
    ("cpu_hash_tables", "hash", "balanced", ("frequency",))])
def test_ablation_sweeps_change_one_field_each(sweep, router, baseline, variants):
  spec = config_lib.load_module(f"configs/sweeps/{sweep}.py").get_sweep()
  by_name = {p["name"]: p["overrides"] for p in spec["points"]}
  assert len(by_name) == 3 * (1 + len(variants))
  for seed in range(3):
    base = by_name[f"seed{seed}_{baseline}"]
    assert base["model.routing.router"] == router and base["train.seed"] == seed
    for variant in variants:
      changed = {k for k, v in by_name[f"seed{seed}_{variant}"].items() if base.get(k) != v}
      assert len(changed) == 1, (variant, changed)


def test_results_row_has_the_seed():
  from routing_lm import sweep
  summary = {"config": {
      "model": {"d_model": 8, "num_layers": 1, "num_heads": 1, "d_ff": 32, "vocab_size": 16,
                "routing": {"num_experts": 4, "router": "hash", "top_k": 1,
                            "routing_frequency": 1.0}},
      "data": {"seq_len": 4, "batch_size": 2},
      "train": {"learning_rate": 1e-3, "seed": 7}}, "val_loss": 3.0}
  row = sweep.result_row("p", summary)
  assert row["seed"] == 7 and "seed" in sweep.COLUMNS
