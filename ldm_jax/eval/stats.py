"""Reference statistics of a data set under an extractor: computed once, cached as `.npz`.

`reference_stats(data_cfg, split, num_images, extractor)` takes the first `num_images` records
of `split` (index order, center crop, no flip — `reference_images`), extracts their features
under the protocol (`ldm_jax.eval.features`) and returns `ReferenceStats` (μ, Σ, the features
for KID and precision/recall, the logits when the extractor has them). The result is saved under

    <cache_dir>/<extractor kind>-<split>-<N>-<key>.npz

where `key` hashes the extractor's `protocol()` (protocol version, resize, input size and
channels, weights fingerprint) and the data identity (the `data.*` keys that decide the
images, the split and N). Another call with the same key reads the file instead of
recomputing; anything that would change the features changes the key. `cache_dir` defaults
to $LDM_JAX_EVAL_CACHE or ~/.cache/ldm_jax/eval.

A stats file also records its protocol, so one computed under another protocol or extractor
is refused by `load_stats` rather than silently compared.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging

from ldm_jax.data import make_source, validate_data_config
from ldm_jax.data.pipeline import preprocess
from ldm_jax.eval import distribution
from ldm_jax.eval import features as features_lib

# data.* keys that do not change which pixels an evaluation sees.
_NOT_DATA_IDENTITY = ("train_split", "eval_split", "random_crop", "random_flip", "num_workers",
                      "label_key", "caption_key")


@dataclasses.dataclass
class ReferenceStats:
  """mu [D], sigma [D, D] (float64), features [N, D], logits [N, K] or None, and `meta`:
  {'protocol': extractor.protocol(), 'data': data identity, 'num_images', 'image_size'}."""
  mu: np.ndarray
  sigma: np.ndarray
  features: np.ndarray
  logits: np.ndarray | None
  meta: dict

  def save(self, path: str) -> None:
    """Writes the `.npz` atomically (a reader never sees a half-written file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    arrays = dict(mu=self.mu, sigma=self.sigma, features=self.features, meta=np.array(json.dumps(self.meta)))
    if self.logits is not None:
      arrays["logits"] = self.logits
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def default_cache_dir() -> str:
  return os.environ.get("LDM_JAX_EVAL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ldm_jax", "eval"))


def data_identity(data_cfg: ml_collections.ConfigDict, split: str, num_images: int) -> dict:
  """What decides the reference pixels: the data.* keys minus order/augmentation, split, N."""
  identity = {k: v for k, v in data_cfg.to_dict().items() if k not in _NOT_DATA_IDENTITY}
  if identity.get("path"):
    identity["path"] = os.path.abspath(identity["path"])
  identity.update(split=split, num_images=num_images)
  return identity


def cache_key(protocol: dict, identity: dict) -> str:
  blob = json.dumps({"protocol": protocol, "data": identity}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def reference_images(data_cfg: ml_collections.ConfigDict, split: str, num_images: int) -> np.ndarray:
  """The first `num_images` records of `split` as uint8 [N, S, S, C] (S = data.image_size):
  the pipeline's resize and center crop, never a random crop or flip. Records a source cannot read
  (`{'skip': 'corrupt'}`, tar shards) are left out."""
  source = make_source(data_cfg, split)
  n = min(num_images, len(source))

  def load(i):
    if "skip" in (record := source[i]):
      return None
    record = preprocess(record, None, image_size=data_cfg.image_size, channels=data_cfg.channels,
                        random_crop=False, random_flip=False)
    return record["image"]

  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    return np.stack([image for image in pool.map(load, range(n)) if image is not None])


def labelled_reference_images(data_cfg: ml_collections.ConfigDict, split: str,
                              num_images: int) -> tuple[np.ndarray, np.ndarray]:
  """`reference_images` and the records' labels; ValueError if a record could not be read (its
  label would not line up with the images)."""
  images = reference_images(data_cfg, split, num_images)
  source = make_source(data_cfg, split)
  if len(images) != min(num_images, len(source)):
    raise ValueError(f"data: {min(num_images, len(source)) - len(images)} of the first {num_images} {split} "
                     "records could not be read; their labels would not line up with the images")
  return images, np.asarray([source[i]["label"] for i in range(len(images))])


def stats_from_features(features: np.ndarray, logits, meta: dict) -> ReferenceStats:
  mu, sigma = distribution.gaussian_stats(features)
  return ReferenceStats(mu=mu, sigma=sigma, features=np.asarray(features, np.float32),
                        logits=None if logits is None else np.asarray(logits, np.float32), meta=meta)


def reference_stats(data_cfg: ml_collections.ConfigDict, split: str, num_images: int,
                    extractor: features_lib.Extractor, *, cache_dir: str | None = None, mesh=None,
                    batch_size: int = 64, progress: bool = True) -> ReferenceStats:
  """Reference statistics of the first `num_images` images of `split`, from the cache if there.

  Args:
    data_cfg: a `data` config section (any source of the data pipeline).
    num_images: N; fewer when the split is smaller (the actual count keys the cache).
    cache_dir: where the `.npz` files live (default `default_cache_dir()`); '' disables caching.
  """
  validate_data_config(data_cfg)
  num_images = min(num_images, len(make_source(data_cfg, split)))
  if num_images < 2:
    raise ValueError(f"reference statistics: split '{split}' of data.source={data_cfg.source!r} "
                     f"gives {num_images} image(s); at least 2 are needed")
  identity = data_identity(data_cfg, split, num_images)
  protocol = extractor.protocol()
  cache_dir = default_cache_dir() if cache_dir is None else cache_dir
  path = None
  if cache_dir:
    path = os.path.join(cache_dir, f"{extractor.kind}-{split}-{num_images}-{cache_key(protocol, identity)}.npz")
    if os.path.isfile(path):
      logging.info("Reference statistics from the cache: %s", path)
      return load_stats(path, extractor)
  images = reference_images(data_cfg, split, num_images)
  out = features_lib.extract(extractor, images, mesh=mesh, batch_size=batch_size, progress=progress,
                             desc=f"reference {split}")
  meta = {"protocol": protocol, "data": identity, "num_images": num_images,
          "image_size": [int(s) for s in images.shape[1:3]]}
  meta = json.loads(json.dumps(meta, default=str))  # as a cached file reads back (tuples become lists)
  stats = stats_from_features(out["features"], out.get("logits"), meta)
  if path and jax.process_index() == 0:
    stats.save(path)
    logging.info("Reference statistics cached: %s", path)
  return stats


def load_stats(path: str, extractor: features_lib.Extractor | None = None) -> ReferenceStats:
  """Reads a stats `.npz`; with `extractor`, refuses one computed under another protocol.

  Raises:
    FileNotFoundError: no such file. ValueError: not a ldm_jax stats file, or a protocol mismatch
      (the message shows both protocols).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: reference statistics file not found")
  with np.load(path, allow_pickle=False) as f:
    missing = {"mu", "sigma", "features", "meta"} - set(f.files)
    if missing:
      raise ValueError(f"{path}: not a ldm_jax reference statistics file (missing {sorted(missing)}); "
                       f"statistics from other tools follow other protocols and cannot be compared — "
                       f"give a data config as --ref to compute them here")
    meta = json.loads(str(f["meta"]))
    stats = ReferenceStats(mu=f["mu"], sigma=f["sigma"], features=f["features"],
                           logits=f["logits"] if "logits" in f.files else None, meta=meta)
  if extractor is not None and meta.get("protocol") != extractor.protocol():
    raise ValueError(f"{path}: these reference statistics were computed under another protocol or "
                     f"extractor.\n  file:    {meta.get('protocol')}\n  current: {extractor.protocol()}\n"
                     f"Recompute them from the data config (--ref CONFIG) with this extractor.")
  return stats
