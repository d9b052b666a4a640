"""The one number check and the whole-config finiteness sweep (issue 12)."""

import math

import ml_collections
import pytest

from ldm_jax.config import check_finite, check_number, run_kind
from ldm_jax.config.common import train_config, validate_train_config


@pytest.mark.parametrize("value, bounds, message", [
    (math.nan, dict(gt=0), "expected a finite number > 0, got nan"),
    (-0.01, dict(gt=0), "expected a finite number > 0, got -0.01"),
    (math.inf, dict(ge=0), "expected a finite number >= 0, got inf"),
    (1.0, dict(ge=0, lt=1), "expected a finite number >= 0 and < 1, got 1.0"),
    (True, {}, "expected a finite number, got True"),
    ("3", {}, "expected a finite number, got '3'"),
    (2.0, dict(integer=True, ge=1), "expected an integer >= 1, got 2.0"),
    (0, dict(integer=True, ge=1), "expected an integer >= 1, got 0"),
])
def test_check_number_names_the_key_and_the_range(value, bounds, message):
  with pytest.raises(ValueError, match=f"^optim.x: {message}\\.$"):
    check_number("optim.x", value, **bounds)


@pytest.mark.parametrize("value, bounds", [(1e-4, dict(gt=0)), (0, dict(ge=0, lt=1)), (3, dict(integer=True, ge=1)),
                                           (-5, {})])
def test_check_number_accepts_values_in_range(value, bounds):
  check_number("k", value, **bounds)


def test_check_finite_sweeps_nested_config_dicts_and_tuples():
  config = ml_collections.ConfigDict(dict(optim=dict(lr=1e-4, betas=(0.9, 0.999)), model=dict(ch=32, name="x")))
  check_finite(config)
  config.optim.betas = (0.9, math.inf)
  with pytest.raises(ValueError, match=r"^optim\.betas: item 1 is inf; expected a finite number\.$"):
    check_finite(config)
  config.optim.betas = (0.9, 0.999)
  config.optim.lr = math.nan
  with pytest.raises(ValueError, match=r"^optim\.lr: expected a finite number, got nan\.$"):
    check_finite(config)


def test_run_kind_tells_the_trainers_configs_apart():
  assert run_kind({"model": {"kind": "kl"}, "loss": {}}) == "autoencoder"
  assert run_kind({"model": {"model_channels": 32}, "diffusion": {}, "autoencoder": {"workdir": "x"}}) == "diffusion"
  assert run_kind({"model": {"feature_dim": 128, "num_classes": 10}}) == "classifier"
  assert run_kind({"anything": 1}) is None


def test_image_every_zero_means_no_grids_and_negative_is_named():
  validate_train_config(train_config(image_every=0))
  with pytest.raises(ValueError, match=r"^train\.image_every: expected an integer >= 0, got -1\.$"):
    validate_train_config(train_config(image_every=-1))
  with pytest.raises(ValueError, match=r"^train\.eval_every: expected an integer >= 1, got 0\.$"):
    validate_train_config(train_config(eval_every=0))
