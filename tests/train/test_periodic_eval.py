"""Periodic evaluation during training (`eval.*`): stage-2 sample metrics, stage-1 rFD, bad keys."""

import json
import math
import os

import pytest

from ldm_jax.train import autoencoder, diffusion
from tests.conftest import load_config


def eval_rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return [r for r in rows if any(k.startswith("eval/") for k in r)]


def text_smoke_config(autoencoder_workdir, cache_dir, **eval_changes):
  config = load_config("configs/ldm/shapes_txt2img.py:smoke")
  config.autoencoder.workdir = autoencoder_workdir
  config.train.update(num_steps=2, log_every=2, checkpoint_every=2, image_every=2, eval_every=2)
  config.eval.update(**{"metrics": ("fd", "kid"), "cache_dir": cache_dir, **eval_changes})
  return config


@pytest.mark.slow
@pytest.mark.extended
def test_stage2_logs_sample_metrics_against_cached_reference_statistics(smoke_autoencoder, tmp_path):
  cache = str(tmp_path / "stats")
  workdir = str(tmp_path / "ldm")
  diffusion.train_and_evaluate(text_smoke_config(smoke_autoencoder, cache), workdir)

  (row,) = eval_rows(workdir)
  assert row["step"] == 2
  # vgg16:32 (the smoke extractor) names its metrics fd_vgg16_32px, kid_vgg16_32px, ….
  assert set(row) == {"step", "eval/fd_vgg16_32px", "eval/kid_vgg16_32px", "eval/kid_vgg16_32px_std"}
  # Two steps of training are far from the data: the distance is large, finite and positive.
  assert math.isfinite(row["eval/fd_vgg16_32px"]) and row["eval/fd_vgg16_32px"] > 0
  assert math.isfinite(row["eval/kid_vgg16_32px"])
  # The reference statistics of the eval split are cached for the next run (or evaluation).
  (stats_file,) = os.listdir(cache)
  assert stats_file.startswith("vgg16-test-") and stats_file.endswith(".npz")  # the split has 25 images


def test_stage2_bad_eval_config_names_the_key(smoke_autoencoder, tmp_path):
  def check(match, **eval_changes):
    config = text_smoke_config(smoke_autoencoder, str(tmp_path / "stats"), **eval_changes)
    with pytest.raises(ValueError, match=match):
      diffusion.train_and_evaluate(config, str(tmp_path / "bad"))
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")  # failed before training started

  check(r"eval\.metrics: unknown metric 'fdd'", metrics=("fdd",))
  check(r"eval\.num_samples: 4 samples are too few for 'kid'", num_samples=4, kid_subset_size=8)
  check(r"eval\.num_ref: .* too few for 'kid'", num_ref=4)
  check(r"eval\.extractor: unknown extractor 'resnet'", extractor="resnet")
  check(r"eval\.extractor: .*vgg16:8", extractor="vgg16:8")
  check(r"eval\.metrics: 'acc' is the class accuracy", metrics=("fd", "acc"))
  check(r"eval\.metrics: 'is' needs class logits", metrics=("is",), num_samples=16)
  check(r"eval\.batch_size: 6 is not divisible", batch_size=6)


def tiny_autoencoder_config(**eval_changes):
  config = load_config("configs/autoencoder/shapes_kl_f4.py:smoke")
  config.model.ch_mult = (1,)
  config.loss.disc_weight = 0.0
  config.train.update(num_steps=2, log_every=2, checkpoint_every=2, eval_every=2, image_every=2, eval_batches=2)
  config.eval.update(**eval_changes)
  return config


# Extended: the default suite logs stage 2's periodic metrics and tests rFD in tests/eval.
@pytest.mark.extended
@pytest.mark.slow
def test_stage1_logs_the_configured_reconstruction_metrics_with_rfd(tmp_path):
  config = tiny_autoencoder_config(metrics=("psnr", "rfd"), extractor="vgg16:32")
  results = autoencoder.train_and_evaluate(config, str(tmp_path / "ae"))
  assert set(results) == {"eval/psnr", "eval/rfd_vgg16_32px"}  # no SSIM or LPIPS: not asked for
  assert 0 < results["eval/rfd_vgg16_32px"] < 1e4 and 0 < results["eval/psnr"] < 60
  assert eval_rows(str(tmp_path / "ae"))[-1]["eval/rfd_vgg16_32px"] == results["eval/rfd_vgg16_32px"]


def test_stage1_bad_eval_config_names_the_key(tmp_path):
  with pytest.raises(ValueError, match=r"eval\.metrics: unknown metric 'kid'"):
    autoencoder.validate_config(tiny_autoencoder_config(metrics=("psnr", "kid")))
  with pytest.raises(ValueError, match=r"eval\.extractor: unknown extractor"):
    autoencoder.train_and_evaluate(tiny_autoencoder_config(metrics=("rfd",), extractor="alexnet"),
                                   str(tmp_path / "bad"))
