"""The expert-layer benchmark's summary lines agree with its own table (tiny shapes)."""
import re

from routing_lm.bench import expert_layer


def test_summary_line_is_computed_from_the_table(capsys):
  expert_layer.main(["--tokens=512", "--d_model=16", "--d_ff=32", "--experts=1,8,64,512",
                     "--routers=uniform", "--runs=1"])
  out = capsys.readouterr().out.strip().splitlines()
  rows = {int(m[1]): (int(m[2]), float(m[3]), float(m[4])) for line in out
          if (m := re.match(r"\s*(\d+)\s+(\d+)\s+uniform\s+([\d.]+)\s+([\d.]+)", line))}
  assert sorted(rows) == [1, 8, 64, 512]
  assert [rows[e][0] for e in (1, 8, 64, 512)] == [512, 64, 8, 1]      # C = T / E slots
  last = dict(kv.split("=") for kv in out[-1].split())
  assert set(last) == {"routed_over_dense_E64", "E512_over_E8"}
  assert abs(float(last["routed_over_dense_E64"]) - rows[64][2]) <= 0.006      # /dense column
  # E512_over_E8 divides the /dense columns (printed to 0.005) ...
  d512, d8 = rows[512][2], rows[8][2]
  assert (d512 - 0.005) / (d8 + 0.005) - 0.001 <= float(last["E512_over_E8"]) \
      <= (d512 + 0.005) / (d8 - 0.005) + 0.001
  # ... and the line before the summary gives it from the ms columns (printed to 0.05 ms).
  raw = float(re.search(r"uniform E512_over_E8=([\d.]+)", out[-2])[1])
  t512, t8 = rows[512][1], rows[8][1]
  assert (t512 - 0.05) / (t8 + 0.05) - 0.001 <= raw <= (t512 + 0.05) / max(t8 - 0.05, 1e-9) + 0.001


def test_time_steps_carries_the_state_and_returns_the_last():
  import jax.numpy as jnp
  from routing_lm.bench import harness
  calls = []

  def step(state):
    calls.append(int(state))
    return state + 1, {"loss": state * 2.0}

  seconds, state, out = harness.time_steps(step, jnp.int32(0), runs=3)
  assert calls == list(range(len(calls))) and len(calls) >= 4     # warm-up, then 3 timed
  assert int(state) == len(calls) and float(out["loss"]) == 2.0 * calls[-1]
  assert seconds >= 0.0


def test_synthetic_batch_is_one_shifted_document_per_row():
  from routing_lm.bench import harness
  b = harness.synthetic_batch(3, 16, 50)
  assert all(v.shape == (3, 16) for v in b.values())
  assert (b["inputs"][:, 1:] == b["targets"][:, :-1]).all()
  assert b["inputs"].min() >= 3 and b["targets"].max() < 50
  assert (b["segment_ids"] == 1).all() and (b["positions"] == range(16)).all()
