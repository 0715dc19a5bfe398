"""The expert-layer benchmark's summary line agrees with its own table (tiny shapes)."""
import re

from routing_lm.bench import expert_layer


def test_summary_line_is_computed_from_the_table(capsys):
  expert_layer.main(["--tokens=512", "--d_model=16", "--d_ff=32", "--experts=1,8,64,512",
                     "--routers=uniform", "--runs=1"])
  out = capsys.readouterr().out.strip().splitlines()
  rows = {int(m[1]): (float(m[2]), float(m[3])) for line in out
          if (m := re.match(r"\s*(\d+)\s+uniform\s+([\d.]+)\s+([\d.]+)", line))}
  assert sorted(rows) == [1, 8, 64, 512]
  last = dict(kv.split("=") for kv in out[-1].split())
  assert set(last) == {"routed_over_dense_E64", "E512_over_E8"}
  assert abs(float(last["routed_over_dense_E64"]) - rows[64][1]) <= 0.006      # /dense column
  t512, t8 = rows[512][0], rows[8][0]                  # ms columns, printed to 0.05 ms
  assert (t512 - 0.05) / (t8 + 0.05) - 0.001 <= float(last["E512_over_E8"]) \
      <= (t512 + 0.05) / max(t8 - 0.05, 1e-9) + 0.001
