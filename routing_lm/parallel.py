"""Meshes, THE table of logical-axis rules, and sharding helpers (ZeRO-1 included).

The model only names axes (`batch`, `embed`, `mlp`, `heads`, `expert`, ...); this module
alone maps those names onto the (data, expert, model) mesh. On one device every helper is
a no-op, so the same code runs from 1 CPU to a pod slice.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import ml_collections
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from routing_lm.errors import ConfigError
from routing_lm.expert_dims import expert_dims

MESH_AXES = ("data", "expert", "model")

# Logical axis -> mesh axes. Tokens are split over data x expert devices (expert devices
# process data too, as in GShard); the dispatch buffer's expert axis moves to `expert`
# (XLA lowers the change to an all-to-all); matmuls split over `model`.
RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "expert")),
    ("group", ("data", "expert")),      # token groups routed independently
    ("expert_group", "data"),           # token groups once experts own the `expert` axis
    ("expert", "expert"),
    ("length", None),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv", None),
    ("vocab", "model"),
    ("layers", None),
)
_RULES = dict(RULES)


def logical_to_spec(axes: Sequence[str | None]) -> P:
  """Logical names -> PartitionSpec via RULES (None = replicated).

  A name with no rule is an error, not a silent replication: a missing rule costs
  memory and speed without failing anything else.
  """
  unknown = [a for a in axes if a is not None and a not in _RULES]
  if unknown:
    raise ValueError(f"logical axis name(s) {unknown} in {tuple(axes)} have no rule in "
                     f"routing_lm.parallel.RULES (known: {sorted(_RULES)}); add a rule "
                     "mapping each to mesh axes, or None to replicate.")
  return P(*(_RULES[a] if a is not None else None for a in axes))


def active_mesh() -> jax.sharding.AbstractMesh | None:
  """The multi-device mesh being traced under, or None (no mesh, or one device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or math.prod(mesh.axis_sizes) == 1:
    return None
  return mesh


def target_platform() -> str:
  """The platform being compiled for: the context mesh's devices ("tpu" when compiling for a
  TPU topology on a CPU host), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op without a multi-device mesh."""
  if active_mesh() is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes))


def on_mesh(mesh: jax.sharding.Mesh, fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` traced with `mesh` as the context mesh, so `constrain` applies inside `jax.jit`
  even when the caller did not enter `jax.set_mesh(mesh)` (without it every constraint
  would silently be a no-op and the expert exchange would not be an all-to-all)."""
  @functools.wraps(fn)
  def traced_on_mesh(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced_on_mesh


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """The (data, expert, model) sizes for `num_devices`; one -1 entry takes the rest."""
  given = {a: int(mesh_cfg[a]) for a in MESH_AXES}
  shape = list(given.values())
  for axis, size in given.items():
    if size == 0 or size < -1:
      raise ConfigError(f"config.mesh.{axis}={size} is invalid: a positive size, or -1 for "
                        "'the remaining devices'.")
  if shape.count(-1) > 1:
    raise ConfigError(f"config.mesh={given} has more than one -1; at most one axis can take "
                      "the remaining devices.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ConfigError(f"config.mesh={given}: the fixed axes ({known}) do not divide the "
                        f"{num_devices} devices; make them divide it.")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ConfigError(f"config.mesh={given} needs {math.prod(shape)} devices but "
                      f"{num_devices} are present; make data*expert*model = {num_devices} "
                      "or set one axis to -1.")
  return tuple(shape)


def make_mesh(mesh_cfg: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A (data, expert, model) mesh with Auto axes over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh(mesh_shape(mesh_cfg, len(devices)), MESH_AXES,
                       axis_types=(AxisType.Auto,) * 3, devices=devices)


def validate_mesh(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
  """Checks that the model and batch split evenly over the mesh; errors say how to fix."""
  r, m = config.model.routing, config.model
  groups = mesh.shape["data"] * mesh.shape["expert"]
  dims = expert_dims(r.num_experts, r.top_k, r.granularity, m.d_ff)
  if r.num_experts > 1 and dims.num_experts % mesh.shape["expert"]:
    raise ConfigError(f"config.model.routing.num_experts={r.num_experts} (x granularity "
                      f"{r.granularity}) is not divisible by mesh.expert={mesh.shape['expert']}; "
                      "choose an expert count that is a multiple of the expert axis.")
  if config.data.batch_size % groups:
    raise ConfigError(f"config.data.batch_size={config.data.batch_size} is not divisible by "
                      f"mesh.data x mesh.expert = {groups}; use a multiple of {groups}.")
  if r.num_experts > 1 and r.num_groups % groups:
    raise ConfigError(f"config.model.routing.num_groups={r.num_groups} must be a multiple of "
                      f"mesh.data x mesh.expert = {groups} (token groups follow the devices).")
  for field, size in (("num_heads", m.num_heads), ("d_ff", dims.d_expert),
                      ("vocab_size", m.vocab_size)):
    if size % mesh.shape["model"]:
      raise ConfigError(f"config.model.{field}={getattr(m, field)} does not split over "
                        f"mesh.model={mesh.shape['model']}; use a multiple of it.")


def mesh_shardings(mesh: jax.sharding.Mesh, logical_specs: Any) -> Any:
  """A tree of logical PartitionSpecs (nnx.get_partition_spec) -> NamedShardings on `mesh`."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, logical_to_spec(tuple(spec))),
                      logical_specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batches [batch, seq] are split over data x expert devices."""
  return NamedSharding(mesh, logical_to_spec(("batch", "length")))


def add_data_axis(sharding: NamedSharding, shape: Sequence[int]) -> NamedSharding:
  """ZeRO-1: also split over `data` on the first dimension where it divides evenly.

  The optimizer state of a parameter keeps the parameter's sharding plus `data`; the
  parameter itself stays replicated over `data` (MaxText's rule).
  """
  mesh = sharding.mesh
  n_data = mesh.shape["data"]
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  used = {a for s in spec if s is not None for a in (s if isinstance(s, tuple) else (s,))}
  if n_data == 1 or "data" in used:
    return sharding
  for i, (dim, s) in enumerate(zip(shape, spec)):
    axes = () if s is None else (s if isinstance(s, tuple) else (s,))
    split = math.prod(mesh.shape[a] for a in axes)
    if dim % (split * n_data) == 0:
      spec[i] = axes + ("data",) if axes else "data"
      return NamedSharding(mesh, P(*spec))
  return sharding
