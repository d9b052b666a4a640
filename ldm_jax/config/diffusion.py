"""Stage-2 config: every key of `train_diffusion.py` with its default, `:smoke`, the samplers and
timestep spacings, and the checks of keys that need nothing but their values (no jax).

Config files (`configs/ldm/*.py`) start from `default_config()`; `ldm_jax.train.diffusion`
resolves a config against its autoencoder, data and conditioner.
"""

from __future__ import annotations

import numbers

import ml_collections

from ldm_jax import config as checks
from ldm_jax.config import common, sections

SAMPLERS = ("ddim", "ddpm", "plms", "dpmpp_2m")
SPACINGS = ("uniform", "quadratic", "leading", "linspace", "trailing")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")  # diffusion.timestep_sampling


def default_config() -> ml_collections.ConfigDict:
  """All stage-2 keys with defaults (an SD 1.x-shaped U-Net; config files override)."""
  config = ml_collections.ConfigDict()
  config.autoencoder = ml_collections.ConfigDict(dict(workdir=""))
  config.data = sections.default_data_config()
  config.model = sections.default_unet_config()
  config.model.in_channels = -1   # -1: the autoencoder's latent channels (+ concat channels)
  config.model.out_channels = -1  # -1: the autoencoder's latent channels
  config.cond = sections.default_cond_config()
  config.diffusion = ml_collections.ConfigDict(dict(
      beta_schedule="scaled_linear", num_timesteps=1000, linear_start=0.0015, linear_end=0.0195,
      cosine_s=8e-3, zero_terminal_snr=False, parameterization="eps", loss_type="l2",
      min_snr_gamma=0.0, offset_noise=0.0,  # min_snr_gamma 0 = no weighting
      timestep_sampling="uniform",  # training timesteps: 'uniform' | 'logit_normal' (SD3: t/T = sigmoid(mean + std·n))
      timestep_logit_mean=0.0,  # 'logit_normal': its mean; < 0 trains more on the less noisy steps
      timestep_logit_std=1.0))  # 'logit_normal': its spread
  # scale_factor 0: 1/std; cache: encode the split in memory; cache_dir: an on-disk cache (python -m ldm_jax.precompute)
  config.latent = ml_collections.ConfigDict(dict(scale_factor=0.0, cache=False, cache_dir=""))
  config.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, warmup_steps=1_000, schedule="constant", weight_decay=0.0, b1=0.9, b2=0.999,
      grad_clip=1.0, ema_decay=0.9999))
  config.sample = ml_collections.ConfigDict(dict(
      sampler="ddim", num_steps=50, eta=0.0, guidance_scale=3.0, num_images=16, prompts=(),
      guidance_interval=()))  # (LO, HI): guidance only at timesteps LO <= t <= HI; () = every step
  config.eval = ml_collections.ConfigDict(dict(
      metrics=(),            # () = no periodic evaluation; some of 'fd', 'kid', 'pr', 'is', 'acc'
      extractor="vgg16:64",  # 'vgg16[:SIZE]' (offline), 'inception' (FID; needs weights), 'classifier:RUN'
      num_samples=1_000,     # generated per evaluation
      num_ref=10_000,        # reference: the first num_ref images of data.eval_split (fewer if smaller)
      batch_size=64,         # samples per compiled sampling call, and images per feature batch
      kid_subset_size=100, pr_k=3,
      cache_dir=""))         # reference statistics cache; '' = $LDM_JAX_EVAL_CACHE or ~/.cache/ldm_jax/eval
  config.init = ml_collections.ConfigDict(dict(pretrained=""))  # a pretrained model to fine-tune
  config.train = common.train_config()
  config.mesh = common.mesh_config()
  return config


def apply_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a stage-2 config to a < 1 minute CPU run (the U-Net and text encoder become tiny).

  The data shrink as the stage-1 `:smoke` configs do (16 px), so that a smoke autoencoder fits.
  """
  config.data.update(image_size=16, num_examples=min(config.data.get("num_examples", 256) or 256, 256))
  config.model.update(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                      num_heads=2, num_head_channels=-1, transformer_depth=1)
  if config.model.context_dim is not None:
    config.model.context_dim = 32
  if config.model.addition_embed_type == "text":  # the pooled text embedding has cond.dim channels
    config.model.addition_embed_dim = 32
  config.cond.update(dim=32, depth=1, num_heads=2, head_dim=-1, max_length=min(config.cond.max_length, 16),
                     vocab_size=min(config.cond.vocab_size, 512))
  config.optim.update(learning_rate=1e-3, warmup_steps=2)
  config.sample.update(num_steps=4, num_images=4)
  config.eval.update(extractor="vgg16:32", num_samples=16, num_ref=32, batch_size=8, kid_subset_size=8)
  config.train.update(num_steps=10, batch_size=8, log_every=5, checkpoint_every=5, eval_every=10,
                      image_every=10)
  return config


def check_values(config: ml_collections.ConfigDict) -> None:
  """The `sample.*`, `optim.*`, `latent.scale_factor` and `diffusion.*` number keys on their own;
  ValueError names the key."""
  if config.sample.sampler not in SAMPLERS:
    raise ValueError(f"sample.sampler: {config.sample.sampler!r} is not one of {SAMPLERS}.")
  if config.optim.schedule not in ("constant", "cosine"):
    raise ValueError(f"optim.schedule: {config.optim.schedule!r} is not 'constant' or 'cosine'.")
  o = config.optim
  checks.check_number("optim.learning_rate", o.learning_rate, gt=0)
  checks.check_number("optim.warmup_steps", o.warmup_steps, integer=True, ge=0)
  for key in ("weight_decay", "grad_clip"):
    checks.check_number(f"optim.{key}", o[key], ge=0)
  for key in ("b1", "b2", "ema_decay"):
    checks.check_number(f"optim.{key}", o[key], ge=0, lt=1)
  checks.check_number("latent.scale_factor", config.latent.scale_factor, ge=0)
  for key in ("min_snr_gamma", "offset_noise"):
    checks.check_number(f"diffusion.{key}", config.diffusion[key], ge=0)
  if config.diffusion.timestep_sampling not in TIMESTEP_SAMPLING:
    raise ValueError(f"diffusion.timestep_sampling: {config.diffusion.timestep_sampling!r} is not one of "
                     f"{TIMESTEP_SAMPLING}.")
  checks.check_number("diffusion.timestep_logit_mean", config.diffusion.timestep_logit_mean)
  checks.check_number("diffusion.timestep_logit_std", config.diffusion.timestep_logit_std, gt=0)
  checks.check_number("sample.num_steps", config.sample.num_steps, integer=True, ge=1)
  checks.check_number("sample.num_images", config.sample.num_images, integer=True, ge=1)
  checks.check_number("sample.eta", config.sample.eta, ge=0)
  checks.check_number("sample.guidance_scale", config.sample.guidance_scale, ge=0)
  if config.sample.guidance_interval:
    check_guidance_interval(tuple(config.sample.guidance_interval), "sample.guidance_interval")


def guidance_interval(sample_cfg: ml_collections.ConfigDict) -> tuple[float, float] | None:
  """`sample.guidance_interval` as the samplers take it: (LO, HI), or None (every step) for ()."""
  return tuple(sample_cfg.guidance_interval) or None


def check_guidance_interval(interval, key: str) -> None:
  """ValueError naming `key` unless `interval` is two timesteps (lo, hi) with 0 ≤ lo ≤ hi."""
  if not (isinstance(interval, (tuple, list)) and len(interval) == 2
          and all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in interval)
          and 0 <= interval[0] <= interval[1]):
    raise ValueError(f"{key}: expected two timesteps LO,HI with 0 <= LO <= HI (guidance at LO <= t <= HI), "
                     f"got {interval!r}.")
