"""Device meshes, partition rules, and the placement of batches and train states on them.

The mesh has the named axes `('data', 'fsdp', 'tensor')`, sized by `mesh.data`, `mesh.fsdp` and
`mesh.tensor` (−1: all remaining devices). Batches are split along their leading axis over
`('data', 'fsdp')`. Parameters are placed by one table, `mesh.rules`: (regex, spec) pairs,
searched in order against each parameter's path (`autoencoder/decoder/conv_out/kernel`,
`unet/down_blocks_0/resnets_0/conv1/kernel`); the first match decides, unmatched parameters are
replicated. A spec is

    'fsdp'         shard the largest dimension divisible by the `fsdp` axis size over `fsdp`;
                   parameters smaller than `mesh.fsdp_min_size` elements, or with no divisible
                   dimension, are replicated (ZeRO-3 / FSDP: XLA gathers them where they are used);
    'replicate'    a full copy on every device;
    a tuple        a `PartitionSpec` per dimension: None, an axis name, or a tuple of axis names,
                   e.g. `(None, 'tensor')` splits a Dense kernel's output features.

The default table `(('.*', 'fsdp'),)` is plain data parallelism when `mesh.fsdp` is 1. Optimizer
states and EMA copies follow their parameter: an optax state leaf whose path ends with a
parameter's path and has its shape (Adam's `mu/unet/…/kernel`) gets that parameter's sharding;
every other leaf (step, counters, RNG) is replicated. The same code runs on one CPU device, on 8
simulated devices and on a multi-host mesh, because every array is placed through
`NamedSharding`s of this one mesh.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ldm_jax.config.mesh import DEFAULT_FSDP_MIN_SIZE, DEFAULT_RULES, MESH_AXES, parse_rules

BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves the −1 entry of `mesh.*` against `num_devices`; ValueError names the key."""
  sizes = {axis: mesh_cfg.get(axis, 1) for axis in MESH_AXES}
  for axis, size in sizes.items():
    if isinstance(size, bool) or not isinstance(size, int) or size == 0 or size < -1:
      raise ValueError(f"mesh.{axis}: {size!r} is not a valid axis size (a positive int or -1).")
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {', '.join('mesh.' + a for a in free)}.")
  known = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % known:
      raise ValueError(f"mesh.{free[0]}: the other axes use {known} devices, which does not divide "
                       f"the {num_devices} available devices.")
    sizes[free[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ValueError(f"mesh: {' × '.join(f'mesh.{a}={s}' for a, s in sizes.items())} = "
                     f"{math.prod(sizes.values())} devices, but {num_devices} are available.")
  return tuple(sizes[axis] for axis in MESH_AXES)


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices=None) -> Mesh:
  """Builds the `('data', 'fsdp', 'tensor')` mesh over `devices` (default: all devices of all
  processes). On TPU the device order follows the physical topology (`mesh_utils`)."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def check_batch_size(batch_size: int, mesh: Mesh, key: str = "train.batch_size", *,
                     grad_accum_steps: int = 1) -> None:
  """ValueError naming `key` unless the global batch splits evenly over devices, processes and
  (with gradient accumulation) micro-batches."""
  size = data_parallel_size(mesh)
  if batch_size % size:
    raise ValueError(f"{key}: {batch_size} is not divisible by the {size} data-parallel devices of the mesh "
                     f"(mesh.data × mesh.fsdp).")
  if batch_size % jax.process_count():
    raise ValueError(f"{key}: {batch_size} is not divisible by the {jax.process_count()} processes.")
  if (batch_size // size) % grad_accum_steps:
    raise ValueError(f"train.grad_accum_steps: {grad_accum_steps} micro-batches do not divide the "
                     f"{batch_size // size} examples per device ({key}={batch_size} over {size} devices).")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put(x, sharding: NamedSharding) -> jax.Array:
  """A host array (the same on every process) → a global array placed with `sharding`."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


# ---- partition rules ----------------------------------------------------------------------------

def path_str(path) -> str:
  """A pytree key path as 'a/b/0/c' (dict keys, attribute names and sequence indices)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      parts.append(str(getattr(k, "key", k)))
  return "/".join(parts)


def _fsdp_spec(shape, axis_size: int, min_size: int) -> tuple:
  if axis_size == 1 or math.prod(shape) < max(min_size, 1):
    return ()
  candidates = [d for d, n in enumerate(shape) if n % axis_size == 0]
  if not candidates:
    return ()
  dim = max(candidates, key=lambda d: (shape[d], d))  # the largest; ties: the later dimension
  return (None,) * dim + ("fsdp",)


def _check_spec(spec: tuple, shape, mesh: Mesh, rule_key: str, path: str) -> None:
  if len(spec) > len(shape):
    raise ValueError(f"{rule_key}: spec {spec} has {len(spec)} entries, but {path} has shape {tuple(shape)}.")
  for dim, entry in enumerate(spec):
    axes = entry if isinstance(entry, tuple) else (entry,)
    size = math.prod(mesh.shape[a] for a in axes if a is not None)
    if shape[dim] % size:
      raise ValueError(f"{rule_key}: dimension {dim} of {path} {tuple(shape)} is not divisible by the "
                       f"{size} devices of mesh axes {entry!r}.")


def partition_specs(mesh: Mesh, tree, rules=DEFAULT_RULES, *, fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE,
                    prefix: str = ""):
  """The PartitionSpec of every leaf of a parameter tree (arrays or ShapeDtypeStructs).

  Paths are matched as `prefix/path` when `prefix` is given (the frozen autoencoder of stage 2 is
  matched as `autoencoder/…`, as it was in its own run). Errors name the rule and the parameter.
  """
  parsed = parse_rules(rules)

  def spec_of(path, leaf):
    name = "/".join(p for p in (prefix, path_str(path)) if p)
    shape = np.shape(leaf)
    for i, (regex, spec) in enumerate(parsed):
      if regex.search(name):
        if spec == "fsdp":
          return P(*_fsdp_spec(shape, mesh.shape["fsdp"], fsdp_min_size))
        _check_spec(spec, shape, mesh, f"mesh.rules[{i}]", name)
        return P(*spec)
    return P()

  return jax.tree_util.tree_map_with_path(spec_of, tree)


def tree_sharding(mesh: Mesh, tree, rules=DEFAULT_RULES, *, fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE,
                  prefix: str = ""):
  """NamedShardings of a parameter tree by the partition rules (see `partition_specs`)."""
  specs = partition_specs(mesh, tree, rules, fsdp_min_size=fsdp_min_size, prefix=prefix)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def rules_of(mesh_cfg: ml_collections.ConfigDict) -> dict:
  """`rules` and `fsdp_min_size` keyword arguments from the `mesh` config section."""
  return dict(rules=mesh_cfg.get("rules", DEFAULT_RULES),
              fsdp_min_size=mesh_cfg.get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE))


def state_sharding(mesh: Mesh, abstract_state, params=None, *, rules=DEFAULT_RULES,
                   fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE):
  """The sharding of every leaf of a train state.

  `params` is the parameter subtree of `abstract_state` (default: `abstract_state.params`). Leaves
  whose path ends with a parameter's path and that have its shape (the parameters themselves,
  EMA copies, Adam moments) get that parameter's sharding; the rest are replicated.
  """
  params = abstract_state.params if params is None else params
  specs = partition_specs(mesh, params, rules, fsdp_min_size=fsdp_min_size)
  by_path = {}
  for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(
      specs, is_leaf=lambda x: isinstance(x, P))):
    by_path[path_str(path)] = (tuple(np.shape(leaf)), spec)

  def sharding_of(path, leaf):
    parts = path_str(path).split("/")
    for i in range(len(parts)):
      match = by_path.get("/".join(parts[i:]))
      if match is not None and match[0] == tuple(np.shape(leaf)):
        return NamedSharding(mesh, match[1])
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(sharding_of, abstract_state)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Turns this process's numpy batch into global arrays split over the data-parallel axes.

  Non-numeric entries (captions) stay on the host: they are tokenized before the step.
  """
  sharding = batch_sharding(mesh)
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in batch.items() if np.asarray(value).dtype.kind in "biuf"}
