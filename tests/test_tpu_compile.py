"""The TPU compile check (routing_lm/tpu_compile.py, `--mode=compile`).

The arithmetic (roofline, HLO parsing, slices, advice) is tested on hand cases. The
compiles run `python -m routing_lm.main --mode=compile` in a subprocess, so libtpu (and its
warnings) never loads into the test process; they are skipped only when libtpu is not
installed (`pip install -e '.[tpu]'`; CI installs it).
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from routing_lm import config as config_lib, tpu_compile
from routing_lm.tpu_compile import GIB, Chip, Report, StepReport, Topology

ROOT = Path(__file__).resolve().parents[1]
HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAVE_LIBTPU, reason="libtpu is not installed: pip install -e '.[tpu]' (jax[tpu] at the "
    "installed jax version) to compile for TPU on this host")
SUMMARY = re.compile(r"^fits=(true|false) hbm_gib=([\d.]+) capacity_gib=([\d.]+) "
                     r"step_flops=(\S+) mfu_bound=(\S+)$")


# ---- arithmetic, no compile ----

def test_roofline_hand_case():
  chip = Chip(peak_flops=100.0, hbm_bandwidth=10.0, hbm_bytes=1.0)
  r = tpu_compile.roofline(flops_per_chip=1000.0, bytes_per_chip=50.0,
                           model_flops_per_chip=500.0, chip=chip)
  assert (r.compute_s, r.memory_s, r.time_s, r.bound) == (10.0, 5.0, 10.0, "compute")
  assert r.mfu == pytest.approx(0.5)           # 500 / (10 s x 100 FLOP/s)
  r = tpu_compile.roofline(1000.0, 400.0, 500.0, chip)
  assert (r.time_s, r.bound) == (40.0, "memory")
  assert r.mfu == pytest.approx(500.0 / (40.0 * 100.0))


def test_chip_table_is_the_published_one():
  v5e = tpu_compile.CHIPS["v5e"]
  assert (v5e.peak_flops, v5e.hbm_bandwidth, v5e.hbm_bytes) == (197e12, 819e9, 16 * GIB)
  assert set(tpu_compile.CHIPS) == {"v4", "v5e", "v5p", "v6e"}
  # A report's roofline uses the table: 1e12 FLOPs and 819e6 bytes on one v5e device.
  rep = fake_report(train=StepReport("train", 0.0, flops=197e12, bytes_accessed=819e9 / 2))
  r = rep.roofline()
  assert r.time_s == pytest.approx(1.0) and r.bound == "compute"
  assert r.mfu == pytest.approx(rep.model_flops / 4 / 197e12)


HLO = """
  %all-to-all.3 = (bf16[2,16,128]{2,1,0}, bf16[2,16,128]{2,1,0}) all-to-all(%a, %b), dimensions={0}
  %all-to-all.4 = f32[8,32]{1,0:T(8,128)} all-to-all(%c), dimensions={0}
  %all-gather-start = (f32[64]{0}, f32[256]{0}) all-gather-start(%p), dimensions={0}
  %all-gather-done = f32[256]{0} all-gather-done(%all-gather-start)
  %all-reduce-start.1 = f32[1024]{0} all-reduce-start(%g), to_apply=%add
  %all-reduce-done.1 = f32[1024]{0} all-reduce-done(%all-reduce-start.1)
  %reduce-scatter.2 = bf16[4,8]{1,0} reduce-scatter(%h), dimensions={0}
  %fusion.7 = f32[9]{0} fusion(%all-to-all.4), kind=kLoop, calls=%fused_all-to-all
"""


def test_collectives_from_hlo_text():
  c = tpu_compile.collectives(HLO)
  assert c["all-to-all"] == {"count": 2, "bytes": 2 * 2 * 16 * 128 * 2 + 8 * 32 * 4}
  assert c["all-gather"] == {"count": 1, "bytes": 256 * 4}      # the -done is not counted
  assert c["all-reduce"] == {"count": 1, "bytes": 1024 * 4}
  assert c["reduce-scatter"] == {"count": 1, "bytes": 4 * 8 * 2}
  assert c["collective-permute"] == {"count": 0, "bytes": 0}


@pytest.mark.parametrize("accelerator,slice_", [
    ("v5litepod-4", "v5e:2x2"), ("v5litepod-8", "v5e:2x4"), ("v5litepod-16", "v5e:4x4"),
    ("v5litepod-32", "v5e:4x8"), ("v5litepod-256", "v5e:16x16"), ("v6e-8", "v6e:2x4"),
    ("v5p-8", "v5p:2x2x1"), ("v5p-16", "v5p:2x2x2"), ("v5p-32", "v5p:2x2x4"),
    ("v5p-128", "v5p:4x4x4"), ("v4-8", "v4:2x2x1"), ("v4-64", "v4:2x4x4"),
])
def test_accelerator_types_name_their_slice(accelerator, slice_):
  assert tpu_compile.accelerator_topology(accelerator) == slice_
  family, chips, name = tpu_compile.parse_topology(accelerator)
  assert name == slice_ and family == slice_.split(":")[0]
  assert chips == (int(accelerator.split("-")[1]) // (2 if family in ("v4", "v5p") else 1))
  assert tpu_compile.accelerator_type(slice_) == accelerator.replace("v5e-", "v5litepod-")


@pytest.mark.parametrize("bad,words", [
    ("v3:2x2", "unknown chip 'v3'"), ("v5e-4x4", "accelerator type"),
    ("v5litepod-12", "power of two"), ("tpu", "accelerator type")])
def test_bad_topology_is_named(bad, words):
  with pytest.raises(tpu_compile.CompileCheckError, match=re.escape(words)):
    tpu_compile.parse_topology(bad)


def test_missing_libtpu_names_the_install(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  with pytest.raises(tpu_compile.CompileCheckError, match=re.escape("pip install -e '.[tpu]'")):
    tpu_compile.get_topology("v5e:2x2")


def test_oom_message_figures():
  msg = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
         "space hbm. Used 66.44G of 15.75G hbm. Exceeded hbm capacity by 50.69G. Total hbm "
         "usage >= 66.44G: reserved 2.13M program 63.18G arguments 3.26G. "
         "HLO temporaries (63.18G) exceeds available HBM (15.75G)")
  f = tpu_compile.oom_figures(msg)
  assert f["temporaries"] == pytest.approx(63.18 * GIB)
  assert f["available"] == pytest.approx(15.75 * GIB)
  assert f["arguments"] == pytest.approx(3.26 * GIB)


def test_dense_fallback_threshold_hand_case():
  c = config_lib.load("configs/tiny.py:sbase,8")   # d 128, d_ff 512, 4 layers, 2 routed
  tokens = 8 * 128
  routed = 3 * 2 * 4 * 128 * 512 * tokens
  assert tpu_compile.routed_ffw_flops(c) == routed
  analytic = tpu_compile.analytic_train_flops(c)
  capacity, fallback = analytic + 0.25 * routed, analytic + 7 * routed
  assert tpu_compile.dense_fallback_threshold(c) == pytest.approx((capacity + fallback) / 2)
  assert tpu_compile.dense_fallback_threshold(config_lib.load("configs/tiny.py:sbase,1")) \
      == float("inf")
  # dropless: gmm's static grid covers the mesh.expert x gathered rows
  c.model.routing.capacity_factor, c.mesh.expert = None, 2
  assert tpu_compile.dense_fallback_threshold(c) == pytest.approx(
      (analytic + 1 * routed + fallback) / 2)


def fake_report(train: StepReport | None = None, remat: str = "none", experts: int = 8,
                microbatches: int | None = None) -> Report:
  c = config_lib.load("configs/tiny.py")
  c.model.remat = remat
  c.model.routing.num_experts = experts
  if microbatches is not None:
    c.train.microbatches = microbatches
  topo = Topology("v5e:2x2", "v5e", 4, (None,) * 4)
  train = train or StepReport("train", 0.0)
  return Report(c, topo, {"data": 2, "expert": 2, "model": 1}, 0, 0, train,
                StepReport("eval", 0.0), model_flops=1e12)


def test_levers_follow_the_memory():
  temps = StepReport("train", 0.0, arguments=1 * GIB, temporaries=40 * GIB)
  advice = " | ".join(tpu_compile.levers(fake_report(temps)))
  assert "model.remat=full" in advice and "mesh.data" in advice
  assert "x2.56" in advice                     # 41 GiB of 16
  assert "train.microbatches=4 (now 1)" in advice
  advice = " | ".join(tpu_compile.levers(fake_report(temps, remat="full", microbatches=1)))
  assert "model.remat" not in advice and "train.microbatches=4 (now 1)" in advice
  args = StepReport("train", 0.0, arguments=30 * GIB, temporaries=2 * GIB)
  advice = " | ".join(tpu_compile.levers(fake_report(args)))
  assert "mesh.expert=2 -> 4" in advice and "model.remat" not in advice
  oom = StepReport("train", 0.0, temporaries=63 * GIB, error="RESOURCE_EXHAUSTED: ...")
  rep = fake_report(oom)
  assert not rep.fits
  lines = tpu_compile.format_report(rep)
  assert SUMMARY.match(lines[-1]) and lines[-1].startswith("fits=false")
  assert any("model.remat=full" in line for line in lines)


def test_table_slices_meshes_and_markdown():
  from routing_lm.bench import tpu_table
  assert [tpu_table.slice_name("v5e", n) for n in (4, 16, 32)] == [
      "v5e:2x2", "v5e:4x4", "v5e:4x8"]
  assert [tpu_table.slice_name("v5p", n) for n in (4, 16, 64)] == [
      "v5p:2x2x1", "v5p:2x2x4", "v5p:4x4x4"]
  assert tpu_table.mesh_for(16, 64) == {"data": 1, "expert": 16, "model": 1}
  assert tpu_table.mesh_for(128, 64) == {"data": 2, "expert": 64, "model": 1}
  assert tpu_table.mesh_for(16, 1) == {"data": 16, "expert": 1, "model": 1}
  assert list(tpu_table.rows(["15m"], [1, 64], ["sbase", "hash"])) == [
      "15m,dense", "15m,sbase,64", "15m,hash,64"]
  # 16 bytes per parameter before any activation: 130m,E=64 (2.6e9 parameters, 42 GB)
  # needs 4 v5e chips, 1.3b,E=64 (26.7e9 parameters, 427 GB) 32.
  assert tpu_table.start_chips("130m,sbase,64", "v5e", 4) == 4
  assert tpu_table.start_chips("1.3b,sbase,64", "v5e", 4) == 32
  cells = {"v5e": tpu_table.Cell("v5e:4x8", "8,4,1", 12.2, 0.41),
           "v5p": tpu_table.Cell(note="no slice up to 1024 chips")}
  text = tpu_table.markdown({"130m,sbase,64": cells}, ["v5e", "v5p"], "full")
  assert ("| 130m,sbase,64 | v5e:4x8 | 8,4,1 | 12.2 | 0.41 | no slice up to 1024 chips "
          "| | | |") in text
  assert "cannot tell" in text


def test_table_cache_is_reused_and_marks_the_rest(tmp_path):
  """Cells are cached by row, family, remat and compiler versions; --cached-only compiles
  nothing and writes every cached cell (the newest compiler's), marking the rest."""
  from routing_lm.bench import tpu_table
  cache, out = tmp_path / "cells.jsonl", tmp_path / "table.md"
  vers = tpu_table.versions()
  tpu_table.append_cache(str(cache), "15m,dense", "v5e", "full", vers,
                         tpu_table.Cell("v5e:2x4", "8,1,1", 12.69, 0.131, 235.0))
  other = {"jax": "9.9", "libtpu": "other"}
  tpu_table.append_cache(str(cache), "15m,dense", "v5p", "full", other,
                         tpu_table.Cell("v5p:2x2x1", "4,1,1", 20.0, 0.2, 1.0))
  assert len(tpu_table.read_cache(str(cache))) == 2
  tpu_table.main(["--rows=15m,dense;25m,dense", f"--cache={cache}", f"--out={out}",
                  "--cached-only"])
  text = out.read_text()
  assert ("| 15m,dense | v5e:2x4 | 8,1,1 | 12.7 | 0.13 | v5p:2x2x1 | 4,1,1 | 20.0 | 0.20 |"
          in text)
  assert "| 25m,dense | not compiled yet | | | | not compiled yet | | | |" in text
  assert "jax 9.9, libtpu other" in text         # the header names the cells' compiler


def fake_fit(row: str, family: str, remat: str, min_chips: int):
  """A stand-in for tpu_table.fit_cell that compiles nothing (picklable for workers)."""
  from routing_lm.bench import tpu_table
  return tpu_table.Cell(f"{family}:{row}", remat, float(min_chips), float(os.getpid()))


def test_table_jobs_run_cells_in_worker_processes():
  """--jobs N: every cell once, each computed in a worker process, as the serial run."""
  from routing_lm.bench import tpu_table
  todo = [(r, f) for r in ("15m,dense", "25m,dense", "55m,dense") for f in ("v5e", "v5p")]
  serial = dict(tpu_table.fit_cells(todo, "full", 4, 1, fit=fake_fit))
  parallel = dict(tpu_table.fit_cells(todo, "full", 4, 2, fit=fake_fit))
  assert sorted(parallel) == sorted(todo) == sorted(serial)
  strip = lambda cells: {k: (c.topology, c.mesh, c.hbm_gib) for k, c in cells.items()}
  assert strip(parallel) == strip(serial)
  assert {c.mfu_bound for c in serial.values()} == {float(os.getpid())}
  assert float(os.getpid()) not in {c.mfu_bound for c in parallel.values()}


def test_expert_path_analytic_flops():
  """Capacity computes E x C rows per group (padding included); dropless the K T rows."""
  from routing_lm.bench import expert_path_tpu as ep
  cap_c = ep.layer_config("configs/tiny.py:sbase,8", "capacity", (2, 2, 1))
  drop_c = ep.layer_config("configs/tiny.py:sbase,8", "gmm", (2, 2, 1))
  assert drop_c.model.routing.capacity_factor is None and cap_c.model.routing.num_groups == 4
  tokens, per_flop = 8 * 128, 3.0 * 4 * 128 * 512
  assert ep.analytic_flops(drop_c, "gmm", 4) == per_flop * tokens / 4
  # 256 tokens per group, cf 1.25, E 8: C = 40 slots, 8 x 40 x 4 groups = 1280 rows
  assert ep.analytic_flops(cap_c, "capacity", 4) == per_flop * 1280 / 4


# ---- compiles for TPU (libtpu), in subprocesses ----

# tiny with 2 layers (one routed): the TPU compile of tiny's 4 layers takes over a minute
# on 2 cores; a mesh with an expert axis.
SMALL = ("--config.model.num_layers=2", "--config.mesh.data=2", "--config.mesh.expert=2")


def compile_cmd(spec: str, *overrides: str, topology: str = "v5e:2x2"):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  argv = [sys.executable, "-m", "routing_lm.main", "--mode=compile", f"--config={spec}",
          f"--topology={topology}", *overrides]
  return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def collective_count(stdout: str, name: str) -> int:
  (line,) = [l for l in stdout.splitlines() if l.strip().startswith(name + " ")]
  return int(line.split()[1])


@pytest.mark.slow
@needs_libtpu
@pytest.mark.parametrize("spec,routed", [("configs/tiny.py:sbase,8", True),
                                         ("configs/tiny.py:sbase,1", False)])
def test_tiny_compiles_for_v5e_with_an_expert_axis(spec, routed):
  proc = compile_cmd(spec, *SMALL)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  m = SUMMARY.match(proc.stdout.splitlines()[-1])
  assert m, proc.stdout
  fits, hbm, capacity, flops, mfu = m.groups()
  assert fits == "true" and 0 < float(hbm) < float(capacity) == 16.0
  assert float(flops) > 0 and 0 < float(mfu) <= 1
  # S-BASE sends tokens to experts on other chips (all-to-all); dense has nothing to send.
  assert (collective_count(proc.stdout, "all-to-all") > 0) == routed
  # The experts compute only their tokens: no dense per-expert fallback.
  fallback = [l for l in proc.stdout.splitlines() if "dense per-expert fallback" in l]
  assert [l.split(": ")[-1] for l in fallback] == (["no"] if routed else [])
  assert "TPU_WORKER_HOSTNAMES" not in proc.stdout


@pytest.mark.slow
@needs_libtpu
def test_dropless_training_compiles_with_gmm_and_no_dense_fallback():
  """capacity_factor=None trains through megablox gmm under shard_map (grouped_matmul=auto
  picks it for TPU): it compiles and fits, exchanges tokens by all-gather instead of
  all-to-all, and its FLOPs stay below the dense per-expert fallback's."""
  proc = compile_cmd("configs/tiny.py:sbase,8", *SMALL,
                     "--config.model.routing.capacity_factor=None")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  m = SUMMARY.match(proc.stdout.splitlines()[-1])
  assert m and m.group(1) == "true", proc.stdout
  assert collective_count(proc.stdout, "all-to-all") == 0
  assert collective_count(proc.stdout, "all-gather") > 0
  fallback = [l for l in proc.stdout.splitlines() if "dense per-expert fallback" in l]
  assert [l.split(": ")[-1] for l in fallback] == ["no"], fallback


@pytest.mark.slow
@needs_libtpu
def test_a_config_that_does_not_fit_is_refused_with_its_lever():
  # 16k sequences per chip: about 26 GiB of temporaries (the activations) on a 16 GiB v5e.
  proc = compile_cmd("configs/tiny.py:sbase,8", *SMALL, "--config.data.batch_size=65536")
  assert proc.returncode == 1, proc.stdout + proc.stderr
  m = SUMMARY.match(proc.stdout.splitlines()[-1])
  assert m and m.group(1) == "false" and float(m.group(2)) > float(m.group(3)) == 15.75
  assert "RESOURCE_EXHAUSTED" in proc.stdout
  levers = proc.stdout.split("Levers")[1]
  assert "model.remat=full" in levers and "a larger slice" in levers
