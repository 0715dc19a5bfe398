"""Train-step throughput of configs/tiny.py and its FLOP utilisation on this machine.

    python -m routing_lm.bench.train_step [--steps 20] [--router sbase] [--experts 8]

Measured in one process: the peak FLOP/s of a large jitted matmul (best of 5), then the
tiny config's compiled train step on a fixed synthetic batch (median step time over
`--steps` after `bench.harness`'s warm-up). Model FLOPs per step = 3 x (F + output
layer) x tokens, with F from `model.counting` (forward FLOPs per token: 2 x active
parameters, attention scores, router); XLA's own count (`cost_analysis`) is printed
beside it. The last line reads `tokens_per_s=<x> flops_utilization=<y>`.
"""
from __future__ import annotations

import argparse

import jax

from routing_lm import config as config_lib, cpu_malloc
from routing_lm.bench import harness


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--router", default="sbase")
  parser.add_argument("--experts", type=int, default=8)
  args = parser.parse_args()
  from routing_lm import train
  from routing_lm.model import counting

  peak = harness.peak_matmul_flops()
  config = config_lib.load(f"configs/tiny.py:{args.router},{args.experts}")
  s = train.setup(config)
  c = s.config
  b, t = c.data.batch_size, c.data.seq_len
  batch = train.to_global(s, harness.synthetic_batch(b, t, c.model.vocab_size))
  step = train.make_train_step(s)
  with jax.set_mesh(s.mesh):
    state = train.init_state(s)
    compiled = step.lower(state, batch).compile()
    xla_flops = compiled.cost_analysis().get("flops", float("nan"))
    step_time, _, _ = harness.time_steps(lambda state: compiled(state, batch), state,
                                         args.steps)
  tokens = b * t
  model_flops = counting.train_step_flops(c.model, b, t)
  tokens_per_s = tokens / step_time
  util = model_flops / step_time / peak
  rows = [("config", f"tiny {args.router} E={args.experts}, batch {b} x {t}, {c.model.dtype}, "
                     f"{jax.device_count()} {jax.devices()[0].platform} device(s)"),
          ("XLA:CPU malloc settings (routing_lm.cpu_malloc)", cpu_malloc.status()),
          ("peak matmul FLOP/s (2048^3, best of 5)", f"{peak:.3e}"),
          ("median step time (s)", f"{step_time:.4f}"),
          ("tokens/s", f"{tokens_per_s:,.0f}"),
          ("model FLOPs/step (3 x (F + output) x tokens)", f"{model_flops:.3e}"),
          ("XLA cost_analysis FLOPs/step", f"{xla_flops:.3e}"),
          ("achieved model FLOP/s", f"{model_flops / step_time:.3e}"),
          ("FLOP utilisation (model / peak)", f"{util:.3f}")]
  width = max(len(r[0]) for r in rows)
  for name, value in rows:
    print(f"{name:<{width}}  {value}")
  print(f"tokens_per_s={tokens_per_s:.1f} flops_utilization={util:.4f}")


if __name__ == "__main__":
  main()
