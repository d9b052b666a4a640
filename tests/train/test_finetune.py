"""Fine-tuning from pretrained weights (`init.pretrained`): a tiny random SD 1.x folder is imported,
fine-tuned a few steps on the built-in shapes at 16 px, and sampled from with sample.py's code."""

import json
import math
import os

import jax
import numpy as np
import pytest

from ldm_jax.config import common as config_lib
from ldm_jax import sampling
from ldm_jax.train import diffusion
from tests.conftest import plain_text_config
from tests.convert.conftest import diffusers_models, sd_pipeline, transformers_models  # noqa: F401
from tests.train.runs import read_state


def finetune_config(pretrained, **train):
  config = plain_text_config()  # its U-Net and text encoder are replaced
  config.init.pretrained = pretrained
  config.train.update(**train)
  return config


# Extended: a full fine-tuning run; the default suite imports SD folders (tests/convert) and trains the text run.
@pytest.mark.extended
@pytest.mark.slow
def test_finetunes_an_imported_sd_folder_and_samples_from_the_run(sd_pipeline, tmp_path):  # noqa: F811
  from ldm_jax.load import load_pretrained
  from ldm_jax.convert.__main__ import main as convert_cli
  pretrained = str(tmp_path / "sd")
  assert convert_cli(["import", "--src", sd_pipeline[0], "--out", pretrained]) == 0
  workdir = str(tmp_path / "run")
  config = finetune_config(pretrained, num_steps=3, log_every=1, checkpoint_every=1, image_every=3,
                           max_checkpoints=5)
  diffusion.train_and_evaluate(config, workdir)

  _, params, configs = load_pretrained(pretrained)
  saved = config_lib.load_config(workdir)
  unet = {k: v for k, v in configs["unet"].to_dict().items() if k not in ("dtype", "remat")}
  assert {k: saved.model[k] for k in unet} == unet
  assert (saved.cond.kind, saved.cond.text_encoder) == ("text", "pretrained")
  assert saved.autoencoder.workdir == os.path.join(pretrained, "autoencoder")
  assert {k: saved.diffusion[k] for k in configs["diffusion"]} == configs["diffusion"].to_dict()
  assert float(read_state(workdir, ("scale_factor",))) == configs["latent"].scale_factor == 0.5
  # The first update runs at the warm-up's learning rate 0: step 1 holds the imported U-Net exactly.
  jax.tree.map(np.testing.assert_array_equal, read_state(workdir, ("params", "unet"), step=1), params["unet"])
  trained = read_state(workdir, ("params", "unet"), step=3)
  assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(params["unet"]))) > 0
  # The text encoder is frozen: kept once, in the parameters; the EMA and AdamW's moments are the U-Net's alone.
  jax.tree.map(np.testing.assert_array_equal, read_state(workdir, ("params", "cond", "text_encoder"), step=3),
               params["text_encoder"])
  ema = read_state(workdir, ("ema_params",), step=3)
  assert set(ema) == {"unet"}
  unet_size = sum(x.size for x in jax.tree.leaves(trained))
  assert sum(x.size for x in jax.tree.leaves(read_state(workdir, ("opt_state",), step=3)) if x.ndim) == 2 * unet_size
  # Sampling and export take the EMA U-Net and the frozen text encoder.
  from ldm_jax import load
  _, sample_params, _ = load.load_diffusion_run(workdir, jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)))
  exported = load.read_workdir(workdir).params
  for got in (jax.device_get(sample_params["unet"]), exported["unet"]):
    jax.tree.map(np.testing.assert_array_equal, got, ema["unet"])
  for got in (jax.device_get(sample_params["cond"]["text_encoder"]), exported["text_encoder"]):
    jax.tree.map(np.testing.assert_array_equal, got, params["text_encoder"])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [json.loads(line)["train/loss"] for line in f]
  assert len(losses) == 3 and all(math.isfinite(x) for x in losses)

  # sample.py --workdir RUN: the run's tokenizer is the pretrained one, its weights the fine-tuned EMA.
  out = str(tmp_path / "samples")
  summary = sampling.sample_to_dir(sampling.SampleRequest(
      out=out, workdir=workdir, prompts=("a red circle", "a blue square"), num_samples=8, steps=2, batch_size=8))
  assert summary["checkpoint_step"] == 3
  with np.load(os.path.join(out, "samples.npz")) as data:
    assert data["images"].shape == (8, 16, 16, 3) and data["images"].std() > 0


def test_pretrained_text_encoder_needs_init_pretrained(smoke_autoencoder, tmp_path):
  config = plain_text_config()
  config.autoencoder.workdir = smoke_autoencoder
  config.cond.text_encoder = "pretrained"
  with pytest.raises(ValueError, match=r"cond\.text_encoder: 'pretrained' is the frozen text encoder of "
                                       r"init\.pretrained, which is not set"):
    diffusion.train_and_evaluate(config, str(tmp_path / "bad"))
  with pytest.raises(FileNotFoundError, match=r"init\.pretrained: .*/missing does not exist"):
    diffusion.train_and_evaluate(finetune_config(str(tmp_path / "missing")), str(tmp_path / "bad"))
