"""One compiled function per request, the batches through it, and a request end to end (`sample_to_dir`)."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from ldm_jax.diffusion.latent_diffusion import LatentDiffusion
from ldm_jax.runtime import sharding
from ldm_jax.runtime.images import to_uint8
from ldm_jax.sampling import adapters
from ldm_jax.sampling.model import read_model
from ldm_jax.sampling.outputs import write_outputs
from ldm_jax.sampling.plan import Plan, make_plan
from ldm_jax.sampling.request import SampleRequest, check_request


def make_sample_fn(ldm: LatentDiffusion, request: SampleRequest, plan: Plan, mesh: jax.sharding.Mesh):
  """(jitted fn, traces): `fn(params, ae_params, cond, null, index, batch_number, key, init_latent, keep_mask, x_T)`.

  index: int32 [B] sample indices (their noise), batch_number: the batch's position (its sampler
  noise), key: the seed's PRNG key, x_T: the batch's given initial latents [B, h, w, c] or None. Returns (images [B, H, W, C] in [-1, 1], x0 images
  [K, B, H, W, C] or None), split over the mesh along B. `len(traces)` counts compilations.
  """
  ldm = dataclasses.replace(ldm, latent_shape=plan.latent_shape)
  settings = dict(sampler=request.sampler, num_steps=request.steps, spacing=request.timestep_spacing,
                  steps_offset=request.steps_offset, eta=request.eta, guidance_scale=request.guidance_scale,
                  guidance_rescale=request.guidance_rescale)
  if request.save_intermediates:
    settings["return_x0_at"] = tuple(request.save_intermediates)
  traces = []

  def fn(params, ae_params, cond, null, index, batch_number, key, init_latent, keep_mask, x_T):
    traces.append(1)  # runs once per compilation
    batch_size = index.shape[0]
    noise_key, sampler_key = jax.random.split(key)
    rng = jax.random.fold_in(sampler_key, batch_number)
    kwargs = dict(settings, null_cond=null, ae_params=ae_params)
    if plan.mode == "sample":
      if x_T is None:
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


def run_batches(ldm: LatentDiffusion, params, ae_params, request: SampleRequest, plan: Plan,
                mesh: jax.sharding.Mesh):
  """Makes the plan's N images: (uint8 [N, H, W, C], uint8 [K, N, H, W, C] or None, compilations)."""
  fn, traces = make_sample_fn(ldm, request, plan, mesh)
  batch_sh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  key = jax.random.PRNGKey(request.seed)
  null = jax.tree.map(lambda x: sharding.put(x, rep), plan.null)
  init_latent = keep = None
  if plan.init_image is not None:
    encode = jax.jit(ldm.encode, out_shardings=rep)  # the posterior mean: deterministic
    init_latent = encode(ae_params, sharding.put(plan.init_image, rep))
  if plan.keep_mask is not None:
    keep = sharding.put(plan.keep_mask, rep)
  B, n = plan.batch_size, plan.num_samples
  images, x0_images = [], []
  t0 = time.perf_counter()
  for b in tqdm(range(plan.num_batches), desc="sampling", unit="batch", disable=jax.process_index() != 0):
    index = np.arange(b * B, (b + 1) * B, dtype=np.int32)
    rows = np.minimum(index, n - 1)  # the padding repeats the last sample's condition
    cond = jax.tree.map(lambda x: sharding.put(np.asarray(x)[rows], batch_sh), plan.cond)
    x_T = None if plan.x_T is None else sharding.put(plan.x_T[rows], batch_sh)
    out, x0 = fn(params, ae_params, cond, null, sharding.put(index, batch_sh), np.int32(b), key, init_latent, keep,
                 x_T)
    keep_rows = min(B, n - b * B)
    images.append(to_uint8(multihost_utils.process_allgather(out, tiled=True))[:keep_rows])
    if x0 is not None:
      x0_images.append(to_uint8(multihost_utils.process_allgather(x0, tiled=True))[:, :keep_rows])
  seconds = time.perf_counter() - t0
  logging.info("Sampled %d images in %.1f s (%.2f images/s incl. compilation), %d compilation(s).", n, seconds,
               n / seconds, len(traces))
  return np.concatenate(images), (np.concatenate(x0_images, axis=1) if x0_images else None), len(traces)


def sampling_mesh(devices=None) -> jax.sharding.Mesh:
  """All devices (default: of all processes) on the data-parallel axis; parameters replicated."""
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1)), devices)


def sample_to_dir(request: SampleRequest, mesh: jax.sharding.Mesh | None = None) -> dict:
  """Runs a request end to end (see the module docstring); returns a summary dict.

  The summary has `out`, `num_samples`, `image_size`, `compilations` (1: every batch reused
  the same compiled function), `checkpoint_step`.
  """
  check_request(request)
  adapters.check_files(request)
  info = adapters.add_placeholders(request, read_model(request))
  mesh = sampling_mesh() if mesh is None else mesh
  plan = make_plan(request, info, sharding.data_parallel_size(mesh))
  weights = "pretrained" if info.step is None else f"step {info.step}, {'EMA' if request.use_ema else 'raw'}"
  logging.info("Sampling %d images of %d×%d from %s (%s weights): %s, %d steps%s, guidance %s, %d per "
               "batch over %d devices.", plan.num_samples, plan.image_size[1], plan.image_size[0], info.source,
               weights, request.sampler, plan.steps_run,
               f" ({plan.mode}, strength {plan.strength})" if plan.init_image is not None else "",
               request.guidance_scale, plan.batch_size, sharding.data_parallel_size(mesh))
  ldm, params, ae_params = info.load(mesh, request.use_ema)
  ldm, params = adapters.apply_adapters(request, ldm, params, mesh)
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
