"""Where the paper's grid fits: the smallest v5e and v5p slice on which each config's train
step compiles within HBM (`routing_lm.tpu_compile`, libtpu on any host), as a markdown table.

    python -m routing_lm.bench.tpu_table --out=docs/tpu_table.md           # the whole grid (hours)
    python -m routing_lm.bench.tpu_table --rows=130m,sbase,64 --families=v5e --min-chips=16

Rows: sizes x {dense, E=64, E=512} x routers of `configs/paper.py`. For each row and chip
family the slices are tried from small to large (powers of two from --min-chips, or from
the chips that parameters and optimizer state alone need); the mesh puts min(E, chips)
devices on `expert` and the rest on `data` (dense: all on `data`), with `model.remat`
(--remat, default full). A slice fits when the train and eval steps compile and the train
step's per-chip total is within HBM. Each compile is printed with its CPU time as it runs.

Every finished cell is appended to `--cache` (JSON lines, default
results/tpu_table.jsonl, with the jax and libtpu versions) and is not compiled again by a
later run with the same versions and remat: the grid can be run in parts, on several
hosts (concatenate their caches). `--cached-only` compiles nothing and writes the table of
the cached cells (any compiler's, named in the header), marking the rest not compiled yet.

`--jobs N` compiles N cells at once in worker processes (libtpu allows several,
`tpu_compile.libtpu_env`); one compile keeps about two cores busy, so on a host with C
cores N = C / 2 is a good start. The parent alone writes the cache.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import importlib.metadata
import json
import math
import multiprocessing
import os
import sys
import time
from typing import Callable, Iterator

from routing_lm import config as config_lib, tpu_compile

FAMILIES = ("v5e", "v5p")
MAX_CHIPS = {"v5e": 256, "v5p": 1024}
# Per parameter: float32 value, gradient and two Adam moments (ZeRO-1 shards the moments).
BYTES_PER_PARAM = 16


@dataclasses.dataclass
class Cell:
  """The smallest fitting slice of one row on one family (or why there is none)."""
  topology: str = "-"
  mesh: str = "-"
  hbm_gib: float = float("nan")
  mfu_bound: float = float("nan")
  compile_s: float = 0.0
  note: str = ""


def versions() -> dict[str, str]:
  """The compiler a cell was compiled with: jax and libtpu versions."""
  def version(name):
    try:
      return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      return "-"
  return {"jax": version("jax"), "libtpu": version("libtpu")}


def read_cache(path: str) -> list[dict]:
  """The cache file's records, oldest first: {row, family, remat, versions, cell}."""
  if not path or not os.path.exists(path):
    return []
  with open(path) as fh:
    return [json.loads(line) for line in fh if line.strip()]


def append_cache(path: str, row: str, family: str, remat: str, vers: dict[str, str],
                 cell: Cell) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  rec = {"row": row, "family": family, "remat": remat, "versions": vers,
         "cell": dataclasses.asdict(cell)}
  with open(path, "a") as fh:
    fh.write(json.dumps(rec) + "\n")


def cached_cell(cache: list[dict], row: str, family: str, remat: str,
                vers: dict[str, str] | None) -> tuple[Cell, dict[str, str]] | None:
  """The newest cached cell of (row, family, remat) compiled with `vers` (None: with any
  compiler), and the versions it was compiled with."""
  for rec in reversed(cache):
    if ((rec["row"], rec["family"], rec["remat"]) == (row, family, remat)
        and vers in (None, rec["versions"])):
      return Cell(**rec["cell"]), rec["versions"]
  return None


def slice_name(family: str, chips: int) -> str:
  """Chip count -> slice, e.g. ('v5e', 16) -> 'v5e:4x4', ('v5p', 16) -> 'v5p:2x2x4'."""
  per = dict((f, p) for f, _, p in tpu_compile.ACCELERATOR_TYPES.values())[family]
  prefix = {"v5e": "v5litepod"}.get(family, family)
  return tpu_compile.accelerator_topology(f"{prefix}-{chips * per}")


def mesh_for(chips: int, experts: int) -> dict[str, int]:
  """min(E, chips) devices on `expert`, the rest on `data` (dense: all on `data`)."""
  expert = math.gcd(experts, chips) if experts > 1 else 1
  return {"data": chips // expert, "expert": expert, "model": 1}


def row_config(row: str, remat: str, chips: int):
  c = config_lib.load(f"configs/paper.py:{row}")
  c.model.remat = remat
  for axis, size in mesh_for(chips, c.model.routing.num_experts).items():
    c.mesh[axis] = size
  return c


def start_chips(row: str, family: str, min_chips: int) -> int:
  """The first slice worth compiling: parameters and optimizer state alone must fit."""
  from routing_lm.model import counting
  c = config_lib.load(f"configs/paper.py:{row}")
  n = counting.count(c.model, c.data.seq_len)
  params = n.total_params + n.embedding_params
  need = params * BYTES_PER_PARAM / tpu_compile.CHIPS[family].hbm_bytes
  return max(min_chips, 4, 2 ** math.ceil(math.log2(max(need, 1.0))))


def smallest_fit(row: str, family: str, remat: str, min_chips: int,
                 log=print) -> Cell:
  """Compiles `row` on growing slices of `family` until one fits."""
  chips = start_chips(row, family, min_chips)
  total_s = 0.0
  while chips <= MAX_CHIPS[family]:
    name = slice_name(family, chips)
    config = row_config(row, remat, chips)
    t0, w0 = time.process_time(), time.perf_counter()
    try:
      rep = tpu_compile.check(config, name)
    except Exception as e:   # noqa: BLE001 - a crash is a row's result, not the table's end
      total_s += time.process_time() - t0
      log(f"  {row} {name}: error {type(e).__name__}: {str(e).splitlines()[0][:200]}")
      return Cell(name, note=f"error: {type(e).__name__}", compile_s=total_s)
    cpu_s, wall_s = time.process_time() - t0, time.perf_counter() - w0
    total_s += cpu_s
    mesh = ",".join(str(rep.mesh_shape[a]) for a in ("data", "expert", "model"))
    log(f"  {row} {name} mesh {mesh}: fits={rep.fits} train {rep.train.total / tpu_compile.GIB:.2f}"
        f" GiB of {rep.capacity / tpu_compile.GIB:.2f} (CPU {cpu_s:.0f} s, wall {wall_s:.0f} s)")
    if rep.fits:
      return Cell(name, mesh, rep.train.total / tpu_compile.GIB, rep.roofline().mfu, total_s)
    chips *= 2
  return Cell(note=f"no slice up to {MAX_CHIPS[family]} chips", compile_s=total_s)


def fit_cell(row: str, family: str, remat: str, min_chips: int) -> Cell:
  """`smallest_fit` with its progress printed (a worker process's task under --jobs)."""
  print(f"{row} on {family}:", flush=True)
  cell = smallest_fit(row, family, remat, min_chips, log=lambda s: print(s, flush=True))
  print(f"  -> {row} on {family}: {cell.topology} mesh {cell.mesh} {cell.hbm_gib:.2f} GiB "
        f"mfu_bound {cell.mfu_bound:.3f} {cell.note} (CPU {cell.compile_s:.0f} s)", flush=True)
  return cell


def fit_cells(todo: list[tuple[str, str]], remat: str, min_chips: int, jobs: int,
              fit: Callable[[str, str, str, int], Cell] = fit_cell,
              ) -> Iterator[tuple[tuple[str, str], Cell]]:
  """((row, family), fit(row, family, remat, min_chips)) for each of `todo`, as each
  finishes: in this process (jobs=1) or in `jobs` spawned workers (each loads its own
  libtpu; `fit` must be picklable: a module-level function)."""
  if jobs <= 1:
    for key in todo:
      yield key, fit(*key, remat, min_chips)
    return
  ctx = multiprocessing.get_context("spawn")     # jax is not fork-safe
  with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
    futures = {pool.submit(fit, *key, remat, min_chips): key for key in todo}
    for done in concurrent.futures.as_completed(futures):
      yield futures[done], done.result()


def rows(sizes: list[str], experts: list[int], routers: list[str]) -> Iterator[str]:
  for size in sizes:
    for e in experts:
      if e == 1:
        yield f"{size},dense"
        continue
      for router in routers:
        yield f"{size},{router},{e}"


def markdown(results: dict[str, dict[str, Cell]], families: list[str], remat: str,
             compilers: list[dict[str, str]] = ()) -> str:
  head = "| config | " + " | ".join(f"{f} slice | mesh | GiB/chip | mfu_bound" for f in families)
  sep = "|---|" + "---|---|---|---|" * len(families)
  lines = [head + " |", sep]
  made_by = "".join(f", jax {v['jax']}, libtpu {v['libtpu']}" for v in compilers)
  for row, cells in results.items():
    parts = []
    for f in families:
      c = cells[f]
      if c.note:
        parts.append(f"{c.note} | | |" if c.topology == "-" else f"{c.topology} ({c.note}) | | |")
      else:
        parts.append(f"{c.topology} | {c.mesh} | {c.hbm_gib:.1f} | {c.mfu_bound:.2f}")
    lines.append(f"| {row} | " + " | ".join(parts) + " |")
  return "\n".join([
      "# Where the paper's grid fits on TPU",
      "",
      "Generated by `python -m routing_lm.bench.tpu_table` (the compile check of",
      "`routing_lm/tpu_compile.py`: libtpu compiles the train and eval steps for the slice on",
      f"any host{made_by}).",
      f"Batch 256 x 2048, bf16 compute, `model.remat={remat}`; mesh (data, expert,",
      "model). GiB/chip is the train step's total (arguments + temporaries + code);",
      "`mfu_bound` is the analytic model FLOPs over the roofline time max(FLOPs / peak,",
      "bytes / HBM bandwidth) at the chip's published peak.",
      "",
      "What the compile check cannot tell: the real step time (the roofline ignores the",
      "interconnect's bandwidth and contention, overlap of communication and compute, and",
      "per-op latency), HBM fragmentation at run time, and input-pipeline stalls.",
      "",
      *lines, ""])


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", default="15m,25m,55m,130m,370m,870m,1.3b")
  p.add_argument("--experts", default="1,64,512")
  p.add_argument("--routers", default="sbase,hash,rlr")
  p.add_argument("--rows", default="", help="explicit rows ('130m,sbase,64;15m,dense'), "
                 "instead of sizes x experts x routers")
  p.add_argument("--families", default=",".join(FAMILIES))
  p.add_argument("--remat", default="full")
  p.add_argument("--min-chips", type=int, default=4)
  p.add_argument("--out", default="", help="markdown file to write (default: print)")
  p.add_argument("--cache", default="results/tpu_table.jsonl",
                 help="finished cells (JSON lines), read and appended; '' for none")
  p.add_argument("--cached-only", action="store_true",
                 help="compile nothing: write the table of the cells already in --cache")
  p.add_argument("--jobs", type=int, default=1,
                 help="cells compiled at once, each in its own process (see the docstring)")
  a = p.parse_args(argv)
  families = a.families.split(",")
  todo = (a.rows.split(";") if a.rows else
          list(rows(a.sizes.split(","), [int(e) for e in a.experts.split(",")],
                    a.routers.split(","))))
  vers = versions()
  cache = read_cache(a.cache)
  used: list[dict[str, str]] = []          # the compilers of the table's cells
  results: dict[str, dict[str, Cell]] = {row: {} for row in todo}
  missing = []
  for row in todo:
    for f in families:
      # --cached-only takes any compiler's newest cell; the table header names them.
      hit = cached_cell(cache, row, f, a.remat, None if a.cached_only else vers)
      if hit or a.cached_only:
        results[row][f] = hit[0] if hit else Cell(note="not compiled yet")
        used += [hit[1]] if hit and hit[1] not in used else []
      else:
        missing.append((row, f))
  for (row, f), cell in fit_cells(missing, a.remat, a.min_chips, a.jobs):
    append_cache(a.cache, row, f, a.remat, vers, cell)
    used += [vers] if vers not in used else []
    results[row][f] = cell
  text = markdown(results, families, a.remat, used)
  if a.out:
    with open(a.out, "w") as fh:
      fh.write(text)
    print(f"wrote {a.out}")
  else:
    sys.stdout.write(text)


if __name__ == "__main__":
  main()
