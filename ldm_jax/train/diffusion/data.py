"""The data of a stage-2 run: training batches (images, or cached latents), conditions, `scale_factor`.

Batches come from the one grain pipeline (`ldm_jax.data.make_loader`); with `latent.cache` the
training split is encoded once into an in-memory latent cache (`ldm_jax.data.latent_cache`) and
batches are drawn from that; with `latent.cache_dir` from an on-disk cache written by
`python -m ldm_jax.precompute`, after `check_disk_cache` has compared its manifest with the run.
`prepare_batch` turns a batch into the step's input on the host: the image or cached latents, the
conditioner's inputs under 'cond/…' (SDXL's time ids from the cached original sizes and crop
offsets too), and the cached outputs of frozen text encoders as 'cond/context' and
'cond/text_embeds' (the pooled embedding).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from ldm_jax import data as data_lib
from ldm_jax.data import latent_cache
from ldm_jax.data.latent_cache import CACHED_LATENT_KEYS, CACHED_TEXT_KEYS, ArraySource, cached_batches
from ldm_jax.data.pipeline import SKIP_REASONS, describe_skipped, skipped_counts
from ldm_jax.diffusion.latent_diffusion import first_stage_latent
from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.models import conditioning
from ldm_jax.precompute import encode as precompute
from ldm_jax.runtime import sharding


def check_disk_cache(config, ae_config) -> dict | None:
  """The manifest of `latent.cache_dir` once it is known to match this run (by content: the
  autoencoder's architecture and parameters, image size, channels, latent shape, frozen text encoders
  and tokenizers) and to hold the columns the run reads (the frozen encoders' context and pooled
  embedding, SDXL's sizes and crop offsets), else ValueError naming the key; None without a
  cache_dir. Reads the autoencoder's parameters (to digest them), no array of the cache."""
  cache_dir = config.latent.cache_dir
  if not cache_dir:
    return None
  if config.latent.cache:
    raise ValueError("latent.cache: True, and latent.cache_dir is set too; use one of them (cache_dir for a cache "
                     "written by python -m ldm_jax.precompute, cache for an in-memory one).")
  if config.cond.kind in ("concat", "hybrid"):
    raise ValueError("latent.cache_dir: concat conditioning needs the images at every step; unset it.")
  manifest = latent_cache.read_manifest(cache_dir)
  latent_cache.check_manifest(manifest, precompute.cache_identity(config, ae_config), cache_dir,
                              columns=precompute.needed_columns(config))
  return manifest


def _encode_for_cache(autoencoder, ae_params, images) -> dict[str, jax.Array]:
  """What the cache keeps of a batch of images, unscaled, float32 (see `cache_latents`)."""
  out = autoencoder.apply({"params": ae_params}, images, method=autoencoder.encode)
  if isinstance(out, ae_lib.DiagonalGaussian):
    return {"latent_moments": jnp.concatenate([out.mean, out.logvar], axis=-1)}
  return {"latent": out.astype(jnp.float32)}


def cache_latents(config, autoencoder, ae_params) -> ArraySource:
  """Encodes this host's share of the training split once (the records `data.make_loader` gives
  this host), without augmentation, with each record's label and caption.

  A KL autoencoder's latents are kept as the posterior's moments ('latent_moments', mean ⊕ logvar),
  so that every step still draws a fresh posterior sample as uncached training does; a VQ
  autoencoder's as the pre-quantization latent ('latent'), which is what LDM trains on (the
  decoder quantizes).
  """
  loader = data_lib.make_loader(config.data, config.data.train_split, batch_size=config.train.batch_size,
                                seed=0, shuffle=False, num_epochs=1, drop_remainder=False)
  encode = jax.jit(functools.partial(_encode_for_cache, autoencoder))
  columns = []
  skipped = np.zeros(len(SKIP_REASONS), np.int64)
  for batch in tqdm(loader, desc="caching latents", disable=jax.process_index() != 0):
    latents = jax.device_get(encode(ae_params, batch["image"]))
    columns.append({**latents, "label": batch["label"], "caption": batch["caption"]})
    skipped += skipped_counts(batch)
  cache = ArraySource({name: np.concatenate([c[name] for c in columns]) for name in columns[0]})
  if skipped.any():  # the training loop's data/skipped_* counts see the cache, not these
    logging.warning("caching latents: the input pipeline dropped %d records of this host's share (%s); the "
                    "cache holds the other %d.", skipped.sum(), describe_skipped(skipped), len(cache))
  return cache


def make_train_iterator(config, source=None):
  """Batches of images (or cached latents), per host, deterministic given train.seed.

  Each host reads its share of the training split: the images `data.make_loader` gives it, or a
  cache of those same images (`cache_latents`), which is not split again.
  """
  if config.latent.cache_dir:
    return latent_cache.disk_cache_loader(config.latent.cache_dir, config.train.batch_size, config.train.seed,
                                          num_workers=config.data.num_workers)
  if source is None:  # with data.buckets, batches of one aspect-ratio bucket each
    return iter(data_lib.make_loader(config.data, config.data.train_split, batch_size=config.train.batch_size,
                                     seed=config.train.seed, buckets=True))
  return cached_batches(source, config.train.batch_size, config.train.seed)


def uses_cached_context(config, tuning=None) -> bool:
  """Whether the step takes the text context and pooled embedding from the cache of `latent.cache_dir`
  (when it holds them: the run's encoders are frozen, `precompute.uses_frozen_text_encoder`): while
  the text encoders stay frozen and the captions are the data's. Textual inversion and a LoRA of the
  text encoder (`tuning.trains_text_encoder`) train it, DreamBooth replaces the captions by its
  prompts: those runs encode the captions at every step."""
  return bool(config.latent.cache_dir) and "dreambooth" not in config and not (
      tuning is not None and tuning.trains_text_encoder)


def prepare_batch(config, tokenizer, latent_shape, batch: dict, step: int, *, transform=None,
                  cached_context: bool = True, tokenizer_2=None) -> dict:
  """Host side: the conditioner's inputs under 'cond/…' next to the image or cached latents
  (as `LatentDiffusion.prepare`, before the run's LatentDiffusion exists), the cached 'context' and
  'text_embeds' as 'cond/context' and 'cond/text_embeds' unless not `cached_context`
  (`uses_cached_context`), and a per-example 'loss_weight' when the batch has one.
  `transform(batch, step)` first changes the batch (a fine-tuning method's captions,
  `finetune.batch_transform`).

  SDXL (`tokenizer_2`, `cond.micro_conditioning='target_size'`): 'cond/time_ids' are each image's
  original size and crop offsets, as the pipeline (or the cache) recorded them, and the size of the
  training image (a cached one: `data.image_size`) as the target size (diffusers'
  train_text_to_image_sdxl.py)."""
  if transform is not None:
    batch = transform(batch, step)
  if config.cond.micro_conditioning == "target_size" and "target_size" not in batch:
    size = batch["image"].shape[1:3] if "image" in batch else (config.data.image_size,) * 2
    batch = {**batch, "target_size": np.asarray(size, np.int32)}
  rng = np.random.default_rng((config.train.seed, step))  # random inpainting masks, reproducible
  cond = conditioning.prepare_condition(config.cond, batch, tokenizer, latent_size=tuple(latent_shape[:2]), rng=rng,
                                        tokenizer_2=tokenizer_2)
  cached = [k for k in CACHED_LATENT_KEYS if k in batch]
  out = {k: batch[k] for k in (cached or ["image"]) + (["loss_weight"] if "loss_weight" in batch else [])}
  out.update({f"cond/{k}": v for k, v in cond.items()})
  if cached_context:  # frozen text encoders' outputs from the on-disk cache
    out.update({f"cond/{k}": batch[k] for k in CACHED_TEXT_KEYS if k in batch})
  return out


def sample_conditions(config, ldm) -> dict:
  """The fixed conditions of the periodic sample grids: prompts, class labels or held-out images."""
  n = config.sample.num_images
  kind = config.cond.kind
  batch = next(iter(data_lib.make_loader(config.data, config.data.eval_split, batch_size=n, seed=0,
                                         shuffle=False, num_epochs=1))) if kind != "none" else {}
  if kind in ("text", "hybrid") and config.sample.prompts:
    prompts = list(config.sample.prompts)
    batch["caption"] = np.array((prompts * n)[:n])
  if config.cond.micro_conditioning == "target_size":  # uncropped images of the training size, as sample.py's default
    size = (config.data.image_size, config.data.image_size)
    batch.update(original_size=size, crop_coords_top_left=(0, 0), target_size=size)
  if kind == "class":
    batch["label"] = np.arange(n, dtype=np.int32) % config.cond.num_classes
  return ldm.prepare(batch, rng=np.random.default_rng(0)) if kind != "none" else {}


def estimate_scale_factor(config, autoencoder, ae_params, batch, mesh) -> float:
  """1 / std of the first global batch's latents (LDM `scale_by_std`), unless the config fixes it.

  `batch` is this process's share (images or cached latents); every process gets the same value.
  """
  if config.latent.scale_factor > 0:
    return float(config.latent.scale_factor)
  if "latent_moments" in batch:
    mean, logvar = np.split(np.asarray(batch["latent_moments"]), 2, axis=-1)
    z = mean + np.exp(0.5 * logvar) * np.random.default_rng(0).standard_normal(mean.shape)
  elif "latent" in batch:
    z = np.asarray(batch["latent"])
  else:
    images = sharding.shard_batch({"image": batch["image"]}, mesh)["image"]
    z = jax.jit(functools.partial(first_stage_latent, autoencoder))(ae_params, images, jax.random.PRNGKey(0))
  z = multihost_utils.process_allgather(z, tiled=True) if jax.process_count() > 1 else jax.device_get(z)
  return float(1.0 / np.std(np.asarray(z, np.float32)))
