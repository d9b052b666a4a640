"""A trained latent diffusion model as one object: condition → sample latents → decode.

`LatentDiffusion` holds the modules (U-Net, conditioner τ_θ, the frozen autoencoder), the noise
schedule, the latent `scale_factor` and the tokenizer, and nothing trainable: parameters are
passed in, so the same object serves the trainer's periodic sample grids (EMA weights) and
`sample.py`. The conditioner runs once per batch, outside the sampling loop; the loop itself is
one jit-compiled `lax.scan` of the samplers in `ldm_jax.diffusion.samplers`.

    ldm = LatentDiffusion(...)
    cond = ldm.prepare({'caption': prompts})               # host: tokenize / labels
    images = ldm.generate(params, ae_params, cond, rng, guidance_scale=3.0)   # [B, H, W, C] in [-1, 1]

`img2img_latents` and `inpaint_latents` start from encoded images instead of noise; all three
take the same guidance arguments through `guided_model_fn`. `ldm_jax.load` builds this object for
a trained run, `ldm_jax.sampling` drives it for `sample.py`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax.diffusion import samplers, tiling
from ldm_jax.diffusion.schedule import Schedule
from ldm_jax.models import conditioning
from ldm_jax.models import unet as unet_lib


class TextEncoderConditioner(nn.Module):
  """τ_θ of a pretrained text-to-image model: frozen text encoders behind the `Conditioner` interface.

  SD 1.x / 2.x: one encoder (CLIP, BERT) whose hidden states are the cross-attention context.
  Params {'text_encoder'}; input {'tokens': int [B, L]}; output {'context': [B, L, dim], 'y': None,
  'concat': None}.

  SDXL: `text_encoder_2` (OpenCLIP bigG with projection) adds its hidden states after the first
  encoder's along the channels (768 + 1280 = 2048) and gives the pooled `text_embeds` [B, P]; the
  refiner has only `text_encoder_2`. Params {'text_encoder', 'text_encoder_2'}; input 'tokens',
  'tokens_2', and optionally 'text_scale' [B] (0 zeroes both embeddings: `cond.null_text='zeros'`)
  and 'time_ids' [B, n] (passed to the U-Net with `text_embeds`).
  """
  text_encoder: nn.Module | None
  text_encoder_2: nn.Module | None = None

  def __call__(self, batch_cond, *, deterministic: bool = True):
    del deterministic  # a frozen encoder has no dropout at sampling time
    contexts, pooled = [], None
    if self.text_encoder is not None:
      contexts.append(self.text_encoder(batch_cond["tokens"]))
    if self.text_encoder_2 is not None:
      context_2, pooled = self.text_encoder_2(batch_cond["tokens_2"], return_pooled=True)
      contexts.append(context_2)
    context = contexts[0] if len(contexts) == 1 else jnp.concatenate(contexts, axis=-1)
    if "text_scale" in batch_cond:
      scale = jnp.asarray(batch_cond["text_scale"], context.dtype)
      context = context * scale[:, None, None]
      pooled = None if pooled is None else pooled * scale[:, None].astype(pooled.dtype)
    out = {"context": context, "y": None, "concat": None}
    if pooled is not None:
      out["text_embeds"] = pooled
    if "time_ids" in batch_cond:
      out["time_ids"] = jnp.asarray(batch_cond["time_ids"], jnp.float32)
    return out


def first_stage_latent(autoencoder, ae_params, images, rng=None):
  """Images [B, H, W, C] in [-1, 1] → unscaled latents [B, h, w, c] of the stage-1 `autoencoder`.

  KL: a posterior sample (the mean when `rng` is None); VQ: the pre-quantization latent.
  """
  out = autoencoder.apply({"params": ae_params}, images, method=autoencoder.encode)
  if hasattr(out, "sample"):
    out = out.mode() if rng is None else out.sample(rng)
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class LatentDiffusion:
  """Modules and constants of one latent diffusion model (see the module docstring).

  Attributes:
    unet: the denoiser ε_θ(z_t, t, context, y) (predicting `parameterization`).
    conditioner: τ_θ, prepared conditions → {'context', 'y', 'concat'}.
    autoencoder: the frozen stage-1 model (`encode` → posterior or pre-quant latent, `decode`).
    schedule: the training noise schedule.
    scale_factor: latents seen by the U-Net are `encode(x) · scale_factor` (the run's one value: a
      trainer builds this object once the value is estimated or restored).
    parameterization: 'eps' | 'x0' | 'v'.
    cond_cfg: the `cond` config section; tokenizer: for text conditioning, else None.
    latent_shape: (h, w, c) of one latent.
    tokenizer_2: SDXL's second tokenizer, else None.
  """
  unet: Any
  conditioner: Any
  autoencoder: Any
  schedule: Schedule
  scale_factor: float
  parameterization: str
  cond_cfg: ml_collections.ConfigDict
  tokenizer: Any
  latent_shape: tuple[int, int, int]
  tokenizer_2: Any = None

  # ---- latents --------------------------------------------------------------------------------
  def encode(self, ae_params, images, rng=None):
    """Images [B, H, W, C] in [-1, 1] → latents [B, h, w, c] × scale_factor (see `first_stage_latent`)."""
    return first_stage_latent(self.autoencoder, ae_params, images, rng) * self.scale_factor

  def decode(self, ae_params, z, *, tile: int | None = None, tile_overlap: int = 0):
    """Latents (scaled) → images [B, H, W, C], clipped to [-1, 1].

    tile, tile_overlap: decode in overlapping tiles of `tile` latent pixels sharing `tile_overlap`
    (`tiling.tiled_decode`, diffusers' `enable_tiling()`): the decoder's memory is one tile's.
    """
    decode_fn = functools.partial(self.autoencoder.apply, {"params": ae_params}, method=self.autoencoder.decode)
    z = z / self.scale_factor
    if tile is None:
      images = decode_fn(z)
    else:
      f = 2 ** (len(self.autoencoder.ch_mult) - 1)  # one upsampling between consecutive levels
      images = tiling.tiled_decode(decode_fn, z, tile, tile_overlap, f)
    return jnp.clip(images, -1.0, 1.0)

  # ---- conditioning ---------------------------------------------------------------------------
  def prepare(self, batch: dict, rng: np.random.Generator | None = None) -> dict:
    """Host side: a batch with 'caption' / 'label' / 'image' … → conditioner inputs (numpy)."""
    return conditioning.prepare_condition(self.cond_cfg, batch, self.tokenizer,
                                          latent_size=self.latent_shape[:2], rng=rng, tokenizer_2=self.tokenizer_2)

  def null(self, batch_size: int) -> dict:
    """Conditioner inputs of the unconditional branch (null class, empty caption)."""
    return conditioning.null_condition(self.cond_cfg, batch_size, self.tokenizer, self.tokenizer_2)

  def condition(self, cond_params, batch_cond, ae_params=None):
    """Conditioner inputs → {'context', 'y', 'concat'} for the U-Net (inpainting encodes here)."""
    if "masked_image" in batch_cond:
      batch_cond = conditioning.inpaint_concat(batch_cond, functools.partial(self.encode, ae_params))
    return self.conditioner.apply({"params": cond_params}, batch_cond, deterministic=True)

  # ---- denoising ------------------------------------------------------------------------------
  def denoise(self, unet_params, z_t, t, cond, *, deterministic=True, rngs=None):
    """U-Net on the noisy latents with the conditioner's outputs (concat channels appended).

    The conditions may hold k·B rows for B latents (`UNet`: each latent under k conditions)."""
    concat = cond.get("concat")
    if concat is None:
      x = z_t
    else:  # the latents under each condition's channels: k·B inputs
      x = jnp.concatenate([unet_lib.repeat_rows(z_t, concat.shape[0]), concat.astype(z_t.dtype)], -1)
    return self.unet.apply({"params": unet_params}, x, t, context=cond.get("context"), y=cond.get("y"),
                           text_embeds=cond.get("text_embeds"), time_ids=cond.get("time_ids"),
                           deterministic=deterministic, rngs=rngs)

  def guided_model_fn(self, params, batch_cond, *, null_cond=None, guidance_scale=1.0, guidance_rescale=0.0,
                      guidance_interval=None, ae_params=None, batch_size=None) -> samplers.ModelFn:
    """The samplers' `model_fn(z_t, t)`: the U-Net with its conditions closed over, guided.

    params: {'unet': …, 'cond': …}. `null_cond` (default: `null(B)`; leading axis B or 1) is the
    unconditional branch; a negative prompt is a prepared condition passed as `null_cond`.
    Guidance scale 1 (or an unconditional model) gives a single pass per step. `batch_size` is
    needed only when there is no condition to take it from (unconditional models).
    """
    cond = self.condition(params["cond"], batch_cond, ae_params)
    apply_fn = lambda x, t, c: self.denoise(params["unet"], x, t, c)
    if guidance_scale == 1.0 or self.cond_cfg.kind == "none":
      return functools.partial(apply_fn, c=cond)
    batch_size = jax.tree.leaves(batch_cond)[0].shape[0] if batch_cond else batch_size
    null_inputs = self.null(batch_size) if null_cond is None else null_cond
    uncond = self.condition(params["cond"], {**batch_cond, **null_inputs}, ae_params)
    return samplers.cfg_model_fn(apply_fn, cond, uncond, guidance_scale, guidance_rescale, guidance_interval,
                                 share_input=True)

  def sample_latents(self, params, batch_cond, rng, *, null_cond=None, sampler="ddim", num_steps=50,
                     eta=0.0, guidance_scale=1.0, guidance_rescale=0.0, guidance_interval=None, ae_params=None,
                     x_T=None, batch_size=None, **sampler_kwargs):
    """Runs a sampler from noise to clean latents [B, h, w, c] (scaled), with guidance.

    params: {'unet': …, 'cond': …}; `null_cond`, `guidance_*`, `batch_size` as `guided_model_fn`.
    `x_T` [B, h, w, c] is the starting noise (default: drawn from `rng`). Extra keyword arguments
    go to the sampler (`return_x0_at`, `spacing`, …); with `return_x0_at` the result is
    `(z, x0_preds [K, B, h, w, c])`.
    """
    batch_size = jax.tree.leaves(batch_cond)[0].shape[0] if batch_cond else batch_size
    rng_noise, rng_sample = jax.random.split(rng)
    if x_T is None:
      x_T = jax.random.normal(rng_noise, (batch_size, *self.latent_shape), jnp.float32)
    model_fn = self.guided_model_fn(params, batch_cond, null_cond=null_cond, guidance_scale=guidance_scale,
                                    guidance_rescale=guidance_rescale, guidance_interval=guidance_interval,
                                    ae_params=ae_params, batch_size=batch_size)
    return samplers.sample(sampler, model_fn, self.schedule, x_T, rng_sample, num_steps=num_steps,
                           parameterization=self.parameterization, **_eta_kwarg(sampler, eta), **sampler_kwargs)

  def img2img_latents(self, params, batch_cond, init_latent, rng, *, strength, null_cond=None, sampler="ddim",
                      num_steps=50, eta=0.0, guidance_scale=1.0, guidance_rescale=0.0, guidance_interval=None,
                      ae_params=None, **sampler_kwargs):
    """Image-to-image (SDEdit) from clean latents [B, h, w, c] (scaled, e.g. `encode(init)`).

    strength ∈ [0, 1]: the last ⌊num_steps·strength⌋ of the `num_steps` timesteps are run from the
    noised init latent (`samplers.img2img`); 0 returns `init_latent` itself. Other arguments as
    `sample_latents`.
    """
    model_fn = self.guided_model_fn(params, batch_cond, null_cond=null_cond, guidance_scale=guidance_scale,
                                    guidance_rescale=guidance_rescale, guidance_interval=guidance_interval,
                                    ae_params=ae_params, batch_size=init_latent.shape[0])
    return samplers.img2img(model_fn, self.schedule, init_latent, rng, strength=strength, sampler=sampler,
                            num_steps=num_steps, parameterization=self.parameterization,
                            **_eta_kwarg(sampler, eta), **sampler_kwargs)

  def inpaint_latents(self, params, batch_cond, known_latent, mask, rng, *, strength=1.0, null_cond=None,
                      sampler="ddim", num_steps=50, eta=0.0, guidance_scale=1.0, guidance_rescale=0.0,
                      guidance_interval=None, ae_params=None, **sampler_kwargs):
    """Inpainting by latent blending (`samplers.inpaint`) with any model.

    known_latent: [B, h, w, c] (scaled, e.g. `encode(image)`); mask: [B or 1, h, w, 1] at the latent
    resolution, 1 = keep the known latent, 0 = generate (an image-sized mask goes through
    `samplers.mask_to_latent`). The known region of the result is exactly `known_latent`.
    Other arguments as `img2img_latents`.
    """
    model_fn = self.guided_model_fn(params, batch_cond, null_cond=null_cond, guidance_scale=guidance_scale,
                                    guidance_rescale=guidance_rescale, guidance_interval=guidance_interval,
                                    ae_params=ae_params, batch_size=known_latent.shape[0])
    return samplers.inpaint(model_fn, self.schedule, known_latent, mask, rng, strength=strength, sampler=sampler,
                            num_steps=num_steps, parameterization=self.parameterization,
                            **_eta_kwarg(sampler, eta), **sampler_kwargs)

  def generate(self, params, ae_params, batch_cond, rng, **kwargs):
    """Prepared conditions → images [B, H, W, C] in [-1, 1]; kwargs as `sample_latents`."""
    z = self.sample_latents(params, batch_cond, rng, ae_params=ae_params, **kwargs)
    return self.decode(ae_params, z)


def _eta_kwarg(sampler: str, eta: float) -> dict:
  """DDIM is the only sampler with a stochasticity knob; the others take no `eta`."""
  return {"eta": eta} if sampler == "ddim" else {}
