"""Forward+backward time of the routed FFW against the dense FFW at the same N.

    python -m routing_lm.bench.expert_layer                  # E in {1, 8, 64, 512}
    python -m routing_lm.bench.expert_layer --granularity    # E = 8, G in {1, 2, 4, 8, 16}
    python -m routing_lm.bench.expert_layer --breakdown      # where the routed time goes

Tokens: 131,072 by default (64 sequences of 2048), a quarter of the paper's 524,288-token
step. Every expert sees all the tokens routed to it wherever it lives, so at capacity
factor 1 the slots per expert C = T / E (column `C`) are what a training step gives an
expert whatever the mesh: 256 at E = 512 here, 1,024 in the paper's step. With fewer
tokens the experts' matmuls shrink to C rows: at `--tokens=32768` (C = 64 at E = 512)
XLA:CPU's matmul kernels run at 60-65% of their large-matrix speed, whatever the layout.

Each layer is jitted and compiled once and warmed up until the heap stops growing
(`harness.warm_up`), then the median of `--runs` timed calls, each ending in
`block_until_ready` on every output (the loss, the input gradient and every parameter
gradient). The routed FFW runs in training mode (capacity
factor `--capacity_factor`, 1.0 by default) with the `uniform` router (no router
parameters: dispatch cost alone) and with `sbase` (the paper's router: router matmul,
Sinkhorn and balanced assignment included).

The same run measures this machine: peak matmul FLOP/s (a square matmul) and memory
bandwidth (a large array copy), each from its best run, and prints for every layer

    bound = max(train FLOPs incl. router / peak, 3 * parameter bytes / bandwidth)

(parameters read forward and backward, gradients written), time / bound, and that
normalised by the dense FFW's, next to the raw routed / dense ratio. The last column,
time / (FLOPs / peak + bytes / bandwidth), is the same with no overlap of compute and
weight traffic (XLA:CPU runs one op at a time): at E = 512 the weights and their
gradients are 3.2 GB per step. The dense FFW runs on x [T, d], its faster layout here;
the time as the model calls it, [B, S, d], is printed too. Run it with the malloc
settings for XLA:CPU (`export GLIBC_TUNABLES=$(python -m routing_lm.cpu_malloc)` first;
the header says whether they are on): without them page faults dominate at E = 512.
One routed layer is in memory at a time (as in training), and its timed runs are
interleaved with the dense FFW's (each round times both once), so that load drifts on a
shared machine hit both alike. `/dense` and routed_over_dense use the dense time of the
same block; E512_over_E8 and the G ratios divide those `/dense` columns, so the dense FFW
timed beside each routed layer corrects for the machine's drift between blocks (their
ratios from the routed times alone are printed too).

The last line is `routed_over_dense_E64=.. E512_over_E8=..` (uniform router: the
dispatch), or `G8_over_G1=.. G16_over_G1=..` with `--granularity`; the line before it
gives the same ratios for sbase.
"""
from __future__ import annotations

import argparse
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from routing_lm import config as config_lib, cpu_malloc
from routing_lm.bench import harness
from routing_lm.model import dispatch
from routing_lm.model.routed_ffw import RoutedFFW
from routing_lm.model.transformer import DenseFFW


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m routing_lm.bench.expert_layer",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokens", type=int, default=131_072)
  p.add_argument("--d_model", type=int, default=256)
  p.add_argument("--d_ff", type=int, default=1024)
  p.add_argument("--experts", default="1,8,64,512", help="comma-separated E (no --granularity)")
  p.add_argument("--granularity", action="store_true",
                 help="E fixed (--gran_experts), G in --gran_values, fixed active parameters")
  p.add_argument("--gran_experts", type=int, default=8)
  p.add_argument("--gran_values", default="1,2,4,8,16")
  p.add_argument("--routers", default="uniform,sbase")
  p.add_argument("--capacity_factor", type=float, default=1.0)
  p.add_argument("--runs", type=int, default=5, help="timed runs (median) after a warm-up")
  p.add_argument("--breakdown", action="store_true",
                 help="also time router, plan (sort), gathers and expert einsums alone")
  return p.parse_args(argv)


def machine(runs: int) -> tuple[float, float]:
  """(peak matmul FLOP/s, memory bandwidth bytes/s) of the default device, float32."""
  peak = harness.peak_matmul_flops(runs)
  x = jax.random.normal(jax.random.key(1), (64 * 2 ** 20,), jnp.float32)    # 256 MiB
  t = harness.time_fn(lambda x: x + 1.0, x, runs=max(runs, 5), stat=min)
  bandwidth = 2 * x.nbytes / t                                                # read + write
  return peak, bandwidth


def model_config(args: argparse.Namespace, router: str, num_experts: int, granularity: int):
  m = config_lib.load("configs/base.py", lock=False).model
  m.d_model, m.d_ff, m.dtype, m.param_dtype = args.d_model, args.d_ff, "float32", "float32"
  r = m.routing
  r.router, r.num_experts, r.granularity, r.top_k = router, num_experts, granularity, 1
  r.capacity_factor = args.capacity_factor
  return m


def train_step_fn(layer: nnx.Module, routed: bool) -> tuple[Callable, tuple]:
  """A function (params, rest, x, rng) -> (loss, grads wrt params and x) for the layer."""
  graphdef, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, rest, x, rng):
    mod = nnx.merge(graphdef, params, rest)
    if routed:
      y, aux = mod(x, jnp.zeros(x.shape[:2], jnp.int32), train=True, rng=rng)
      extra = sum(aux["aux_losses"].values(), jnp.zeros(()))
    else:
      y, extra = mod(x), 0.0
    return jnp.mean(y.astype(jnp.float32) ** 2) + extra

  def step(params, rest, x, rng):
    return jax.value_and_grad(loss, argnums=(0, 2))(params, rest, x, rng)

  return step, (params, rest)


def n_params(tree) -> int:
  return sum(a.size for a in jax.tree.leaves(tree))


def train_flops(args: argparse.Namespace, router_params: int) -> float:
  """Forward+backward FLOPs: 3x forward matmuls (experts at the active size, router)."""
  t, d, f = args.tokens, args.d_model, args.d_ff
  return 3.0 * (4 * t * d * f + 2 * t * router_params)


def prepare_layer(args, layer, routed: bool, x, peak, bandwidth):
  """(compiled forward+backward call, (FLOP seconds, weight-traffic seconds)) for a layer."""
  step, (params, rest) = train_step_fn(layer, routed)
  call = harness.compile_fn(step, params, rest, x, jax.random.key(0))
  router = n_params(nnx.state(layer.router, nnx.Param)) if routed else 0
  flops = train_flops(args, router)
  param_bytes = sum(a.nbytes for a in jax.tree.leaves(params))
  return call, (flops / peak, 3 * param_bytes / bandwidth)


class _WithRouter:
  """The routed FFW's attributes with another router object (to differentiate it alone)."""

  def __init__(self, router, layer):
    self.router, self.global_router = router, layer.global_router


def breakdown(args, m, x) -> None:
  """Forward+backward of the routed FFW's pieces alone, in ms."""
  layer = RoutedFFW(m, rngs=nnx.Rngs(params=0))
  t, d = args.tokens, args.d_model
  xs = x.reshape(1, t, d)
  ids = jnp.zeros((1, t), jnp.int32)
  e, k = layer.num_experts, layer.top_k
  cap = dispatch.capacity(t, e, k, args.capacity_factor)
  routing = layer.route(xs, ids, True, jax.random.key(0))
  plan = dispatch.plan(routing.expert_ids[0], e, cap)
  buf = dispatch.gather_in(x, plan)[None]                     # [1, E, C, d] as in the layer
  gd, params, rest = nnx.split(layer, nnx.Param, ...)

  rgd, rparams, rrest = nnx.split(layer.router, nnx.Param, ...)

  def router_fn(params, xs):
    out = layer.route.__func__(_WithRouter(nnx.merge(rgd, params, rrest), layer), xs, ids,
                               True, jax.random.key(0))
    return jnp.sum(out.weights) + sum(jax.tree.leaves(out.aux_losses), jnp.zeros(()))

  def experts_fn(params, buf):
    mod = nnx.merge(gd, params, rest)
    return jnp.mean(mod.experts(buf) ** 2)

  ids_t = routing.expert_ids[0]
  w = routing.weights[0]
  pieces = {
      "router (+grad)": (jax.grad(router_fn, argnums=(0, 1)), (rparams, xs)),
      "plan (sort)": (lambda ids: dispatch.plan(ids, e, cap), (ids_t,)),
      "gather_in (+grad)": (jax.grad(lambda x: jnp.sum(dispatch.gather_in(x, plan) ** 2)), (x,)),
      "experts (+grad)": (jax.grad(experts_fn, argnums=(0, 1)), (params, buf)),
      "gather_out (+grad)": (jax.grad(lambda y, w: jnp.sum(dispatch.gather_out(y, plan, w) ** 2),
                                      argnums=(0, 1)), (buf[0], w)),
  }
  for name, (fn, fargs) in pieces.items():
    print(f"    {name:<20} {1e3 * harness.time_fn(fn, *fargs, runs=args.runs):9.1f} ms")


def main(argv: Sequence[str] | None = None) -> None:
  args = _parse(argv)
  routers = args.routers.split(",")
  dev = jax.devices()[0]
  print(f"device: {dev.platform} {dev.device_kind} x{jax.device_count()}, float32, "
        f"tokens={args.tokens}, d_model={args.d_model}, d_ff={args.d_ff}, top_k=1, "
        f"capacity_factor={args.capacity_factor}, median of {args.runs} after warm-up, "
        f"XLA:CPU malloc settings {cpu_malloc.status()}")
  peak, bandwidth = machine(args.runs)
  print(f"machine: peak matmul {peak / 1e9:.0f} GFLOP/s, copy bandwidth {bandwidth / 1e9:.1f} GB/s")
  x = jax.random.normal(jax.random.key(0), (1, args.tokens, args.d_model), jnp.float32)
  m = model_config(args, "uniform", 1, 1)
  with nnx.use_eager_sharding(False):
    dense = DenseFFW(m, rngs=nnx.Rngs(params=0))
  # The dense FFW on [T, d] (its fastest layout here) and as the model calls it, [B, S, d].
  dense_call, dense_bounds = prepare_layer(args, dense, False, x[0], peak, bandwidth)
  dense3d_call, _ = prepare_layer(args, dense, False, x, peak, bandwidth)
  first = harness.time_interleaved({"dense": dense_call, "dense3d": dense3d_call}, args.runs)
  dense_b = max(dense_bounds)
  print(f"dense FFW [T, d]: {1e3 * first['dense']:.1f} ms (bound {1e3 * dense_b:.1f} ms, "
        f"time/bound {first['dense'] / dense_b:.2f}); as called in the model, [1, T, d]: "
        f"{1e3 * first['dense3d']:.1f} ms")
  if args.granularity:
    points = [(args.gran_experts, int(g)) for g in args.gran_values.split(",")]
    head = f"{'G':>4} {'experts':>8} {'width':>6}"
  else:
    points = [(int(e), 1) for e in args.experts.split(",")]
    head = f"{'E':>4}"
  print(f"{head} {'C':>6} {'router':>8} {'ms':>9} {'/dense':>7} {'bound ms':>9} {'time/bound':>10} "
        f"{'(time/bound)/dense':>18} {'time/(F+B)':>10}")
  ratios, times = {}, {}   # (router, E, G) -> time / dense time of its block; seconds
  for e, g in points:
    for router in routers:
      m = model_config(args, router, e, g)
      with nnx.use_eager_sharding(False):
        layer = RoutedFFW(m, rngs=nnx.Rngs(params=0))
      call, bounds = prepare_layer(args, layer, True, x, peak, bandwidth)
      del layer
      block = harness.time_interleaved({"dense": dense_call, "routed": call}, args.runs)
      del call                                   # one routed layer in memory at a time
      s, dense_s = block["routed"], block["dense"]
      b, add = max(bounds), sum(bounds)
      ratios[router, e, g], times[router, e, g] = s / dense_s, s
      lead = (f"{g:>4} {e * g:>8} {args.d_ff // g:>6}" if args.granularity else f"{e:>4}")
      cap = dispatch.capacity(args.tokens, e * g, g, args.capacity_factor)
      print(f"{lead} {cap:>6} {router:>8} {1e3 * s:9.1f} {s / dense_s:7.2f} {1e3 * b:9.1f} "
            f"{s / b:10.2f} {(s / b) / (dense_s / dense_b):18.2f} {s / add:10.2f}", flush=True)
  if args.breakdown:
    for e, g in points:
      for router in routers:
        print(f"breakdown {router} E={e} G={g}:")
        with nnx.use_eager_sharding(False):
          breakdown(args, model_config(args, router, e, g), x[0])
  if args.granularity:
    e = args.gran_experts
    summary = {"G8_over_G1": ((e, 8), (e, 1)), "G16_over_G1": ((e, 16), (e, 1))}
  else:
    summary = {"routed_over_dense_E64": ((64, 1), None), "E512_over_E8": ((512, 1), (8, 1))}
  pairs = [(r, name, num, den) for r in routers for name, (num, den) in summary.items()
           if all((r, *p) in times for p in (num, den) if p)]
  raw = [f"{r} {name}={times[(r, *num)] / times[(r, *den)]:.3f}"
         for r, name, num, den in pairs if den]
  if raw:
    print("from the routed times alone (no drift correction): " + ", ".join(raw))
  for r in routers[1:] + routers[:1]:          # the first router's line is the last line
    line = " ".join(f"{name}={ratios[(r, *num)] / (ratios[(r, *den)] if den else 1.0):.3f}"
                    for r_, name, num, den in pairs if r_ == r)
    if line:
      print(line if r == routers[0] else f"{r}: {line}")

if __name__ == "__main__":
  main()
