"""Device meshes and the placement of batches and train states on them.

The mesh has the named axes `('data', 'fsdp')`, sized by the config keys `mesh.data` and
`mesh.fsdp`, where −1 means "all remaining devices". Batches are split along their leading
axis over both axes; parameters and optimizer state are replicated (data parallelism).
The same code runs on one CPU device, on 8 simulated devices and on a multi-host mesh,
because every array is placed through `NamedSharding`s of this one mesh.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves the −1 entries of `mesh.*` against `num_devices`; ValueError names the key."""
  sizes = {axis: int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES}
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {', '.join('mesh.' + a for a in free)}.")
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(f"mesh.{axis}: {size} is not a valid axis size (a positive int or -1).")
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
  """Builds the `('data', 'fsdp')` mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def check_batch_size(batch_size: int, mesh: Mesh, key: str = "train.batch_size") -> None:
  """ValueError naming `key` unless the global batch splits evenly over devices and processes."""
  size = data_parallel_size(mesh)
  if batch_size % size:
    raise ValueError(f"{key}: {batch_size} is not divisible by the {size} data-parallel devices of the mesh.")
  if batch_size % jax.process_count():
    raise ValueError(f"{key}: {batch_size} is not divisible by the {jax.process_count()} processes.")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data-parallel axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def state_sharding(mesh: Mesh, abstract_state):
  """The sharding of every leaf of a train state: replicated (pure data parallelism)."""
  return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Turns this process's numpy batch into global arrays split over the data-parallel axes.

  Non-numeric entries (captions) stay on the host: they are tokenized before the step.
  """
  sharding = batch_sharding(mesh)
  return {key: jax.make_array_from_process_local_data(sharding, value)
          for key, value in batch.items() if np.asarray(value).dtype.kind in "biuf"}
