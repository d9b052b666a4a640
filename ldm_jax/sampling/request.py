"""A sample request (`sample.py`'s flags) and its checks on its own, before any file of the model is read."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from PIL import Image

from ldm_jax import config as checks
from ldm_jax.config.diffusion import SAMPLERS, SPACINGS, check_guidance_interval
from ldm_jax.nn import attention as attention_lib


@dataclasses.dataclass(frozen=True)
class SampleRequest:
  """What to sample and where to write it; the fields are `sample.py`'s flags.

  Attributes:
    out: output directory (must not exist, or be empty).
    workdir: a stage-2 run directory. `pretrained`: anything `ldm_jax.load.load_pretrained`
      reads (an ldm_jax pretrained directory, a diffusers pipeline folder, a single-file
      checkpoint). Exactly one of the two.
    num_samples: images to make; None = one per prompt of `prompts` (a prompts file), or one per
      class with `class_labels='all'`.
    prompts: text-conditional models: the prompts, cycled over the samples.
    class_labels: class-conditional models: one label for all samples, or 'all' (cycle the classes).
    negative_prompt: the unconditional branch of guidance for text models (default: "").
    guidance_scale, guidance_rescale, guidance_interval: classifier-free guidance
      (`samplers.cfg_model_fn`); guidance_interval (LO, HI) guides only timesteps LO ≤ t ≤ HI.
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
    latents: a `.npy` file of the initial latents x_T, float32 [N, h, w, c] (NHWC, as the U-Net sees
      them: unit variance), one per sample, instead of drawing them from the seed — to reproduce a
      run of another framework (diffusers' `latents=`, transposed from NCHW).
    original_size, crops_coords_top_left, target_size: SDXL's micro-conditioning (H, W), (top, left),
      (H, W); defaults as diffusers: original = target = (height, width), crops (0, 0).
    aesthetic_score, negative_aesthetic_score: the SDXL refiner's (its conditional and unconditional
      branches; diffusers' defaults 6 and 2.5).
    lora: (file, scale) pairs: LoRA adapters added to the weights (`ldm_jax.sampling.adapters`).
    textual_inversion: learned_embeds files whose tokens the prompts may use.
    refiner, denoising_end: an ensemble of experts (SDXL base + refiner): the model denoises the
      noise levels above `denoising_end` ∈ (0, 1) of the way (e.g. 0.8) and the `refiner` (an SDXL
      refiner directory or diffusers folder, conditioned on aesthetic scores) the rest from its
      latents, then decodes with its autoencoder — diffusers' `denoising_end` / `denoising_start`.
    vae_tiling: decode in overlapping tiles (diffusers' `enable_tiling()`), tiles of `vae_tile_size`
      pixels (None: the autoencoder's sample size, as diffusers) overlapping by the fraction
      `vae_tile_overlap` (0.25); `ldm_jax.diffusion.tiling`.
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
  guidance_interval: tuple[float, float] | None = None
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
  latents: str | None = None
  original_size: tuple[int, int] | None = None
  crops_coords_top_left: tuple[int, int] = (0, 0)
  target_size: tuple[int, int] | None = None
  aesthetic_score: float = 6.0
  negative_aesthetic_score: float = 2.5
  lora: tuple[tuple[str, float], ...] = ()
  textual_inversion: tuple[str, ...] = ()
  refiner: str | None = None
  denoising_end: float | None = None
  vae_tiling: bool = False
  vae_tile_size: int | None = None
  vae_tile_overlap: float = 0.25


def is_int(value) -> bool:
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
  if r.num_samples is not None and (not is_int(r.num_samples) or r.num_samples < 1):
    raise ValueError(f"--num_samples: expected a positive integer, got {r.num_samples!r}.")
  if not is_int(r.batch_size) or r.batch_size < 1:
    raise ValueError(f"--batch_size: expected a positive integer, got {r.batch_size!r}.")
  if not is_int(r.steps) or r.steps < 1:
    raise ValueError(f"--steps: expected a positive integer, got {r.steps!r}.")
  if not is_int(r.seed):
    raise ValueError(f"--seed: expected an integer, got {r.seed!r}.")
  checks.check_number("--guidance_scale", r.guidance_scale, ge=0)  # 1 = no guidance
  checks.check_number("--guidance_rescale", r.guidance_rescale, ge=0, le=1)
  if r.guidance_interval is not None:
    check_guidance_interval(r.guidance_interval, "--guidance_interval")
  if r.sampler not in SAMPLERS:
    raise ValueError(f"--sampler: {r.sampler!r} is not one of {', '.join(SAMPLERS)}.")
  if r.attention is not None:
    attention_lib.check_implementation(r.attention, "--attention")
  if r.timestep_spacing not in SPACINGS:
    raise ValueError(f"--timestep_spacing: {r.timestep_spacing!r} is not one of {', '.join(SPACINGS)}.")
  if not is_int(r.steps_offset) or r.steps_offset < 0:
    raise ValueError(f"--steps_offset: expected a non-negative integer, got {r.steps_offset!r}.")
  checks.check_number("--eta", r.eta, ge=0)
  if r.eta != 0 and r.sampler != "ddim":
    raise ValueError(f"--eta: only DDIM has an η; got --eta {r.eta} with --sampler {r.sampler}.")
  if r.prompts is not None and r.class_labels is not None:
    raise ValueError("--prompt / --prompts_file and --class_label: give prompts (text model) or a class "
                     "label (class-conditional model), not both.")
  if r.prompts is not None and (isinstance(r.prompts, str) or not r.prompts):
    raise ValueError(f"--prompt / --prompts_file: expected a non-empty sequence of prompts, got {r.prompts!r}.")
  if r.class_labels is not None and r.class_labels != "all" and not is_int(r.class_labels):
    raise ValueError(f"--class_label: expected a class index or 'all', got {r.class_labels!r}.")
  if r.negative_prompt is not None and r.guidance_scale == 1:
    raise ValueError("--negative_prompt: replaces the unconditional branch of guidance, which "
                     "--guidance_scale 1 does not run; use a scale ≠ 1.")
  for name in ("height", "width"):
    value = getattr(r, name)
    if value is not None and (not is_int(value) or value < 1):
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
    read_image(path, flag, "L")  # a damaged file fails here, before the run is read
  if r.latents is not None:
    if r.init_image is not None:
      raise ValueError("--latents: the initial noise of text/class-to-image sampling; --init_image starts from "
                       "an image instead. Give one of them.")
    if not os.path.isfile(r.latents):
      raise FileNotFoundError(f"--latents: {r.latents} is not a file.")
  for flag, value, low in (("--original_size", r.original_size, 1), ("--target_size", r.target_size, 1),
                           ("--crops_coords_top_left", r.crops_coords_top_left, 0)):
    if value is not None and (len(value) != 2 or not all(is_int(v) and v >= low for v in value)):
      raise ValueError(f"{flag}: expected two integers ≥ {low} (H,W or top,left), got {value!r}.")
  for path, scale in r.lora:
    checks.check_number(f"--lora {path}: the scale", scale)
  checks.check_number("--aesthetic_score", r.aesthetic_score)
  checks.check_number("--negative_aesthetic_score", r.negative_aesthetic_score)
  _check_refiner_and_tiling(r)
  steps = list(r.save_intermediates)
  if any(not is_int(i) or i < 0 for i in steps) or len(set(steps)) != len(steps):
    raise ValueError(f"--save_intermediates: expected distinct step indices ≥ 0, got {tuple(steps)}.")
  if os.path.exists(r.out) and (not os.path.isdir(r.out) or os.listdir(r.out)):
    raise FileExistsError(f"--out: {r.out} already exists and is not an empty directory; choose a new one "
                          "(outputs are never mixed with earlier ones).")


def _check_refiner_and_tiling(r: SampleRequest) -> None:
  if (r.refiner is None) != (r.denoising_end is None):
    raise ValueError("--refiner / --denoising_end: give both (the refiner takes over after the fraction "
                     "--denoising_end of the denoising, e.g. 0.8) or neither.")
  if r.refiner is not None:
    checks.check_number("--denoising_end", r.denoising_end, gt=0, lt=1)
    if not os.path.exists(r.refiner):
      raise FileNotFoundError(f"--refiner: {r.refiner} does not exist (an SDXL refiner directory: `convert "
                              "import` output or a diffusers folder).")
    for flag, value in (("--init_image", r.init_image), ("--save_intermediates", r.save_intermediates),
                        ("--textual_inversion", r.textual_inversion)):
      if value:
        raise ValueError(f"{flag}: not with --refiner (the base + refiner ensemble samples from noise, "
                         "with the models' own vocabularies, and draws only the final images).")
  if not isinstance(r.vae_tiling, bool):
    raise ValueError(f"--vae_tiling: expected true or false, got {r.vae_tiling!r}.")
  if not r.vae_tiling and (r.vae_tile_size is not None or r.vae_tile_overlap != 0.25):
    raise ValueError("--vae_tile_size / --vae_tile_overlap: only used with --vae_tiling.")
  if r.vae_tile_size is not None and (not is_int(r.vae_tile_size) or r.vae_tile_size < 1):
    raise ValueError(f"--vae_tile_size: expected a positive number of pixels, got {r.vae_tile_size!r}.")
  checks.check_number("--vae_tile_overlap", r.vae_tile_overlap, ge=0, lt=1)


def read_image(path: str, flag: str, mode: str) -> np.ndarray:
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert(mode))
  except OSError as e:
    raise ValueError(f"{flag}: cannot read {path} as an image ({e}).") from e
