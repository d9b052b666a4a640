"""Resilience: exact resume after SIGKILL, SIGTERM saves, the non-finite guard stops a run, an
unreadable checkpoint falls back to the previous one, and bad scale-out settings name their key."""

import glob
import logging
import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.train import autoencoder
from ldm_jax.runtime import checkpoint as ckpt_lib
from tests.conftest import load_config
from tests.train.runs import TINY_AE, Run, cpu_env, finalized_steps, jax_cache, read_state, wait_until  # noqa: F401

NUM_STEPS = 60
RUN_FLAGS = TINY_AE + ["--config.train.batch_size=4", f"--config.train.num_steps={NUM_STEPS}",
                       "--config.train.checkpoint_every=10", "--config.train.log_every=10",
                       f"--config.train.eval_every={NUM_STEPS}", "--config.mesh.data=1", "--config.mesh.fsdp=2"]


def train(workdir, env, log, *extra):
  return Run(["train_autoencoder.py", "--workdir", str(workdir), *RUN_FLAGS, *extra], env, str(log))


@pytest.mark.slow
@pytest.mark.extended
def test_sigterm_saves_and_a_killed_run_resumes_to_identical_parameters(tmp_path, jax_cache):
  env = cpu_env(2, jax_cache)
  reference, workdir = tmp_path / "reference", tmp_path / "run"
  assert train(reference, env, tmp_path / "reference.log").wait(600) == 0

  # SIGTERM (preemption) after the first checkpoint: the current step is saved, exit status 0.
  run = train(workdir, env, tmp_path / "term.log")
  wait_until(lambda: finalized_steps(workdir), run, 300, "the first checkpoint")
  run.proc.send_signal(signal.SIGTERM)
  assert run.wait(120) == 0, run.output()[-3000:]
  preempted = max(finalized_steps(workdir))
  assert 10 < preempted < NUM_STEPS and "Preemption (SIGTERM): saving step" in run.output()

  # SIGKILL after the next checkpoint, then the same command again.
  run = train(workdir, env, tmp_path / "kill.log")
  wait_until(lambda: max(finalized_steps(workdir)) > preempted, run, 300, "a checkpoint after the resume")
  run.proc.send_signal(signal.SIGKILL)
  assert run.wait(60) == -signal.SIGKILL
  assert max(finalized_steps(workdir)) < NUM_STEPS
  assert train(workdir, env, tmp_path / "resume.log").wait(300) == 0

  for keys in (("params",), ("opt_state",), ("rng",)):
    jax.tree.map(np.testing.assert_array_equal, read_state(workdir, keys, NUM_STEPS),
                 read_state(reference, keys, NUM_STEPS))


@pytest.mark.slow
def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, jax_cache):
  """Batches turn to NaN after step 12: steps 13–15 are skipped, the third stops the run with a
  message naming the key, and the checkpoint of step 10 is the newest and intact."""
  workdir = tmp_path / "nan"
  poison = ("import runpy, sys, numpy as np\n"
            "from ldm_jax.runtime import sharding\n"
            "shard, calls = sharding.shard_batch, [0]\n"
            "def poisoned(batch, mesh):\n"
            "  calls[0] += 1\n"
            "  if calls[0] > 12:\n"
            "    batch = dict(batch, image=np.full_like(batch['image'], np.nan))\n"
            "  return shard(batch, mesh)\n"
            "sharding.shard_batch = poisoned\n"
            "sys.argv = sys.argv[1:]\n"
            "runpy.run_path('train_autoencoder.py', run_name='__main__')\n")
  run = Run(["-c", poison, "train_autoencoder.py", "--workdir", str(workdir), *RUN_FLAGS,
             "--config.train.max_nonfinite_steps=3"], cpu_env(2, jax_cache), str(tmp_path / "nan.log"))
  assert run.wait(600) != 0
  assert "train.max_nonfinite_steps: 3 steps in a row (steps 13–15)" in run.output()
  assert finalized_steps(workdir) == [10]
  params = read_state(str(workdir), ("params",), 10)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
  directory = str(tmp_path / "checkpoints")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  dataset = grain.MapDataset.range(100).batch(2).to_iter_dataset()
  ckpt = ckpt_lib.Checkpointer(directory, async_save=False)
  data = iter(dataset)
  states = {step: {"w": jnp.full(8, float(step)), "step": jnp.int32(step)} for step in (1, 2)}
  for step in (1, 2):
    next(data)
    ckpt.save(step, states[step], data)
  ckpt.close()
  for path in glob.glob(os.path.join(directory, "2", "state", "**", "d", "*"), recursive=True):
    with open(path, "r+b") as f:  # truncated array data, as after a crash on a non-atomic filesystem
      f.truncate(3)
  os.makedirs(os.path.join(directory, "3.orbax-checkpoint-tmp-1234", "state"))  # killed mid-save

  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), states[1])
  ckpt = ckpt_lib.Checkpointer(directory, async_save=False)
  data = iter(dataset)
  with caplog.at_level(logging.WARNING):
    restored = ckpt.restore(abstract, data)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(states[1]))
  np.testing.assert_array_equal(next(data), [2, 3])  # the data position of step 1
  assert any("Checkpoint 2" in r.getMessage() and "cannot be restored" in r.getMessage() for r in caplog.records)
  assert ckpt.all_steps() == [1] and any(n.startswith("2.corrupt-") for n in os.listdir(directory))
  assert ckpt.save(2, states[2], data)  # the run can write step 2 again

  # When no checkpoint restores (here: a config that no longer matches), an error and no renaming.
  wrong = {"w": jax.ShapeDtypeStruct((9,), jnp.float32, sharding=device), "step": abstract["step"]}
  with pytest.raises(ValueError, match=r"none of the checkpoints \[2, 1\] could be restored"):
    ckpt.restore(wrong)
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()


@pytest.mark.parametrize("changes, match", [
    ({"mesh.data": 3}, "mesh.fsdp|mesh: "),
    ({"train.batch_size": 12}, "train.batch_size: 12 is not divisible by the 8 data-parallel devices"),
    ({"mesh.rules": ((".*", (None, "model")),)}, r"mesh.rules\[0\]: axis 'model'"),
    ({"train.grad_accum_steps": 3}, "train.grad_accum_steps: 3 micro-batches"),
    ({"train.dtype": "float16"}, "train.dtype: 'float16'"),
    ({"train.max_nonfinite_steps": 0}, "train.max_nonfinite_steps"),
    ({"model.dtype": "bfloat16"}, r"model.dtype: 'bfloat16', but training uses train.dtype"),
])
def test_bad_scale_settings_name_their_key_before_compiling(tmp_path, changes, match):
  config = load_config("configs/autoencoder/shapes_kl_f4.py:smoke")
  for key, value in changes.items():
    section, name = key.split(".")
    config[section][name] = value
  with pytest.raises(ValueError, match=match):
    autoencoder.train_and_evaluate(config, str(tmp_path / "bad"))
