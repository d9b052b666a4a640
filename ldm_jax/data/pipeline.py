"""The grain input pipeline: source → host shard → shuffle → repeat → preprocess → batch.

Batches are numpy, per host:

    {'image':   float32 [B, S, S, C] in [-1, 1],   S = data.image_size, C = data.channels
     'label':   int32 [B],
     'caption': str array [B]}

with B = train.batch_size // jax.process_count(). Each JAX process reads the
records `process_index::process_count` of the source, so hosts never share a
record. The batch sequence is a pure function of (config, split, seed,
process layout, data.num_workers): the shuffle order and every random crop and
flip are seeded from `seed` and the record's position in the stream, and each
epoch is shuffled differently. The iterator has `get_state()` (a small
JSON-serialisable dict) and `set_state(state)`, which continues exactly where
the state was taken; trainers store it in their checkpoints.

`data.num_workers > 0` moves loading into grain worker processes (each worker
batches its own slice of records, so the sequence differs from num_workers=0);
grain then needs absl flags parsed, as they are under `absl.app.run`.
"""

import functools
import os
from collections.abc import Sequence
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image

from ldm_jax.data.sources import make_source


def host_batch_size(batch_size: int) -> int:
  """The per-host share of the global `train.batch_size`."""
  processes = jax.process_count()
  if batch_size < 1 or batch_size % processes:
    raise ValueError(f'train.batch_size={batch_size} must be a positive multiple of the number '
                     f'of JAX processes ({processes})')
  return batch_size // processes


def preprocess(record: dict[str, Any], rng: np.random.Generator, *, image_size: int,
               channels: int, random_crop: bool, random_flip: bool) -> dict[str, Any]:
  """Resizes the shorter side to `image_size`, crops a square, flips, converts channels.

  Args:
    record: `{'image': uint8 [H, W, C], 'label', 'caption'}` with C in {1, 3}.
    rng: per-record generator, used only for a random crop and flip.

  Returns:
    The record with `image` uint8 [image_size, image_size, channels].
  """
  image = record['image']
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  pil = pil.convert('L' if channels == 1 else 'RGB')
  width, height = pil.size
  scale = image_size / min(width, height)
  if scale != 1:
    size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
    # PIL widens the bicubic kernel when shrinking, so downscaling is antialiased.
    pil = pil.resize(size, Image.Resampling.BICUBIC)
  width, height = pil.size
  if random_crop:
    left, top = rng.integers(0, width - image_size + 1), rng.integers(0, height - image_size + 1)
  else:
    left, top = (width - image_size) // 2, (height - image_size) // 2
  pil = pil.crop((left, top, left + image_size, top + image_size))
  if random_flip and rng.random() < 0.5:
    pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  out = np.asarray(pil)
  return {
      'image': out[..., None] if out.ndim == 2 else out,
      'label': np.int32(record['label']),
      'caption': record['caption'],
  }


def collate(records: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  """Stacks preprocessed records and scales images from uint8 to float32 [-1, 1]."""
  images = np.stack([r['image'] for r in records]).astype(np.float32)
  return {
      'image': images / 127.5 - 1.0,
      'label': np.array([r['label'] for r in records], np.int32),
      'caption': np.array([r['caption'] for r in records], dtype=str),
  }


def make_loader(data_cfg: ml_collections.ConfigDict, split: str, *, batch_size: int, seed: int,
                shuffle: bool = True, num_epochs: int | None = None,
                drop_remainder: bool = True) -> grain.DatasetIterator:
  """An iterator over per-host batches of `split` (see the module docstring).

  Args:
    data_cfg: the `data` config section.
    split: source split, usually `data_cfg.train_split` or `data_cfg.eval_split`.
    batch_size: global batch size (`train.batch_size`), divisible by the process count.
    seed: seeds the shuffle and the random crops and flips.
    shuffle: shuffle records (a new order each epoch).
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: drop a last incomplete batch. With False the last batch may
      differ in size between hosts.
  """
  per_host = host_batch_size(batch_size)
  ds = grain.MapDataset.source(make_source(data_cfg, split)).seed(seed)
  ds = ds[jax.process_index()::jax.process_count()]
  if shuffle:
    ds = ds.shuffle()
  ds = ds.repeat(num_epochs)
  ds = ds.random_map(functools.partial(
      preprocess, image_size=data_cfg.image_size, channels=data_cfg.channels,
      random_crop=data_cfg.random_crop, random_flip=data_cfg.random_flip))
  # Threads overlap file reads and PIL work (which releases the GIL); the buffer
  # holds about two batches of records so the next batch is ready on time.
  num_threads = min(8, os.cpu_count() or 1)
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(2 * per_host, num_threads)))
  ds = ds.batch(per_host, drop_remainder=drop_remainder, batch_fn=collate)
  if data_cfg.num_workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  return iter(ds)
