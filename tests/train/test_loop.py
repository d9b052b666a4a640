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


def test_due_runs_every_k_steps_and_at_the_last_and_never_with_zero():
  assert [s for s in range(1, 11) if loop.due(s, 4, 10)] == [4, 8, 10]
  assert [s for s in range(1, 11) if loop.due(s, 100, 10)] == [10]
  assert not any(loop.due(s, 0, 10) for s in range(1, 11))  # train.image_every=0: no grids


@pytest.fixture
def backend_compiles():
  """A list that records one entry per XLA compilation while the test runs."""
  events = []
  def listener(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      events.append(duration)
  jax.monitoring.register_event_duration_secs_listener(listener)
  yield events
  jax.monitoring.unregister_event_duration_listener(listener)


def test_compile_ahead_compiles_once_for_the_later_call(backend_compiles):
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))
  rep, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  step = jax.jit(lambda w, x: (w - 0.1 * jnp.mean(x @ w), jnp.sum(x)), in_shardings=(rep, batch_sh),
                 out_shardings=(rep, rep), donate_argnums=0)
  abstract_w = jax.ShapeDtypeStruct((3, 3), jnp.float32, sharding=rep)
  x = jax.device_put(np.arange(24, dtype=np.float32).reshape(8, 3), batch_sh)
  future = loop.compile_ahead(step, abstract_w, x)
  w = jax.device_put(np.eye(3, dtype=np.float32), rep)  # meanwhile, the "state" is made
  future.result()
  compiled = len(backend_compiles)
  assert compiled >= 1
  w, total = step(w, x)
  assert len(backend_compiles) == compiled  # the call found the executable compiled ahead
  assert float(total) == 276.0
  np.testing.assert_allclose(np.asarray(w), np.eye(3) - 0.1 * np.mean(np.arange(24.0).reshape(8, 3) @ np.eye(3)),
                             rtol=1e-6)


def test_compile_ahead_raises_the_compile_error_on_result():
  def bad(x):
    return x @ jnp.ones((4, 4))  # [2, 3] @ [4, 4]: shapes do not match
  future = loop.compile_ahead(jax.jit(bad), jax.ShapeDtypeStruct((2, 3), jnp.float32))
  with pytest.raises(TypeError, match="dot_general"):
    future.result()
