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
    cond_cfg: the `cond` section (kind, num_classes, max_length); tokenizer: for text models.
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
  config, ae_config, step, tokenizer = _read_run_files(workdir)
  size = config.data.image_size
  return ModelInfo(
      source=workdir, cond_cfg=config.cond, tokenizer=tokenizer, num_timesteps=config.diffusion.num_timesteps,
      image_size=(size, size) if _is_int(size) else tuple(size), channels=config.data.channels,
      latent_channels=int(ae_config.model.embed_dim), f=ae_lib.downsampling_factor(ae_config.model),
      unet_factor=2 ** (len(config.model.channel_mult) - 1), step=step,
      load=lambda mesh, use_ema: load_ldm(workdir, mesh, use_ema=use_ema))


def read_pretrained(directory: str) -> ModelInfo:
  """A pretrained model (`ldm_jax.convert.load_pretrained`: an ldm_jax pretrained directory, a
  diffusers pipeline folder, a single-file checkpoint). Its weights are read into host memory
  here — the readers give configs and weights together — and placed on devices by `load`.

  The conditioning comes from what the source holds: a trained `conditioner` (ldm_jax exports,
  with its `cond` config), else a pretrained `text_encoder` + tokenizer (Stable Diffusion: the
  encoder's last hidden states are the context), else none (unconditional U-Net).
  """
  # Imported here: workdir sampling does not need the converters.
  from ldm_jax.convert import load_pretrained  # pylint: disable=g-import-not-at-top
  if not os.path.exists(directory):
    raise FileNotFoundError(f"--pretrained: {directory} does not exist.")
  modules, params, configs = load_pretrained(directory)
  for component in ("unet", "autoencoder"):
    if component not in modules:
      raise ValueError(f"--pretrained: {directory} has no {component}; sampling needs a U-Net and an autoencoder.")
  tokenizer = modules.get("tokenizer")
  unet_cfg, ae_cfg = configs["unet"], configs["autoencoder"]
  if "conditioner" in modules:
    conditioner, cond_cfg, cond_params = modules["conditioner"], configs["cond"], params["conditioner"]
  elif "text_encoder" in modules:
    if tokenizer is None:
      raise ValueError(f"--pretrained: {directory} has a text encoder but no tokenizer/ folder.")
    conditioner = TextEncoderConditioner(modules["text_encoder"])
    cond_cfg = conditioning.default_cond_config()
    cond_cfg.update(kind="text", text_encoder="pretrained", max_length=tokenizer.max_length,
                    dim=int(configs["text_encoder"].dim))
    cond_params = {"text_encoder": params["text_encoder"]}
  else:
    if unet_cfg.get("context_dim") is not None or unet_cfg.get("num_classes") is not None:
      raise ValueError(f"--pretrained: the U-Net in {directory} is conditional (context_dim / num_classes) but the "
                       "directory has neither a text encoder nor a conditioner.")
    cond_cfg = conditioning.default_cond_config()
    conditioner, cond_params = conditioning.make_conditioner(cond_cfg), {}
  diffusion_cfg = configs.get("diffusion", ml_collections.ConfigDict())
  scale_factor = float(configs.get("latent", {}).get("scale_factor", 1.0))
  resolution = int(ae_cfg.resolution)
  ldm = LatentDiffusion(
      unet=modules["unet"], conditioner=conditioner, autoencoder=modules["autoencoder"],
      schedule=schedule_lib.schedule_from_config(diffusion_cfg), scale_factor=scale_factor,
      parameterization=diffusion_cfg.get("parameterization", "eps"), cond_cfg=cond_cfg, tokenizer=tokenizer,
      latent_shape=ae_lib.latent_shape(ae_cfg, resolution))
  host = {"unet": params["unet"], "cond": cond_params}, params["autoencoder"]

  def load(mesh, use_ema):
    del use_ema  # a pretrained directory holds one set of weights
    return (ldm,) + jax.device_put(host, sharding.replicated(mesh))

  return ModelInfo(
      source=directory, cond_cfg=cond_cfg, tokenizer=tokenizer,
      num_timesteps=int(diffusion_cfg.get("num_timesteps", 1000)), image_size=(resolution, resolution),
      channels=int(ae_cfg.in_channels), latent_channels=int(ae_cfg.embed_dim),
      f=ae_lib.downsampling_factor(ae_cfg), unet_factor=2 ** (len(unet_cfg.channel_mult) - 1), step=None, load=load)


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
