"""A stage-2 config resolved against its autoencoder, data and conditioner, and the run's tokenizer.

Everything here runs before anything is compiled or written (the tokenizer is saved in the
workdir once the config is known to be good).
"""

from __future__ import annotations

import os
import shutil

import jax
import ml_collections

from ldm_jax import config as checks
from ldm_jax import data as data_lib
from ldm_jax.config import common as config_lib
from ldm_jax.config import diffusion as stage2_config
from ldm_jax.config import mesh as mesh_config
from ldm_jax.data.tokenizer import build_tokenizer, load_tokenizer
from ldm_jax.diffusion import schedule as schedule_lib
from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.models import conditioning
from ldm_jax.models import unet as unet_lib
from ldm_jax.train.diffusion import evaluation


def resolve_config(config: ml_collections.ConfigDict, ae_config: ml_collections.ConfigDict) -> None:
  """Fills the derived keys (U-Net channels, context dim, classes) and checks them against the
  autoencoder, the data and the conditioner, all before anything is compiled."""
  checks.check_finite(config)
  config_lib.validate_train_config(config.train)
  config_lib.validate_model_overrides(config.model, config.train)
  mesh_config.validate_mesh_config(config.mesh)
  data_lib.validate_data_config(config.data)
  conditioning.validate_cond_config(config.cond)
  if conditioning.uses_text(config.cond) and config.cond.text_encoder == "pretrained" and not config.init.pretrained:
    raise ValueError("cond.text_encoder: 'pretrained' is the frozen text encoder of init.pretrained, which is not "
                     "set; name a pretrained model there, or use 'scratch'.")
  # A pretrained autoencoder is convolutional: fine-tuning may use another image size than its own.
  for key in ("channels",) if config.init.pretrained else ("image_size", "channels"):
    if config.data[key] != ae_config.data[key]:
      raise ValueError(f"data.{key}: {config.data[key]}, but the autoencoder in {config.autoencoder.workdir} "
                       f"was trained with data.{key}={ae_config.data[key]}.")
  latent = ae_lib.latent_shape(ae_config.model, config.data.image_size)
  concat = conditioning.concat_channels(config.cond, latent[-1])
  for key, derived in (("in_channels", latent[-1] + concat), ("out_channels", latent[-1])):
    if config.model[key] == -1:
      config.model[key] = derived
    elif config.model[key] != derived:
      raise ValueError(f"model.{key}: {config.model[key]}, but the autoencoder's {latent[-1]}-channel latents"
                       f"{f' and {concat} concat channels' if key == 'in_channels' and concat else ''} "
                       f"need {derived} (or -1 to derive it).")
  if config.cond.kind == "class" and config.cond.num_classes == 0:
    config.cond.num_classes = data_lib.num_classes(config.data)
  config.model.num_classes = conditioning.num_class_embeddings(config.cond)
  unet_lib.validate_unet_config(config.model, latent, conditioning.context_dim(config.cond),
                                concat_channels=concat)
  takes_pooled = config.model.addition_embed_type == "text"
  if config.cond.pooled != takes_pooled or (takes_pooled and config.model.addition_embed_dim != config.cond.dim):
    raise ValueError(f"cond.pooled: {config.cond.pooled}, model.addition_embed_type "
                     f"{config.model.addition_embed_type!r}, model.addition_embed_dim {config.model.addition_embed_dim}: "
                     "the pooled text embedding needs both, model.addition_embed_type='text' and "
                     f"model.addition_embed_dim = cond.dim ({config.cond.dim}).")
  if config.diffusion.parameterization not in schedule_lib.PARAMETERIZATIONS:
    raise ValueError(f"diffusion.parameterization: {config.diffusion.parameterization!r} is not one of "
                     f"{schedule_lib.PARAMETERIZATIONS}.")
  if config.diffusion.loss_type not in schedule_lib.LOSS_TYPES:
    raise ValueError(f"diffusion.loss_type: {config.diffusion.loss_type!r} is not one of {schedule_lib.LOSS_TYPES}.")
  _check_buckets(config, ae_config)
  if config.cond.micro_conditioning != "none" and config.latent.cache:
    raise ValueError("latent.cache: the in-memory latent cache keeps no original sizes or crop offsets, which "
                     f"SDXL's micro-conditioning (cond.micro_conditioning={config.cond.micro_conditioning!r}) needs at "
                     "every step; write an on-disk cache (python -m ldm_jax.precompute) and name it in "
                     "latent.cache_dir, or train from the images.")
  for key in ("random_crop", "random_flip"):
    if config.latent.cache_dir and config.data[key]:
      raise ValueError(f"data.{key}: True, but the cache of latent.cache_dir holds one centre crop of each image, "
                       f"unflipped (python -m ldm_jax.precompute); set data.{key}=False, or train from the images.")
  stage2_config.check_values(config)
  schedule_lib.schedule_from_config(config.diffusion)  # raises on bad schedule keys
  evaluation.validate_eval_config(config)


def _check_buckets(config, ae_config) -> None:
  """Aspect-ratio buckets (`data.buckets`) whose latents the U-Net can take, from the images."""
  if not config.data.buckets:
    return
  if config.latent.cache or config.latent.cache_dir or config.cond.kind in ("concat", "hybrid"):
    raise ValueError("data.buckets: aspect-ratio bucketing trains on images of several sizes; the latent caches "
                     "(latent.cache, latent.cache_dir) and concat conditioning (cond.kind 'concat', 'hybrid') "
                     "take one size.")
  multiple = ae_lib.downsampling_factor(ae_config.model) * unet_lib.downsampling_factor(config.model.channel_mult)
  for height, width in config.data.buckets:
    if height % multiple or width % multiple:
      raise ValueError(f"data.buckets: {height}×{width} is not a multiple of {multiple} (the autoencoder's f × the "
                       "U-Net's downsampling) on both sides.")


def get_tokenizer(config, workdir):
  """The run's tokenizer: the one saved in the workdir (resume), else built and saved there
  (a `cond.tokenizer_dir` is copied as it is)."""
  if config.cond.kind not in ("text", "hybrid"):
    return None
  saved = os.path.join(workdir, "tokenizer")
  if os.path.isdir(saved):
    return load_tokenizer(saved, max_length=config.cond.max_length)
  tokenizer = build_tokenizer(config.cond, data_lib.captions(config.data, config.data.train_split))
  if jax.process_index() == 0:
    if config.cond.tokenizer_dir:
      shutil.copytree(config.cond.tokenizer_dir, saved)
    else:
      tokenizer.save(saved)
  return tokenizer


def get_tokenizer_2(config, workdir):
  """SDXL's second tokenizer: the one saved in `workdir/tokenizer_2` (resume), else that of the
  pretrained model whose frozen encoders condition the run, copied there; None for other runs."""
  saved = os.path.join(workdir, "tokenizer_2")
  if not os.path.isdir(saved):
    if not (conditioning.uses_text(config.cond) and config.cond.text_encoder == "pretrained"):
      return None
    source = os.path.join(config.init.pretrained, "tokenizer_2")
    if not os.path.isdir(source):
      return None
    if jax.process_index() == 0:
      shutil.copytree(source, saved)
    return load_tokenizer(source, max_length=config.cond.max_length)
  return load_tokenizer(saved, max_length=config.cond.max_length)


# Keys a resumed run must share with its checkpoints (`config.check_resume`).
RESUME_KEYS = ("model.", "cond.kind", "cond.class_mode", "cond.concat_source", "cond.text_encoder", "cond.dim",
               "cond.depth", "cond.num_heads", "cond.head_dim", "cond.vocab_size", "cond.max_length",
               "cond.num_classes", "cond.concat_channels", "cond.micro_conditioning", "autoencoder.workdir", "init.pretrained", "latent.cache",
               "lora.", "textual_inversion.")  # dreambooth.* may change: it is data
