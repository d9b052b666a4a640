"""A whole Stable Diffusion folder: import, text-to-image parity with diffusers' pipeline, workdir use, export."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ldm_jax.load import load_pretrained  # noqa: E402
from ldm_jax.convert.__main__ import main as cli  # noqa: E402
from ldm_jax.convert.diffusers_format import diffusion_config_from_scheduler  # noqa: E402
from ldm_jax.diffusion import samplers  # noqa: E402
from ldm_jax.diffusion.schedule import schedule_from_config  # noqa: E402
from tests.convert.reference import nchw, nhwc, state_numpy  # noqa: E402

PROMPTS = ["a cat", "a dog and a cat"]


def test_pipeline_folder_gives_every_component(sd_pipeline):
  folder, pipe = sd_pipeline
  modules, params, configs = load_pretrained(folder)
  assert set(modules) == {"unet", "autoencoder", "text_encoder", "tokenizer"}
  assert set(params) == {"unet", "autoencoder", "text_encoder"}
  assert configs["latent"].scale_factor == 0.5
  assert configs["diffusion"].to_dict() == dict(beta_schedule="scaled_linear", num_timesteps=1000,
                                                linear_start=0.00085, linear_end=0.012, zero_terminal_snr=False,
                                                parameterization="eps")
  reference = pipe.tokenizer(PROMPTS + [""], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True).input_ids
  np.testing.assert_array_equal(modules["tokenizer"].tokenize(PROMPTS + [""]), reference)


def test_scheduler_configs_map_to_the_diffusion_config():
  sd2_v = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
           "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
           "rescale_betas_zero_snr": True}
  assert diffusion_config_from_scheduler(sd2_v) == dict(
      beta_schedule="scaled_linear", num_timesteps=1000, linear_start=0.00085, linear_end=0.012,
      zero_terminal_snr=True, parameterization="v")
  assert diffusion_config_from_scheduler({"beta_schedule": "squaredcos_cap_v2"})["beta_schedule"] == "cosine"
  with pytest.raises(ValueError, match="beta_schedule='sigmoid'"):
    diffusion_config_from_scheduler({"beta_schedule": "sigmoid"})


def test_text_to_image_matches_the_diffusers_pipeline(sd_pipeline):
  """Prompt → CLIP → DDIM with classifier-free guidance → decode, against StableDiffusionPipeline."""
  folder, pipe = sd_pipeline
  modules, params, configs = load_pretrained(folder)
  unet, vae, clip = modules["unet"], modules["autoencoder"], modules["text_encoder"]
  scale_factor = configs["latent"].scale_factor
  tokens = modules["tokenizer"].tokenize(PROMPTS)
  null = modules["tokenizer"].tokenize([""])
  x_T = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype(np.float32)

  @jax.jit
  def generate(params, x_T):
    context = clip.apply({"params": params["text_encoder"]}, tokens)
    uncond = clip.apply({"params": params["text_encoder"]}, null)
    apply_fn = lambda x, t, c: unet.apply({"params": params["unet"]}, x, t, c)
    model_fn = samplers.cfg_model_fn(apply_fn, context, uncond, guidance_scale=4.0, share_input=True)
    z = samplers.ddim(model_fn, schedule_from_config(configs["diffusion"]), x_T, num_steps=3)
    images = vae.apply({"params": params["autoencoder"]}, z / scale_factor, method="decode")
    return jnp.clip(images / 2 + 0.5, 0, 1)

  ours = np.asarray(generate(params, jnp.asarray(x_T)))
  with torch.no_grad():
    reference = pipe(PROMPTS, height=16, width=16, num_inference_steps=3, guidance_scale=4.0,
                     latents=nchw(x_T), output_type="np").images
  np.testing.assert_allclose(ours, reference, atol=1e-4)
  assert reference.std() > 0.05


def test_import_writes_a_stage1_workdir_and_exports_back(sd_pipeline, tmp_path):
  folder, pipe = sd_pipeline
  imported = str(tmp_path / "pretrained")
  assert cli(["import", "--src", folder, "--out", imported]) == 0
  assert sorted(os.listdir(imported)) == [".ldm_jax_written.json", "autoencoder", "ldm_jax_pretrained.json",
                                         "text_encoder", "tokenizer", "unet"]

  # Stage 2 takes the imported autoencoder folder as its `autoencoder.workdir`.
  from ldm_jax import load
  from ldm_jax.runtime import sharding
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)))
  _, ae_config, ae_params = load.load_autoencoder(os.path.join(imported, "autoencoder"), sharding.replicated(mesh))
  assert (ae_config.data.image_size, ae_config.model.kind) == (16, "kl")
  _, params, _ = load_pretrained(folder)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, ae_params), params["autoencoder"])

  exported = str(tmp_path / "exported")
  assert cli(["export", "--src", imported, "--format", "diffusers", "--out", exported]) == 0
  reloaded = diffusers.StableDiffusionPipeline.from_pretrained(exported, safety_checker=None)
  for name in ("unet", "vae", "text_encoder"):
    ours, theirs = state_numpy(getattr(reloaded, name)), state_numpy(getattr(pipe, name))
    for key, value in theirs.items():
      np.testing.assert_array_equal(ours[key], value, err_msg=f"{name}: {key}")
  assert reloaded.vae.config.scaling_factor == 0.5
  assert reloaded.scheduler.config.prediction_type == "epsilon"
  with torch.no_grad():
    z = torch.from_numpy(np.random.default_rng(1).normal(size=(1, 4, 8, 8)).astype(np.float32))
    np.testing.assert_allclose(nhwc(reloaded.vae.decode(z).sample), nhwc(pipe.vae.decode(z).sample), atol=1e-6)
