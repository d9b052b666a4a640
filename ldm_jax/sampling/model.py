"""The model a request names, before its weights are on devices: `ModelInfo` from a stage-2 run or a pretrained model."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import ml_collections

from ldm_jax import load
from ldm_jax.diffusion.latent_diffusion import LatentDiffusion
from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.models import unet as unet_lib
from ldm_jax.runtime import sharding
from ldm_jax.sampling.request import SampleRequest, is_int


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What sampling needs to know about a model before its weights are placed, and how to place them.

  Attributes:
    source: the workdir or pretrained directory (named in messages).
    cond_cfg: the `cond` section (kind, num_classes, max_length); tokenizer: for text models;
      tokenizer_2: SDXL's second tokenizer, else None.
    num_timesteps: the training timesteps; image_size: the training size (H, W); channels: image
      channels; latent_channels, f: the autoencoder's; unet_factor: the U-Net's downsampling.
    step: the checkpoint step (workdirs), else None.
    load: `load(mesh, use_ema) -> (ldm, params {'unet', 'cond'}, ae_params)`, replicated on `mesh`.
  """
  source: str
  cond_cfg: ml_collections.ConfigDict
  tokenizer: Any
  num_timesteps: int
  image_size: tuple[int, int]
  channels: int
  latent_channels: int
  f: int
  unet_factor: int
  step: int | None
  load: Callable[[jax.sharding.Mesh, bool], tuple[LatentDiffusion, dict, dict]]
  tokenizer_2: Any = None

  @property
  def kind(self) -> str:
    return self.cond_cfg.kind

  @property
  def size_multiple(self) -> int:
    """Image sides must be multiples of f × the U-Net's own downsampling factor."""
    return self.f * self.unet_factor


def read_run(workdir: str) -> ModelInfo:
  """A stage-2 run from its configs, its newest checkpoint's step and its tokenizer; no weights read.

  Raises FileNotFoundError naming the missing path (workdir, config.json, checkpoints, the
  autoencoder run, the tokenizer folder) and ValueError when the workdir is not a stage-2 run.
  """
  config, ae_config, step, tokenizer = load.read_diffusion_run(workdir)
  size = config.data.image_size
  return ModelInfo(
      source=workdir, cond_cfg=config.cond, tokenizer=tokenizer, num_timesteps=config.diffusion.num_timesteps,
      image_size=(size, size) if is_int(size) else tuple(size), channels=config.data.channels,
      latent_channels=int(ae_config.model.embed_dim), f=ae_lib.downsampling_factor(ae_config.model),
      unet_factor=unet_lib.downsampling_factor(config.model.channel_mult), step=step,
      load=lambda mesh, use_ema: load.load_diffusion_run(workdir, mesh, use_ema=use_ema),
      tokenizer_2=load.run_tokenizer_2(workdir, config))


def read_pretrained(directory: str, flag: str = "--pretrained") -> ModelInfo:
  """A pretrained model (`ldm_jax.load.load_pretrained_ldm`: an ldm_jax pretrained directory, a
  diffusers pipeline folder, a single-file checkpoint). Its weights are read into host memory
  here — the readers give configs and weights together — and placed on devices by `load`.

  The conditioning comes from what the source holds (`ldm_jax.load.pretrained_conditioning`): a
  trained `conditioner`, else a pretrained `text_encoder` + tokenizer, else none. Errors name `flag`.
  """
  ldm, params, ae_params, configs = load.load_pretrained_ldm(directory, flag)
  ae_cfg, diffusion_cfg = configs["autoencoder"], configs.get("diffusion", ml_collections.ConfigDict())
  resolution = int(ae_cfg.resolution)

  def place(mesh, use_ema):
    del use_ema  # a pretrained directory holds one set of weights
    return (ldm,) + jax.device_put((params, ae_params), sharding.replicated(mesh))

  return ModelInfo(
      source=directory, cond_cfg=ldm.cond_cfg, tokenizer=ldm.tokenizer,
      num_timesteps=int(diffusion_cfg.get("num_timesteps", 1000)), image_size=(resolution, resolution),
      channels=int(ae_cfg.in_channels), latent_channels=int(ae_cfg.embed_dim),
      f=ae_lib.downsampling_factor(ae_cfg), unet_factor=unet_lib.downsampling_factor(configs["unet"].channel_mult),
      step=None, load=place, tokenizer_2=ldm.tokenizer_2)


def is_pretrained_dir(directory: str) -> bool:
  """Whether `directory` is a pretrained directory (`convert import`/`export --format ldm_jax`
  output: `unet/config.json`, no run `config.json`) rather than a training workdir."""
  return (os.path.isfile(os.path.join(directory, "unet", "config.json"))
          and not os.path.isfile(os.path.join(directory, "config.json")))


def read_model(request: SampleRequest) -> ModelInfo:
  """The model a request names: `--workdir` (a stage-2 run, or a pretrained directory made by
  `python -m ldm_jax.convert import --out`) or `--pretrained`."""
  if request.pretrained is not None:
    return read_pretrained(request.pretrained)
  if is_pretrained_dir(request.workdir):
    return read_pretrained(request.workdir)
  return read_run(request.workdir)


def read_refiner(request: SampleRequest) -> ModelInfo | None:
  """The `--refiner` of a base + refiner ensemble (a pretrained directory or diffusers folder), or None."""
  return None if request.refiner is None else read_pretrained(request.refiner, "--refiner")
