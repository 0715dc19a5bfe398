"""A tiny model on the offline `stdlib_text` corpus: a few hundred steps on CPU in minutes.

    python -m routing_lm.main --config=configs/tiny.py --workdir=/tmp/tiny
    python -m routing_lm.main --config=configs/tiny.py:hash,8 --workdir=/tmp/tiny_hash

The optional argument is `<router>[,<num_experts>]` (num_experts 1 = dense).
"""
import ml_collections

from routing_lm import config as config_lib

base = config_lib.load_module("configs/base.py")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = base.get_config()
  c.name = "tiny"
  c.model.vocab_size = 2048
  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.d_ff = 512
  c.model.dtype = "float32"
  c.model.routing.num_experts = 8
  c.model.routing.capacity_factor = 1.25   # S-BASE balances exactly; little slack needed
  c.data.task = "stdlib_text"
  c.data.seq_len = 128
  c.data.batch_size = 8
  c.data.max_chars = 4_000_000
  c.train.num_steps = 300
  c.train.learning_rate = 3e-3
  c.train.warmup_steps = 30
  c.train.eval_every = 100
  c.train.eval_batches = 8
  c.train.checkpoint_every = 100
  c.train.log_every = 10
  c.train.zero1 = False
  if arg:
    point = config_lib.parse_arg(arg, where="configs/tiny.py",
                                 usage="expected '<router>[,<num_experts>]', e.g. 'hash,8'",
                                 positional=(("router", str, "a router name"),
                                             ("num_experts", int, "an integer E >= 1")))
    c.model.routing.router = point["router"]
    c.model.routing.num_experts = point.get("num_experts", c.model.routing.num_experts)
  return c
