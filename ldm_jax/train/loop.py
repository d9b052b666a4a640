"""Pieces of the train step and loop shared by both trainers.

Inside the jitted step:
  - `accumulate_gradients` splits the batch into `train.grad_accum_steps` micro-batches and sums
    their gradients with `lax.scan`, so that only one micro-batch of activations is alive at once;
  - `all_finite` / `keep_if` skip an update whose loss, gradients or updates are not finite: the step
    counter and the RNG advance, parameters, optimizer state and EMA stay as they were.
On the host:
  - `NonFiniteMonitor` stops the run after `train.max_nonfinite_steps` skipped steps in a row;
  - `summarize` averages a window of step metrics for the logs and counts the skipped steps;
    `write_train_scalars` writes them with the throughput and `InputMonitor`'s input statistics
    (the fraction of the time spent waiting for data, records the pipeline dropped);
    `write_eval_scalars`: evaluation scores; `due` says whether a periodic action (log, eval, images, checkpoint) runs at a step;
    `compile_ahead` compiles a train step in a thread while the state is built;
    `running` wraps the loop (SIGTERM guard, closing its outputs) and `checkpoint_or_stop` saves
    checkpoints and answers a SIGTERM; `save_config_once` writes config.json after the first step;
  - `entry_point` is the whole `main` of `train_autoencoder.py` and `train_diffusion.py`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags, logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from ldm_jax.config import common as config_lib
from ldm_jax.data.pipeline import SKIP_REASONS, describe_skipped, skipped_counts
from ldm_jax.runtime import distributed
from ldm_jax.runtime import sharding as sharding_lib
from ldm_jax.runtime.logging import setup_logging
from ldm_jax.runtime.preemption import PreemptionGuard

NONFINITE = "nonfinite"  # the metric key of the skip flag (1.0 when the update was skipped)


def split_micro_batches(batch: dict, num: int, mesh=None) -> dict:
  """[B, …] → [num, B/num, …], micro-batch k = examples k, k + num, k + 2·num, …

  Interleaving keeps every micro-batch spread over all data-parallel devices: each device's
  contiguous block of the batch holds B/(num·devices) examples of every micro-batch, so the split
  moves no data between devices.
  """
  def split(x):
    x = x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1)
    if mesh is not None:
      x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, sharding_lib.BATCH_AXES)))
    return x
  return jax.tree.map(split, batch)


def accumulate_gradients(grad_fn: Callable, params, batch: dict, rng: jax.Array, num_micro_batches: int, *,
                         mesh=None, grad_sharding=None):
  """Mean gradients and metrics of `grad_fn` over `num_micro_batches` micro-batches of `batch`.

  grad_fn(params, micro_batch, rng) → (grads, metrics), metrics a dict of scalars. With one
  micro-batch this is just `grad_fn(params, batch, rng)`; otherwise micro-batch k uses
  `jax.random.split(rng, num)[k]`. `grad_sharding` (the parameters' shardings) keeps the running
  sum sharded like the parameters, as FSDP needs.
  """
  if num_micro_batches == 1:
    return grad_fn(params, batch, rng)
  micro = split_micro_batches(batch, num_micro_batches, mesh)
  rngs = jax.random.split(rng, num_micro_batches)
  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(grad_fn, params, first, rngs[0])
  constrain = lambda g: g if grad_sharding is None else jax.lax.with_sharding_constraint(g, grad_sharding)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  zeros = (constrain(zeros[0]), zeros[1])

  def body(total, inputs):
    micro_batch, micro_rng = inputs
    grads, metrics = grad_fn(params, micro_batch, micro_rng)
    total = jax.tree.map(jnp.add, total, (constrain(grads), metrics))
    return (constrain(total[0]), total[1]), None

  (grads, metrics), _ = jax.lax.scan(body, zeros, (micro, rngs))
  return jax.tree.map(lambda x: x / num_micro_batches, (grads, metrics))


def all_finite(*trees) -> jax.Array:
  """A bool scalar: every element of every tree is finite.

  Computed as finite global norms, so a tree whose squared norm overflows float32 (elements
  beyond ~1e19, a diverged step anyway) counts as non-finite too. Per-leaf `all(isfinite(x))`
  flags would make XLA's CPU compile of a whole train step about ten times slower.
  """
  ok = jnp.asarray(True)
  for tree in trees:
    ok = ok & jnp.isfinite(optax.tree.norm(tree))
  return ok


def keep_if(ok: jax.Array, new, old):
  """`new` where `ok`, else `old`, leaf by leaf (same structure)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


class NonFiniteError(RuntimeError):
  """Raised when `train.max_nonfinite_steps` steps in a row were skipped."""


class NonFiniteMonitor:
  """Counts consecutive skipped steps from the steps' `nonfinite` flags, one step behind.

  `push(step, metrics)` is called right after step `step` is dispatched and reads the flag of
  the step before, which has finished or is about to: the device never waits for the host.
  """

  def __init__(self, max_steps: int):
    self.max_steps = max_steps
    self.streak = 0
    self._pending = None
    self._first = None

  def push(self, step: int, metrics: dict) -> None:
    previous, self._pending = self._pending, (step, metrics[NONFINITE])
    if previous is not None:
      self._check(*previous)

  def flush(self) -> None:
    if self._pending is not None:
      self._check(*self._pending)
      self._pending = None

  def _check(self, step: int, flag) -> None:
    if float(jax.device_get(flag)) > 0:
      self._first = step if self.streak == 0 else self._first
      self.streak += 1
      if self.streak >= self.max_steps:
        raise NonFiniteError(
            f"train.max_nonfinite_steps: {self.streak} steps in a row (steps {self._first}–{step}) had a "
            f"non-finite loss or gradient; their updates were skipped and the run stops here. "
            f"Checkpoints hold the parameters of the last finite update; lower the learning rate, "
            f"use train.dtype='float32', or check the data before resuming.")
    else:
      self.streak = 0


def summarize(window: list[dict]) -> dict[str, float]:
  """Means of a window of fetched step metrics as `train/<key>`, over the steps that updated.

  Keys missing from some steps (GAN terms before `loss.disc_start`) are averaged over the steps
  that have them. `train/skipped_steps` counts the skipped steps of the window; when every step
  was skipped the means are NaN.
  """
  kept = [m for m in window if not float(m.get(NONFINITE, 0.0)) > 0]
  keys = [k for k in window[-1] if k != NONFINITE]
  scalars = {}
  for key in keys:
    values = [float(m[key]) for m in kept if key in m]
    scalars[f"train/{key}"] = float(np.mean(values)) if values else float("nan")
  scalars["train/skipped_steps"] = float(len(window) - len(kept))
  return scalars


def due(step: int, every: int, num_steps: int) -> bool:
  """Whether a periodic action with period `every` runs at `step` (the last step always runs it;
  `every` = 0: never, e.g. `train.image_every=0` draws no sample grids)."""
  return every > 0 and (step % every == 0 or step == num_steps)


def compile_ahead(jitted, *args) -> concurrent.futures.Future:
  """Compiles `jitted` for `args` (arrays or `jax.ShapeDtypeStruct`s with shardings) in a thread and
  returns at once; a later call of `jitted` on arguments of these shapes and shardings reuses the
  executable. Stage 2 compiles its train step this way while a new state initialises: the two
  compiles overlap (a 3-step run of the demo's stage 2 took 75 instead of 90 s; stage 1's two
  compiles gained nothing, they keep both cores busy already). `.result()` waits for it and
  raises its error, if any."""
  executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile_ahead")
  future = executor.submit(lambda: jitted.lower(*args).compile())
  executor.shutdown(wait=False)  # the thread ends with the compile
  return future


class InputMonitor:
  """The input side of a training loop: times `next(iterator)` and sums the batches' 'skipped'
  counts (records the pipeline dropped, by `SKIP_REASONS`).

  `scalars()` — at every log step, on every process: it gathers over processes — gives
  `data/wait_fraction` (the share of the window's wall time spent waiting for batches, mean over
  processes; near 0 when the input pipeline keeps up with the step) and `data/skipped_<reason>`
  (records dropped in the window, all processes), and starts the next window; `restart()` starts
  one without reporting (after sampling or evaluation, whose time is not the step's).

  With `buckets` (aspect-ratio bucketing; every process has the same bucket) it also counts the
  window's batches by image size: `data/bucket_<H>x<W>`, the histogram of the buckets trained on,
  logged as well.
  """

  def __init__(self, buckets: bool = False):
    self.total_skipped = np.zeros(len(SKIP_REASONS), np.int64)
    self._count_buckets = buckets
    self.restart()

  def restart(self) -> None:
    self._start, self._wait = time.perf_counter(), 0.0
    self._skipped = np.zeros(len(SKIP_REASONS), np.int64)
    self._buckets: dict[str, int] = {}

  def next(self, iterator) -> dict:
    start = time.perf_counter()
    batch = next(iterator)
    self._wait += time.perf_counter() - start
    self._skipped += skipped_counts(batch)
    if self._count_buckets and "image" in batch:
      key = "x".join(map(str, np.shape(batch["image"])[1:3]))
      self._buckets[key] = self._buckets.get(key, 0) + 1
    return batch

  def scalars(self) -> dict[str, float]:
    local = np.concatenate([[self._wait, time.perf_counter() - self._start], self._skipped]).astype(np.float64)
    rows = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, local.size) \
        if jax.process_count() > 1 else local[None]
    skipped = rows[:, 2:].sum(axis=0).astype(np.int64)
    self.total_skipped += skipped
    if skipped.any():
      logging.info("Input pipeline dropped %d records in this window (%s); %d in all since the start.",
                   skipped.sum(), describe_skipped(skipped),
                   self.total_skipped.sum())
    out = {"data/wait_fraction": float(np.mean(rows[:, 0] / np.maximum(rows[:, 1], 1e-9)))}
    out.update({f"data/skipped_{r}": float(n) for r, n in zip(SKIP_REASONS, skipped)})
    if self._buckets:
      logging.info("Batches by bucket (H×W) in this window: %s",
                   ", ".join(f"{k} {n}" for k, n in sorted(self._buckets.items())))
      out.update({f"data/bucket_{k}": float(n) for k, n in self._buckets.items()})
    self.restart()
    return out


def write_train_scalars(writer, progress, step: int, window: list, batch_size: int, seconds: float,
                        inputs: InputMonitor | None = None) -> dict:
  """Summarizes a window of (device) step metrics, adds `train/images_per_sec` (and the input
  statistics of `inputs`), writes them with `writer` (a `MetricWriter`) and shows loss and
  throughput on the tqdm `progress` bar."""
  scalars = summarize(jax.device_get(window))
  scalars["train/images_per_sec"] = len(window) * batch_size / seconds
  if inputs is not None:
    scalars.update(inputs.scalars())
  writer.write_scalars(step, scalars)
  progress.set_postfix(loss=f"{scalars['train/loss']:.4f}", img_s=f"{scalars['train/images_per_sec']:.1f}")
  return scalars


def write_eval_scalars(writer, step: int, results: dict) -> None:
  """Writes evaluation scores with `writer` and logs them, rounded."""
  writer.write_scalars(step, results)
  logging.info("step %d: %s", step, {k: round(v, 4) for k, v in results.items()})


@contextlib.contextmanager
def running(*resources):
  """Context of a training loop: yields its `PreemptionGuard`, and closes `resources` (progress
  bar, checkpointer — waiting for its saves —, metric writer) however the loop ends."""
  try:
    with PreemptionGuard() as preemption:
      yield preemption
  finally:
    for resource in resources:
      resource.close()


def checkpoint_or_stop(checkpointer, preemption, step: int, state, data_iterator, every: int,
                       num_steps: int) -> bool:
  """Saves `step` every `every` steps and at the last; when a SIGTERM asked to stop
  (`PreemptionGuard.reached`), saves it in any case and returns True: the trainer returns."""
  saved = due(step, every, num_steps)
  if saved:
    checkpointer.save(step, state, data_iterator)
  if preemption.reached(step):
    if not saved:
      checkpointer.save(step, state, data_iterator, force=True)
    return True
  return False


def save_config_once(config, workdir: str, step: int, start_step: int) -> None:
  """Writes `workdir/config.json` right after the first step of this invocation has run: a run's
  config changes only once a step has trained under it (a resume that fails keeps the old one)."""
  if step == start_step + 1 and jax.process_index() == 0:
    config_lib.save_config(config, workdir)


def entry_point(train_and_evaluate: Callable, results_name: str) -> Callable:
  """Defines `--config`, `--workdir` and the multi-host flags; returns the `main(argv)` for `app.run`
  that sets up logging and `jax.distributed`, then runs `train_and_evaluate(config, workdir)`."""
  config = config_flags.DEFINE_config_file("config", None, "Path to a config file (`path.py[:arg]`); its keys: "
                                           "python -m ldm_jax.config keys path.py[:arg].",
                                           lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Directory of the run: checkpoints, logs, samples.")
  flags.mark_flags_as_required(["config", "workdir"])
  distributed.define_flags()

  def main(argv):
    del argv
    setup_logging()
    distributed.initialize_from_flags()
    results = train_and_evaluate(config.value, workdir.value)
    logging.info("%s: %s", results_name, results)

  return main
