"""The one checkpoint helper: orbax for the train state, grain's handler for the data iterator.

A checkpoint `workdir/checkpoints/<step>/` holds two items: `state` (the whole train state —
params, optimizer state, EMA, step, RNG, scale_factor — restored directly into the shardings of
the abstract state it is given) and `data` (each process's grain iterator position, one JSON
file per process), so that a resumed run sees exactly the batches it would have seen.
Saving is asynchronous: the step loop goes on while the arrays are written; every process
writes its own shards and orbax commits a step only when all of them are on disk (a killed run
leaves a temporary directory that is ignored). Restoring falls back to the previous step when
the newest cannot be read, and places the arrays on whatever mesh the resumed run uses.
"""

from __future__ import annotations

import json
import os
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from ldm_jax.runtime import distributed


class Checkpointer:
  """Saves and restores (state, data iterator) pairs under `directory`, keeping the newest few."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True, this_process_only: bool = False):
    """`this_process_only`: host arrays written by this process alone, without waiting for the others
    (e.g. process 0 writing a converted model while the others wait for it)."""
    self.directory = os.path.abspath(directory)
    alone = {}
    if this_process_only:  # orbax creates the directory only with every process taking part
      os.makedirs(self.directory, exist_ok=True)
      alone = {"multiprocessing_options": ocp.options.MultiprocessingOptions(
          primary_host=jax.process_index(), active_processes={jax.process_index()})}
    # The directories of a step are created before `save` returns, the other processes waiting in a
    # barrier until process 0 has made them. With orbax's default (created in the background) a
    # process waits instead for a signal keyed by its own count of orbax saves, and a save made by
    # one process alone (`this_process_only`: the import of a pretrained model on process 0) puts
    # process 0 one save ahead: the others then waited for nothing and wrote their data position
    # into a directory that did not exist yet (ENOENT under load; tests/multihost/test_checkpoint_race.py).
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not this_process_only,
                                           enable_async_checkpointing=async_save,
                                           async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
                                           **alone)
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

  def restore(self, abstract_state, data_iterator=None, step: int | None = None, *, unread: tuple = ()):
    """Restores checkpoint `step` (default: the newest good one) into `abstract_state`'s shapes
    and shardings; None when there is no checkpoint.

    `unread`: key paths (tuples) of subtrees that checkpoints of an older layout hold and
    `abstract_state` no longer has (the EMA of frozen text encoders). A checkpoint holding one of
    them is read partially: the subtrees of `abstract_state` (a missing one fails), nothing else.
    Without it, any difference of layout fails (ValueError naming the path).

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s with shardings (from `jax.eval_shape`);
    the data iterator, when given, is moved in place to the saved position. The shardings may
    differ from those the checkpoint was written with (another mesh shape, other rules).

    Without `step`, checkpoints are tried newest first: one that cannot be read (half-written,
    truncated, damaged) is skipped with a warning and renamed `<step>.corrupt-<time>` once an
    older one restores, so that the run can write that step again. If none restores (e.g. the
    config no longer matches the checkpoints), ValueError naming the directory, with the newest
    one's error.
    """
    if step is not None:
      return self._restore(step, abstract_state, data_iterator, unread)
    failed = []
    for candidate in sorted(self.all_steps(), reverse=True):
      problem = self._agree(self._check_readable(candidate) or self._check_params(candidate, abstract_state))
      if problem is None:
        try:
          state = self._restore(candidate, abstract_state, data_iterator, unread)
        except Exception as e:  # noqa: BLE001 — any damage must fall back to the previous step
          if jax.process_count() > 1:
            raise  # the other processes wait in orbax's barrier: no consistent fallback possible
          problem = f"{type(e).__name__}: {e}"
        else:
          self._quarantine([s for s, _ in failed])
          return state
      logging.warning("Checkpoint %d in %s cannot be restored, trying the previous one: %s",
                      candidate, self.directory, problem[:500])
      failed.append((candidate, problem))
    if failed:
      raise ValueError(f"{self.directory}: none of the checkpoints {[s for s, _ in failed]} could be "
                       f"restored (does the config match the run's?); the newest failed with: "
                       f"{failed[0][1][:2000]}")
    return None

  def restore_or_close(self, abstract_state, data_iterator=None, *, unread: tuple = ()):
    """`restore`, closing the checkpointer when it raises: a caller that stops on the error leaves
    no background thread of orbax behind to fail noisily at exit."""
    try:
      return self.restore(abstract_state, data_iterator, unread=unread)
    except BaseException:
      self.close()
      raise

  def _restore(self, step: int, abstract_state, data_iterator, unread: tuple = ()):
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    older = bool(unread) and self._holds_any(step, unread)
    if older:  # an older layout: the state's own subtrees are read by the item's handler directly
      logging.info("Checkpoint %d in %s: not reading %s (no longer part of the state).", step, self.directory,
                   ", ".join(".".join(path) for path in unread))
      state = _restore_tree(epath.Path(self.directory) / str(step) / "state", abstract_state)
      del items["state"]
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(step, args=ocp.args.Composite(**items)) if items else {}
    logging.info("Restored checkpoint %d from %s", step, self.directory)
    return state if older else restored["state"]

  def _holds_any(self, step: int, paths: tuple) -> bool:
    """Whether the `state` item of checkpoint `step` has a subtree at any of the key `paths`."""
    tree = _metadata(os.path.join(self.directory, str(step), "state"))
    for path in paths:
      node = tree
      for key in path:
        node = node.get(key) if isinstance(node, dict) else None
      if node is not None:
        return True
    return False

  def _check_readable(self, step: int) -> str | None:
    """Cheap local checks every process can make before the collective restore: the metadata
    files parse. Returns what is wrong, or None."""
    path = os.path.join(self.directory, str(step))
    for relative in ("_CHECKPOINT_METADATA", os.path.join("state", "_METADATA")):
      try:
        with open(os.path.join(path, relative)) as f:
          json.load(f)
      except (OSError, ValueError) as e:
        return f"{relative}: {type(e).__name__}: {e}"
    return None

  def _check_params(self, step: int, abstract_state) -> str | None:
    """The parameter shapes the checkpoint's metadata records against `abstract_state.params`:
    a config of another model is found here, before orbax starts reading arrays (when one of its
    concurrent reads fails, the others print thousands of lines of tracebacks)."""
    params = abstract_state.get("params") if isinstance(abstract_state, dict) else getattr(abstract_state, "params", None)
    if not isinstance(params, dict):
      return None
    try:
      saved = _metadata(os.path.join(self.directory, str(step), "state"))["params"]
    except Exception:  # noqa: BLE001 — damage is for the restore to find and report
      return None
    want, have = _shapes(params), _shapes(saved)
    for key in sorted(want.keys() | have.keys()):
      if want.get(key) != have.get(key):
        return (f"params{key}: shape {want.get(key)} in this config, {have.get(key)} in the checkpoint (None: "
                "absent); the config does not describe the model of these checkpoints")
    return None

  def _agree(self, problem: str | None) -> str | None:
    """A problem seen by any process is a problem for all, so that all skip the same steps."""
    if jax.process_count() == 1:
      return problem
    flags = multihost_utils.process_allgather(np.int32(problem is not None))
    if problem is None and np.any(flags):
      return f"unreadable on process(es) {np.flatnonzero(flags).tolist()}"
    return problem

  def _quarantine(self, steps: list[int]) -> None:
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        target = os.path.join(self.directory, f"{step}.corrupt-{int(time.time())}")
        os.rename(os.path.join(self.directory, str(step)), target)
        logging.warning("Moved unreadable checkpoint %d to %s", step, target)
    if jax.process_count() > 1:
      distributed.barrier("checkpoint_quarantine")
    self._manager.reload()

  def restore_subtree(self, keys: tuple[str, ...], sharding, step: int | None = None):
    """Restores only `state[keys[0]][keys[1]]…` (e.g. a frozen model's params) onto `sharding`.

    Reads the shapes from the checkpoint's own metadata, so the caller needs no abstract state
    of the run that wrote it, and the optimizer state is never read. `sharding` is one sharding
    for every leaf, or a function from the subtree of ShapeDtypeStructs to a tree of shardings
    (e.g. the partition rules, `sharding.tree_sharding`).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{self.directory}: no checkpoint to restore.")
    path = epath.Path(self.directory) / str(step) / "state"
    tree = _metadata(path)
    for key in keys:
      tree = tree[key]
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
    shardings = sharding(abstract) if callable(sharding) else jax.tree.map(lambda _: sharding, abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    for key in reversed(keys):
      abstract = {key: abstract}
    restored = _restore_tree(path, abstract)
    for key in keys:
      restored = restored[key]
    return restored

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _restore_tree(path, abstract):
  """The arrays of `abstract` (ShapeDtypeStructs with shardings) from a saved `state` item, leaving the
  item's other subtrees unread."""
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.restore(path, args=ocp.args.PyTreeRestore(
        item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True))
  finally:
    handler.close()


def _metadata(path) -> dict:
  """The tree of array metadata (shape, dtype) of a saved `state` item, read without its arrays."""
  # The item's handler reads the item directly; the Checkpointer wrappers would also look for
  # step metadata inside the item directory and warn that it is missing (it is one level up).
  handler = ocp.PyTreeCheckpointHandler()
  try:
    return handler.metadata(epath.Path(path)).tree
  finally:
    handler.close()


def _shapes(tree) -> dict[str, tuple]:
  return {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def abstract_like(state, shardings):
  """ShapeDtypeStructs of `state` placed with `shardings` (same tree), for restoring."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
