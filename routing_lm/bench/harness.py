"""What the benchmarks share: compile once, warm up, interleave, median; a synthetic batch.

Under `cpu_malloc`'s settings the heap keeps what it grew to, but it grows over the
first several calls of a large program, in 512 MB steps at unpredictable calls (on a
VM each can cost ~1.5 s of page faults): after a single warm-up call such steps land
in timed calls as 3x outliers. `warm_up` therefore calls until the page faults stop.
"""
from __future__ import annotations

import resource
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from routing_lm import cpu_malloc


def compile_fn(fn: Callable[..., Any], *args) -> Callable[[], Any]:
  """Compiles `fn` once; returns a zero-argument call that blocks on every output."""
  compiled = jax.jit(fn).lower(*args).compile()
  return lambda: jax.block_until_ready(compiled(*args))


def warm_up(call: Callable[[], Any], max_calls: int = 20) -> int:
  """Calls `call` until two calls in a row take under 32 page faults; returns the calls.

  Under glibc's default malloc every call faults its buffers in afresh, so there is
  nothing to wait for: one call.
  """
  if not cpu_malloc.active():
    max_calls = 1
  quiet, calls = 0, 0
  while quiet < 2 and calls < max_calls:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    call()
    calls += 1
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    quiet = quiet + 1 if faults < 32 else 0
  return calls


def time_interleaved(calls: dict[str, Callable[[], Any]], runs: int,
                     stat: Callable[[list[float]], float] = statistics.median
                     ) -> dict[str, float]:
  """`stat` (median) of the seconds per call: each warmed up (`warm_up`), then `runs`
  rounds that time every call once in turn, so slow drifts in machine load (a shared
  machine) hit all alike. Each call must block on its outputs."""
  for call in calls.values():
    warm_up(call)
  times: dict[str, list[float]] = {name: [] for name in calls}
  for _ in range(runs):
    for name, call in calls.items():
      start = time.perf_counter()
      call()
      times[name].append(time.perf_counter() - start)
  return {name: stat(t) for name, t in times.items()}


def time_fn(fn: Callable[..., Any], *args, runs: int,
            stat: Callable[[list[float]], float] = statistics.median) -> float:
  """`stat` (median) of the seconds of `runs` calls of the compiled `fn` after a warm-up."""
  return time_interleaved({"fn": compile_fn(fn, *args)}, runs, stat)["fn"]


def time_steps(step: Callable[[Any], tuple[Any, Any]], state: Any, runs: int
               ) -> tuple[float, Any, Any]:
  """(median seconds, last state, last output) of `state, out = step(state)`, blocking
  on `out`, over `runs` calls after a warm-up; the state is carried from call to call,
  as in training."""
  last = [state, None]

  def call():
    last[:] = step(last[0])
    jax.block_until_ready(last[1])

  seconds = time_interleaved({"step": call}, runs)["step"]
  return seconds, last[0], last[1]


def peak_matmul_flops(runs: int = 5, n: int = 2048) -> float:
  """FLOP/s of a float32 [n, n] @ [n, n] matmul, from its best run."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  return 2 * n ** 3 / time_fn(lambda a: a @ a, a, runs=max(runs, 5), stat=min)


def synthetic_batch(batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
  """A fixed batch of random tokens in [3, vocab), one document per row: dict of
  [batch, seq]."""
  rng = np.random.default_rng(0)
  toks = rng.integers(3, vocab, size=(batch, seq + 1)).astype(np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:],
          "segment_ids": np.ones((batch, seq), np.int32),
          "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
          "weights": np.ones((batch, seq), np.float32)}
