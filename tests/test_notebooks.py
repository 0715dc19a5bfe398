"""The notebooks: stored without outputs, and each one runs on CPU with small settings.

Each notebook has one code cell tagged `parameters`; the tests insert a cell right after
it that overrides those values (papermill's convention) and execute the notebook with
nbclient in a fresh kernel whose working directory is notebooks/. Besides "no cell
raised", each test checks numbers the notebook printed.
"""
import json
import math
import os
import pathlib
import re
import sys

import nbformat
import pandas as pd
import pytest

from routing_lm import scaling

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
ROUTERS = ["dense", "sbase", "hash", "rlr", "topk"]


def _params_index(nb) -> int:
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
  return tagged[0]


def run_notebook(name: str, params: dict, timeout: int = 600):
  """Executes notebooks/<name> with `params` overriding its parameters cell."""
  from nbclient import NotebookClient
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  original = _params_index(nb)
  for key in params:   # only override names the notebook declares
    assert re.search(rf"^{key}\s*=", nb.cells[original].source, re.M), key
  injected = nbformat.v4.new_code_cell(
      "\n".join(f"{k} = {v!r}" for k, v in params.items()),
      metadata={"tags": ["injected-parameters"]})
  nb.cells.insert(original + 1, injected)
  NotebookClient(nb, timeout=timeout, kernel_name="python3",
                 resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
  errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
  assert not errors, errors
  return nb


def stdout(nb) -> str:
  return "".join(o.text for c in nb.cells for o in c.get("outputs", [])
                 if o.output_type == "stream" and o.name == "stdout")


def images(nb) -> int:
  return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def number(pattern: str, text: str) -> float:
  match = re.search(pattern, text)
  assert match, f"{pattern!r} not in the notebook's output:\n{text[-3000:]}"
  return float(match.group(1))


def test_notebooks_are_stored_without_outputs():
  paths = sorted(NOTEBOOKS.glob("*.ipynb"))
  assert {"01_quickstart.ipynb", "02_scaling_laws.ipynb",
          "03_routers_side_by_side.ipynb"} <= {p.name for p in paths}
  for path in paths:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    _params_index(nb)
    for i, cell in enumerate(nb.cells):
      where = f"{path.name} cell {i}"
      assert "execution" not in cell.metadata, f"{where}: execution timings are stored"
      if cell.cell_type == "code":
        assert cell.outputs == [], f"{where} has outputs: clear them before committing"
        assert cell.execution_count is None, f"{where} has an execution_count"
    assert "widgets" not in nb.metadata, f"{path.name}: widget state is stored"


def test_notebook_kernel_is_this_interpreter():
  """The "python3" kernel that run_notebook starts is the Python running the tests, so each
  CI stage (3.11, 3.13: .ci/run) runs the notebooks on its own venv, not on a kernelspec
  that another install left behind."""
  from jupyter_client.manager import KernelManager
  command = KernelManager(kernel_name="python3").format_kernel_cmd()
  assert os.path.abspath(command[0]) == os.path.abspath(sys.executable), command


@pytest.mark.slow
def test_quickstart(tmp_path):
  workdir = tmp_path / "run"
  nb = run_notebook("01_quickstart.ipynb", dict(
      STEPS=10, LOG_EVERY=2, EVAL_BATCHES=1, WORKDIR=str(workdir)))
  out = stdout(nb)
  assert "skipping the install" in out
  assert "8 devices" in out and "'data': 2, 'expert': 4, 'model': 1" in out
  # The expert weights are split over the expert axis: 8 experts, 2 per device.
  assert re.search(r"experts.*wi.*\(8, 64, 256\)\s+\(2, 64, 256\)", out), out
  initial = number(r"initial train loss: ([\d.]+)", out)
  final = number(r"final train loss: ([\d.]+)", out)
  val = number(r"validation loss: ([\d.]+)", out)
  assert all(math.isfinite(v) for v in (initial, final, val))
  assert final < initial, (initial, final)
  assert images(nb) == 1
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  loads = [k for k in rows[0] if re.fullmatch(r"router/block\d+/load/\d+", k)]
  assert len(loads) == 8
  assert sum(rows[-2][k] for k in loads) == pytest.approx(1.0, abs=1e-5)


def coefficient_rows(out: str) -> dict[tuple[str, str], list[str]]:
  """The notebook's Table-3-like printout: (router, fit|paper) -> the row's cells."""
  header = out.index("router  source")
  rows = {}
  for line in out[header:].splitlines()[1:]:
    cells = line.split()   # router source a b c d E_start E_max N_cutoff RMSE runs
    if len(cells) != 11 or cells[1] not in ("fit", "paper"):
      break
    rows[(cells[0], cells[1])] = cells
  return rows


@pytest.mark.slow
def test_scaling_laws_recovers_the_published_coefficients(tmp_path):
  nb = run_notebook("02_scaling_laws.ipynb", dict(
      RESULTS_CSV=str(tmp_path / "absent.csv"), NOISE=0.0, N_BOOTSTRAP=3,
      OUT_DIR=str(tmp_path / "figures")))
  out = stdout(nb)
  assert "source: synthetic table from the published laws" in out
  rows = coefficient_rows(out)
  assert {r for r, _ in rows} == set(scaling.PUBLISHED)
  for router, published in scaling.PUBLISHED.items():
    fit = rows[(router, "fit")]
    a, b, c, d, e_start, e_max = map(float, fit[2:8])
    assert (a, b, c, d) == pytest.approx((published.a, published.b, published.c, published.d),
                                         abs=2e-4)
    assert e_start == pytest.approx(published.e_start, rel=1e-3)
    assert e_max == pytest.approx(published.e_max, rel=1e-3)
    assert float(fit[9]) < 1e-4                       # RMSE of an exact table
    assert rows[(router, "paper")][2:8] == [f"{published.a:.4f}", f"{published.b:.4f}",
                                           f"{published.c:.4f}", f"{published.d:.4f}",
                                           f"{published.e_start:.3f}", f"{published.e_max:.3f}"]
  assert "S-BASE N̄(5M, 128) = 51.8M" in out        # paper_spec.md 2.3.1 golden value
  assert re.search(r"sbase\s+1T\s+12\.00", out)      # cut-off 10^(-b/c)
  assert images(nb) == 9                             # 3 figures x 3 routers
  assert len(list((tmp_path / "figures").glob("*.png"))) == 9


@pytest.mark.slow
def test_scaling_laws_reads_a_results_table(tmp_path):
  # A sweep-shaped table: shared dense rows, two routers (one without published values).
  table = scaling.synthetic_routed_table(scaling.SBASE, n_params=(1e6, 3e6, 1e7, 3e7),
                                         experts=(1, 2, 4, 8, 16, 32))
  topk = table[table.num_experts > 1].assign(router="topk")
  path = tmp_path / "results.csv"
  pd.concat([table, topk]).to_csv(path, index=False)
  nb = run_notebook("02_scaling_laws.ipynb", dict(
      RESULTS_CSV=str(path), N_BOOTSTRAP=0, OUT_DIR=str(tmp_path / "figures")))
  out = stdout(nb)
  assert f"source: results table {path}" in out
  rows = coefficient_rows(out)
  assert set(rows) == {("sbase", "fit"), ("sbase", "paper"), ("topk", "fit")}
  for router in ("sbase", "topk"):   # both follow the S-BASE law in this table
    assert float(rows[(router, "fit")][2]) == pytest.approx(scaling.SBASE.a, abs=2e-4)
  assert images(nb) == 6


@pytest.mark.slow
def test_routers_side_by_side(tmp_path):
  nb = run_notebook("03_routers_side_by_side.ipynb", dict(
      STEPS=4, LOG_EVERY=1, EVAL_BATCHES=1, WORKDIR=str(tmp_path)))
  out = stdout(nb)
  header = out.index("router  experts  val_loss")
  lines = out[header:].splitlines()[1:1 + len(ROUTERS)]
  table = {line.split()[0]: line.split() for line in lines}
  assert list(table) == ROUTERS                      # one row per router, in order
  for router, cells in table.items():
    assert int(cells[1]) == (1 if router == "dense" else 8)
    assert math.isfinite(float(cells[2])) and float(cells[2]) < 9.0   # val_loss
    if router == "dense":
      assert cells[4:8] == ["-"] * 4                 # no router statistics
    else:
      max_load, dropped = float(cells[4]), float(cells[7])
      assert 1.0 <= max_load <= 8.0 and 0.0 <= dropped < 1.0
  assert float(table["sbase"][4]) == pytest.approx(1.0)   # S-BASE balances exactly
  assert float(table["sbase"][7]) == 0.0
  assert float(table["hash"][6]) == 0.0                   # HASH has no router distribution
  assert images(nb) == 1
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(ROUTERS)
