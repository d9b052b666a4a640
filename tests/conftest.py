"""Test-wide setup: 8 simulated CPU devices so that meshes are exercised on one machine."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(relative_path: str):
  """A config file of the repository, `path[:arg]` relative to the repository root."""
  from ldm_jax.config import common as config_lib
  return config_lib.from_file(os.path.join(ROOT, relative_path))


@pytest.fixture(scope="session")
def smoke_autoencoder(tmp_path_factory):
  """Workdir of a `shapes_kl_f4:smoke` stage-1 run (16 px, f=2), trained once per session."""
  from ldm_jax.train import autoencoder
  workdir = str(tmp_path_factory.mktemp("smoke_ae"))
  autoencoder.train_and_evaluate(load_config("configs/autoencoder/shapes_kl_f4.py:smoke"), workdir)
  return workdir


@pytest.fixture(scope="session")
def smoke_text_run(smoke_autoencoder, tmp_path_factory):
  """Workdir of a `shapes_txt2img:smoke` stage-2 run, the base of the fine-tuning tests. Four steps:
  U-Net outputs start at zero (`conv_out`, then `proj_out`, zero-initialised as in CompVis), so
  only from the third update on do the attention layers and the text encoder affect the loss."""
  from ldm_jax.train import diffusion
  workdir = str(tmp_path_factory.mktemp("smoke_text_run"))
  config = load_config("configs/ldm/shapes_txt2img.py:smoke")
  config.autoencoder.workdir = smoke_autoencoder
  config.train.update(num_steps=4, checkpoint_every=4, image_every=100)
  diffusion.train_and_evaluate(config, workdir)
  return workdir
