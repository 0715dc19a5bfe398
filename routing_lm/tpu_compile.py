"""Compile the real train and eval steps for a named TPU slice on any host (no TPU needed).

    python -m routing_lm.main --mode=compile --config=configs/paper.py:130m,sbase,64 \
        --config.mesh.data=4 --config.mesh.expert=4 --topology=v5e:4x4

The TPU compiler (libtpu, `pip install -e '.[tpu]'`) compiles for the slice's devices
(`jax.experimental.topologies`), with the mesh from the config; nothing runs. The report
gives, per chip: HBM (parameters, optimizer state, temporaries, total, capacity), FLOPs
(compiler and analytic), the collectives of the compiled HLO with their bytes, and a
roofline step time with the MFU it implies. The last line is

    fits=<true|false> hbm_gib=<x> capacity_gib=<y> step_flops=<z> mfu_bound=<m>

with `hbm_gib` the train step's per-chip total, `step_flops` the compiler's FLOPs of one
train step summed over chips, `mfu_bound` = analytic model FLOPs / (roofline time x
peak). What this cannot tell: the real step time (the roofline ignores ICI bandwidth,
contention, overlap, and the latency of small ops), and HBM fragmentation at run time.
See /work/shared/tpu.md for the recipe and its pitfalls.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from routing_lm import parallel

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures: peak dense bf16 FLOP/s, HBM bandwidth (bytes/s), HBM
  capacity (bytes)."""
  peak_flops: float
  hbm_bandwidth: float
  hbm_bytes: float


# THE table of chip figures. Source: Cloud TPU documentation, "System architecture" of
# https://cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16, 32 GiB, 1200 GB/s),
# https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s, 16 GB, 819 GB/s),
# https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s, 95 GB, 2765 GB/s),
# https://cloud.google.com/tpu/docs/v6e (918 TFLOP/s, 32 GB, 1640 GB/s).
# Capacities are taken as GiB: libtpu reports v5e's usable HBM as 15.75G (of 16 GiB).
CHIPS: dict[str, Chip] = {
    "v4": Chip(peak_flops=275e12, hbm_bandwidth=1200e9, hbm_bytes=32 * GIB),
    "v5e": Chip(peak_flops=197e12, hbm_bandwidth=819e9, hbm_bytes=16 * GIB),
    "v5p": Chip(peak_flops=459e12, hbm_bandwidth=2765e9, hbm_bytes=95 * GIB),
    "v6e": Chip(peak_flops=918e12, hbm_bandwidth=1640e9, hbm_bytes=32 * GIB),
}

COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "all-reduce",
               "collective-permute")


class CompileCheckError(ValueError):
  """A bad --topology, or libtpu missing: the message names the fix."""


# ---------------------------------------------------------------- topology
@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice: name (`v5e:4x4`), chip family, chip count, compile-only devices."""
  name: str
  family: str
  chips: int
  devices: tuple[Any, ...]

  @property
  def chip(self) -> Chip:
    return CHIPS[self.family]

  @property
  def devices_per_chip(self) -> int:
    return max(1, len(self.devices) // self.chips)


# Accelerator type (as `gcloud ... create --accelerator-type` takes it) -> (family, grid
# rank, chips per unit of the type's number): v5e/v6e count chips, v4/v5p TensorCores.
ACCELERATOR_TYPES = {"v5litepod": ("v5e", 2, 1), "v5e": ("v5e", 2, 1), "v6e": ("v6e", 2, 1),
                     "v5p": ("v5p", 3, 2), "v4": ("v4", 3, 2)}


def accelerator_topology(accelerator_type: str) -> str:
  """'v5litepod-16' -> 'v5e:4x4', 'v5p-32' -> 'v5p:2x2x4', 'v4-8' -> 'v4:2x2x1': the
  slice shapes of the Cloud TPU docs (double the smallest, last, dimension)."""
  m = re.fullmatch(r"(v\w+?)-(\d+)", accelerator_type.strip())
  if not m or m.group(1) not in ACCELERATOR_TYPES:
    raise CompileCheckError(f"--topology={accelerator_type!r} is neither a slice "
                            "'<chip>:<AxB[xC]>' (v5e:4x4) nor an accelerator type "
                            f"({', '.join(k + '-N' for k in ACCELERATOR_TYPES)}).")
  family, rank, per_chip = ACCELERATOR_TYPES[m.group(1)]
  chips = int(m.group(2)) // per_chip
  if chips < 1 or chips & (chips - 1):
    raise CompileCheckError(f"--topology={accelerator_type!r}: {chips} chips is not a power "
                            "of two.")
  dims = [1] * rank if rank == 2 else [2, 2, 1]
  while math.prod(dims) < chips:
    i = max(j for j, d in enumerate(dims) if d == min(dims))
    dims[i] *= 2
  if rank == 3 and chips < 4:
    dims = [chips, 1, 1]
  return f"{family}:{'x'.join(map(str, dims))}"


def parse_topology(name: str) -> tuple[str, int, str]:
  """'v5e:4x4' -> ('v5e', 16, 'v5e:4x4'); an accelerator type ('v5litepod-16') is
  translated first. The family must be in CHIPS."""
  name = name.strip()
  if ":" not in name:
    name = accelerator_topology(name)
  m = re.fullmatch(r"(v\w+):(\d+(?:x\d+)*)", name)
  if not m:
    raise CompileCheckError(f"--topology={name!r} is not '<chip>:<AxB[xC]>', e.g. v5e:4x4 or "
                            "v5p:2x2x4, or an accelerator type such as v5litepod-16.")
  family, dims = m.group(1), m.group(2)
  if family not in CHIPS:
    raise CompileCheckError(f"--topology={name!r}: unknown chip {family!r}; known: "
                            f"{', '.join(CHIPS)}.")
  return family, math.prod(int(d) for d in dims.split("x")), name


def get_topology(name: str) -> Topology:
  """The compile-only devices of slice `name` (needs libtpu, not a TPU). libtpu refuses
  slices smaller than a host (v5e:1x1): those take the first chips of a 2x2 host."""
  family, chips, name = parse_topology(name)
  if importlib.util.find_spec("libtpu") is None:
    raise CompileCheckError(f"--topology={name}: the TPU compiler (libtpu) is not installed; "
                            "pip install -e '.[tpu]' (jax[tpu] at the installed jax version).")
  host = name
  if chips < 4:
    host = f"{family}:2x2" if family in ("v5e", "v6e") else f"{family}:2x2x1"
  for key, value in libtpu_env(host).items():
    os.environ.setdefault(key, value)
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")   # this host traces on CPU; libtpu compiles
  from jax.experimental import topologies
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=host)
  except Exception as e:   # noqa: BLE001 - libtpu raises RuntimeError/JaxRuntimeError
    text = str(e)
    raise CompileCheckError(f"--topology={name}: libtpu refused it: {text.splitlines()[0]} "
                            "(slices must match real hosts: one chip is v5e:2x2 with a "
                            "1-device mesh)") from e
  devices = tuple(topo.devices)
  if host != name:
    devices = devices[:chips * (len(devices) // 4)]
  return Topology(name, family, chips, devices)


def accelerator_type(topology: str) -> str:
  """'v5e:4x4' -> 'v5litepod-16', 'v5p:2x2x4' -> 'v5p-32' (the inverse of
  accelerator_topology)."""
  family, chips, _ = parse_topology(topology)
  prefix = {"v5e": "v5litepod"}.get(family, family)
  per_chip = next(p for f, _, p in ACCELERATOR_TYPES.values() if f == family)
  return f"{prefix}-{chips * per_chip}"


def libtpu_env(topology: str) -> dict[str, str]:
  """Environment for loading libtpu as a compiler on a host without a TPU (set before it
  loads; variables already set win):

  - ALLOW_MULTIPLE_LIBTPU_LOAD=1: libtpu's own switch (jax's multi-process tests set it)
    for several processes at once. Without it libtpu holds `/tmp/libtpu_lockfile` and a
    second process fails with "Internal error when accessing libtpu multi-process
    lockfile" (checked: two processes each building a v5e:2x2 topology).
  - TPU_WORKER_HOSTNAMES, TPU_ACCELERATOR_TYPE: what a TPU VM's metadata would give;
    without them libtpu prints warnings that it could not determine them.
  """
  return {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_WORKER_HOSTNAMES": "localhost",
          "TPU_ACCELERATOR_TYPE": accelerator_type(topology)}


# ---------------------------------------------------------------- arithmetic
def shard_bytes(tree: Any) -> int:
  """Per-device bytes of a tree of sharded `ShapeDtypeStruct`s (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def analytic_train_flops(config: ml_collections.ConfigDict) -> float:
  """Model FLOPs of one train step: 3 x (F + output layer) x tokens, F from
  `model.counting` (paper_spec.md section 3; as routing_lm/bench/train_step.py)."""
  from routing_lm.model import counting
  return counting.train_step_flops(config.model, config.data.batch_size, config.data.seq_len)


def routed_ffw_flops(config: ml_collections.ConfigDict) -> float:
  """Train FLOPs of one step's routed FFWs when each token visits its K experts once:
  3 x n_routed x 4 d d_ff K x tokens (with granularity G: K G experts of width d_ff / G,
  the same; finegrained_spec.md section 1)."""
  from routing_lm.model import counting
  m, d = config.model, config.data
  n_routed = counting.count(m, d.seq_len).num_routed_layers
  return 3.0 * n_routed * 4 * m.d_model * m.d_ff * m.routing.top_k * d.batch_size * d.seq_len


def dense_fallback_threshold(config: ml_collections.ConfigDict) -> float:
  """Step FLOPs above which the routed FFWs compute every expert on every token.

  The capacity path adds at most (capacity_factor - 1) x routed FFW FLOPs to the analytic
  count. The dropless path (routing_lm/model/grouped.py) adds (mesh.expert - 1) x, as the
  compiler counts gmm's static grid over every gathered row. A dense per-expert fallback
  adds (E / K - 1) x. The threshold is the midpoint of the path's figure and the
  fallback's (inf for a dense model)."""
  r = config.model.routing
  if r.num_experts == 1:
    return float("inf")
  factor = r.capacity_factor if r.capacity_factor is not None else float(config.mesh.expert)
  routed, analytic = routed_ffw_flops(config), analytic_train_flops(config)
  expected = analytic + max(factor - 1.0, 0.0) * routed
  fallback = analytic + (r.num_experts / r.top_k - 1.0) * routed
  return (expected + fallback) / 2


@dataclasses.dataclass(frozen=True)
class Roofline:
  """Per-chip roofline: time = max(flops / peak, bytes / bandwidth) seconds."""
  compute_s: float
  memory_s: float
  time_s: float
  bound: str
  mfu: float


def roofline(flops_per_chip: float, bytes_per_chip: float, model_flops_per_chip: float,
             chip: Chip) -> Roofline:
  """The roofline step time of one chip and the MFU it implies,
  model_flops / (time x peak) (at most flops_per_chip's share of the peak)."""
  compute = flops_per_chip / chip.peak_flops
  memory = bytes_per_chip / chip.hbm_bandwidth
  t = max(compute, memory)
  mfu = model_flops_per_chip / (t * chip.peak_flops) if t > 0 else float("nan")
  return Roofline(compute, memory, t, "compute" if compute >= memory else "memory", mfu)


# ---------------------------------------------------------------- HLO collectives
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
                "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_OP = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")


def _array_bytes(text: str) -> list[int]:
  out = []
  for dtype, dims in _ARRAY.findall(text):
    if dtype in _DTYPE_BYTES:
      out.append(math.prod(int(x) for x in dims.split(",") if x) * _DTYPE_BYTES[dtype])
  return out


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """Counts and result bytes of each collective in an HLO module's text.

  Synchronous ops count their result shape (all arrays of a tuple result). An async
  `<op>-start` counts once (its `-done` is not counted); its result tuple holds the
  operands and the outputs, so the largest array stands for its bytes.
  """
  out = {name: {"count": 0, "bytes": 0} for name in COLLECTIVES}
  for line in hlo_text.splitlines():
    m = _OP.search(line)
    if not m:
      continue
    result, name, start = m.groups()
    sizes = _array_bytes(result)
    out[name]["count"] += 1
    out[name]["bytes"] += (max(sizes) if sizes else 0) if start else sum(sizes)
  return out


# ---------------------------------------------------------------- compile
@dataclasses.dataclass
class StepReport:
  """One compiled step, per chip. Memory in bytes."""
  name: str
  compile_s: float
  arguments: int = 0
  outputs: int = 0
  aliased: int = 0
  temporaries: int = 0
  code: int = 0
  flops: float = float("nan")
  bytes_accessed: float = float("nan")
  collectives: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
  error: str | None = None
  available: float | None = None     # usable HBM per chip, when libtpu's OOM names it

  @property
  def total(self) -> int:
    """Peak HBM: arguments + outputs not aliased to them + temporaries + code."""
    return self.arguments + self.outputs - self.aliased + self.temporaries + self.code


_OOM = {"temporaries": re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\)"),
        "available": re.compile(r"available HBM \(([\d.]+)([KMGT]?)\)"),
        "arguments": re.compile(r"\barguments ([\d.]+)([KMGT]?)\b")}


def oom_figures(message: str) -> dict[str, float]:
  """libtpu's RESOURCE_EXHAUSTED message -> bytes: 'HLO temporaries (63.18G) exceeds
  available HBM (15.75G)' gives temporaries and available; '... arguments 3.26G' gives
  arguments."""
  scale = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GIB, "T": 1024 ** 4}
  out = {}
  for name, pattern in _OOM.items():
    m = pattern.search(message)
    if m:
      out[name] = float(m.group(1)) * scale[m.group(2)]
  return out


def compile_step(name: str, jitted: Any, args: Sequence[Any]) -> StepReport:
  """Lowers and compiles `jitted(*args)`; RESOURCE_EXHAUSTED becomes `error`. Then the
  temporaries are the compiler's figure and the arguments the abstract arguments' shards
  (libtpu's message names them only sometimes)."""
  t0 = time.perf_counter()
  try:
    compiled = jitted.lower(*args).compile()
  except Exception as e:   # noqa: BLE001 - XlaRuntimeError; only RESOURCE_EXHAUSTED is ours
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    text = str(e).strip()
    rep = StepReport(name, time.perf_counter() - t0, error=text[:600])
    figures = oom_figures(text)
    rep.temporaries = int(figures.get("temporaries", 0))
    rep.arguments = int(figures.get("arguments", shard_bytes(args)))
    rep.available = figures.get("available")
    return rep
  rep = StepReport(name, time.perf_counter() - t0)
  mem = compiled.memory_analysis()
  if mem is not None:
    rep.arguments = int(mem.argument_size_in_bytes)
    rep.outputs = int(mem.output_size_in_bytes)
    rep.aliased = int(mem.alias_size_in_bytes)
    rep.temporaries = int(mem.temp_size_in_bytes)
    rep.code = int(getattr(mem, "generated_code_size_in_bytes", 0))
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  rep.flops = float(cost.get("flops", float("nan")))
  rep.bytes_accessed = float(cost.get("bytes accessed", float("nan")))
  rep.collectives = collectives(compiled.as_text())
  return rep


def abstract_batch(s: Any) -> dict[str, jax.ShapeDtypeStruct]:
  """The train/eval batch as sharded abstract arrays, [batch, seq] each."""
  d = s.config.data
  sh = parallel.batch_sharding(s.mesh)
  shape = (d.batch_size, d.seq_len)
  dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32,
            "positions": jnp.int32, "weights": jnp.float32}
  return {k: jax.ShapeDtypeStruct(shape, v, sharding=sh) for k, v in dtypes.items()}


@dataclasses.dataclass
class Report:
  """The compile check of one config on one slice."""
  config: ml_collections.ConfigDict
  topology: Topology
  mesh_shape: dict[str, int]
  params: int
  opt_state: int
  train: StepReport
  eval: StepReport
  model_flops: float

  @property
  def capacity(self) -> float:
    """HBM per device: libtpu's usable figure when an OOM named it (v5e: 15.75 GiB), else
    the published one (CHIPS)."""
    usable = [r.available for r in (self.train, self.eval) if r.available]
    return min(usable) if usable else self.topology.chip.hbm_bytes / self.topology.devices_per_chip

  @property
  def fits(self) -> bool:
    return all(r.error is None and r.total <= self.capacity for r in (self.train, self.eval))

  @property
  def num_devices(self) -> int:
    return len(self.topology.devices)

  def roofline(self) -> Roofline:
    chip = self.topology.chip
    per_device = Chip(chip.peak_flops / self.topology.devices_per_chip,
                      chip.hbm_bandwidth / self.topology.devices_per_chip, self.capacity)
    return roofline(self.train.flops, self.train.bytes_accessed,
                    self.model_flops / self.num_devices, per_device)


def check(config: ml_collections.ConfigDict, topology: str | Topology) -> Report:
  """Compiles the train and eval steps of `config` for `topology`; see the module doc."""
  from routing_lm import train
  topo = topology if isinstance(topology, Topology) else get_topology(topology)
  mesh = parallel.make_mesh(config.mesh, topo.devices)
  s = train.setup(config, mesh)
  state = s.abstract_state
  batch = abstract_batch(s)
  train_rep = compile_step("train", train.make_train_step(s), (state, batch))
  if train_rep.error:     # the answer is known; the eval compile can take longer than train's
    eval_rep = StepReport("eval", 0.0, error="not compiled: the train step does not fit")
  else:
    eval_rep = compile_step("eval", train.make_eval_step(s),
                            (state["params"], state["other"], batch))
  return Report(s.config, topo, dict(mesh.shape), shard_bytes(state["params"]),
                shard_bytes(state["opt"]), train_rep, eval_rep, analytic_train_flops(s.config))


# ---------------------------------------------------------------- advice and printing
def levers(report: Report) -> list[str]:
  """What would make a config that does not fit fit, from where its memory goes."""
  c, step = report.config, report.train if report.train.error or \
      report.train.total > report.capacity else report.eval
  need, cap = step.total, report.capacity
  out = []
  temps_dominate = step.temporaries >= step.arguments
  if temps_dominate:
    if c.model.get("remat", "none") != "full":
      out.append(f"model.remat=full (now {c.model.get('remat', 'none')!r}): the backward keeps "
                 "only block inputs; temporaries are the activations")
    if "microbatches" in c.train:
      factor = max(2, 2 ** math.ceil(math.log2(max(need / cap, 1.0) * 1.25)))
      out.append(f"train.microbatches={c.train.microbatches * factor} (now "
                 f"{c.train.microbatches}): activations scale with the microbatch")
    out.append("more data parallelism (a larger slice with a larger mesh.data): fewer sequences "
               "per chip")
  else:
    if c.model.routing.num_experts > 1:
      out.append(f"more expert parallelism (mesh.expert={report.mesh_shape['expert']} -> "
                 f"{2 * report.mesh_shape['expert']}): expert weights split over more chips")
    if not c.train.zero1:
      out.append("train.zero1=True: shard the optimizer state over mesh.data")
    out.append(f"mesh.model > 1 (now {report.mesh_shape['model']}): split the matmul weights")
  ratio = need / cap if cap else float("inf")
  out.append(f"a larger slice: needs {need / GIB:.2f} GiB of {cap / GIB:.2f} per chip "
             f"(x{ratio:.2f})" if need else "a larger slice")
  return out


def format_report(rep: Report) -> list[str]:
  """The printed report; its last line is the machine-readable summary."""
  lines = []
  c, topo = rep.config, rep.topology
  g = lambda b: f"{b / GIB:8.3f} GiB"
  lines.append(f"config {c.get('name', '?')}  topology {topo.name} ({topo.chips} chips, "
               f"{len(topo.devices)} devices)  mesh {rep.mesh_shape}  remat "
               f"{c.model.get('remat', 'none')}  batch {c.data.batch_size} x {c.data.seq_len}")
  lines.append("per-chip HBM:")
  lines.append(f"  parameters          {g(rep.params)}")
  lines.append(f"  optimizer state     {g(rep.opt_state)}")
  for r in (rep.train, rep.eval):
    if r.error:
      what = r.error if r.error.startswith("not compiled") else (
          f"does not compile ({r.compile_s:.1f} s): {r.error}; arguments {g(r.arguments)}, "
          f"temporaries {g(r.temporaries)}")
      lines.append(f"  {r.name} step: {what}")
      continue
    lines.append(f"  {r.name} step ({r.compile_s:.1f} s to compile): arguments {g(r.arguments)}, "
                 f"temporaries {g(r.temporaries)}, outputs not aliased "
                 f"{g(r.outputs - r.aliased)}, code {g(r.code)}")
    lines.append(f"  {r.name} step total   {g(r.total)}")
  lines.append(f"  capacity            {g(rep.capacity)}")
  t = rep.train
  step_flops = t.flops * rep.num_devices
  lines.append("FLOPs per train step:")
  lines.append(f"  compiler (cost_analysis, all chips)       {step_flops:.4e}")
  lines.append(f"  analytic (3 x (F + output) x tokens)      {rep.model_flops:.4e}")
  threshold = dense_fallback_threshold(c)
  if math.isfinite(threshold) and not t.error:
    verdict = "no" if step_flops < threshold else "YES: every expert computes every token"
    lines.append(f"  dense per-expert fallback (compiler FLOPs > {threshold:.4e}): {verdict}")
  if not t.error:
    lines.append("collectives in the train step (count, result bytes per chip):")
    for name, v in t.collectives.items():
      lines.append(f"  {name:<20} {v['count']:5d}  {v['bytes'] / 2 ** 20:12.2f} MiB")
  r = rep.roofline() if not t.error else None
  if r:
    lines.append(f"roofline per chip: compute {r.compute_s * 1e3:.2f} ms, HBM "
                 f"{r.memory_s * 1e3:.2f} ms ({t.bytes_accessed / GIB:.2f} GiB accessed) -> "
                 f"{r.time_s * 1e3:.2f} ms, {r.bound}-bound; MFU at that time {r.mfu:.3f}")
  if not rep.fits:
    lines.append("does not fit. Levers, from where the memory goes:")
    lines.extend(f"  - {x}" for x in levers(rep))
  lines.append(f"fits={str(rep.fits).lower()} hbm_gib={rep.train.total / GIB:.3f} "
               f"capacity_gib={rep.capacity / GIB:.3f} step_flops={step_flops:.4e} "
               f"mfu_bound={r.mfu if r else float('nan'):.4f}")
  return lines
