"""Evaluation of generated samples and of autoencoder reconstructions against reference data.

For trainers (periodic evaluation) and the `python -m ldm_jax.eval` entry point:

    extractor = make_extractor("vgg16:112")                        # once
    ref = reference_stats(config.data, "train", 10_000, extractor)   # once; cached on disk
    scores = evaluate_samples(images_uint8, ref, extractor, ("fd", "kid"), kid_subset_size=500)
    # {'fd_vgg16_112px': …, 'kid_vgg16_112px': …, 'kid_vgg16_112px_std': …}

Metrics (`SAMPLE_METRICS`): 'fd' Fréchet distance (FID on Inception), 'kid' (mean and std),
'pr' precision and recall, 'is' Inception Score (extractors with logits), 'acc' the class
accuracy of conditional samples (classifier extractor + labels). Every requirement — sample
counts, dtype, logits, labels, the reference's protocol and image size — is checked before any
feature is computed.
"""

from __future__ import annotations

import functools
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ldm_jax.eval import distribution
from ldm_jax.eval import features as features_lib
from ldm_jax.eval import metrics as metrics_lib
from ldm_jax.eval import stats as stats_lib
from ldm_jax.losses import lpips as lpips_lib
from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.runtime import sharding

SAMPLE_METRICS = ("fd", "kid", "pr", "is", "acc")
RECONSTRUCTION_METRICS = ("psnr", "ssim", "lpips", "rfd")
_ALIASES = {"fid": "fd", "rfid": "rfd", "precision": "pr", "recall": "pr", "accuracy": "acc"}


def parse_metrics(spec: str | tuple[str, ...], allowed: tuple[str, ...]) -> tuple[str, ...]:
  """'fid,kid,pr' → ('fd', 'kid', 'pr'); ValueError naming an unknown metric."""
  names = spec.split(",") if isinstance(spec, str) else spec
  out = []
  for name in (n.strip().lower() for n in names if n.strip()):
    name = _ALIASES.get(name, name)
    if name not in allowed:
      raise ValueError(f"unknown metric {name!r}; expected some of {', '.join(allowed)} "
                       f"(aliases: {', '.join(_ALIASES)})")
    if name not in out:
      out.append(name)
  if not out:
    raise ValueError("no metric given")
  return tuple(out)


def _check_request(metrics, extractor, n_fake: int, ref: stats_lib.ReferenceStats, *, labels,
                   kid_subset_size: int, pr_k: int, is_splits: int) -> None:
  n_real = len(ref.features)
  needs = []
  if "fd" in metrics and n_fake < 2:
    needs.append(f"fd needs at least 2 samples, got {n_fake}")
  if "kid" in metrics and min(n_fake, n_real) < kid_subset_size:
    needs.append(f"kid with subset size {kid_subset_size} needs that many samples and reference images, "
                 f"got {n_fake} and {n_real} (lower --kid_subset_size)")
  if "pr" in metrics and min(n_fake, n_real) <= pr_k:
    needs.append(f"pr with k={pr_k} needs more than {pr_k} samples and reference images, got {n_fake} "
                 f"and {n_real}")
  if "is" in metrics:
    if not extractor.has_logits:
      needs.append(f"is needs class logits, which the {extractor.kind} extractor does not give "
                   f"(use inception or classifier:RUN)")
    elif n_fake < is_splits:
      needs.append(f"is with {is_splits} splits needs at least {is_splits} samples, got {n_fake}")
  if "acc" in metrics:
    if extractor.kind != "classifier":
      needs.append("acc needs the classifier:RUN extractor (its classes are the data's)")
    if labels is None:
      needs.append("acc needs the samples' class labels (samples.npz 'labels')")
    elif len(labels) != n_fake:
      needs.append(f"acc: {len(labels)} labels for {n_fake} samples")
  if needs:
    raise ValueError("cannot evaluate: " + "; ".join(needs))
  if ref.meta.get("protocol") != extractor.protocol():
    raise ValueError(f"the reference statistics were computed under another protocol or extractor:\n"
                     f"  reference: {ref.meta.get('protocol')}\n  current:   {extractor.protocol()}")


def evaluate_samples(images, ref: stats_lib.ReferenceStats, extractor: features_lib.Extractor,
                     metrics=("fd",), *, labels=None, mesh=None, batch_size: int = 64,
                     kid_subsets: int = 100, kid_subset_size: int = 1000, pr_k: int = 3,
                     is_splits: int = 10, seed: int = 0, progress: bool = True) -> dict[str, float]:
  """Distribution metrics of generated images against reference statistics.

  Args:
    images: uint8 [N, H, W, C] samples, H × W as the reference images.
    ref: from `stats.reference_stats` or `stats.load_stats`, under this extractor.
    extractor: from `features.make_extractor`.
    metrics: names from `SAMPLE_METRICS` (or a comma-separated string; 'fid' = 'fd').
    labels: int [N] classes of conditional samples, for 'acc'.
  Returns:
    {name: value} with names from `extractor.metric_name`: e.g. 'fid', 'kid', 'kid_std',
    'precision', 'recall', 'inception_score', 'inception_score_std' on Inception;
    'fd_vgg16', 'kid_vgg16', … on VGG16; 'class_accuracy' for 'acc'.
  Raises:
    ValueError before any computation when the images, counts or reference do not fit.
  """
  metrics = parse_metrics(metrics, SAMPLE_METRICS)
  images = features_lib.check_images(images, "samples")
  ref_size = ref.meta.get("image_size")
  if ref_size and list(images.shape[1:3]) != list(ref_size):
    raise ValueError(f"samples are {images.shape[1]}×{images.shape[2]} but the reference images are "
                     f"{ref_size[0]}×{ref_size[1]}; compare at the same resolution (data.image_size)")
  _check_request(metrics, extractor, len(images), ref, labels=labels, kid_subset_size=kid_subset_size,
                 pr_k=pr_k, is_splits=is_splits)
  out = features_lib.extract(extractor, images, mesh=mesh, batch_size=batch_size, progress=progress,
                             desc="samples")
  fake = out["features"]
  name = extractor.metric_name
  results = {}
  if "fd" in metrics:
    mu, sigma = distribution.gaussian_stats(fake)
    results[name("fd")] = distribution.frechet_distance(mu, sigma, ref.mu, ref.sigma)
  if "kid" in metrics:
    mean, std = distribution.kid(fake, ref.features, kid_subsets, kid_subset_size, seed=seed)
    results[name("kid")], results[name("kid") + "_std"] = mean, std
  if "pr" in metrics:
    results[name("precision")], results[name("recall")] = distribution.precision_recall(
        ref.features, fake, k=pr_k)
  if "is" in metrics:
    mean, std = distribution.inception_score(out["logits"], is_splits, seed=seed)
    results[name("is")], results[name("is") + "_std"] = mean, std
  if "acc" in metrics:
    results["class_accuracy"] = float(np.mean(np.argmax(out["logits"], -1) == np.asarray(labels)))
  return results


def load_samples(path: str) -> tuple[np.ndarray, np.ndarray | None]:
  """(images uint8 [N, H, W, C], labels or None) from a samples.npz; clear errors otherwise."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: samples file not found")
  try:  # never unpickled: object arrays and pickles are refused by allow_pickle=False
    with np.load(path, allow_pickle=False) as f:
      if not hasattr(f, "files"):
        raise ValueError("a single .npy array, not an .npz archive")
      if "images" not in f.files:
        raise ValueError(f"no 'images' array (keys: {f.files})")
      images, labels = f["images"], (f["labels"] if "labels" in f.files else None)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: not a readable samples .npz ({e}); sample.py writes uint8 images "
                     "[N, H, W, C] under 'images'.") from e
  return features_lib.check_images(images, f"{path}: 'images'"), labels


def load_prompts(path: str) -> np.ndarray | None:
  """The `prompts` of a samples.npz (text-conditional samples), or None when it has none."""
  with np.load(path, allow_pickle=False) as f:
    return f["prompts"] if "prompts" in f.files else None


def labels_from_prompts(prompts, class_captions: tuple[str, ...], *, source: str) -> np.ndarray:
  """int32 [N]: the class whose caption each prompt is (case and spacing ignored), so that text
  samples prompted with a data set's class captions get a class accuracy; ValueError naming the
  first prompt that is no class caption of `source`."""
  def norm(text):
    return " ".join(str(text).lower().split())
  index = {norm(c): i for i, c in enumerate(class_captions)}
  labels = []
  for prompt in prompts:
    if norm(prompt) not in index:
      raise ValueError(f"acc: the prompt {str(prompt)!r} is none of the class captions of {source} "
                       f"({', '.join(repr(c) for c in class_captions)}); sample with those prompts, or "
                       "write the class labels into samples.npz as 'labels'")
    labels.append(index[norm(prompt)])
  return np.asarray(labels, np.int32)


# ---- autoencoders ---------------------------------------------------------------------------

def _reconstruct(model, params, x):
  """Deterministic reconstruction, as the stage-1 evaluation: posterior mode (KL) or the
  quantized code (VQ); clipped to [-1, 1]."""
  if isinstance(model, ae_lib.VQModel):
    x_rec = model.apply({"params": params}, x)[0]
  else:
    posterior = model.apply({"params": params}, x, method=model.encode)
    x_rec = model.apply({"params": params}, posterior.mode(), method=model.decode)
  return jnp.clip(x_rec.astype(jnp.float32), -1.0, 1.0)


@functools.lru_cache(maxsize=4)
def _reconstruction_step(model, mesh, scores: tuple[str, ...]):
  """Jitted (params, lpips_params, x) → ({score: [B]}, x_rec) computing only `scores`."""
  def step(params, lpips_params, x):
    x_rec = _reconstruct(model, params, x)
    fns = {"psnr": lambda: metrics_lib.psnr(x, x_rec), "ssim": lambda: metrics_lib.ssim(x, x_rec),
           "lpips": lambda: lpips_lib.lpips(lpips_params, x, x_rec)}
    return {k: fns[k]() for k in scores}, x_rec
  rep, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(rep, rep, batch), out_shardings=rep)


def evaluate_autoencoder(model, params, data_cfg, split: str, num_images: int,
                         extractor: features_lib.Extractor | None, metrics=RECONSTRUCTION_METRICS, *,
                         mesh=None, batch_size: int = 64, cache_dir: str | None = None,
                         progress: bool = True) -> dict[str, float]:
  """Reconstruction metrics over the first `num_images` images of `split`.

  PSNR, SSIM and LPIPS are per-image means on the [-1, 1] images and the clipped float
  reconstructions (as the stage-1 trainer's evaluation); rFD is the Fréchet distance between
  the extractor features of the uint8-rounded reconstructions and of the originals (whose
  statistics come from the reference cache). Names: 'psnr', 'ssim', 'lpips', and
  'rfid' on Inception, 'rfd_vgg16' on VGG16, ….
  """
  metrics = parse_metrics(metrics, RECONSTRUCTION_METRICS)
  if "rfd" in metrics and extractor is None:
    raise ValueError("rfd needs a feature extractor")
  mesh = features_lib.default_mesh() if mesh is None else mesh
  originals = stats_lib.reference_images(data_cfg, split, num_images)
  if len(originals) < 2:
    raise ValueError(f"split '{split}' gives {len(originals)} image(s); at least 2 are needed")
  size = sharding.data_parallel_size(mesh) * jax.process_count()
  batch_size = -(-batch_size // size) * size
  per_process = batch_size // jax.process_count()
  scores_wanted = tuple(k for k in ("psnr", "ssim", "lpips") if k in metrics)
  step = _reconstruction_step(model, mesh, scores_wanted)
  rep = sharding.replicated(mesh)
  params = jax.device_put(params, rep)
  lpips_params = jax.device_put(lpips_lib.load_lpips_params() if "lpips" in metrics else {}, rep)
  n = len(originals)
  totals = {k: 0.0 for k in scores_wanted}
  recon = np.empty_like(originals)
  for start in tqdm(range(0, n, batch_size), desc="reconstructions", unit="batch", leave=False,
                    disable=not progress or jax.process_index() != 0):
    chunk = originals[start:start + batch_size]
    real = len(chunk)
    if real < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - real, axis=0)])
    local = chunk[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
    x = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh),
                                               local.astype(np.float32) / 127.5 - 1.0)
    scores, x_rec = step(params, lpips_params, x)
    scores = {k: np.asarray(v.addressable_data(0))[:real] for k, v in scores.items()}
    for key in totals:
      totals[key] += float(np.sum(scores[key]))
    x_rec = np.asarray(x_rec.addressable_data(0))[:real]
    recon[start:start + real] = np.clip(np.round((x_rec + 1.0) * 127.5), 0, 255).astype(np.uint8)
  results = {k: totals[k] / n for k in scores_wanted}
  if "rfd" in metrics:
    ref = stats_lib.reference_stats(data_cfg, split, n, extractor, cache_dir=cache_dir, mesh=mesh,
                                    batch_size=batch_size, progress=progress)
    fake = features_lib.extract(extractor, recon, mesh=mesh, batch_size=batch_size, progress=progress,
                                desc="reconstruction features")["features"]
    mu, sigma = distribution.gaussian_stats(fake)
    results[extractor.metric_name("rfd")] = distribution.frechet_distance(mu, sigma, ref.mu, ref.sigma)
  return results
