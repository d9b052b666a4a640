"""Shared step/loop pieces: gradient accumulation, the non-finite guard and its monitor, log summaries."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldm_jax.train import loop
from ldm_jax.runtime import sharding


def linear_grads(params, batch, rng):
  """Mean squared error of a linear model (no randomness: rng unused)."""
  del rng
  def loss_fn(p):
    return jnp.mean(jnp.square(batch["x"] @ p["w"] + p["b"] - batch["y"]))
  loss, grads = jax.value_and_grad(loss_fn)(params)
  return grads, {"loss": loss}


def test_accumulated_gradients_equal_the_full_batch_gradient():
  rng = np.random.default_rng(0)
  batch = {"x": rng.normal(size=(16, 5)).astype(np.float32), "y": rng.normal(size=(16, 3)).astype(np.float32)}
  params = {"w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32), "b": jnp.zeros(3)}
  full, full_metrics = linear_grads(params, batch, None)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4)))
  batch_sh = sharding.batch_sharding(mesh)
  batch = jax.device_put(batch, batch_sh)

  @jax.jit
  def accumulated(params, batch):
    return loop.accumulate_gradients(linear_grads, params, batch, jax.random.PRNGKey(0), 4, mesh=mesh)

  grads, metrics = accumulated(params, batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, full)
  # The mean of the micro-batch losses is the full-batch loss (equal micro-batch sizes).
  np.testing.assert_allclose(metrics["loss"], full_metrics["loss"], rtol=1e-5)


def test_micro_batches_interleave_so_each_device_keeps_its_examples():
  x = np.arange(8)
  micro = loop.split_micro_batches({"x": x}, 2)["x"]
  np.testing.assert_array_equal(micro, [[0, 2, 4, 6], [1, 3, 5, 7]])


def test_keep_if_selects_the_old_state_when_not_finite():
  old = {"a": jnp.ones(3), "b": jnp.zeros(())}
  new = {"a": jnp.full(3, 2.0), "b": jnp.ones(())}
  assert bool(loop.all_finite(new))
  assert not bool(loop.all_finite(new, {"g": jnp.array([1.0, jnp.nan])}))
  assert not bool(loop.all_finite(jnp.inf))
  kept = loop.keep_if(jnp.asarray(False), new, old)
  jax.tree.map(np.testing.assert_array_equal, kept, old)
  jax.tree.map(np.testing.assert_array_equal, loop.keep_if(jnp.asarray(True), new, old), new)


def test_monitor_stops_after_k_skipped_steps_in_a_row_one_step_behind():
  monitor = loop.NonFiniteMonitor(3)
  flags = {1: 0.0, 2: 1.0, 3: 1.0, 4: 0.0, 5: 1.0, 6: 1.0}
  for step, flag in flags.items():
    monitor.push(step, {loop.NONFINITE: jnp.asarray(flag)})  # a streak of 2 is reset by step 4
  assert monitor.streak == 1  # step 6 is read at the next push or flush
  with pytest.raises(loop.NonFiniteError, match=r"train.max_nonfinite_steps: 3 steps in a row \(steps 5–7\)"):
    monitor.push(7, {loop.NONFINITE: jnp.asarray(1.0)})
    monitor.flush()


def test_summarize_averages_updated_steps_and_counts_skipped_ones():
  window = [{"loss": 1.0, loop.NONFINITE: 0.0}, {"loss": float("nan"), loop.NONFINITE: 1.0},
            {"loss": 3.0, "d_loss": 0.5, loop.NONFINITE: 0.0}]
  scalars = loop.summarize(window)
  assert scalars == {"train/loss": 2.0, "train/d_loss": 0.5, "train/skipped_steps": 1.0}
  assert np.isnan(loop.summarize(window[1:2])["train/loss"])
