"""The one checkpoint helper: orbax for the train state, grain's handler for the data iterator.

A checkpoint `workdir/checkpoints/<step>/` holds two items: `state` (the whole train state —
params, optimizer state, EMA, step, RNG, scale_factor — restored directly into the shardings of
the abstract state it is given) and `data` (each process's grain iterator position, one JSON
file per process), so that a resumed run sees exactly the batches it would have seen.
Saving is asynchronous: the step loop goes on while the arrays are written.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


class Checkpointer:
  """Saves and restores (state, data iterator) pairs under `directory`, keeping the newest few."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    """Starts saving `state` (and the iterator position) as checkpoint `step`; returns whether it did."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state, data_iterator=None, step: int | None = None):
    """Restores checkpoint `step` (default: the newest) into `abstract_state`'s shapes and shardings.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s with shardings (from `jax.eval_shape`);
    the data iterator, when given, is moved in place to the saved position.
    Returns the restored state, or None when there is no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return None
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("Restored checkpoint %d from %s", step, self.directory)
    return restored["state"]

  def restore_subtree(self, keys: tuple[str, ...], sharding, step: int | None = None):
    """Restores only `state[keys[0]][keys[1]]…` (e.g. a frozen model's params) onto `sharding`.

    Reads the shapes from the checkpoint's own metadata, so the caller needs no abstract state
    of the run that wrote it, and the optimizer state is never read.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no checkpoint to restore.")
    path = os.path.join(self.directory, str(step), "state")
    tree = ocp.StandardCheckpointer().metadata(path).item_metadata.tree
    for key in keys:
      tree = tree[key]
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree)
    for key in reversed(keys):
      abstract = {key: abstract}
    restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True))
    for key in keys:
      restored = restored[key]
    return restored

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` placed with `shardings` (same tree), for restoring."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
