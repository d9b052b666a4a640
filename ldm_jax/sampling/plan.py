"""The request against the model: every input prepared on the host, no weights needed."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from absl import logging

from ldm_jax.diffusion import samplers
from ldm_jax.models import conditioning
from ldm_jax.sampling.model import ModelInfo
from ldm_jax.sampling.request import SampleRequest, read_image

_SUPPORTED_KINDS = ("none", "class", "text")


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
    x_T: float32 [N, h, w, c] initial latents from `--latents`, or None (drawn from the seed).
    refiner: the second expert of a base + refiner ensemble (`--refiner`), or None.
    decode_tile: (tile, overlap) in latent pixels of a tiled decode (`--vae_tiling`), or None.
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
  x_T: np.ndarray | None = None
  refiner: RefinerPlan | None = None
  decode_tile: tuple[int, int] | None = None

  @property
  def num_batches(self) -> int:
    return math.ceil(self.num_samples / self.batch_size)

  @property
  def mode(self) -> str:
    if self.init_image is None:
      return "sample"
    return "img2img" if self.keep_mask is None else "inpaint"


@dataclasses.dataclass(frozen=True)
class RefinerPlan:
  """The refiner of an ensemble of experts: its prepared conditions of the N samples (`cond`) and
  of the unconditional branch (`null`), and the timesteps each model visits (`samplers.expert_timesteps`)."""
  cond: dict
  null: dict
  base_timesteps: np.ndarray
  refiner_timesteps: np.ndarray


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


def make_plan(request: SampleRequest, info: ModelInfo, num_devices: int, refiner: ModelInfo | None = None) -> Plan:
  """Checks the request against the model (and the `--refiner`'s) and prepares every input on the
  host; no weights needed.

  Raises ValueError naming the flag (and the model's limit) for: conditioning that does not fit the
  model, a class out of range, more steps than the training timesteps, sizes not divisible by
  f × the U-Net's factor, an init image of the wrong size, a mask not matching it, intermediate
  steps that do not run, a batch size not divisible by the devices, a refiner that does not share
  the model's latents or leaves one of the two models no step, a tile that does not fit the latents.
  """
  r = request
  n, labels, prompts, cols = _conditioning(r, info)
  num_timesteps = info.num_timesteps
  if r.steps > num_timesteps:
    raise ValueError(f"--steps: {r.steps} is more than the {num_timesteps} timesteps the model was trained with.")
  try:
    timesteps = samplers.make_timesteps(num_timesteps, r.steps, r.timestep_spacing, steps_offset=r.steps_offset,
                                        sampler=r.sampler)
  except ValueError as err:
    raise ValueError(f"--steps / --timestep_spacing / --steps_offset: {err}") from None
  if refiner is not None:
    _check_refiner(info, refiner)
  _check_micro_flags(r, [info] if refiner is None else [info, refiner])

  init_image = keep_mask = None
  channels = info.channels
  if r.init_image is not None:
    pixels = read_image(r.init_image, "--init_image", "L" if channels == 1 else "RGB")
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
    if refiner is not None and value % refiner.size_multiple:
      raise ValueError(f"--{name}: {value} is not a multiple of {refiner.size_multiple}, the --refiner's "
                       f"autoencoder f = {refiner.f} × its U-Net's downsampling {refiner.unet_factor}.")
  f = info.f
  latent_shape = (height // f, width // f, info.latent_channels)

  if r.mask is not None:
    mask = read_image(r.mask, "--mask", "L")
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

  cond, null = _prepare_conditions(r, info, labels, prompts, height, width)
  refiner_plan = None
  if refiner is not None:
    base_ts, refiner_ts = samplers.expert_timesteps(num_timesteps, timesteps, r.denoising_end)
    if not len(base_ts) or not len(refiner_ts):
      raise ValueError(f"--denoising_end: {r.denoising_end} of the {r.steps} steps (timesteps {timesteps.tolist()}) "
                       f"leaves {len(base_ts)} to the model and {len(refiner_ts)} to the --refiner; each needs at "
                       "least one: move --denoising_end or give more --steps.")
    refiner_plan = RefinerPlan(*_prepare_conditions(r, refiner, labels, prompts, height, width),
                               base_timesteps=base_ts, refiner_timesteps=refiner_ts)
  decoder = info if refiner is None else refiner
  return Plan(num_samples=n, batch_size=batch_size, image_size=(height, width), latent_shape=latent_shape,
              cond=cond, null=null, labels=labels, prompts=prompts, init_image=init_image, keep_mask=keep_mask,
              strength=strength, steps_run=steps_run, grid_cols=cols, x_T=_read_latents(r, n, latent_shape),
              refiner=refiner_plan, decode_tile=_decode_tile(r, decoder, latent_shape))


def _prepare_conditions(r: SampleRequest, info: ModelInfo, labels, prompts, height: int, width: int):
  """(cond of the N samples, null: the unconditional branch, leading axis 1) for `info`'s conditioner."""
  cfg = info.cond_cfg
  positive, negative = _micro_conditioning(r, info, height, width)
  tokenizers = dict(tokenizer=info.tokenizer, tokenizer_2=info.tokenizer_2)
  if info.kind == "class":
    return conditioning.prepare_condition(cfg, {"label": labels}), conditioning.null_condition(cfg, 1)
  if info.kind != "text":
    return {}, {}
  cond = conditioning.prepare_condition(cfg, {"caption": prompts, **positive}, **tokenizers)  # warns on truncation
  if r.negative_prompt is None:
    null = conditioning.null_condition(cfg, 1, **tokenizers)
    if negative:
      null["time_ids"] = conditioning.time_ids(cfg, negative, 1)
  else:
    null = conditioning.prepare_condition(cfg, {"caption": [r.negative_prompt], **negative}, **tokenizers)
  return cond, null


def _check_refiner(info: ModelInfo, refiner: ModelInfo) -> None:
  """The refiner continues from the model's latents: same conditioning kind, latents and timesteps."""
  ours = (info.kind, info.latent_channels, info.f, info.num_timesteps)
  theirs = (refiner.kind, refiner.latent_channels, refiner.f, refiner.num_timesteps)
  if ours != theirs:
    raise ValueError(f"--refiner: the model in {refiner.source} (cond.kind {theirs[0]!r}, {theirs[1]} latent "
                     f"channels, f = {theirs[2]}, {theirs[3]} timesteps) cannot continue the model in {info.source}'s "
                     f"latents ({ours[0]!r}, {ours[1]} channels, f = {ours[2]}, {ours[3]} timesteps).")


# Which micro-conditioning flags each kind of SDXL model reads, and the flags' defaults.
_MICRO_FLAGS = {"none": (), "target_size": ("original_size", "crops_coords_top_left", "target_size"),
                "aesthetic_score": ("original_size", "crops_coords_top_left", "aesthetic_score",
                                    "negative_aesthetic_score")}
_MICRO_DEFAULTS = dict(original_size=None, target_size=None, crops_coords_top_left=(0, 0), aesthetic_score=6.0,
                       negative_aesthetic_score=2.5)


def _check_micro_flags(r: SampleRequest, infos: list[ModelInfo]) -> None:
  """A micro-conditioning flag that none of the models (the base, the refiner) reads is an error."""
  modes = [info.cond_cfg.get("micro_conditioning", "none") for info in infos]
  used = {flag for mode in modes for flag in _MICRO_FLAGS[mode]}
  sources = " and ".join(info.source for info in infos)
  for key, default in _MICRO_DEFAULTS.items():
    if key in used or getattr(r, key) == default:
      continue
    if set(modes) == {"none"}:
      raise ValueError(f"--{key}: SDXL micro-conditioning, but the model in {sources} has none.")
    if key == "target_size":
      raise ValueError(f"--target_size: the model in {sources} (an SDXL refiner) is conditioned on an aesthetic "
                       "score instead (--aesthetic_score).")
    raise ValueError(f"--aesthetic_score / --negative_aesthetic_score: the refiner's; the model in {sources} "
                     "is conditioned on the target size (--target_size).")


def _micro_conditioning(request: SampleRequest, info: ModelInfo, height: int, width: int) -> tuple[dict, dict]:
  """SDXL's size/crop (and aesthetic) conditions of the positive and the negative branch, as batch fields."""
  r, mode = request, info.cond_cfg.get("micro_conditioning", "none")
  if mode == "none":
    return {}, {}
  size = (height, width)
  common = {"original_size": r.original_size or size, "crop_coords_top_left": r.crops_coords_top_left}
  if mode == "target_size":
    positive = dict(common, target_size=r.target_size or size)
    return positive, positive
  # The refiner's unconditional branch is not cropped: diffusers' StableDiffusionXLImg2ImgPipeline
  # gives it `negative_crops_coords_top_left`, (0, 0) by default (the base's takes the crops).
  negative = dict(common, crop_coords_top_left=(0, 0), aesthetic_score=r.negative_aesthetic_score)
  return dict(common, aesthetic_score=r.aesthetic_score), negative


def _decode_tile(r: SampleRequest, info: ModelInfo, latent_shape) -> tuple[int, int] | None:
  """(tile, overlap) in latent pixels of `--vae_tiling`, laid out as diffusers' `enable_tiling()` does:
  tiles of `tile_sample_min_size` pixels stepping by int(tile·(1 − overlap)) latent pixels, blended over
  int(pixels·overlap) pixels — which must agree, or diffusers' image would not have the latents' size."""
  if not r.vae_tiling:
    return None
  pixels = info.image_size[0] if r.vae_tile_size is None else r.vae_tile_size
  what = (f"--vae_tile_size: {pixels}" if r.vae_tile_size is not None
          else f"--vae_tile_size: the default, the autoencoder's sample size {pixels},")
  if pixels % info.f:
    raise ValueError(f"{what} is not a multiple of the autoencoder's f = {info.f}.")
  tile = pixels // info.f
  stride = int(tile * (1 - r.vae_tile_overlap))
  blend = int(pixels * r.vae_tile_overlap)
  if stride < 1 or stride * info.f + blend != pixels:
    raise ValueError(f"--vae_tile_overlap: {r.vae_tile_overlap} of a {pixels}-pixel tile ({tile} latent pixels) is not "
                     f"a whole number of latent pixels in [0, {tile}); use a multiple of 1/{tile}, e.g. 0.25 with "
                     f"--vae_tile_size a multiple of {4 * info.f}.")
  if tile >= max(latent_shape[:2]):
    logging.info("--vae_tiling: the %d×%d latents fit in one %d-pixel tile; decoded whole.", latent_shape[0],
                 latent_shape[1], pixels)
  return tile, tile - stride


def _read_latents(request: SampleRequest, num_samples: int, latent_shape) -> np.ndarray | None:
  if request.latents is None:
    return None
  try:
    latents = np.load(request.latents, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise ValueError(f"--latents: cannot read {request.latents} as a .npy array ({e}).") from None
  want = (num_samples,) + tuple(latent_shape)
  if latents.shape != want:
    raise ValueError(f"--latents: {request.latents} holds {latents.shape}; this request needs {want} "
                     "(samples, latent height, width, channels: NHWC).")
  return latents.astype(np.float32)
