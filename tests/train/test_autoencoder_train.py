"""End-to-end stage-1 runs at `:smoke` size: learning, checkpoints, resume, VQ metrics."""

import json
import os

import jax
import numpy as np
import pytest

from ldm_jax.train import autoencoder
from ldm_jax.config import common as config_lib
from ldm_jax.runtime import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def smoke_config(name):
  return config_lib.from_file(os.path.join(ROOT, "configs", "autoencoder", name) + ":smoke")


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# Extended, with LPIPS as configured (VGG16's forward and backward are most of the compile time):
# the default suite trains stage 1 once (tests/conftest.py's smoke_autoencoder, which stage 2's
# tests read), resumes a trained run in tests/cli/test_files.py, restores its checkpoints onto
# other meshes (tests/runtime/test_sharding.py) and covers the LPIPS term and its gradient
# (tests/losses).
@pytest.mark.extended
@pytest.mark.slow
def test_kl_smoke_run_learns_checkpoints_and_resumes(tmp_path):
  workdir = str(tmp_path / "kl")
  config = smoke_config("kl_f8.py")  # the GAN on from step 7; LPIPS in the loss and evaluation
  results = autoencoder.train_and_evaluate(config, workdir)

  rows = [r for r in read_metrics(workdir) if "train/rec_loss" in r]
  assert [r["step"] for r in rows] == [4, 8, 12]
  rec = [r["train/rec_loss"] for r in rows]
  assert rec[0] > rec[1] > rec[2], rec
  # The GAN switches on after loss.disc_start = 6: its terms appear in the later logs only.
  assert "train/d_loss" not in rows[0] and "train/d_loss" in rows[-1]
  assert rows[-1]["train/d_weight"] > 0
  assert 5.0 < results["eval/psnr"] < 60.0 and -1.0 <= results["eval/ssim"] <= 1.0
  assert "eval/lpips" in results and 0.0 < results["eval/lpips"] < 1.0
  assert rows[-1]["train/p_loss"] > 0
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "6"]
  assert os.path.isfile(os.path.join(workdir, "config.json"))
  assert any(name.startswith("reconstructions_") for name in os.listdir(os.path.join(workdir, "samples")))

  # The same command with more steps resumes at step 12 instead of starting over.
  config.train.num_steps = 16
  autoencoder.train_and_evaluate(config, workdir)
  steps = [r["step"] for r in read_metrics(workdir) if "train/rec_loss" in r]
  assert steps == [4, 8, 12, 16]


@pytest.mark.slow
@pytest.mark.extended
def test_vq_smoke_run_reports_codebook_usage(tmp_path):
  config = smoke_config("vq_f4.py")
  results = autoencoder.train_and_evaluate(config, str(tmp_path / "vq"))
  assert 0.0 < results["eval/codebook_usage"] <= 1.0
  rows = [r for r in read_metrics(str(tmp_path / "vq")) if "train/perplexity" in r]
  assert rows and all(1.0 <= r["train/perplexity"] <= config.model.n_embed for r in rows)


@pytest.mark.extended
def test_dropout_is_active_in_the_train_step_and_not_in_evaluation():
  """A VQ model draws nothing at random but its dropout: with model.dropout > 0 the train step
  depends on the step's rng, without it it does not; evaluation is deterministic either way."""
  def stage(dropout):
    config = smoke_config("vq_f4.py")
    config.model.update(ch_mult=(1,), dropout=dropout)
    return autoencoder.Stage1(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))

  batch = {"image": np.random.default_rng(0).uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)}
  with_dropout, without = stage(0.5), stage(0.0)
  initial = jax.device_get(with_dropout.init(jax.random.PRNGKey(0)))

  def losses(s):
    """The step's loss from the same parameters with two step rngs."""
    return [float(s.train_step[False](jax.device_put(initial.replace(rng=jax.random.PRNGKey(seed)), s.state_sharding),
                                      sharding.shard_batch(batch, s.mesh))[1]["loss"]) for seed in (1, 2)]

  first, second = losses(with_dropout)
  assert first != second
  first, second = losses(without)
  assert first == second
  evaluated = [jax.device_get(s.eval_step(initial.params, sharding.shard_batch(batch, s.mesh))[1])
               for s in (with_dropout, without)]
  np.testing.assert_array_equal(*evaluated)


@pytest.mark.extended  # ~40 s: two Stage1 steps compiled; moved to keep the default suite under 15 minutes
def test_steps_before_the_gan_leave_the_discriminator_as_full_adam_on_zero_gradients_would():
  """Before loss.disc_start the discriminator's Adam only counts steps (`counts_only`): the state
  after three such steps equals, leaf for leaf, the one Adam itself gives on the zero gradients."""
  config = smoke_config("kl_f8.py")
  config.loss.perceptual_weight = 0.0
  config.model.update(ch_mult=(1, 2), num_res_blocks=1)
  mesh = sharding.make_mesh(config.mesh)
  fast, full = autoencoder.Stage1(config, mesh), autoencoder.Stage1(config, mesh)
  full._optimizer_before_gan = full.optimizer  # every leaf through Adam, as before counts_only
  batch = sharding.shard_batch(
      {"image": np.random.default_rng(0).uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32)}, mesh)
  initial = jax.device_get(fast.init(jax.random.PRNGKey(0)))
  states = []
  for stage in (fast, full):
    state = jax.device_put(initial, stage.state_sharding)
    for _ in range(3):
      state, _ = stage.train_step[False](state, batch)
    states.append(jax.device_get(state))
  leaves, tree = jax.tree_util.tree_flatten_with_path(states[0])
  assert tree == jax.tree.structure(states[1])
  for (path, a), b in zip(leaves, jax.tree.leaves(states[1])):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  disc_adam = states[0].opt_state.inner_states["discriminator"].inner_state[0]
  assert int(disc_adam.count) == 3 and not any(np.any(x) for x in jax.tree.leaves(disc_adam.mu))
  # …and the autoencoder did train, its Adam too.
  assert int(states[0].opt_state.inner_states["autoencoder"].inner_state[0].count) == 3
  assert any(np.any(a != b) for a, b in zip(jax.tree.leaves(initial.params["autoencoder"]),
                                            jax.tree.leaves(states[0].params["autoencoder"])))
