"""Sampling from a trained stage-2 run or a pretrained model: read it, check a request against it, write images.

    request = SampleRequest(out="out/shapes", workdir="runs/shapes_ldm", num_samples=16,
                            prompts=("a large red circle on a white background",))
    sample_to_dir(request)   # out/shapes/grid.png, images/00000.png …, samples.npz, sampling.json

This is what `sample.py` runs; `SampleRequest` mirrors its flags (error messages name them).
The order is the point:

  1. `check_request`: the request on its own (ranges, exclusive flags, the output directory).
  2. `read_model` → `ModelInfo`: for a workdir (`read_run`) the run's `config.json`, its
     autoencoder's, the newest checkpoint's step and the tokenizer — no weights; for
     `--pretrained` (`read_pretrained`, through `ldm_jax.convert.load_pretrained`) configs and
     weights in host memory, as the converters read them together.
  3. `make_plan`: the request against the model (conditioning kind, class range, timesteps, sizes
     divisible by the latent and U-Net factors, init image and mask) and every condition prepared
     on the host (prompts are tokenized here; the tokenizer warns when it truncates one).
  4. `ModelInfo.load` (`load_ldm` for workdirs): weights (EMA by default) replicated on a mesh of
     all devices.
  5. One jit-compiled function per request (same padded shape for every batch): noise →
     sampler (one `lax.scan`, guidance inside) → decoder, batches split over the mesh.
  6. `write_outputs`: into a hidden staging directory beside `--out`, renamed at the end, so
     a failure at any point leaves no partial output.

Seeds: sample i starts from the noise `normal(fold_in(k_noise, i))`, so with a deterministic
sampler (DDIM η = 0, PLMS, DPM-Solver++) sample i is the same whatever the batch size; the
samplers' own noise (DDPM, DDIM η > 0) and img2img's noise are drawn per batch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from PIL import Image
from tqdm import tqdm

from ldm_jax import config as checks
from ldm_jax.data.tokenizer import load_tokenizer
from ldm_jax.diffusion import samplers
from ldm_jax.diffusion import schedule as schedule_lib
from ldm_jax.diffusion.pipeline import LatentDiffusion, TextEncoderConditioner
from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.models import conditioning
from ldm_jax.nn import attention as attention_lib
from ldm_jax.train import checkpoint as ckpt_lib
from ldm_jax.train import config as config_lib
from ldm_jax.train import diffusion
from ldm_jax.train import sharding
from ldm_jax.train.logging import image_grid, save_png, to_uint8

GRID_MAX_IMAGES = 64  # grid.png shows the first 64 images; every image has its own PNG
INTERMEDIATE_ROWS = 8  # intermediates.png shows the denoising of the first 8 samples
_SUPPORTED_KINDS = ("none", "class", "text")


@dataclasses.dataclass(frozen=True)
class SampleRequest:
  """What to sample and where to write it; the fields are `sample.py`'s flags.

  Attributes:
    out: output directory (must not exist, or be empty).
    workdir: a stage-2 run directory. `pretrained`: anything `ldm_jax.convert.load_pretrained`
      reads (an ldm_jax pretrained directory, a diffusers pipeline folder, a single-file
      checkpoint). Exactly one of the two.
    num_samples: images to make; None = one per prompt of `prompts` (a prompts file), or one per
      class with `class_labels='all'`.
    prompts: text-conditional models: the prompts, cycled over the samples.
    class_labels: class-conditional models: one label for all samples, or 'all' (cycle the classes).
    negative_prompt: the unconditional branch of guidance for text models (default: "").
    guidance_scale, guidance_rescale: classifier-free guidance (`samplers.cfg_model_fn`).
    steps, eta, sampler: the sampler's settings (`eta` only for DDIM).
    timestep_spacing, steps_offset: the timesteps (`samplers.make_timesteps`): 'uniform' (CompVis,
      the default), 'quadratic', or diffusers' 'leading' / 'linspace' / 'trailing' with its
      `steps_offset`, to visit the timesteps of the sampler's diffusers scheduler.
    seed: PRNG seed; the same request gives the same images on the same mesh.
    batch_size: images per compiled call, a multiple of the number of devices.
    height, width: image size in pixels; None = the training size (or the init image's).
    init_image: image-to-image from this file; `strength` ∈ [0, 1] (default 0.6; with `mask` 1.0).
    mask: inpainting mask file, the size of the init image; white = repaint, black = keep.
    use_ema: sample with the EMA weights (default) or the raw ones (workdirs only).
    save_intermediates: step indices whose x0 predictions make `intermediates.png`.
    attention: the attention implementation of the U-Net and the autoencoder
      (`ldm_jax.nn.attention.IMPLEMENTATIONS`); None = the model's own (`model.attention`).
  """
  out: str
  workdir: str | None = None
  pretrained: str | None = None
  num_samples: int | None = None
  prompts: tuple[str, ...] | None = None
  class_labels: int | str | None = None
  negative_prompt: str | None = None
  guidance_scale: float = 3.0
  guidance_rescale: float = 0.0
  steps: int = 50
  eta: float = 0.0
  sampler: str = "ddim"
  timestep_spacing: str = "uniform"
  steps_offset: int = 0
  seed: int = 0
  batch_size: int = 8
  height: int | None = None
  width: int | None = None
  init_image: str | None = None
  strength: float | None = None
  mask: str | None = None
  use_ema: bool = True
  save_intermediates: tuple[int, ...] = ()
  attention: str | None = None


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_request(request: SampleRequest) -> None:
  """Checks the request on its own, before any file of the run is read; ValueError names the flag."""
  r = request
  if (r.workdir is None) == (r.pretrained is None):
    raise ValueError("--workdir / --pretrained: give exactly one (a stage-2 run directory, or a converted "
                     "pretrained model directory).")
  if r.pretrained is not None and not r.use_ema:
    raise ValueError("--use_ema: a --pretrained directory holds one set of weights; --nouse_ema applies to "
                     "--workdir runs.")
  if r.num_samples is not None and (not _is_int(r.num_samples) or r.num_samples < 1):
    raise ValueError(f"--num_samples: expected a positive integer, got {r.num_samples!r}.")
  if not _is_int(r.batch_size) or r.batch_size < 1:
    raise ValueError(f"--batch_size: expected a positive integer, got {r.batch_size!r}.")
  if not _is_int(r.steps) or r.steps < 1:
    raise ValueError(f"--steps: expected a positive integer, got {r.steps!r}.")
  if not _is_int(r.seed):
    raise ValueError(f"--seed: expected an integer, got {r.seed!r}.")
  checks.check_number("--guidance_scale", r.guidance_scale, ge=0)  # 1 = no guidance
  checks.check_number("--guidance_rescale", r.guidance_rescale, ge=0, le=1)
  if r.sampler not in samplers.SAMPLERS:
    raise ValueError(f"--sampler: {r.sampler!r} is not one of {', '.join(samplers.SAMPLERS)}.")
  if r.attention is not None:
    attention_lib.check_implementation(r.attention, "--attention")
  if r.timestep_spacing not in samplers.SPACINGS:
    raise ValueError(f"--timestep_spacing: {r.timestep_spacing!r} is not one of {', '.join(samplers.SPACINGS)}.")
  if not _is_int(r.steps_offset) or r.steps_offset < 0:
    raise ValueError(f"--steps_offset: expected a non-negative integer, got {r.steps_offset!r}.")
  checks.check_number("--eta", r.eta, ge=0)
  if r.eta != 0 and r.sampler != "ddim":
    raise ValueError(f"--eta: only DDIM has an η; got --eta {r.eta} with --sampler {r.sampler}.")
  if r.prompts is not None and r.class_labels is not None:
    raise ValueError("--prompt / --prompts_file and --class_label: give prompts (text model) or a class "
                     "label (class-conditional model), not both.")
  if r.prompts is not None and (isinstance(r.prompts, str) or not r.prompts):
    raise ValueError(f"--prompt / --prompts_file: expected a non-empty sequence of prompts, got {r.prompts!r}.")
  if r.class_labels is not None and r.class_labels != "all" and not _is_int(r.class_labels):
    raise ValueError(f"--class_label: expected a class index or 'all', got {r.class_labels!r}.")
  if r.negative_prompt is not None and r.guidance_scale == 1:
    raise ValueError("--negative_prompt: replaces the unconditional branch of guidance, which "
                     "--guidance_scale 1 does not run; use a scale ≠ 1.")
  for name in ("height", "width"):
    value = getattr(r, name)
    if value is not None and (not _is_int(value) or value < 1):
      raise ValueError(f"--{name}: expected a positive number of pixels, got {value!r}.")
  if r.strength is not None:
    if r.init_image is None:
      raise ValueError("--strength: only used with --init_image (image-to-image or inpainting).")
    checks.check_number("--strength", r.strength, ge=0, le=1)  # 0 = the init image, 1 = pure noise
  if r.mask is not None and r.init_image is None:
    raise ValueError("--mask: inpainting needs the image to complete; give --init_image too.")
  for flag, path in (("--init_image", r.init_image), ("--mask", r.mask)):
    if path is None:
      continue
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{flag}: {path} is not a file.")
    _read_image(path, flag, "L")  # a damaged file fails here, before the run is read
  steps = list(r.save_intermediates)
  if any(not _is_int(i) or i < 0 for i in steps) or len(set(steps)) != len(steps):
    raise ValueError(f"--save_intermediates: expected distinct step indices ≥ 0, got {tuple(steps)}.")
  if os.path.exists(r.out) and (not os.path.isdir(r.out) or os.listdir(r.out)):
    raise FileExistsError(f"--out: {r.out} already exists and is not an empty directory; choose a new one "
                          "(outputs are never mixed with earlier ones).")


# ---------------------------------------------------------------------------------------------
# The model, before its weights are on devices

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


def checkpoint_steps(checkpoint_dir: str) -> list[int]:
  """Steps of the finished checkpoints in `checkpoint_dir` (orbax's in-progress ones are skipped)."""
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(int(name) for name in os.listdir(checkpoint_dir)
                if name.isdigit() and os.path.isdir(os.path.join(checkpoint_dir, name, "state")))


def _read_run_files(workdir: str):
  """(config, ae_config, newest step, tokenizer) of a stage-2 run; errors name the missing path."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir: {workdir} does not exist.")
  config = config_lib.load_config(workdir)
  if "diffusion" not in config or "autoencoder" not in config:
    raise ValueError(f"--workdir: {os.path.join(workdir, 'config.json')} is not a stage-2 run's config "
                     "(no diffusion/autoencoder sections); sample from a train_diffusion.py workdir.")
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  steps = checkpoint_steps(checkpoint_dir)
  if not steps:
    raise FileNotFoundError(f"--workdir: {checkpoint_dir} holds no checkpoint; train the model there first "
                            f"(python train_diffusion.py --config … --workdir {workdir}).")
  ae_workdir = config.autoencoder.workdir
  if not checkpoint_steps(os.path.join(ae_workdir, "checkpoints")):
    raise FileNotFoundError(f"autoencoder.workdir: the run's autoencoder {ae_workdir} (named in "
                            f"{os.path.join(workdir, 'config.json')}) has no checkpoint.")
  ae_config = config_lib.load_config(ae_workdir)
  tokenizer = None
  if conditioning.uses_text(config.cond):
    tokenizer_dir = os.path.join(workdir, "tokenizer")
    if not os.path.isdir(tokenizer_dir):
      raise FileNotFoundError(f"--workdir: {tokenizer_dir} is missing; a text-conditional run saves its "
                              "tokenizer there and sampling must use the same token ids.")
    tokenizer = load_tokenizer(tokenizer_dir, max_length=config.cond.max_length)
  return config, ae_config, steps[-1], tokenizer


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


def load_ldm(workdir: str, mesh: jax.sharding.Mesh, *, use_ema: bool = True) -> tuple[LatentDiffusion, dict, dict]:
  """(ldm, params {'unet', 'cond'}, ae_params) of a stage-2 run's newest checkpoint, replicated on `mesh`.

  `use_ema` picks the EMA weights (what the trainer's sample grids show) or the raw ones; the
  latent `scale_factor` is the one the run estimated.
  """
  config, _, step, tokenizer = _read_run_files(workdir)
  model, ae_config, ae_params = diffusion.load_frozen_autoencoder(config, mesh)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    params = checkpointer.restore_subtree(("ema_params" if use_ema else "params",), sharding.replicated(mesh),
                                          step=step)
    scale_factor = checkpointer.restore_subtree(("scale_factor",), sharding.replicated(mesh), step=step)
  finally:
    checkpointer.close()
  ldm = diffusion.build_ldm(config, model, ae_config, tokenizer, float(jax.device_get(scale_factor)))
  return ldm, params, ae_params


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


# ---------------------------------------------------------------------------------------------
# The request against the model

@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything a request resolves to, on the host, before loading weights.

  Attributes:
    num_samples, batch_size: N images, made B at a time (B a multiple of the device count;
      the last batch is padded and the padding dropped).
    image_size: (H, W); latent_shape: (h, w, c).
    cond: prepared conditions of all N samples ({'label': [N]} / {'tokens': [N, L]} / {}).
    null: the unconditional branch, leading axis 1 (null class, "" or the negative prompt).
    labels: int32 [N] (class models); prompts: N strings (text models).
    init_image: [1, H, W, C] in [-1, 1] or None; keep_mask: [1, h, w, 1], 1 = keep, or None.
    strength: for init_image; steps_run: how many sampler steps run; grid_cols: grid columns.
  """
  num_samples: int
  batch_size: int
  image_size: tuple[int, int]
  latent_shape: tuple[int, int, int]
  cond: dict
  null: dict
  labels: np.ndarray | None
  prompts: list[str] | None
  init_image: np.ndarray | None
  keep_mask: np.ndarray | None
  strength: float | None
  steps_run: int
  grid_cols: int | None

  @property
  def num_batches(self) -> int:
    return math.ceil(self.num_samples / self.batch_size)

  @property
  def mode(self) -> str:
    if self.init_image is None:
      return "sample"
    return "img2img" if self.keep_mask is None else "inpaint"


def _read_image(path: str, flag: str, mode: str) -> np.ndarray:
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert(mode))
  except OSError as e:
    raise ValueError(f"{flag}: cannot read {path} as an image ({e}).") from e


def _conditioning(request: SampleRequest, info: ModelInfo):
  """(num_samples, labels, prompts, grid columns) of the request for the model's conditioning kind."""
  kind, r = info.kind, request
  if kind not in _SUPPORTED_KINDS:
    raise ValueError(f"{'--workdir' if info.step is not None else '--pretrained'}: the model in {info.source} has "
                     f"cond.kind={kind!r} (concat conditioning: super-resolution, inpainting models, maps), which "
                     f"sample.py does not sample yet; it samples {', '.join(_SUPPORTED_KINDS)} models.")
  if kind != "text" and r.prompts is not None:
    raise ValueError(f"--prompt / --prompts_file: the model in {info.source} is not text-conditional "
                     f"(cond.kind={kind!r}){'; use --class_label' if kind == 'class' else ''}.")
  if kind != "text" and r.negative_prompt is not None:
    raise ValueError(f"--negative_prompt: the model in {info.source} is not text-conditional (cond.kind={kind!r}).")
  if kind != "class" and r.class_labels is not None:
    raise ValueError(f"--class_label: the model in {info.source} is not class-conditional "
                     f"(cond.kind={kind!r}){'; use --prompt or --prompts_file' if kind == 'text' else ''}.")
  labels = prompts = cols = None
  n = r.num_samples
  if kind == "class":
    num_classes = info.cond_cfg.num_classes
    if r.class_labels is None:
      raise ValueError(f"--class_label: the model in {info.source} is class-conditional; give a class in "
                       f"[0, {num_classes}) or 'all'.")
    if r.class_labels == "all":
      n = num_classes if n is None else n
      labels = np.arange(n, dtype=np.int32) % num_classes
      cols = num_classes if num_classes <= 16 else None
    else:
      if not 0 <= r.class_labels < num_classes:
        raise ValueError(f"--class_label: {r.class_labels} is outside the model's classes [0, {num_classes}).")
      if n is None:
        raise ValueError("--num_samples: required with a single --class_label.")
      labels = np.full((n,), r.class_labels, np.int32)
  elif kind == "text":
    if r.prompts is None:
      raise ValueError(f"--prompt / --prompts_file: the model in {info.source} is text-conditional; give a "
                       "prompt (--prompt '' samples unconditionally).")
    n = len(r.prompts) if n is None else n
    prompts = [r.prompts[i % len(r.prompts)] for i in range(n)]
    cols = len(r.prompts) if 2 <= len(r.prompts) <= 16 else None
  elif n is None:
    raise ValueError("--num_samples: required for an unconditional model.")
  if kind == "none" and r.guidance_scale != 1:
    logging.info("The model in %s is unconditional; --guidance_scale %s has no effect.", info.source,
                 r.guidance_scale)
  return n, labels, prompts, cols


def make_plan(request: SampleRequest, info: ModelInfo, num_devices: int) -> Plan:
  """Checks the request against the model and prepares every input on the host; no weights needed.

  Raises ValueError naming the flag (and the model's limit) for: conditioning that does not fit the
  model, a class out of range, more steps than the training timesteps, sizes not divisible by
  f × the U-Net's factor, an init image of the wrong size, a mask not matching it, intermediate
  steps that do not run, a batch size not divisible by the devices.
  """
  r = request
  n, labels, prompts, cols = _conditioning(r, info)
  num_timesteps = info.num_timesteps
  if r.steps > num_timesteps:
    raise ValueError(f"--steps: {r.steps} is more than the {num_timesteps} timesteps the model was trained with.")
  try:
    samplers.make_timesteps(num_timesteps, r.steps, r.timestep_spacing, steps_offset=r.steps_offset, sampler=r.sampler)
  except ValueError as err:
    raise ValueError(f"--steps / --timestep_spacing / --steps_offset: {err}") from None

  init_image = keep_mask = None
  channels = info.channels
  if r.init_image is not None:
    pixels = _read_image(r.init_image, "--init_image", "L" if channels == 1 else "RGB")
    height, width = pixels.shape[:2]
    for name, want, got in (("height", r.height, height), ("width", r.width, width)):
      if want is not None and want != got:
        raise ValueError(f"--{name}: {want}, but --init_image {r.init_image} is {width}×{height} (W×H); "
                         f"omit --{name} or resize the image.")
    init_image = (pixels.reshape(1, height, width, channels).astype(np.float32) / 127.5 - 1.0)
  else:
    height = info.image_size[0] if r.height is None else r.height
    width = info.image_size[1] if r.width is None else r.width
  m = info.size_multiple
  for name, value in (("height", height), ("width", width)):
    if value % m:
      what = f"--init_image: {r.init_image} has {name} {value}" if r.init_image else f"--{name}: {value}"
      raise ValueError(f"{what} is not a multiple of {m} (the autoencoder's f = {info.f} × the U-Net's "
                       f"downsampling {m // info.f}).")
  f = info.f
  latent_shape = (height // f, width // f, info.latent_channels)

  if r.mask is not None:
    mask = _read_image(r.mask, "--mask", "L")
    if mask.shape != (height, width):
      raise ValueError(f"--mask: {r.mask} is {mask.shape[1]}×{mask.shape[0]} (W×H), but --init_image "
                       f"{r.init_image} is {width}×{height}; they must match.")
    keep = (mask < 128).astype(np.float32).reshape(1, height, width, 1)  # white (≥ 128) = repaint
    # A latent pixel is kept only where its whole f×f block is kept, so no repainted pixel is pinned.
    keep_mask = (np.asarray(samplers.mask_to_latent(keep, f)) == 1.0).astype(np.float32)
  strength = None
  steps_run = r.steps
  if init_image is not None:
    strength = r.strength if r.strength is not None else (1.0 if keep_mask is not None else 0.6)
    steps_run = min(int(r.steps * strength), r.steps)
  for i in r.save_intermediates:
    if i >= steps_run:
      raise ValueError(f"--save_intermediates: step {i} does not run; this request runs {steps_run} steps "
                       f"(--steps {r.steps}{f' × --strength {strength}' if strength is not None else ''}).")

  if r.batch_size % num_devices:
    raise ValueError(f"--batch_size: {r.batch_size} is not divisible by the {num_devices} devices the batch is "
                     f"split over; use a multiple of {num_devices}.")
  batch_size = min(r.batch_size, math.ceil(n / num_devices) * num_devices)

  cfg = info.cond_cfg
  cond, null = {}, {}
  if info.kind == "class":
    cond = conditioning.prepare_condition(cfg, {"label": labels})
    null = conditioning.null_condition(cfg, 1)
  elif info.kind == "text":
    cond = conditioning.prepare_condition(cfg, {"caption": prompts}, info.tokenizer)  # warns on truncation
    null = (conditioning.null_condition(cfg, 1, info.tokenizer) if r.negative_prompt is None else
            conditioning.prepare_condition(cfg, {"caption": [r.negative_prompt]}, info.tokenizer))
  return Plan(num_samples=n, batch_size=batch_size, image_size=(height, width), latent_shape=latent_shape,
              cond=cond, null=null, labels=labels, prompts=prompts, init_image=init_image, keep_mask=keep_mask,
              strength=strength, steps_run=steps_run, grid_cols=cols)


# ---------------------------------------------------------------------------------------------
# Sampling

def make_sample_fn(ldm: LatentDiffusion, request: SampleRequest, plan: Plan, mesh: jax.sharding.Mesh):
  """(jitted fn, traces): `fn(params, ae_params, cond, null, index, batch_number, key, init_latent, keep_mask)`.

  index: int32 [B] sample indices (their noise), batch_number: the batch's position (its sampler
  noise), key: the seed's PRNG key. Returns (images [B, H, W, C] in [-1, 1], x0 images
  [K, B, H, W, C] or None), split over the mesh along B. `len(traces)` counts compilations.
  """
  ldm = dataclasses.replace(ldm, latent_shape=plan.latent_shape)
  settings = dict(sampler=request.sampler, num_steps=request.steps, spacing=request.timestep_spacing,
                  steps_offset=request.steps_offset, eta=request.eta, guidance_scale=request.guidance_scale,
                  guidance_rescale=request.guidance_rescale)
  if request.save_intermediates:
    settings["return_x0_at"] = tuple(request.save_intermediates)
  traces = []

  def fn(params, ae_params, cond, null, index, batch_number, key, init_latent, keep_mask):
    traces.append(1)  # runs once per compilation
    batch_size = index.shape[0]
    noise_key, sampler_key = jax.random.split(key)
    rng = jax.random.fold_in(sampler_key, batch_number)
    kwargs = dict(settings, null_cond=null, ae_params=ae_params)
    if plan.mode == "sample":
      x_T = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i), plan.latent_shape))(index)
      out = ldm.sample_latents(params, cond, rng, x_T=x_T, batch_size=batch_size, **kwargs)
    else:
      init = jnp.broadcast_to(init_latent, (batch_size,) + plan.latent_shape)
      if plan.mode == "img2img":
        out = ldm.img2img_latents(params, cond, init, rng, strength=plan.strength, **kwargs)
      else:
        out = ldm.inpaint_latents(params, cond, init, keep_mask, rng, strength=plan.strength, **kwargs)
    z, x0 = out if request.save_intermediates else (out, None)
    images = ldm.decode(ae_params, z)
    if x0 is None:
      return images, None
    k = x0.shape[0]
    x0_images = ldm.decode(ae_params, x0.reshape((k * batch_size,) + plan.latent_shape))
    return images, x0_images.reshape((k, batch_size) + images.shape[1:])

  batch = sharding.batch_sharding(mesh)
  x0_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))
  return jax.jit(fn, out_shardings=(batch, x0_sharding if request.save_intermediates else None)), traces


def _put(x, sharding_):
  """A host array (the same on every process) → a global array placed with `sharding_`."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding_, lambda index: x[index])


def _pad(x: np.ndarray, size: int) -> np.ndarray:
  """Pads the leading axis to `size` by repeating the last row (padding is dropped afterwards)."""
  return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)]) if len(x) < size else x


def run_batches(ldm: LatentDiffusion, params, ae_params, request: SampleRequest, plan: Plan,
                mesh: jax.sharding.Mesh):
  """Makes the plan's N images: (uint8 [N, H, W, C], uint8 [K, N, H, W, C] or None, compilations)."""
  fn, traces = make_sample_fn(ldm, request, plan, mesh)
  batch_sh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  key = jax.random.PRNGKey(request.seed)
  null = jax.tree.map(lambda x: _put(x, rep), plan.null)
  init_latent = keep = None
  if plan.init_image is not None:
    encode = jax.jit(ldm.encode, out_shardings=rep)  # the posterior mean: deterministic
    init_latent = encode(ae_params, _put(plan.init_image, rep))
  if plan.keep_mask is not None:
    keep = _put(plan.keep_mask, rep)
  B, n = plan.batch_size, plan.num_samples
  images, x0_images = [], []
  t0 = time.perf_counter()
  for b in tqdm(range(plan.num_batches), desc="sampling", unit="batch", disable=jax.process_index() != 0):
    index = np.arange(b * B, (b + 1) * B, dtype=np.int32)
    rows = np.minimum(index, n - 1)  # the padding repeats the last sample's condition
    cond = jax.tree.map(lambda x: _put(np.asarray(x)[rows], batch_sh), plan.cond)
    out, x0 = fn(params, ae_params, cond, null, _put(index, batch_sh), np.int32(b), key, init_latent, keep)
    keep_rows = min(B, n - b * B)
    images.append(to_uint8(multihost_utils.process_allgather(out, tiled=True))[:keep_rows])
    if x0 is not None:
      x0_images.append(to_uint8(multihost_utils.process_allgather(x0, tiled=True))[:, :keep_rows])
  seconds = time.perf_counter() - t0
  logging.info("Sampled %d images in %.1f s (%.2f images/s incl. compilation), %d compilation(s).", n, seconds,
               n / seconds, len(traces))
  return np.concatenate(images), (np.concatenate(x0_images, axis=1) if x0_images else None), len(traces)


# ---------------------------------------------------------------------------------------------
# Outputs

def write_outputs(out: str, images: np.ndarray, *, labels=None, prompts=None, x0_images=None,
                  grid_cols: int | None = None, settings: dict | None = None) -> str:
  """Writes `out/` at once: grid.png, images/NNNNN.png, samples.npz, [intermediates.png], sampling.json.

  Files go to a staging directory beside `out` that is renamed to `out` at the end (removed on
  any error), so `out` either holds every output or does not exist. `out` may exist if empty.

  samples.npz: `images` uint8 [N, H, W, C], `labels` int32 [N] (class-conditional), `prompts`
  str [N] (text-conditional). intermediates.png: one row per sample (the first 8), the x0
  predictions at the requested steps, then the final image.
  """
  out = os.path.abspath(out)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".partial", dir=parent)
  try:
    shown = images[:GRID_MAX_IMAGES]
    save_png(os.path.join(staging, "grid.png"), image_grid(shown, num_cols=min(grid_cols or 0, len(shown)) or None))
    for i, image in enumerate(images):
      save_png(os.path.join(staging, "images", f"{i:05d}.png"), image)
    arrays = {"images": images}
    if labels is not None:
      arrays["labels"] = np.asarray(labels, np.int32)
    if prompts is not None:
      arrays["prompts"] = np.asarray(prompts, dtype=str)
    np.savez(os.path.join(staging, "samples.npz"), **arrays)
    if x0_images is not None:
      rows = min(len(images), INTERMEDIATE_ROWS)
      sequence = np.concatenate([x0_images[:, :rows], images[None, :rows]])  # [K + 1, rows, H, W, C]
      sequence = sequence.transpose(1, 0, 2, 3, 4).reshape((-1,) + images.shape[1:])
      save_png(os.path.join(staging, "intermediates.png"), image_grid(sequence, num_cols=len(x0_images) + 1))
    with open(os.path.join(staging, "sampling.json"), "w") as f:
      json.dump(settings or {}, f, indent=2, sort_keys=True)
    if os.path.isdir(out):
      os.rmdir(out)  # empty (checked before sampling); a non-empty one makes this fail, not merge
    os.rename(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return out


def sampling_mesh(devices=None) -> jax.sharding.Mesh:
  """All devices (default: of all processes) on the data-parallel axis; parameters replicated."""
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices)


def sample_to_dir(request: SampleRequest, mesh: jax.sharding.Mesh | None = None) -> dict:
  """Runs a request end to end (see the module docstring); returns a summary dict.

  The summary has `out`, `num_samples`, `image_size`, `compilations` (1: every batch reused
  the same compiled function), `checkpoint_step`.
  """
  check_request(request)
  info = read_model(request)
  mesh = sampling_mesh() if mesh is None else mesh
  plan = make_plan(request, info, sharding.data_parallel_size(mesh))
  weights = "pretrained" if info.step is None else f"step {info.step}, {'EMA' if request.use_ema else 'raw'}"
  logging.info("Sampling %d images of %d×%d from %s (%s weights): %s, %d steps%s, guidance %s, %d per "
               "batch over %d devices.", plan.num_samples, plan.image_size[1], plan.image_size[0], info.source,
               weights, request.sampler, plan.steps_run,
               f" ({plan.mode}, strength {plan.strength})" if plan.init_image is not None else "",
               request.guidance_scale, plan.batch_size, sharding.data_parallel_size(mesh))
  ldm, params, ae_params = info.load(mesh, request.use_ema)
  if request.attention is not None:
    ldm = dataclasses.replace(ldm, unet=ldm.unet.clone(attention=request.attention),
                              autoencoder=ldm.autoencoder.clone(attention=request.attention))
  images, x0_images, compilations = run_batches(ldm, params, ae_params, request, plan, mesh)
  settings = dict(dataclasses.asdict(request), checkpoint_step=info.step, scale_factor=ldm.scale_factor,
                  strength=plan.strength, steps_run=plan.steps_run, mode=plan.mode)
  out = request.out
  if jax.process_index() == 0:
    out = write_outputs(request.out, images, labels=plan.labels, prompts=plan.prompts, x0_images=x0_images,
                        grid_cols=plan.grid_cols, settings=settings)
    logging.info("Wrote %d images to %s", len(images), out)
  return dict(out=out, num_samples=plan.num_samples, image_size=plan.image_size, compilations=compilations,
              checkpoint_step=info.step)
