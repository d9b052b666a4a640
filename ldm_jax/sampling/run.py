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
from ldm_jax.sampling.model import read_model, read_refiner
from ldm_jax.sampling.outputs import write_outputs
from ldm_jax.sampling.plan import Plan, make_plan
from ldm_jax.sampling.request import SampleRequest, check_request


def make_sample_fn(ldm: LatentDiffusion, request: SampleRequest, plan: Plan, mesh: jax.sharding.Mesh,
                   refiner: LatentDiffusion | None = None):
  """(jitted fn, traces): `fn(params, ae_params, cond, null, index, batch_number, key, init_latent, keep_mask, x_T,
  expert=None)`.

  index: int32 [B] sample indices (their noise), batch_number: the batch's position (its sampler
  noise), key: the seed's PRNG key, x_T: the batch's given initial latents [B, h, w, c] or None.
  With `plan.refiner`, `refiner` is the second expert and `expert` its inputs {'params',
  'ae_params', 'cond' [B, …], 'null'}: the model runs `plan.refiner.base_timesteps` and lands on the
  refiner's first timestep, the refiner runs the rest from those latents and its autoencoder
  decodes (diffusers' `denoising_end` then `denoising_start`). Returns (images [B, H, W, C] in
  [-1, 1], x0 images [K, B, H, W, C] or None), split over the mesh along B. `len(traces)` counts
  compilations.
  """
  ldm = dataclasses.replace(ldm, latent_shape=plan.latent_shape)
  if plan.refiner is not None:
    refiner = dataclasses.replace(refiner, latent_shape=plan.latent_shape)
  tiles = {} if plan.decode_tile is None else dict(tile=plan.decode_tile[0], tile_overlap=plan.decode_tile[1])
  settings = dict(sampler=request.sampler, num_steps=request.steps, spacing=request.timestep_spacing,
                  steps_offset=request.steps_offset, eta=request.eta, guidance_scale=request.guidance_scale,
                  guidance_rescale=request.guidance_rescale, guidance_interval=request.guidance_interval)
  if request.save_intermediates:
    settings["return_x0_at"] = tuple(request.save_intermediates)
  traces = []

  def fn(params, ae_params, cond, null, index, batch_number, key, init_latent, keep_mask, x_T, expert=None):
    traces.append(1)  # runs once per compilation
    batch_size = index.shape[0]
    noise_key, sampler_key = jax.random.split(key)
    rng = jax.random.fold_in(sampler_key, batch_number)
    kwargs = dict(settings, null_cond=null, ae_params=ae_params)
    decoder = ldm
    if plan.mode == "sample":
      if x_T is None:
        x_T = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i), plan.latent_shape))(index)
      if plan.refiner is None:
        out = ldm.sample_latents(params, cond, rng, x_T=x_T, batch_size=batch_size, **kwargs)
      else:
        base_rng, refiner_rng = jax.random.split(rng)
        ts, refiner_ts = plan.refiner.base_timesteps, plan.refiner.refiner_timesteps
        z = ldm.sample_latents(params, cond, base_rng, x_T=x_T, batch_size=batch_size, timesteps=ts,
                               end_timestep=int(refiner_ts[0]), **kwargs)
        decoder, ae_params = refiner, expert["ae_params"]
        out = refiner.sample_latents(expert["params"], expert["cond"], refiner_rng, x_T=z, batch_size=batch_size,
                                     timesteps=refiner_ts, **dict(kwargs, null_cond=expert["null"], ae_params=ae_params))
    else:
      init = jnp.broadcast_to(init_latent, (batch_size,) + plan.latent_shape)
      if plan.mode == "img2img":
        out = ldm.img2img_latents(params, cond, init, rng, strength=plan.strength, **kwargs)
      else:
        out = ldm.inpaint_latents(params, cond, init, keep_mask, rng, strength=plan.strength, **kwargs)
    z, x0 = out if request.save_intermediates else (out, None)
    images = decoder.decode(ae_params, z, **tiles)
    if x0 is None:
      return images, None
    k = x0.shape[0]
    x0_images = decoder.decode(ae_params, x0.reshape((k * batch_size,) + plan.latent_shape), **tiles)
    return images, x0_images.reshape((k, batch_size) + images.shape[1:])

  batch = sharding.batch_sharding(mesh)
  x0_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))
  return jax.jit(fn, out_shardings=(batch, x0_sharding if request.save_intermediates else None)), traces


def run_batches(ldm: LatentDiffusion, params, ae_params, request: SampleRequest, plan: Plan,
                mesh: jax.sharding.Mesh, refiner: tuple[LatentDiffusion, dict, dict] | None = None):
  """Makes the plan's N images: (uint8 [N, H, W, C], uint8 [K, N, H, W, C] or None, compilations).

  refiner: (ldm, params, ae_params) of `plan.refiner`'s model, placed on `mesh`."""
  fn, traces = make_sample_fn(ldm, request, plan, mesh, None if refiner is None else refiner[0])
  batch_sh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  key = jax.random.PRNGKey(request.seed)
  null = jax.tree.map(lambda x: sharding.put(x, rep), plan.null)
  refiner_null = None if plan.refiner is None else jax.tree.map(lambda x: sharding.put(x, rep), plan.refiner.null)
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
    expert = None
    if plan.refiner is not None:
      expert = dict(params=refiner[1], ae_params=refiner[2], null=refiner_null,
                    cond=jax.tree.map(lambda x: sharding.put(np.asarray(x)[rows], batch_sh), plan.refiner.cond))
    out, x0 = fn(params, ae_params, cond, null, sharding.put(index, batch_sh), np.int32(b), key, init_latent, keep,
                 x_T, expert)
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


def _with_attention(ldm: LatentDiffusion, attention: str) -> LatentDiffusion:
  return dataclasses.replace(ldm, unet=ldm.unet.clone(attention=attention),
                             autoencoder=ldm.autoencoder.clone(attention=attention))


def sample_to_dir(request: SampleRequest, mesh: jax.sharding.Mesh | None = None) -> dict:
  """Runs a request end to end (see the module docstring); returns a summary dict.

  The summary has `out`, `num_samples`, `image_size`, `compilations` (1: every batch reused
  the same compiled function), `checkpoint_step`.
  """
  check_request(request)
  adapters.check_files(request)
  info = adapters.add_placeholders(request, read_model(request))
  refiner_info = read_refiner(request)
  mesh = sampling_mesh() if mesh is None else mesh
  plan = make_plan(request, info, sharding.data_parallel_size(mesh), refiner_info)
  weights = "pretrained" if info.step is None else f"step {info.step}, {'EMA' if request.use_ema else 'raw'}"
  logging.info("Sampling %d images of %d×%d from %s (%s weights): %s, %d steps%s, guidance %s, %d per "
               "batch over %d devices.", plan.num_samples, plan.image_size[1], plan.image_size[0], info.source,
               weights, request.sampler, plan.steps_run,
               f" ({plan.mode}, strength {plan.strength})" if plan.init_image is not None else "",
               request.guidance_scale, plan.batch_size, sharding.data_parallel_size(mesh))
  if plan.refiner is not None:
    logging.info("Ensemble of experts: %d steps by the model, %d by the refiner %s (timesteps from %d).",
                 len(plan.refiner.base_timesteps), len(plan.refiner.refiner_timesteps), refiner_info.source,
                 plan.refiner.refiner_timesteps[0])
  ldm, params, ae_params = info.load(mesh, request.use_ema)
  ldm, params = adapters.apply_adapters(request, ldm, params, mesh)
  refiner = None if refiner_info is None else refiner_info.load(mesh, True)
  if request.attention is not None:
    ldm = _with_attention(ldm, request.attention)
    refiner = None if refiner is None else (_with_attention(refiner[0], request.attention),) + refiner[1:]
  images, x0_images, compilations = run_batches(ldm, params, ae_params, request, plan, mesh, refiner)
  settings = dict(dataclasses.asdict(request), checkpoint_step=info.step, scale_factor=ldm.scale_factor,
                  strength=plan.strength, steps_run=plan.steps_run, mode=plan.mode, decode_tile=plan.decode_tile)
  if plan.refiner is not None:
    settings.update(base_timesteps=plan.refiner.base_timesteps.tolist(),
                    refiner_timesteps=plan.refiner.refiner_timesteps.tolist())
  out = request.out
  if jax.process_index() == 0:
    out = write_outputs(request.out, images, labels=plan.labels, prompts=plan.prompts, x0_images=x0_images,
                        grid_cols=plan.grid_cols, settings=settings)
    logging.info("Wrote %d images to %s", len(images), out)
  return dict(out=out, num_samples=plan.num_samples, image_size=plan.image_size, compilations=compilations,
              checkpoint_step=info.step)
