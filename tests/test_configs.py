"""Every config file loads, and loads with `:smoke`; smoke configs pass validation."""

import glob
import os

import pytest

from ldm_jax.data import shapes
from ldm_jax.train import autoencoder
from ldm_jax.config import common as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AE_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "autoencoder", "*.py")))


def test_all_autoencoder_configs_are_found():
  names = {os.path.basename(p) for p in AE_CONFIGS}
  assert {"kl_f4.py", "kl_f8.py", "kl_f16.py", "vq_f4.py", "vq_f8.py", "shapes_kl_f4.py", "shapes_kl_f2.py",
          "shapes_kl_f4z4.py", "fmnist_kl_f4.py"} <= names


@pytest.mark.parametrize("path", AE_CONFIGS, ids=os.path.basename)
def test_smoke_configs_validate(path):
  config = config_lib.from_file(path + ":smoke")
  if config.data.source == "idx" and not os.path.isdir(config.data.path):
    pytest.skip(f"{config.data.path} not installed")
  autoencoder.validate_config(config)
  assert config.train.num_steps <= 20 and config.data.image_size <= 32


@pytest.mark.parametrize("path", AE_CONFIGS, ids=os.path.basename)
def test_full_configs_keep_their_shape(path):
  config = config_lib.from_file(path)
  # The model follows the data through linked fields: overriding one moves the other.
  config.data.channels = 1
  assert config.model.in_channels == 1
  assert config.model.resolution == config.data.image_size


def test_paper_configs_need_a_data_path():
  config = config_lib.from_file(os.path.join(ROOT, "configs", "autoencoder", "kl_f8.py"))
  with pytest.raises(ValueError, match="data.path"):
    autoencoder.validate_config(config)


def test_unknown_config_argument_is_rejected():
  with pytest.raises(ValueError, match="unknown config argument"):
    config_lib.from_file(os.path.join(ROOT, "configs", "autoencoder", "kl_f8.py") + ":smok")


def test_demo_configs_hold_out_the_same_pairs_and_ask_for_them():
  """Both demo stages train without the held-out colour–kind pairs, and some demo prompts ask for them."""
  ae = config_lib.from_file(os.path.join(ROOT, "configs", "autoencoder", "shapes_kl_f4z4.py"))  # demo.AE_CONFIG
  ldm = config_lib.from_file(os.path.join(ROOT, "configs", "ldm", "shapes_txt2img.py"))
  assert ae.data.shapes_layout == ldm.data.shapes_layout == "quadrants"
  assert tuple(ae.data.shapes_holdout) == tuple(ldm.data.shapes_holdout)
  holdout = set(shapes.check_holdout(ldm.data.shapes_holdout))
  asked = [shapes.parse_quadrant_caption(p) for p in ldm.sample.prompts]  # raises on a bad prompt
  pairs = [f"{labels['colour']} {labels['kind']}" for labels in asked]
  assert 0 < sum(p in holdout for p in pairs) < len(pairs)
