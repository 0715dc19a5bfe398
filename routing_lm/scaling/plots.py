"""Figures and text tables of the scaling laws (matplotlib, Agg canvas; no pyplot state).

Each plot function returns the Figure; with `path`, it saves the image there and the
plotted data as JSON next to it (same name, .json), so the numbers behind a figure can be
read back and checked. format_table / format_count serve the CLIs' printed tables.
"""
from __future__ import annotations

import json
import pathlib
from typing import Sequence

import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from routing_lm.scaling import laws


def _figure(title: str, xlabel: str, ylabel: str, logx: bool = True):
  fig = Figure(figsize=(6.0, 4.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
  if logx:
    ax.set_xscale("log")
  return fig, ax


def _save(fig: Figure, data: dict, path: str | pathlib.Path | None) -> Figure:
  ax = fig.axes[0]
  handles = ax.get_legend_handles_labels()[0]
  if handles:
    ax.legend(fontsize=6 if len(handles) > 8 else 7, ncol=2 if len(handles) > 8 else 1)
  if path is not None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    path.with_suffix(".json").write_text(json.dumps(_jsonable(data), indent=1))
  return fig


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple, np.ndarray)):
    return [_jsonable(v) for v in x]
  return x.item() if isinstance(x, np.generic) else x


def format_count(n: float) -> str:
  """A count with a unit, as the papers write sizes: 1.3B, 100M, 7.94T."""
  n = float(f"{n:.3g}")        # round first, so 999.99...B prints as 1T
  for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= scale:
      return f"{n / scale:.3g}{unit}"
  return f"{n:.3g}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """Right-aligned text columns, the header first."""
  cells = [[str(v) for v in r] for r in [header, *rows]]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells)


def _plot_family(df: pd.DataFrame, coeffs: laws.RoutedCoeffs, title: str, x_col: str,
                 group_col: str, grid: np.ndarray, curve, label, path, loss_column: str,
                 x_label: str) -> Figure:
  """One line of points and one fitted curve per value of `group_col`, against `x_col`."""
  fig, ax = _figure(title, x_label, "validation loss")
  series = []
  for i, (g, rows) in enumerate(sorted(df.groupby(group_col), key=lambda t: t[0])):
    rows = rows.sort_values(x_col)
    fitted = curve(g, grid)
    color = f"C{i % 10}"
    ax.plot(rows[x_col], rows[loss_column], "o", color=color, label=label(g))
    ax.plot(grid, fitted, "-", color=color, lw=1)
    series.append({group_col: g, x_col: rows[x_col].tolist(),
                   "loss": rows[loss_column].tolist(), f"fit_{x_col}": grid.tolist(),
                   "fit_loss": fitted.tolist()})
  return _save(fig, {"coefficients": laws.coefficients(coeffs), "series": series}, path)


def plot_loss_vs_experts(df: pd.DataFrame, coeffs: laws.RoutedCoeffs,
                         path=None, loss_column: str = "val_loss") -> Figure:
  """Loss against E for each N, points and fitted curves (paper_spec.md section 2.2)."""
  grid = np.geomspace(1, max(512.0, df["num_experts"].max()), 60)
  return _plot_family(df, coeffs, "Loss vs experts", "num_experts", "n_params", grid,
                      lambda n, e: laws.routed_loss(n, e, coeffs),
                      lambda n: f"N={format_count(n)}", path, loss_column, "experts E")


def plot_loss_vs_params(df: pd.DataFrame, coeffs: laws.RoutedCoeffs,
                        path=None, loss_column: str = "val_loss") -> Figure:
  """Loss against N for each E, points and fitted lines (paper_spec.md section 2.2)."""
  grid = np.geomspace(df["n_params"].min() / 1.5, df["n_params"].max() * 1.5, 60)
  return _plot_family(df, coeffs, "Loss vs dense size", "n_params", "num_experts", grid,
                      lambda e, n: laws.routed_loss(n, e, coeffs),
                      lambda e: f"E={e:g}", path, loss_column, "parameters N")


def plot_iso_loss(coeffs: laws.RoutedCoeffs, path=None, df: pd.DataFrame | None = None,
                  n_range: tuple[float, float] = (1e7, 1e10),
                  e_range: tuple[float, float] = (1, 512), levels: int = 12) -> Figure:
  """Iso-loss contours of the fitted law in (N, E), with the runs if `df` is given."""
  fig, ax = _figure("Iso-loss contours", "parameters N", "experts E")
  ax.set_yscale("log")
  n_grid = np.geomspace(*n_range, 80)
  e_grid = np.geomspace(*e_range, 60)
  loss = laws.routed_loss(n_grid[None, :], e_grid[:, None], coeffs)
  contours = ax.contour(n_grid, e_grid, loss, levels=levels, cmap="viridis")
  ax.clabel(contours, fontsize=7, fmt="%.2f")
  data = {"coefficients": laws.coefficients(coeffs), "n_params": n_grid.tolist(),
          "num_experts": e_grid.tolist(), "loss": loss.tolist(),
          "levels": [float(v) for v in contours.levels]}
  if df is not None:
    ax.plot(df["n_params"], df["num_experts"], "k.", label="runs")
    data["runs"] = {"n_params": df["n_params"].tolist(),
                    "num_experts": df["num_experts"].tolist()}
  return _save(fig, data, path)


def plot_effective_params(df: pd.DataFrame, coeffs: laws.RoutedCoeffs, path=None,
                          loss_column: str = "val_loss") -> Figure:
  """Dense and routed runs against N̄(N, E) (Eq. 11, paper_spec.md 2.5): one power law."""
  fig, ax = _figure("Loss vs effective parameters", "effective parameters N̄",
                    "validation loss")
  n_bar = laws.effective_params(df["n_params"].to_numpy(), df["num_experts"].to_numpy(),
                                coeffs)
  dense = df["num_experts"].to_numpy() == 1
  ax.plot(n_bar[dense], df[loss_column].to_numpy()[dense], "ks", label="dense")
  ax.plot(n_bar[~dense], df[loss_column].to_numpy()[~dense], "o", label="routed", alpha=.7)
  grid = np.geomspace(n_bar.min() / 1.5, n_bar.max() * 1.5, 60)
  curve = laws.routed_loss(grid, 1, coeffs)
  ax.plot(grid, curve, "-", color="C3", lw=1, label="L(N̄, 1)")
  return _save(fig, {
      "coefficients": laws.coefficients(coeffs), "n_params": df["n_params"].tolist(),
      "num_experts": df["num_experts"].tolist(), "effective_params": n_bar.tolist(),
      "loss": df[loss_column].tolist(), "fit_effective_params": grid.tolist(),
      "fit_loss": curve.tolist()}, path)


def plot_granular_loss_vs_g(df: pd.DataFrame, coeffs: laws.GranularCoeffs, path=None,
                            loss_column: str = "val_loss") -> Figure:
  """Loss against G for each budget (N, D) with Eq. 9 (finegrained_spec.md section 2)."""
  fig, ax = _figure("Loss vs granularity", "granularity G", loss_column)
  ax.set_xscale("log", base=2)
  ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
  g_grid = np.geomspace(1, max(16.0, df["granularity"].max()), 40)
  series = []
  groups = sorted(df.groupby(["total_params_nonemb", "tokens"]), key=lambda t: t[0])
  for i, ((n, d), rows) in enumerate(groups):
    rows = rows.sort_values("granularity")
    curve = laws.granular_loss(n, d, g_grid, coeffs)
    color = f"C{i % 10}"
    ax.plot(rows["granularity"], rows[loss_column], "o", color=color,
            label=f"N={format_count(n)}, D={format_count(d)}")
    ax.plot(g_grid, curve, "-", color=color, lw=1)
    series.append({"total_params_nonemb": n, "tokens": d,
                   "granularity": rows["granularity"].tolist(),
                   "loss": rows[loss_column].tolist(), "fit_granularity": g_grid.tolist(),
                   "fit_loss": curve.tolist()})
  return _save(fig, {"coefficients": laws.coefficients(coeffs), "series": series}, path)
