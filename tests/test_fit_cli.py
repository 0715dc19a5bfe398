"""The `routing_lm.fit` CLI on small results.csv files written to a tmp dir."""
import json
import pathlib
import re
import subprocess
import sys

import pandas as pd
import pytest

from routing_lm import fit as fit_cli
from routing_lm import plan as plan_cli
from routing_lm import scaling

REPO = pathlib.Path(__file__).resolve().parents[1]
CONTRACT = ["router", "num_experts", "top_k", "routing_frequency", "granularity", "n_params",
            "total_params", "flops_per_token", "total_params_nonemb", "active_params_nonemb",
            "train_flops", "steps", "tokens", "val_loss", "train_loss",
            "train_loss_smoothed", "wall_seconds"]
N_PARAMS = (15e6, 55e6, 130e6, 370e6, 1.3e9)
EXPERTS = (1, 2, 4, 8, 32, 128)


def _contract(df: pd.DataFrame) -> pd.DataFrame:
  """Fill the results.csv columns a synthetic table lacks with plausible values."""
  defaults = dict(top_k=1, routing_frequency=0.5, granularity=1, steps=1000, tokens=1.3e11,
                  wall_seconds=60.0, n_params=df.get("active_params_nonemb"),
                  total_params=df.get("total_params_nonemb"), flops_per_token=1.0,
                  total_params_nonemb=df.get("total_params"),
                  active_params_nonemb=df.get("n_params"), train_flops=1.0)
  for col in CONTRACT:
    if col not in df.columns:
      df[col] = defaults.get(col, df.get("val_loss"))
  return df[CONTRACT]


@pytest.fixture(scope="module")
def routed_csv(tmp_path_factory) -> pathlib.Path:
  parts = [scaling.synthetic_routed_table(scaling.PUBLISHED[r], n_params=N_PARAMS,
                                          experts=EXPERTS, noise=0.005, seed=i, router=r)
           for i, r in enumerate(("sbase", "hash"))]
  df = pd.concat([parts[0], parts[1][parts[1]["num_experts"] > 1]], ignore_index=True)
  path = tmp_path_factory.mktemp("routed") / "results.csv"
  _contract(df).to_csv(path, index=False)
  return path


@pytest.fixture(scope="module")
def granular_csv(tmp_path_factory) -> pathlib.Path:
  moe = scaling.synthetic_granular_table(scaling.KRAJEWSKI_E64, noise=0.003, router="topk")
  dense = scaling.synthetic_granular_table(scaling.KRAJEWSKI_DENSE, num_experts=1,
                                           granularities=(1,), router="dense")
  path = tmp_path_factory.mktemp("granular") / "results.csv"
  _contract(pd.concat([moe, dense], ignore_index=True)).to_csv(path, index=False)
  return path


def _rows(out: str, first_word: str) -> list[list[str]]:
  return [line.split() for line in out.splitlines() if line.split()[:1] == [first_word]]


def _section(out: str, title: str) -> list[list[str]]:
  """The table printed after the line starting with `title`: header row first."""
  lines = out.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(title))
  table = []
  for line in lines[start + 1:]:
    if not line.strip():
      break
    table.append(line.split())
  return table


def test_fit_cli_routed_table(routed_csv, tmp_path, capsys):
  out_dir = tmp_path / "fits"
  assert fit_cli.main([f"--results={routed_csv}", f"--out={out_dir}", "--n_bootstrap=3"]) == 0
  out = capsys.readouterr().out
  header = out.splitlines()[1].split()
  assert header[:7] == ["router", "a", "b", "c", "d", "E_start", "E_max"]
  # The printed sbase row is fit_routed on the dense rows plus the sbase rows.
  df = pd.read_csv(routed_csv)
  expected = scaling.fit_routed(df[(df.num_experts == 1) | (df.router == "sbase")],
                                n_bootstrap=0)
  row = _rows(out, "sbase")[0]
  assert row[1:7] == [f"{expected.a:.4f}", f"{expected.b:.4f}", f"{expected.c:.4f}",
                      f"{expected.d:.4f}", f"{expected.e_start:.3f}", f"{expected.e_max:.3f}"]
  assert row[-1] == str(len(N_PARAMS) * len(EXPERTS))
  # coefficients, leave-out errors, 4 AIC forms, intervals; dense: coefficients, leave-out
  assert len(_rows(out, "hash")) == 7 and len(_rows(out, "dense")) == 2
  # Published S-BASE: a = -0.082, d = 1.104 (0.5% noise; 30 runs).
  assert float(row[1]) == pytest.approx(-0.082, rel=0.1)
  assert float(row[4]) == pytest.approx(1.104, rel=0.05)

  # Prediction errors of the refits that did not see the largest N or one E.
  held = _section(out, "Prediction error of refits on the runs they did not see")
  assert held[0] == ["router", "largest", "size", "out", "rows", "RMSE", "|rel", "err|",
                     "E=2", "out", "E=4", "out", "E=8", "out", "E=32", "out", "E=128", "out",
                     "RMS", "over", "E"]
  sbase = next(r for r in held if r[0] == "sbase")
  h = expected.largest_out
  assert sbase[1:5] == ["1.3e+09", "6", f"{h.rmse:.4f}", f"{h.mean_abs_rel:.2%}"]
  assert sbase[5:] == [f"{expected.e_out[e].rmse:.4f}" for e in (2, 4, 8, 32, 128)] + [
      f"{expected.e_out_rms:.4f}"]
  assert next(r for r in held if r[0] == "dense")[1:3] == ["1.3e+09", "1"]
  # AIC of each form, the preferred one marked.
  aic = _section(out, "AIC of Eq. 1 against simpler forms")
  assert aic[0] == ["router", "form", "coeffs", "n", "RSS", "AIC", "AICc", "dAICc", "preferred"]
  sbase = {r[1]: r for r in aic if r[0] == "sbase"}
  assert set(sbase) == {"saturating", "no_saturation", "dense", "dense_per_e"}
  for name, form in expected.forms.items():
    assert sbase[name][2:7] == [str(form.n_coefficients), "30", f"{form.rss:.3e}",
                                f"{form.aic:.2f}", f"{form.aicc:.2f}"]
  assert [r[1] for r in aic if r[-1] == "<-"] == [
      scaling.fit_routed(df[(df.num_experts == 1) | (df.router == r)], n_bootstrap=0,
                         leave_out=False).preferred_form for r in ("hash", "sbase")]
  assert sbase[expected.preferred_form][7] == "0.00"
  assert "Bootstrap 3 x 80% of the runs, 10-90% intervals:" in out

  fits = json.loads((out_dir / "fits.json").read_text())
  assert fits["law"] == "routed" and set(fits["fits"]) == {"sbase", "hash"}
  assert fits["n_bootstrap"] == 3 and fits["fits"]["sbase"]["n_bootstrap"] == 3
  assert fits["fits"]["sbase"]["largest_out"]["rmse"] == pytest.approx(h.rmse)
  assert set(fits["fits"]["sbase"]["e_out"]) == {"2", "4", "8", "32", "128"}
  assert fits["fits"]["sbase"]["preferred_form"] == expected.preferred_form
  assert fits["fits"]["sbase"]["aic"]["dense"]["n_coefficients"] == 2
  assert fits["dense"]["largest_out"]["n_points"] == 1
  assert fits["fits"]["sbase"]["coefficients"]["a"] == pytest.approx(expected.a)
  assert set(fits["fits"]["hash"]["intervals"]) == {"a", "b", "c", "d", "e_start", "e_max"}
  assert fits["dense"]["n_points"] == len(N_PARAMS)
  for router in ("sbase", "hash"):
    for kind in ("loss_vs_experts", "loss_vs_params", "iso_loss", "effective_params"):
      assert (out_dir / f"{router}_{kind}.png").stat().st_size > 1000
  saved = json.loads((out_dir / "hash_loss_vs_experts.json").read_text())
  assert [s["n_params"] for s in saved["series"]] == list(N_PARAMS)
  assert saved["series"][-1]["num_experts"] == list(EXPERTS)

  # The plan CLI reads these fits.
  assert plan_cli.main([f"--fits={out_dir / 'fits.json'}", "--fit=hash",
                        "--flops_per_token=2.6e8"]) == 0
  assert "law hash" in capsys.readouterr().out


def test_fit_cli_router_filter_and_heldout(routed_csv, tmp_path, capsys):
  assert fit_cli.main([f"--results={routed_csv}", f"--out={tmp_path}", "--router=hash",
                       "--n_bootstrap=0", "--no_plots", "--holdout_above=400e6"]) == 0
  out = capsys.readouterr().out
  assert not _rows(out, "sbase") and len(_rows(out, "hash")) == 6  # table, leave-out, 4 AIC
  # Leave-largest-out works inside the fitted range: the refit leaves out 370M.
  held = _section(out, "Prediction error of refits on the runs they did not see")
  assert next(r for r in held if r[0] == "hash")[1:3] == ["3.7e+08", "6"]
  fits = json.loads((tmp_path / "fits.json").read_text())
  assert fits["fits"]["hash"]["heldout_points"] == len(EXPERTS)  # the 1.3B rows
  assert fits["fits"]["hash"]["heldout_rmse"] < 0.01
  assert not list(tmp_path.glob("*.png"))


def test_fit_cli_granular(granular_csv, tmp_path, capsys):
  assert fit_cli.main([f"--results={granular_csv}", f"--out={tmp_path}", "--law=granular",
                       "--n_bootstrap=2"]) == 0
  out = capsys.readouterr().out
  header = out.splitlines()[1].split()
  assert header[:9] == ["fit", "E", "a", "alpha", "b", "beta", "g", "gamma", "c"]
  df = pd.read_csv(granular_csv)
  expected = scaling.fit_granular(df[df.num_experts == 64], n_bootstrap=0)
  row = _rows(out, "topk_e64")[0]
  assert row[1] == "64" and row[2:9] == [f"{v:.4g}" for v in
                                         scaling.coefficients(expected).values()]
  dense = _rows(out, "dense")[0]
  assert dense[8] == f"{expected.c:.4g}"  # the dense law shares c
  held = _section(out, "Prediction error of refits on the runs they did not see")
  assert held[0][:6] == ["fit", "largest", "size", "out", "rows", "RMSE"]
  row = next(r for r in held if r[0] == "topk_e64")
  assert row[2] == "15" and float(row[3]) < 0.01  # d_model 768: 5 G x 3 D
  assert "AIC of Eq. 1" not in out
  fits = json.loads((tmp_path / "fits.json").read_text())
  assert fits["law"] == "granular" and fits["fits"]["topk_e64"]["num_experts"] == 64
  assert fits["fits"]["topk_e64"]["largest_out"]["n_points"] == 15
  saved = json.loads((tmp_path / "topk_e64_loss_vs_granularity.json").read_text())
  assert len(saved["series"]) == 15 and saved["series"][0]["granularity"] == [1, 2, 4, 8, 16]

  assert plan_cli.main([f"--fits={tmp_path / 'fits.json'}", "--flops=1e20"]) == 0
  out = capsys.readouterr().out
  assert "64 x" in out and "x" in out.splitlines()[-1].split()[-1]  # dense/MoE ratio


@pytest.mark.parametrize("edit, message", [
    (lambda df: df.drop(columns=["val_loss"]), r"missing column\(s\) \['val_loss'\]"),
    (lambda df: df.assign(num_experts=0), r"'num_experts' must be >= 1"),
    (lambda df: df.head(3).assign(num_experts=1), "no routed rows"),
])
def test_fit_cli_bad_tables(routed_csv, tmp_path, capsys, edit, message):
  bad = tmp_path / "bad.csv"
  edit(pd.read_csv(routed_csv)).to_csv(bad, index=False)
  assert fit_cli.main([f"--results={bad}", f"--out={tmp_path / 'o'}", "--no_plots"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error:")
  assert re.search(message, err), err


def test_fit_cli_bootstrap_default():
  args = fit_cli._parse(["--results=r.csv", "--out=o"])
  assert args.n_bootstrap == scaling.N_BOOTSTRAP >= 1000


@pytest.mark.parametrize("content, message", [
    ("", r"--results=\S+bad.csv is empty \(no header, no rows\); point it at the results.csv"),
    (",".join(CONTRACT) + "\n", r"bad.csv has no rows \(only a header\): no run has "
     r"finished yet. Run the sweep"),
])
def test_fit_cli_empty_results(tmp_path, capsys, content, message):
  bad = tmp_path / "bad.csv"
  bad.write_text(content)
  assert fit_cli.main([f"--results={bad}", f"--out={tmp_path / 'o'}", "--no_plots"]) == 2
  err = capsys.readouterr().err
  assert re.search(message, err), err
  assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("law, column", [("routed", "val_loss"), ("routed", "n_params"),
                                         ("granular", "tokens")])
def test_fit_cli_nan_results(routed_csv, granular_csv, tmp_path, capsys, law, column):
  df = pd.read_csv(routed_csv if law == "routed" else granular_csv)
  df.loc[[4, 9], column] = float("nan")  # what a failed run leaves behind
  bad = tmp_path / "bad.csv"
  df.to_csv(bad, index=False)
  assert fit_cli.main([f"--results={bad}", f"--out={tmp_path / 'o'}", f"--law={law}",
                       "--no_plots", "--n_bootstrap=0"]) == 2
  err = capsys.readouterr().err
  assert re.search(rf"column '{column}' is empty or infinite \(nan\) in row 4 \(line 6 of "
                   rf"\S+bad.csv\) \(2 of {len(df)} rows\); a failed or diverged run leaves it "
                   rf"empty: rerun it, or drop or fill that row", err), err


def test_plan_cli_rejects_empty_or_nan_fits(routed_csv, tmp_path, capsys):
  empty = tmp_path / "fits.json"
  empty.write_text("")
  args = ["--flops_per_token=2.6e8"]
  assert plan_cli.main([f"--fits={empty}", *args]) == 2
  assert re.search(r"--fits=\S+fits.json is empty; pass the fits.json that `python -m "
                   r"routing_lm.fit --results=results.csv --out=DIR` writes", capsys.readouterr().err)
  # results.csv where fits.json belongs, with NaN losses or not.
  df = pd.read_csv(routed_csv)
  df.loc[3, "val_loss"] = float("nan")
  df.to_csv(tmp_path / "results.csv", index=False)
  assert plan_cli.main([f"--fits={tmp_path / 'results.csv'}", *args]) == 2
  assert re.search(r"results.csv is a results table \(CSV\), not fits; pass the fits.json",
                   capsys.readouterr().err)
  # A fit whose coefficients came out NaN.
  coefficients = {**scaling.coefficients(scaling.SBASE), "e_max": float("nan")}
  nan_fits = tmp_path / "nan.json"
  nan_fits.write_text(json.dumps({"law": "routed", "fits": {"sbase": {
      "coefficients": coefficients}}}))
  assert plan_cli.main([f"--fits={nan_fits}", *args]) == 2
  assert re.search(r"nan.json: fit 'sbase' has coefficient e_max = nan; the fit failed .* "
                   r"Rerun routing_lm.fit", capsys.readouterr().err)
  nan_fits.write_text(json.dumps({"law": "routed", "fits": {}}))
  assert plan_cli.main([f"--fits={nan_fits}", *args]) == 2
  assert "no fits in the file" in capsys.readouterr().err


def test_fit_cli_unknown_router(routed_csv, tmp_path, capsys):
  assert fit_cli.main([f"--results={routed_csv}", f"--out={tmp_path}", "--router=rlr"]) == 2
  assert "--router ['rlr'] has no routed rows; the table has ['hash', 'sbase']" in (
      capsys.readouterr().err)


def test_fit_cli_module_runs(routed_csv, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "routing_lm.fit", f"--results={routed_csv}", f"--out={tmp_path}",
       "--n_bootstrap=0", "--no_plots"], cwd=REPO, capture_output=True, text=True, check=True)
  assert "sbase" in result.stdout and (tmp_path / "fits.json").exists()
