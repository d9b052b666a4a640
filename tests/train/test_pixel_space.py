"""Pixel-space diffusion (the paper's LDM-1): `model.kind='identity'` first stages, f = 1."""

import os

import jax
import numpy as np
import pytest

from ldm_jax import load, sampling
from ldm_jax.config import common as config_lib
from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.train import autoencoder as stage1
from ldm_jax.train import diffusion as stage2

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _identity_config():
  config = config_lib.from_file(os.path.join(ROOT, "configs/autoencoder/shapes_kl_f4.py:smoke"))
  config.model.update(kind="identity", ch_mult=(1,), embed_dim=3)
  return config


@pytest.mark.parametrize("key, value, message", [
    ("ch_mult", (1, 2), "model.ch_mult: (1, 2), but an 'identity' first stage does not downsample"),
    ("embed_dim", 4, "model.embed_dim: 4, but an 'identity' first stage's latent is the image itself; set it to "
                     "model.in_channels = 3"),
])
def test_identity_config_errors_name_the_key(key, value, message):
  config = _identity_config()
  config.model[key] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    stage1.validate_config(config)


def test_identity_latent_is_the_image():
  config = _identity_config()
  stage1.validate_config(config)
  assert ae_lib.latent_shape(config.model, 16) == (16, 16, 3)
  assert ae_lib.downsampling_factor(config.model) == 1
  model = ae_lib.make_autoencoder(config.model)
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3), minval=-1, maxval=1)
  params = model.init(jax.random.PRNGKey(1), x, method=model.init_all)
  assert jax.tree.leaves(params) == []
  np.testing.assert_array_equal(model.apply(params, x, method=model.encode), x)
  np.testing.assert_array_equal(model.apply(params, x + 1, method=model.decode), x + 1)


def test_identity_stage1_run_is_an_empty_checkpoint_that_loads(tmp_path):
  workdir = str(tmp_path / "pixels")
  assert stage1.train_and_evaluate(_identity_config(), workdir) == {}
  assert load.checkpoint_steps(os.path.join(workdir, "checkpoints")) == [0]
  model, ae_config, params = load.load_autoencoder(workdir)
  assert ae_config.model.kind == "identity" and params == {}
  assert isinstance(model, ae_lib.IdentityFirstStage) and model.in_channels == 3
  # Run again (e.g. a resubmitted job): nothing changes, nothing fails.
  assert stage1.train_and_evaluate(_identity_config(), workdir) == {}
  assert load.checkpoint_steps(os.path.join(workdir, "checkpoints")) == [0]


@pytest.mark.extended  # ~40 s: a stage-2 run on pixels, then samples decoded by the identity
def test_stage2_trains_and_samples_on_pixels(tmp_path):
  ae_dir, ldm_dir = str(tmp_path / "pixels"), str(tmp_path / "ldm")
  stage1.train_and_evaluate(_identity_config(), ae_dir)
  config = config_lib.from_file(os.path.join(ROOT, "configs/ldm/shapes_txt2img.py:smoke"))
  config.autoencoder.workdir = ae_dir
  config.eval.metrics = ()
  stage2.train_and_evaluate(config, ldm_dir)
  # The U-Net ran on 16×16×3 pixels: its input convolution takes the image's 3 channels.
  unet_params = load.restore(ldm_dir, ("params", "unet"))
  assert unet_params["conv_in"]["kernel"].shape[-2] == 3
  ldm_config, ae_config, step, tokenizer = load.read_diffusion_run(ldm_dir)
  assert step == config.train.num_steps and ae_config.model.kind == "identity"
  out = str(tmp_path / "samples")
  summary = sampling.sample_to_dir(sampling.SampleRequest(out=out, workdir=ldm_dir, prompts=("a red circle",),
                                                          num_samples=2, steps=4, seed=0))
  assert summary["num_samples"] == 2
  with np.load(os.path.join(out, "samples.npz"), allow_pickle=False) as data:
    images = data["images"]
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
  assert sorted(os.listdir(os.path.join(out, "images"))) == ["00000.png", "00001.png"]


def test_diffusers_export_refuses_a_pixel_space_run_by_name():
  from ldm_jax.convert import diffusers_format
  with pytest.raises(ValueError, match="model.kind: 'identity' — a pixel-space run has no autoencoder"):
    diffusers_format.autoencoder_config_to_diffusers(dict(_identity_config().model))
