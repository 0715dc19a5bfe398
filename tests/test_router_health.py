"""Router health (routing_lm/health.py, routers/base.py): the z-loss of every learned
router, max share and switched share, and the collapse alarm in a training run."""
from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from routing_lm import health, routers, train
from routing_lm.config import load_module
from routing_lm.errors import ConfigError
from routing_lm.metrics import read_jsonl
from routing_lm.routers import base as router_base
from test_train import SyntheticPipeline, small_config

base = load_module("configs/base.py")
LEARNED = ("sbase", "rlr", "topk", "lossfree")


def identity_router(name: str, e: int, **overrides):
  cfg = base.get_config().model.routing[name].copy_and_resolve_references()
  cfg.update(overrides)
  spec = routers.RouterSpec(e, e, 1, 64, cfg)
  routers.get(name).check_config(spec)
  with nnx.use_eager_sharding(False):
    r = routers.get(name)(spec, rngs=nnx.Rngs(params=0))
  r.w[...] = jnp.eye(e)
  return r


def test_every_learned_router_has_a_z_loss_coef():
  routing = base.get_config().model.routing
  assert {n for n, r in routers.REGISTRY.items() if "z_loss_coef" in r.defaults} == set(LEARNED)
  assert {n: routing[n].z_loss_coef for n in LEARNED} == {
      "sbase": 0.0, "rlr": 0.0, "topk": 0.001, "lossfree": 0.0}
  with pytest.raises(ConfigError, match=r"model\.routing\.sbase\.z_loss_coef=-1"):
    identity_router("sbase", 2, z_loss_coef=-1.0)


@pytest.mark.parametrize("name", ["sbase", "rlr", "lossfree"])
def test_z_loss_by_hand(name):
  """Logit rows (ln 3, 0) and (0, ln 1): logsumexp ln 4 and ln 2, so
  z = ((ln 4)^2 + (ln 2)^2) / 2 = 2.5 (ln 2)^2; aux = coef * z, the metric is z."""
  logits = jnp.asarray([[math.log(3.0), 0.0], [0.0, 0.0]], jnp.float32)
  z = 2.5 * math.log(2.0) ** 2

  def call(router):
    gd, state = nnx.split(router)
    return jax.jit(lambda s, x: nnx.merge(gd, s)(
        x, jnp.zeros((2,), jnp.int32), train=True, rng=jax.random.key(0)))(state, logits)
  out = call(identity_router(name, 2, z_loss_coef=0.01))
  assert float(router_base.z_loss(logits)) == pytest.approx(z, rel=1e-6)
  assert float(out.aux_losses["z_loss"]) == pytest.approx(0.01 * z, rel=1e-6)
  assert float(out.metrics["z_loss"]) == pytest.approx(z, rel=1e-6)
  out = call(identity_router(name, 2, z_loss_coef=0.0))
  assert "z_loss" not in out.aux_losses and float(out.metrics["z_loss"]) == pytest.approx(z)


def test_max_share_and_switched_share_hand_cases():
  assert health.max_share(np.asarray([0.5, 0.25, 0.25, 0.0]), 1) == 0.5
  assert health.max_share(np.asarray([0.5, 0.5, 0.0, 0.0]), 2) == 1.0   # every token has e0
  prev = np.asarray([[[0, 1], [2, 3], [1, 2]]])              # [B=1, S=3, K=2]
  cur = np.asarray([[[1, 0], [2, 0], [1, 2]]])               # same set, changed, same
  assert health.switched_share(prev, cur) == pytest.approx(1 / 3)
  assert health.switched_share(prev, cur, mask=np.asarray([[1, 1, 0]])) == pytest.approx(0.5)


def test_alarm_fires_after_n_intervals_once_and_again_after_recovery():
  alarm = health.CollapseAlarm(0.5, 3)
  assert alarm.update(10, {1: 0.9, 3: 0.3}) == []
  assert alarm.update(20, {1: 0.9, 3: 0.6}) == []
  [msg] = alarm.update(30, {1: 0.8, 3: 0.3})
  assert "block 1" in msg and "80%" in msg and "step 30" in msg
  assert alarm.active() == [1]
  assert alarm.update(40, {1: 0.9, 3: 0.3}) == []            # ongoing: no new warning
  assert alarm.update(50, {1: 0.5, 3: 0.3}) == [] and alarm.active() == []   # not > 0.5
  for step in (60, 70):
    assert alarm.update(step, {1: 0.7, 3: 0.3}) == []
  assert len(alarm.update(80, {1: 0.7, 3: 0.3})) == 1
  assert [(a["layer"], a["step"]) for a in alarm.alarms] == [(1, 30), (1, 80)]
  # A resumed run replays its metrics rows (the last row of a step wins, later steps ignored).
  rows = [{"step": s, health.SHARE_KEY.format(1): v, health.SHARE_KEY.format(3): 0.3}
          for s, v in [(10, 0.9), (20, 0.9), (30, 0.8), (40, 0.9), (50, 0.5), (60, 0.7),
                       (70, 0.7), (80, 0.7), (90, 0.9)]] + [{"step": 30, "val_loss": 1.0}]
  replayed = health.CollapseAlarm(0.5, 3)
  replayed.replay(rows, up_to_step=80)
  assert replayed.alarms == alarm.alarms and replayed.streak == alarm.streak
  with pytest.raises(ConfigError, match=r"train\.collapse_intervals=0"):
    health.CollapseAlarm(0.5, 0)
  with pytest.raises(ConfigError, match=r"train\.collapse_share=1\.5"):
    health.CollapseAlarm(1.5, 3)


def run(tmp_path, router: str, capsys) -> tuple[dict, list[dict], str]:
  config = small_config(router, steps=6)
  config.train.update(collapse_share=0.5, collapse_intervals=3, eval_every=100,
                      checkpoint_every=100)
  summary = train.train(config, str(tmp_path), pipeline=SyntheticPipeline())
  rows = [r for r in read_jsonl(str(tmp_path / "metrics.jsonl")) if "loss" in r]
  on_disk = json.load(open(tmp_path / "summary.json"))
  assert on_disk["collapse_alarms"] == summary["collapse_alarms"]
  captured = capsys.readouterr()
  return summary, rows, captured.out + captured.err


@pytest.mark.slow
def test_alarm_fires_on_a_forced_collapse(tmp_path, capsys, monkeypatch):
  """Every router logit gets +100 on expert 0: all tokens take it, at every step."""
  real = router_base.router_logits
  monkeypatch.setattr(router_base, "router_logits",
                      lambda x, w: real(x, w) + jnp.asarray([100.0, 0.0, 0.0, 0.0]))
  summary, rows, output = run(tmp_path, "topk", capsys)
  assert [(a["layer"], a["step"]) for a in summary["collapse_alarms"]] == [(1, 3)]
  assert summary["collapse_alarms"][0]["share"] == 1.0
  assert "router collapse in block 1" in output                  # the progress bar's note
  assert "collapse=block 1" in output                             # and its postfix
  assert all(r["router/block1/max_share"] == 1.0 for r in rows)
  assert all(r["router/block1/switched"] == 0.0 for r in rows)   # always expert 0


@pytest.mark.slow
def test_alarm_silent_on_a_healthy_run(tmp_path, capsys):
  summary, rows, output = run(tmp_path, "lossfree", capsys)
  assert summary["collapse_alarms"] == [] and "router collapse" not in output
  shares = [r["router/block1/max_share"] for r in rows]
  assert len(shares) == 6 and max(shares) < 0.5
  switched = [r["router/block1/switched"] for r in rows]
  assert all(0.0 <= s <= 1.0 for s in switched) and max(switched) > 0   # the router moves
