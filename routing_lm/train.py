"""Train state, the loss, the jitted train/eval steps, and the training loop.

The state is a plain pytree `{"params", "other", "opt", "step"}` (NNX parameters, fixed
variables such as HASH tables, the optax state, the step); the model is rebuilt from
its graph definition inside each jitted step (`nnx.merge`). The rng of step s is
`fold_in(key(seed), s)` and batch s is a pure function of (data config, s), so a resumed
run repeats the uninterrupted one exactly.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import signal
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from routing_lm import checkpoint, config as config_lib, health, parallel
from routing_lm.expert_dims import expert_dims
from routing_lm.routers import reinforce_surrogate
from routing_lm.metrics import MetricWriter, Progress, read_jsonl
from routing_lm.model import counting
from routing_lm.model.transformer import Transformer, routed_layer_indices, unembed_logits

log = logging.getLogger("routing_lm")
Batch = dict[str, jax.Array]


# ---------------------------------------------------------------- optimizer and loss
def make_schedule(t: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to the peak, cosine decay to end_lr_ratio * peak at num_steps."""
  warmup = min(t.warmup_steps, t.num_steps - 1)
  return optax.warmup_cosine_decay_schedule(
      0.0, t.learning_rate, warmup, max(t.num_steps, warmup + 1),
      t.learning_rate * t.end_lr_ratio)


def is_router_param(path: tuple, _) -> bool:
  """Whether the parameter at `path` (a key path in the model's params) is a router's."""
  return any(getattr(k, "key", getattr(k, "name", None)) == "router" for k in path)


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW; no weight decay on vectors (norm scales). With
  `train.router_lr_scale` != 1 the routers' updates (learning rate and decoupled decay
  alike) are scaled by it: a per-group learning rate."""
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  parts = [optax.clip_by_global_norm(t.grad_clip),
           optax.adamw(make_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay,
                       mask=decay_mask)]
  scale = t.get("router_lr_scale", 1.0)
  if scale != 1.0:
    router_mask = lambda params: jax.tree_util.tree_map_with_path(is_router_param, params)
    parts.append(optax.masked(optax.scale(scale), router_mask))
  return optax.chain(*parts)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood [B, S] in nats."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def chunked_token_nll(h: jax.Array, unembed: jax.Array, targets: jax.Array,
                      chunk_tokens: int = 0) -> jax.Array:
  """Per-token NLL [B, S] from final hidden states h [B, S, d] and unembed [d, V].

  chunk_tokens = 0 (or >= B x S) projects the whole batch at once: [B, S, V] float32
  logits. Otherwise the sequence is cut into chunks of c = chunk_tokens // B positions
  (the last one zero-padded), each chunk [B, c] of every row is projected, log-softmaxed
  and reduced to its NLL in a `lax.map`, and `jax.checkpoint` makes the backward
  recompute each chunk's logits: at most [B, c, V] logits (and their gradient) are live.
  Chunks run along the sequence, so the batch axis keeps its data x expert split.
  """
  b, s, d = h.shape
  c = chunk_tokens // b if chunk_tokens else s
  if c >= s:
    return token_nll(unembed_logits(h, unembed), targets)
  if c < 1:
    raise ValueError(f"loss chunk of {chunk_tokens} tokens is smaller than the batch's {b} "
                     "rows; raise config.train.loss_chunk_tokens to at least the batch size")
  n = -(-s // c)
  pad = n * c - s
  h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  hc = parallel.constrain(h.reshape(b, n, c, d).swapaxes(0, 1),
                          (None, "batch", "length", "embed"))            # [n, B, c, d]
  tc = targets.reshape(b, n, c).swapaxes(0, 1)                           # [n, B, c]

  @jax.checkpoint
  def one_chunk(args: tuple[jax.Array, jax.Array]) -> jax.Array:
    h_i, t_i = args
    return token_nll(unembed_logits(h_i, unembed), t_i)                  # [B, c]

  nll = jax.lax.map(one_chunk, (hc, tc))                                 # [n, B, c]
  return nll.swapaxes(0, 1).reshape(b, n * c)[:, :s]


def compute_loss(model: Transformer, batch: Batch, rng: jax.Array, train: bool, *,
                 loss_chunk_tokens: int = 0, token_norm: jax.Array | None = None,
                 aux_weight: float = 1.0) -> tuple[jax.Array, dict[str, Any]]:
  """The one place that builds the differentiated scalar.

  loss = sum(NLL * weights) / token_norm
         + aux_weight * (sum of routers' (already weighted) aux losses
                         + policy_gradient_coef * REINFORCE surrogate of each layer whose
                           router returns log-probabilities (RL-R;
                           `routers.base.Router.policy_gradient_coef`))

  token_norm defaults to this batch's token count (max 1), aux_weight to 1: the mean NLL
  plus the aux losses. A microbatch of a larger batch (`make_train_step`) passes the whole
  batch's token count and 1 / microbatches, so the microbatches' losses sum to the batch's.
  The NLL is computed in chunks of `loss_chunk_tokens` tokens (`chunked_token_nll`).
  """
  h, layers = model.hidden(batch["inputs"], segment_ids=batch["segment_ids"],
                           positions=batch["positions"], train=train, rng=rng)
  w = batch["weights"]
  nll = chunked_token_nll(h, model.unembed[...], batch["targets"], loss_chunk_tokens)
  n_tokens = jnp.maximum(jnp.sum(w), 1.0) if token_norm is None else token_norm
  nll_mean = jnp.sum(nll * w) / n_tokens
  aux_total = jnp.zeros((), jnp.float32)
  aux_terms: dict[str, jax.Array] = {}
  for layer in layers:
    for name, value in layer["aux_losses"].items():
      aux_terms[name] = aux_terms.get(name, 0.0) + value
      aux_total += value
    if layer["log_probs"] is not None and train:
      keep = w.reshape(-1) > 0
      lp = layer["log_probs"].reshape(-1, layer["log_probs"].shape[-1])
      surrogate = reinforce_surrogate(jnp.where(keep[:, None], lp, 0.0),
                                      jnp.where(keep, -nll.reshape(-1), 0.0))
      aux_terms["reinforce"] = aux_terms.get("reinforce", 0.0) + surrogate
      aux_total += layer["policy_gradient_coef"] * surrogate
  out = {"nll": nll_mean, "nll_sum": jnp.sum(nll * w), "tokens": jnp.sum(w),
         "aux": aux_terms, "layers": [layer["metrics"] for layer in layers]}
  return nll_mean + aux_weight * aux_total, out


# ---------------------------------------------------------------- state
@dataclasses.dataclass
class Setup:
  """Everything fixed for a run: config, mesh, the model's graph, optimizer, shardings."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  graphdef: Any
  tx: optax.GradientTransformation
  state_shardings: dict[str, Any]
  abstract_state: dict[str, Any]


def prepare_config(config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh) -> ml_collections.ConfigDict:
  """Validates, and routes tokens in one group per data x expert device."""
  config_lib.validate(config)
  config = ml_collections.ConfigDict(config.to_dict())
  groups = mesh.shape["data"] * mesh.shape["expert"]
  if config.model.routing.num_groups == 1:
    config.model.routing.num_groups = groups
  parallel.validate_mesh(config, mesh)
  validate_microbatches(config, mesh)
  return config


def validate_microbatches(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Each microbatch must split over the data x expert devices and into the routing groups."""
  m, batch = config.train.microbatches, config.data.batch_size
  groups = mesh.shape["data"] * mesh.shape["expert"]
  rows = batch // m
  if rows % groups:
    raise config_lib.ConfigError(
        f"config.train.microbatches={m} leaves {rows} sequences per microbatch "
        f"(data.batch_size={batch} / {m}), not divisible by mesh.data x mesh.expert = "
        f"{groups}; make data.batch_size a multiple of microbatches x {groups}.")
  r = config.model.routing
  if r.num_experts > 1 and (rows * config.data.seq_len) % r.num_groups:
    raise config_lib.ConfigError(
        f"config.train.microbatches={m}: a microbatch's {rows} x {config.data.seq_len} tokens "
        f"do not split into model.routing.num_groups={r.num_groups} groups; use fewer "
        "microbatches or fewer groups.")


def _split(model: Transformer) -> tuple[Any, Any, Any]:
  return nnx.split(model, nnx.Param, ...)


def setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None) -> Setup:
  """Validates the config against the mesh and derives every sharding (ZeRO-1 included)."""
  mesh = mesh or parallel.make_mesh(config.mesh)
  config = prepare_config(config, mesh)
  with nnx.use_eager_sharding(False):
    abstract_model = nnx.eval_shape(lambda: Transformer(config.model, rngs=nnx.Rngs(0)))
  graphdef, abs_params, abs_other = _split(abstract_model)
  param_sh = parallel.mesh_shardings(mesh, nnx.get_partition_spec(abs_params))
  other_sh = parallel.mesh_shardings(mesh, nnx.get_partition_spec(abs_other))
  tx = make_optimizer(config.train)
  abs_opt = jax.eval_shape(tx.init, abs_params)
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  if config.train.zero1:
    opt_sh = optax.tree_map_params(
        # sh is an nnx.Param holding a NamedSharding: map inside it to keep the wrapper.
        tx, lambda leaf, sh: jax.tree.map(lambda x: parallel.add_data_axis(x, leaf.shape), sh),
        abs_opt, param_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: isinstance(x, nnx.Variable))
  else:
    opt_sh = optax.tree_map_params(tx, lambda leaf, sh: sh, abs_opt, param_sh,
                                   transform_non_params=lambda _: replicated,
                                   is_leaf=lambda x: isinstance(x, nnx.Variable))
  shardings = {"params": param_sh, "other": other_sh, "opt": opt_sh, "step": replicated}
  abstract = {"params": abs_params, "other": abs_other, "opt": abs_opt,
              "step": jax.ShapeDtypeStruct((), jnp.int32)}
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return Setup(config, mesh, graphdef, tx, shardings, abstract)


def init_state(s: Setup) -> dict[str, Any]:
  """Creates parameters and optimizer state directly in their shardings."""
  def init():
    with nnx.use_eager_sharding(False):
      model = Transformer(s.config.model, rngs=nnx.Rngs(params=s.config.train.seed))
    _, params, other = _split(model)
    return {"params": params, "other": other, "opt": s.tx.init(params),
            "step": jnp.zeros((), jnp.int32)}
  with jax.set_mesh(s.mesh):
    return jax.jit(init, out_shardings=s.state_shardings)()


def fit_routers_to_data(s: Setup, state: dict[str, Any],
                        token_counts: Callable[[], np.ndarray]) -> dict[str, Any]:
  """A fresh state whose routers' fixed variables are set from the train split's token
  counts (`Router.fit_to_data`; HASH's `frequency` table). `token_counts` is called only
  if some router wants the counts."""
  model = nnx.merge(s.graphdef, state["params"], state["other"])
  wanting = [r for r in model.routers() if r.wants_token_counts]
  if not wanting:
    return state
  counts = np.asarray(token_counts())
  for router in wanting:
    router.fit_to_data(counts)
  _, _, other = _split(model)
  return {**state, "other": jax.device_put(other, s.state_shardings["other"])}


def step_rng(seed: int, step: jax.Array) -> jax.Array:
  return jax.random.fold_in(jax.random.key(seed), step)


def update_router_state(graphdef: Any, params: Any, other: Any,
                        layers: list[dict[str, jax.Array]]) -> Any:
  """The `other` collection after each routed layer's router updated its non-trained
  state from that layer's step metrics (`routers.base.Router.update_state`; e.g. the
  loss-free bias). Runs in the train step after the optimizer update, outside the
  (rematerialised) forward; a router without state leaves `other` unchanged."""
  model = nnx.merge(graphdef, params, other)
  for i, metrics in zip(model.routed, layers):
    model.blocks[i].ffw.router.update_state(metrics)
  return _split(model)[2]


# ---------------------------------------------------------------- steps
def make_train_step(s: Setup) -> Callable[[dict[str, Any], Batch], tuple[dict[str, Any], dict]]:
  """The jitted step: state, batch -> new state, metrics (state buffers are donated)."""
  t = s.config.train
  schedule = make_schedule(t)

  def grad_fn(state, batch, rng, token_norm=None, aux_weight=1.0):
    def loss_fn(params):
      model = nnx.merge(s.graphdef, params, state["other"])
      return compute_loss(model, batch, rng, train=True,
                          loss_chunk_tokens=t.loss_chunk_tokens, token_norm=token_norm,
                          aux_weight=aux_weight)
    return jax.value_and_grad(loss_fn, has_aux=True)(state["params"])

  def step_fn(state, batch):
    rng = step_rng(t.seed, state["step"])
    if t.microbatches == 1:
      (loss, out), grads = grad_fn(state, batch, rng)
    else:
      (loss, out), grads = accumulate_grads(grad_fn, state, batch, rng, t.microbatches,
                                            s.state_shardings["params"])
    updates, opt = s.tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    other = update_router_state(s.graphdef, params, state["other"], out["layers"])
    metrics = {"loss": out["nll"], "total_loss": loss, "aux": out["aux"],
               "layers": out["layers"], "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state["step"])}
    return {"params": params, "other": other, "opt": opt,
            "step": state["step"] + 1}, metrics

  batch_sh = parallel.batch_sharding(s.mesh)
  return jax.jit(parallel.on_mesh(s.mesh, step_fn), in_shardings=(s.state_shardings, batch_sh),
                 out_shardings=(s.state_shardings, None), donate_argnums=(0,))


def accumulate_grads(grad_fn: Callable, state: dict[str, Any], batch: Batch, rng: jax.Array,
                     microbatches: int, param_shardings: Any) -> tuple[tuple[jax.Array, dict], Any]:
  """Gradient accumulation: the batch in `microbatches` pieces, summed with `lax.scan`.

  Microbatch j takes rows j, j + m, j + 2m, ... (m = microbatches), so each keeps the
  batch's data x expert split. Each microbatch's loss is its summed weighted NLL over the
  WHOLE batch's token count, plus its aux losses / m; the summed gradient is therefore
  exactly the full batch's for the NLL. Aux losses become the mean of per-microbatch
  values: equal to the full batch's only for routers whose choices are per token (HASH,
  dense); S-BASE (balanced per group) and top-k's balance loss see fewer tokens at a time,
  and stochastic routers (RL-R) draw with rng fold_in(step rng, j).
  Returns ((total loss, out as from compute_loss, nll over the batch), summed grads).
  """
  m = microbatches
  token_norm = jnp.maximum(jnp.sum(batch["weights"]), 1.0)
  micro = jax.tree.map(
      lambda x: parallel.constrain(x.reshape(x.shape[0] // m, m, *x.shape[1:]).swapaxes(0, 1),
                                   (None, "batch", "length")), batch)

  def body(acc, xs):
    mb, j = xs
    (loss, out), g = grad_fn(state, mb, jax.random.fold_in(rng, j), token_norm, 1.0 / m)
    return jax.tree.map(jnp.add, acc, g), (loss, out)

  zeros = jax.tree.map(jnp.zeros_like, state["params"])
  if parallel.active_mesh() is not None:
    zeros = jax.lax.with_sharding_constraint(zeros, param_shardings)
  grads, (losses, outs) = jax.lax.scan(body, zeros, (micro, jnp.arange(m)))
  mean = lambda tree: jax.tree.map(lambda x: jnp.mean(x, axis=0), tree)
  out = {"nll": jnp.sum(outs["nll_sum"]) / token_norm, "nll_sum": jnp.sum(outs["nll_sum"]),
         "tokens": jnp.sum(outs["tokens"]), "aux": mean(outs["aux"]),
         "layers": mean(outs["layers"])}
  return (jnp.sum(losses), out), grads


def make_eval_step(s: Setup) -> Callable[[dict[str, Any], Batch], dict[str, jax.Array]]:
  """Jitted evaluation: summed NLL and token count of one batch (no token is dropped
  unless `eval_capacity_factor` is set)."""
  def eval_fn(params, other, batch):
    model = nnx.merge(s.graphdef, params, other)
    _, out = compute_loss(model, batch, jax.random.key(0), train=False,
                          loss_chunk_tokens=s.config.train.loss_chunk_tokens)
    return {"nll_sum": out["nll_sum"], "tokens": out["tokens"], "layers": out["layers"]}
  return jax.jit(parallel.on_mesh(s.mesh, eval_fn),
                 in_shardings=(s.state_shardings["params"], s.state_shardings["other"],
                               parallel.batch_sharding(s.mesh)))


def make_probe_step(s: Setup) -> Callable[..., list[jax.Array]]:
  """Jitted: params, other, batch -> each routed layer's expert ids [B, S, K], routed in
  evaluation mode (`health.switched_share`)."""
  def probe_fn(params, other, batch):
    model = nnx.merge(s.graphdef, params, other)
    _, layers = model(batch["inputs"], segment_ids=batch["segment_ids"],
                      positions=batch["positions"], train=False)
    return [layer["expert_ids"] for layer in layers]
  return jax.jit(parallel.on_mesh(s.mesh, probe_fn),
                 in_shardings=(s.state_shardings["params"], s.state_shardings["other"],
                               parallel.batch_sharding(s.mesh)))


def to_global(s: Setup, batch: dict[str, np.ndarray]) -> Batch:
  """This host's share of a batch -> global arrays split over data x expert devices."""
  sh = parallel.batch_sharding(s.mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}


def smoothed_train_loss(history: list[float], start: int, num_steps: int,
                        metrics_path: str) -> float:
  """The mean training loss over the last 10% of the run's steps (steps > num_steps -
  num_steps // 10), the same window whether or not the run was resumed. `history` holds
  this invocation's every-step losses (steps start+1 ...); a run resumed inside the window
  adds the logged losses of its earlier steps there (every log_every-th step)."""
  first = num_steps - max(1, num_steps // 10)
  values = history[max(0, first - start):]
  if start > first:
    logged = {r["step"]: r["loss"] for r in read_jsonl(metrics_path, missing_ok=True)
              if r.get("loss") is not None}
    values = [v for step, v in sorted(logged.items()) if first < step <= start] + values
  return float(np.mean(values)) if values else float("nan")


def evaluate(s: Setup, eval_step, state: dict[str, Any],
             batches: list[dict[str, np.ndarray]]) -> dict[str, float]:
  """Validation NLL in nats/token over a fixed list of batches (the paper's metric)."""
  with jax.set_mesh(s.mesh):       # dispatch every batch, then fetch: one host sync
    outs = [eval_step(state["params"], state["other"], to_global(s, b)) for b in batches]
  outs = jax.device_get(outs)
  nll = sum(float(o["nll_sum"]) for o in outs)
  tokens = sum(float(o["tokens"]) for o in outs)
  return {"val_loss": nll / max(tokens, 1.0), "val_tokens": tokens}


# ---------------------------------------------------------------- loop
class _StopRequested:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

  def __init__(self):
    self.signum: int | None = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:   # not the main thread: rely on the caller
        pass
    return self

  def _handle(self, signum, frame):
    self.signum = signum

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def flatten_metrics(metrics: dict[str, Any], routed_layers: list[int]) -> dict[str, float]:
  """Nested step metrics -> flat scalars (per-expert loads become one entry per expert)."""
  flat = {"loss": metrics["loss"], "total_loss": metrics["total_loss"],
          "grad_norm": metrics["grad_norm"], "learning_rate": metrics["learning_rate"]}
  flat.update({f"aux/{k}": v for k, v in metrics["aux"].items()})
  for layer, m in zip(routed_layers, metrics["layers"]):
    for k, v in m.items():
      v = np.asarray(v)
      if v.ndim == 0:
        flat[f"router/block{layer}/{k}"] = v
      else:
        flat.update({f"router/block{layer}/{k}/{e}": x for e, x in enumerate(v)})
  return {k: float(v) for k, v in flat.items()}


class RouterHealth:
  """At each log step: each routed block's `max_share` and `switched` (on a fixed probe
  batch) and the collapse alarm (`routing_lm.health`)."""

  def __init__(self, s: Setup, routed: list[int], probe_batch: dict[str, np.ndarray],
               state: dict[str, Any]):
    t, r = s.config.train, s.config.model.routing
    self.alarm = health.CollapseAlarm(t.collapse_share, t.collapse_intervals)
    self.s, self.routed = s, routed
    self.top_k = expert_dims(r.num_experts, r.top_k, r.granularity, s.config.model.d_ff).top_k
    self.probe = make_probe_step(s) if routed else None
    self.batch, self.mask = to_global(s, probe_batch), probe_batch["weights"]
    self.previous = self._probe(state)

  def _probe(self, state: dict[str, Any]) -> list[np.ndarray]:
    if self.probe is None:
      return []
    with jax.set_mesh(self.s.mesh):
      return jax.device_get(self.probe(state["params"], state["other"], self.batch))

  def observe(self, step: int, state: dict[str, Any],
              layers: list[dict[str, np.ndarray]]) -> tuple[dict[str, float], list[str]]:
    """layers: the step's per-block metrics (host) -> (flat scalars, new alarm messages)."""
    shares = {b: health.max_share(m["load"], self.top_k) for b, m in zip(self.routed, layers)}
    current = self._probe(state)
    flat = {health.SHARE_KEY.format(b): v for b, v in shares.items()}
    flat.update({health.SWITCHED_KEY.format(b): health.switched_share(p, c, self.mask)
                 for b, p, c in zip(self.routed, self.previous, current)})
    self.previous = current
    return flat, self.alarm.update(step, shares)


def train(config: ml_collections.ConfigDict, workdir: str, pipeline: Any | None = None,
          stop_at: int | None = None) -> dict[str, Any]:
  """Trains (resuming from the workdir's latest checkpoint), evaluates, writes summary.json.

  `stop_at` ends this invocation after that step with a checkpoint, as a preemption
  would (the schedule still spans `train.num_steps`); rerunning resumes.
  """
  from routing_lm import data as data_lib
  start_time = time.time()
  s = setup(config)
  config, t = s.config, s.config.train
  pipe = pipeline or data_lib.make_pipeline(config.data)
  if pipe.vocab_size > config.model.vocab_size:
    raise config_lib.ConfigError(
        f"config.model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
        f"vocabulary ({pipe.vocab_size}); set it to at least {pipe.vocab_size}.")
  counts = counting.count(config.model, config.data.seq_len)
  ckpt = checkpoint.Checkpointer(workdir, config, t.checkpoint_every, t.keep_checkpoints)
  state = (ckpt.restore_latest(s.abstract_state)
           or fit_routers_to_data(s, init_state(s), lambda: pipe.token_counts()))
  start = int(state["step"])
  writer = MetricWriter(workdir, start)
  if start == 0:
    writer.write_config(config, counts.as_dict())
  else:
    log.info("resumed from step %d", start)
  earlier_seconds = writer.last_value("wall_seconds", up_to_step=start)
  train_step, eval_step = make_train_step(s), make_eval_step(s)
  val_batches = pipe.validation_batches(t.eval_batches)
  routed = routed_layer_indices(config.model.num_layers, config.model.routing.routing_frequency,
                                config.model.routing.num_experts)
  tokens_per_step = config.data.batch_size * config.data.seq_len
  router_health = RouterHealth(s, routed, val_batches[0], state)
  if start:
    router_health.alarm.replay(read_jsonl(writer.metrics_path, missing_ok=True), start)
  progress = Progress(t.num_steps, start)
  last_log_time, last_log_step = time.time(), start
  train_loss = float("nan")
  history: list[float] = []                 # every step's loss (this invocation)
  pending: list[jax.Array] = []             # losses not yet fetched from the device
  val, val_step = None, -1
  batches: Iterator = pipe.train_batches(start)
  with _StopRequested() as stop:
    for step in range(start, min(t.num_steps, stop_at or t.num_steps)):
      with jax.set_mesh(s.mesh):
        state, metrics = train_step(state, to_global(s, next(batches)))
      done = step + 1
      pending.append(metrics["loss"])
      if done % t.log_every == 0 or done == t.num_steps:
        host_metrics = jax.device_get(metrics)
        flat = flatten_metrics(host_metrics, routed)
        health_flat, alarms = router_health.observe(done, state, host_metrics["layers"])
        flat.update(health_flat)
        for message in alarms:
          log.warning(message)
          progress.note(f"WARNING {message}")
        train_loss = flat["loss"]
        window = [float(x) for x in jax.device_get(pending)]
        history.extend(window)
        pending.clear()
        flat["loss_avg"] = float(np.mean(window))       # mean over the logging window
        now = time.time()
        flat["wall_seconds"] = earlier_seconds + now - start_time
        flat["step_time"] = (now - last_log_time) / (done - last_log_step)
        flat["tokens_per_s"] = tokens_per_step / flat["step_time"]
        last_log_time, last_log_step = now, done
        writer.write(done, flat)
        progress.update(done, flat["loss"], flat["tokens_per_s"],
                        collapsed=router_health.alarm.active())
      if done % t.eval_every == 0 or done == t.num_steps:
        val, val_step = evaluate(s, eval_step, state, val_batches), done
        writer.write(done, val)
        progress.note(f"step {done}: val_loss {val['val_loss']:.4f}")
      ckpt.maybe_save(done, state, force=done in (t.num_steps, stop_at))
      if stop.signum is not None:
        ckpt.save_now(done, state)
        progress.note(f"signal {stop.signum}: saved step {done}; rerun the same command to resume")
        writer.close()
        ckpt.close()
        raise SystemExit(128 + stop.signum)
  progress.close()
  if int(state["step"]) < t.num_steps:      # stopped early (stop_at): resumable, no summary
    writer.close()
    ckpt.close()
    return {"steps": int(state["step"]), "train_loss": train_loss, "finished": False}
  if val_step != t.num_steps:               # the loop's last evaluation may already be final
    val = evaluate(s, eval_step, state, val_batches)
  smoothed = smoothed_train_loss(history, start, t.num_steps, writer.metrics_path)
  summary = {"config": json.loads(config.to_json()), **counts.as_dict(),
             "steps": int(state["step"]), "tokens": int(state["step"]) * tokens_per_step,
             "train_flops": counts.train_flops_per_token * int(state["step"]) * tokens_per_step,
             "train_loss": train_loss, "train_loss_smoothed": smoothed,
             "val_loss": val["val_loss"],
             "collapse_alarms": router_health.alarm.alarms,
             "wall_seconds": earlier_seconds + time.time() - start_time}
  writer.write_summary(summary)
  writer.close()
  ckpt.close()
  return summary


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """`--mode=eval`: the latest checkpoint's validation NLL."""
  from routing_lm import data as data_lib
  s = setup(config)
  ckpt = checkpoint.Checkpointer(workdir, s.config, 1, 1)
  state = ckpt.restore_latest(s.abstract_state, required=True)
  pipe = data_lib.make_pipeline(s.config.data)
  result = evaluate(s, make_eval_step(s), state,
                    pipe.validation_batches(s.config.train.eval_batches))
  result["step"] = int(state["step"])
  ckpt.close()
  return result
