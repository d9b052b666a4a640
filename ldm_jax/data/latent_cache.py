"""Latent caches: in-memory columns of encoded training images, and their batches.

A stage-2 run with `latent.cache` encodes this host's share of the training split once
(`ldm_jax.train.diffusion.data.cache_latents`) into an `ArraySource`; `cached_batches` then
shuffles and batches it per host as `make_loader` does images. The cache is not split by host
again: it already is this host's share.
"""

from __future__ import annotations

import grain
import numpy as np

from ldm_jax.data.pipeline import host_batch_size

# What a latent cache holds per image: the KL posterior's moments or VQ's pre-quantization latent.
CACHED_LATENT_KEYS = ("latent_moments", "latent")


class ArraySource:
  """Random access over in-memory columns of equal length: record i is {name: column[i]}."""

  def __init__(self, columns: dict[str, np.ndarray]):
    self.columns = columns

  def __len__(self) -> int:
    return len(next(iter(self.columns.values())))

  def __getitem__(self, i):
    return {name: column[i] for name, column in self.columns.items()}


def _collate(records):
  return {key: np.stack([np.asarray(r[key]) for r in records]) for key in records[0]}


def cached_batches(source: ArraySource, batch_size: int, seed: int):
  """Endless shuffled per-host batches of `source` (global `batch_size`), deterministic given `seed`;
  a grain iterator with `get_state`/`set_state` as `make_loader`'s."""
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None)
  ds = ds.batch(host_batch_size(batch_size), drop_remainder=True, batch_fn=_collate)
  return iter(ds.to_iter_dataset())
