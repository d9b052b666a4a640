"""What bad input must never do to files (issue 12), where a table of command lines cannot show it."""

import os
import shutil

import numpy as np
import pytest

from ldm_jax.train import autoencoder
from ldm_jax.config import common as config_lib
from ldm_jax.runtime.images import image_grid, to_uint8

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_images_are_an_error_not_black_pixels(bad):
  images = np.zeros((2, 4, 4, 3), np.float32)
  images[1, 2, 3, 0] = bad
  with pytest.raises(ValueError, match=r"images: 1 of 96 values are NaN or infinite"):
    to_uint8(images)
  with pytest.raises(ValueError, match="NaN or infinite"):
    image_grid(images)
  np.testing.assert_array_equal(to_uint8(np.array([-1.0, 0.0, 1.0, 7.0])), [0, 128, 255, 255])


def test_a_resume_that_trains_no_step_keeps_config_json(workspace, tmp_path):
  """config.json changes only when a step trains under the new config: the run in W/ae has reached
  its 12 steps, so a rerun with another (resumable) key trains nothing and leaves config.json alone."""
  workdir = str(tmp_path / "ae")
  shutil.copytree(os.path.join(workspace, "ae"), workdir)
  with open(os.path.join(workdir, "config.json"), "rb") as f:
    saved = f.read()
  config = config_lib.from_file(os.path.join(ROOT, "configs/autoencoder/shapes_kl_f4.py:smoke"))
  config.train.log_every = 3
  assert autoencoder.train_and_evaluate(config, workdir) == {}
  with open(os.path.join(workdir, "config.json"), "rb") as f:
    assert f.read() == saved
  assert config_lib.load_config(workdir).train.log_every == 4


def test_resume_compares_only_what_the_checkpoints_depend_on(workspace):
  workdir = os.path.join(workspace, "ae")
  config = config_lib.load_config(workdir)
  with config.unlocked():
    config.model.added_since = 3  # a key newer than the run: its default describes the run
  config.model.attention = "xla"  # another implementation of the same parameters
  config.train.num_steps = 100
  config_lib.check_resume(config, workdir, "autoencoder", autoencoder.RESUME_KEYS)
  config.model.update(ch=64, z_channels=8)
  with pytest.raises(ValueError, match=r"^model\.ch: 64, but the run in .* was trained with 32 \(also differ: "
                                       r"model\.z_channels\);"):
    config_lib.check_resume(config, workdir, "autoencoder", autoencoder.RESUME_KEYS)
  with pytest.raises(ValueError, match=r"^--workdir: .*/ae holds a stage-1 autoencoder run"):
    config_lib.check_resume(config, workdir, "diffusion", ())
