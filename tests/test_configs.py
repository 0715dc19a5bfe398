"""configs/paper.py: the paper's sizes, the grid-point string, and clear errors for bad
input before anything runs (issue 5).

N is counted by routing_lm.model.counting: N = L (4 d (h k) + 2 d d_ff), attention and
FFW without embeddings. paper_spec.md's table also counts a Transformer-XL relative-position
projection, L d (h k); this codebase uses rotary positions (no parameters), so each size
is compared with the table's N minus that projection, within 2%.
"""
import jax
import pytest

from routing_lm.config import load_module
from routing_lm import config as config_lib, parallel, sweep
from routing_lm.config import ConfigError
from routing_lm.model import counting

base = load_module("configs/base.py")
paper = load_module("configs/paper.py")
tiny = load_module("configs/tiny.py")

# paper_spec.md section 3: name -> (d_model, layers, heads, head size, d_ffw, N)
SPEC = {
    "15m": (384, 8, 6, 64, 1536, 15.3e6),
    "25m": (512, 8, 8, 64, 2048, 27.3e6),
    "55m": (512, 16, 8, 64, 2048, 54.5e6),
    "130m": (896, 12, 16, 64, 3584, 132.1e6),
    "370m": (1536, 12, 12, 128, 6144, 368.1e6),
    "870m": (2048, 16, 16, 128, 8192, 872.4e6),
    "1.3b": (2048, 24, 16, 128, 8192, 1308.6e6),
}


def spec_n_without_relpos(size):
  d, layers, heads, head, d_ff, n = SPEC[size]
  hk = heads * head
  full = layers * (4 * d * hk + 2 * d * d_ff + d * hk)
  assert full == pytest.approx(n, abs=0.051e6), "the spec's formula gives its (rounded) N"
  return full - layers * d * hk


def test_every_spec_size_is_named():
  assert list(paper.SIZES) == list(SPEC)


@pytest.mark.parametrize("size", list(SPEC))
def test_paper_size_n_within_2_percent(size):
  c = paper.get_config(size)
  n = counting.count(c.model, c.data.seq_len).n_params
  assert n == pytest.approx(spec_n_without_relpos(size), rel=0.02)


@pytest.mark.parametrize("size", list(SPEC))
def test_paper_size_shape(size):
  d, layers, heads, head, d_ff, _ = SPEC[size]
  m = paper.get_config(size).model
  assert (m.d_model, m.num_layers, m.d_ff) == (d, layers, d_ff)
  assert (m.num_heads, m.head_dim) == (heads, head)
  assert m.d_ff == 4 * m.d_model


def test_paper_training_setup():
  c = paper.get_config("130m,sbase,64")
  assert (c.data.seq_len, c.data.batch_size, c.train.num_steps) == (2048, 256, 250_000)
  assert c.data.task == "c4" and c.model.vocab_size == 32_000 == c.data.vocab_size
  assert c.model.dtype == "bfloat16" and c.train.zero1 is True
  assert (c.train.b1, c.train.b2, c.train.weight_decay, c.train.grad_clip) == (0.9, 0.95, 0.1, 1.0)
  assert c.train.end_lr_ratio == 0.1 and c.train.warmup_steps == 1500
  assert c.model.routing.capacity_factor == 2.0
  # learning rates fall with size (Gopher family)
  lrs = [paper.get_config(s).train.learning_rate for s in SPEC]
  assert lrs == sorted(lrs, reverse=True) and lrs[0] == 6e-4 and lrs[-1] == 2e-4


def test_parses_grid_point():
  c = paper.get_config("130m,sbase,64")
  r = c.model.routing
  assert (r.router, r.num_experts, r.top_k, r.routing_frequency, r.granularity) == (
      "sbase", 64, 1, 0.5, 1)
  assert c.model.d_model == 896 and c.name == "paper_130m_sbase_e64"


@pytest.mark.parametrize("arg, expected", [
    ("130m,sbase,64,k=2,r=1.0", ("sbase", 64, 2, 1.0, 1)),
    ("15m,hash,512", ("hash", 512, 1, 0.5, 1)),
    ("25m,rlr,8,r=0.25", ("rlr", 8, 1, 0.25, 1)),
    ("1.3B, SBASE, 128", ("sbase", 128, 1, 0.5, 1)),
    ("55m,topk,16,k=2,g=4", ("topk", 16, 2, 0.5, 4)),
    ("370m,sbase", ("sbase", 64, 1, 0.5, 1)),           # E defaults to 64
])
def test_parses_variants(arg, expected):
  r = paper.get_config(arg).model.routing
  assert (r.router, r.num_experts, r.top_k, r.routing_frequency, r.granularity) == expected


@pytest.mark.parametrize("arg", ["870m", "870m,dense", "870m,dense,1", "870m,sbase,1"])
def test_dense_spellings(arg):
  c = paper.get_config(arg)
  assert c.model.routing.num_experts == 1
  assert counting.count(c.model, 2048).num_routed_layers == 0
  assert c.name == "paper_870m_dense"


def test_default_arg():
  assert paper.get_config().model.routing.num_experts == 64


@pytest.mark.parametrize("form", ["--config=configs/paper.py:25m,hash,16,k=2",
                                  "--config configs/paper.py:25m,hash,16,k=2"])
def test_config_file_flag_passes_arg(form):
  """main's --config: loaded by config.load, then --config.<field> overrides (typed)."""
  from absl import flags
  from routing_lm import main
  argv = ["prog", *form.split(" "), "--config.model.routing.num_experts=32",
          "--config.train.learning_rate=1e-3"]
  fv = flags.FlagValues()
  rest = main.define_config_flag(argv, fv)
  assert rest == ["prog", "--config.model.routing.num_experts=32",
                  "--config.train.learning_rate=1e-3"]
  fv(rest)
  r = fv.config.model.routing
  assert (r.router, r.num_experts, r.top_k) == ("hash", 32, 2)
  assert fv.config.train.learning_rate == 1e-3
  with pytest.raises(ConfigError, match="does not exist"):
    main.define_config_flag(["prog", "--config=configs/nope.py"], flags.FlagValues())
  with pytest.raises(ConfigError, match=r"config.model.routing.num_expert does not exist.*"
                                        r"Did you mean 'num_experts'"):
    main.define_config_flag(["prog", "--config=configs/tiny.py",
                             "--config.model.routing.num_expert=4"], flags.FlagValues())


def test_none_from_the_command_line_makes_routing_dropless():
  """`--config.<field>=None` sets None (ml_collections' flag parser cannot for a number):
  dropless training and evaluation from the command line."""
  from absl import flags
  from routing_lm import main
  fv = flags.FlagValues()
  rest = main.define_config_flag(["prog", "--config=configs/tiny.py",
                                  "--config.model.routing.capacity_factor=None",
                                  "--config.model.routing.eval_capacity_factor=1.5"], fv)
  assert rest == ["prog", "--config.model.routing.eval_capacity_factor=1.5"]
  fv(rest)
  r = fv.config.model.routing
  assert r.capacity_factor is None and r.eval_capacity_factor == 1.5


@pytest.mark.parametrize("arg, names", [
    ("131m,sbase,64", ["131m", "15m", "25m", "55m", "130m", "370m", "870m", "1.3b"]),
    ("130m,sbaes,64", ["sbaes", "dense", "sbase", "hash", "rlr", "topk"]),
    ("130m,sbase,64,x=1", ["'x'", "k=", "r=", "g="]),
    ("130m,sbase,64,k=two", ["k='two'", "int"]),
    ("130m,sbase,sixty", ["'sixty'", "E"]),
    ("130m,dense,64", ["dense", "E=64"]),
    ("130m,sbase,0", ["num_experts='0'", ">= 1"]),
    ("130m,sbase,64,1", ["at most 3", "size, router, num_experts"]),
    ("130m,sbase,64,k=1,k=2", ["twice"]),
    ("130m,rlr,64,k=2", ["model.routing.top_k", "rlr"]),     # rejected by validate()
    ("130m,sbase,64,r=1.5", ["routing_frequency", "1.5"]),
    ("130m,sbase,64,g=3", ["granularity", "3584"]),
    ("130m,sbase,64,k=128", ["top_k", "num_experts=64"]),
])
def test_bad_grid_point_is_a_clear_error(arg, names):
  with pytest.raises(ConfigError) as e:
    paper.get_config(arg)
  for name in names:
    assert name in str(e.value)


def test_unknown_field_override_is_refused():
  c = paper.get_config("130m,sbase,64")
  with pytest.raises(ConfigError, match=r"num_expert.*Did you mean 'num_experts'"):
    config_lib.apply_overrides(c, {"model.routing.num_expert": 8}, "test")
  with pytest.raises(ConfigError, match=r"config.model.foo.*no field 'foo'"):
    config_lib.apply_overrides(c, {"model.foo.bar": 1}, "test")
  with pytest.raises(ConfigError, match=r"config.model.d_model='wide'.*int"):
    config_lib.apply_overrides(c, {"model.d_model": "wide"}, "test")


def test_mesh_invalid_grid_point_is_a_clear_error():
  from routing_lm import train
  c = paper.get_config("130m,sbase,6")
  c.mesh.expert = 4
  mesh = jax.sharding.AbstractMesh((2, 4, 1), parallel.MESH_AXES)
  with pytest.raises(ConfigError, match=r"num_experts=6.*not divisible by mesh.expert=4"):
    train.prepare_config(c, mesh)   # validate + validate_mesh, as a run starts
  c8 = paper.get_config("130m,sbase,8")
  c8.mesh.expert = 4
  train.prepare_config(c8, mesh)   # a valid point passes


def _sweep_file(tmp_path, points, config="configs/tiny.py", overrides=None):
  f = tmp_path / "grid.py"
  f.write_text(f"def get_sweep():\n  return {{'config': {config!r}, 'overrides': "
               f"{overrides or {}!r}, 'tokens': 4096, 'points': {points!r}}}\n")
  return str(f)


def test_sweep_refuses_mesh_invalid_point_before_running(tmp_path, capsys):
  points = [{"name": "ok", "overrides": {"model.routing.num_experts": 8}},
            {"name": "bad", "overrides": {"model.routing.num_experts": 6}}]
  path = _sweep_file(tmp_path, points, overrides={"mesh.expert": 4, "mesh.data": -1})
  work = tmp_path / "work"
  assert sweep.main([f"--sweep={path}", f"--workdir={work}", "--num_devices=8"]) == 2
  err = capsys.readouterr().err
  assert "point 1 (bad)" in err and "num_experts=6" in err and "mesh.expert=4" in err
  assert "point 0" not in err
  assert not work.exists()   # nothing ran


def test_sweep_refuses_unknown_field_and_size_before_running(tmp_path, capsys):
  work = tmp_path / "work"
  path = _sweep_file(tmp_path, [{"name": "a", "overrides": {"model.routing.num_expert": 2}}])
  assert sweep.main([f"--sweep={path}", f"--workdir={work}"]) == 2
  assert "num_expert" in capsys.readouterr().err
  path = _sweep_file(tmp_path, [{"name": "a", "config": "configs/paper.py:13m,sbase,8"}])
  assert sweep.main([f"--sweep={path}", f"--workdir={work}", "--print-commands"]) == 2
  out = capsys.readouterr()
  assert out.out == "" and "13m" in out.err and "allowed sizes" in out.err
  assert not work.exists()


def test_sweep_mesh_for_local_devices(tmp_path, capsys):
  # One local CPU device: a mesh asking for 2 expert devices cannot be built.
  if jax.device_count() != 1:
    pytest.skip("needs exactly one local device")
  path = _sweep_file(tmp_path, [{"name": "a", "overrides": {"mesh.expert": 2}}])
  assert sweep.main([f"--sweep={path}", f"--workdir={tmp_path / 'w'}"]) == 2
  assert "mesh" in capsys.readouterr().err


def test_tiny_and_base_still_validate():
  config_lib.validate(tiny.get_config())
  config_lib.validate(base.get_config())
