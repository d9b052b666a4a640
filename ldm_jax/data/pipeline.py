"""The grain input pipeline: source → host shard → shuffle → repeat → filter → preprocess → batch.

Batches are numpy, per host:

    {'image':         float32 [B, S, S, C] in [-1, 1],   S = data.image_size, C = data.channels
                      (with `buckets`: [B, H, W, C], one of `data.buckets` per batch)
     'label':         int32 [B],
     'caption':       str array [B],
     'original_size': int32 [B, 2], (h, w) before any resizing (for size micro-conditioning),
     'crop_coords_top_left': int32 [B, 2], (top, left) of the crop in the resized image (crop conditioning),
     'skipped':       int32 [B, len(SKIP_REASONS)], records dropped just before each record, by reason}

with B = train.batch_size // jax.process_count(). Each JAX process reads the
records `process_index::process_count` of the source (the `shards` source: whole
shards, `process_index::process_count` of them), so hosts never share a record.

Filters (`data.min_side`, `data.max_aspect_ratio` on the original size,
`data.min_caption_length` in characters) and unreadable records (`'corrupt'`)
drop a record at read time; each batch counts the records dropped before it by
reason (`SKIP_REASONS`; batch-shaped, so that a batch shards as a whole), which
the trainers sum and log. Dropping is part of the
deterministic sequence: a resumed iterator drops the same records. The batch sequence is a pure function of (config, split, seed,
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
from jax.experimental import multihost_utils
from PIL import Image

from ldm_jax.data.buckets import BucketBatches, check_buckets, nearest_bucket, one_process
from ldm_jax.data.sources import HOST_SHARDED, make_source

SKIP_REASONS = ('corrupt', 'min_side', 'aspect_ratio', 'caption_length')


def skipped_counts(batch: dict[str, Any]) -> np.ndarray:
  """The records the pipeline dropped before a batch's records, by `SKIP_REASONS` (int64 [4]; zeros for
  a batch without 'skipped', e.g. of a cache)."""
  if 'skipped' not in batch:
    return np.zeros(len(SKIP_REASONS), np.int64)
  return np.asarray(batch['skipped'], np.int64).reshape(-1, len(SKIP_REASONS)).sum(axis=0)


def describe_skipped(counts: np.ndarray) -> str:
  """'caption_length 3, corrupt 1'-style: the reasons with a count."""
  return ', '.join(f'{r} {n}' for r, n in zip(SKIP_REASONS, counts) if n)


def host_source(data_cfg: ml_collections.ConfigDict, split: str, seed: int) -> grain.MapDataset:
  """This process's records of `split`: its shards (`shards`) or every process_count-th record."""
  index, count = jax.process_index(), jax.process_count()
  source = make_source(data_cfg, split, shard_index=index, shard_count=count)
  ds = grain.MapDataset.source(source).seed(seed)
  return ds if data_cfg.source in HOST_SHARDED else ds[index::count]


def skip_reason(record: dict[str, Any], *, min_side: int = 0, max_aspect_ratio: float = 0.0,
                min_caption_length: int = 0) -> str | None:
  """Why a record is dropped at read time (one of SKIP_REASONS), or None to keep it."""
  if 'skip' in record:
    return record['skip']
  height, width = record.get('original_size', record['image'].shape[:2])
  if min_side and min(height, width) < min_side:
    return 'min_side'
  if max_aspect_ratio and max(height, width) > max_aspect_ratio * min(height, width):
    return 'aspect_ratio'
  if min_caption_length and len(record['caption'].strip()) < min_caption_length:
    return 'caption_length'
  return None


def _filter_and_preprocess(record: dict[str, Any], rng: np.random.Generator, *, filters: dict,
                           buckets: tuple[tuple[int, int], ...] = (), **options) -> dict[str, Any]:
  reason = skip_reason(record, **filters)
  if reason is not None:
    return {'skip': reason}
  if not buckets:
    return preprocess(record, rng, **options)
  bucket = nearest_bucket(buckets, *record.get('original_size', record['image'].shape[:2]))
  return {**preprocess(record, rng, **{**options, 'image_size': buckets[bucket]}), 'bucket': bucket}


class _DropSkipped(grain.DatasetIterator):
  """Drops `{'skip': reason}` records; each record it yields carries 'skipped', the counts per
  reason of the records dropped since the previous one. Its position is its parent's: between
  two `next` calls nothing is pending."""

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)

  def __next__(self):
    counts = np.zeros(len(SKIP_REASONS), np.int32)
    while True:
      record = next(self._parent)
      if 'skip' not in record:
        return {**record, 'skipped': counts}
      counts[SKIP_REASONS.index(record['skip'])] += 1

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class _DropSkippedDataset(grain.IterDataset):

  def __init__(self, parent: grain.IterDataset):
    super().__init__(parent)

  def __iter__(self):
    return _DropSkipped(self._parent.__iter__())


def host_batch_size(batch_size: int) -> int:
  """The per-host share of the global `train.batch_size`."""
  processes = jax.process_count()
  if batch_size < 1 or batch_size % processes:
    raise ValueError(f'train.batch_size={batch_size} must be a positive multiple of the number '
                     f'of JAX processes ({processes})')
  return batch_size // processes


def preprocess(record: dict[str, Any], rng: np.random.Generator, *, image_size: int | tuple[int, int],
               channels: int, random_crop: bool, random_flip: bool) -> dict[str, Any]:
  """Resizes the image to cover `image_size` (the shorter side to it, for a square), crops it to
  that size, flips, converts channels.

  Args:
    record: `{'image': uint8 [H, W, C], 'label', 'caption'}` with C in {1, 3}.
    rng: per-record generator, used only for a random crop and flip.
    image_size: the side of a square, or (height, width) (an aspect-ratio bucket).

  Returns:
    The record with `image` uint8 [height, width, channels], 'original_size' int32 [2]
    (h, w: the record's, else the decoded image's) and 'crop_coords_top_left' int32 [2] (top,
    left: where the crop starts in the resized — and, when flipped, mirrored — image, SDXL's
    crop conditioning as diffusers' train_text_to_image_sdxl.py records it).
  """
  image = record['image']
  pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  pil = pil.convert('L' if channels == 1 else 'RGB')
  out_h, out_w = (image_size, image_size) if np.ndim(image_size) == 0 else image_size
  width, height = pil.size
  scale = max(out_h / height, out_w / width)
  if scale != 1:
    size = (max(out_w, round(width * scale)), max(out_h, round(height * scale)))
    # PIL widens the bicubic kernel when shrinking, so downscaling is antialiased.
    pil = pil.resize(size, Image.Resampling.BICUBIC)
  width, height = pil.size
  if random_crop:
    left, top = rng.integers(0, width - out_w + 1), rng.integers(0, height - out_h + 1)
  else:
    left, top = (width - out_w) // 2, (height - out_h) // 2
  pil = pil.crop((left, top, left + out_w, top + out_h))
  if random_flip and rng.random() < 0.5:
    pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    # The same pixels as cropping the flipped resized image (diffusers flips, then crops): offsets
    # are recorded in that image.
    left = width - out_w - left
  out = np.asarray(pil)
  return {
      'image': out[..., None] if out.ndim == 2 else out,
      'label': np.int32(record['label']),
      'caption': record['caption'],
      'original_size': np.asarray(record.get('original_size', image.shape[:2]), np.int32),
      'crop_coords_top_left': np.array([top, left], np.int32),
  }


def collate(records: Sequence[dict[str, Any]]) -> dict[str, np.ndarray]:
  """Stacks preprocessed records and scales images from uint8 to float32 [-1, 1]."""
  images = np.stack([r['image'] for r in records]).astype(np.float32)
  return {
      'image': images / 127.5 - 1.0,
      'label': np.array([r['label'] for r in records], np.int32),
      'caption': np.array([r['caption'] for r in records], dtype=str),
      'original_size': np.stack([r['original_size'] for r in records]),
      'crop_coords_top_left': np.stack([r['crop_coords_top_left'] for r in records]),
      'skipped': np.stack([r['skipped'] for r in records]),
  }


def make_loader(data_cfg: ml_collections.ConfigDict, split: str, *, batch_size: int, seed: int,
                shuffle: bool = True, num_epochs: int | None = None,
                drop_remainder: bool = True, buckets: bool = False) -> grain.DatasetIterator:
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
    buckets: batches of `data.buckets` (aspect-ratio bucketing, `ldm_jax.data.buckets`), when set,
      instead of square images.
  """
  per_host = host_batch_size(batch_size)
  ds = host_source(data_cfg, split, seed)
  if shuffle:
    ds = ds.shuffle()
  return batched(ds.repeat(num_epochs), data_cfg, per_host, drop_remainder=drop_remainder,
                 random_crop=data_cfg.random_crop, random_flip=data_cfg.random_flip,
                 buckets=check_buckets(data_cfg.get('buckets', ())) if buckets else ())


def batched(ds: grain.MapDataset, data_cfg: ml_collections.ConfigDict, batch_size: int, *,
            drop_remainder: bool = False, random_crop: bool = False,
            random_flip: bool = False, buckets: tuple[tuple[int, int], ...] = ()) -> grain.DatasetIterator:
  """Records of `ds` in its order → filtered, preprocessed batches of `batch_size` (the last one
  smaller unless `drop_remainder`), loaded with threads or `data.num_workers` processes; with
  `buckets`, batches of one aspect-ratio bucket each (`ldm_jax.data.buckets.BucketBatches`)."""
  filters = {k: data_cfg[k] for k in ('min_side', 'max_aspect_ratio', 'min_caption_length')}
  ds = ds.random_map(functools.partial(
      _filter_and_preprocess, filters=filters, image_size=data_cfg.image_size, channels=data_cfg.channels,
      random_crop=random_crop, random_flip=random_flip, buckets=buckets))
  if buckets:
    gather = one_process if jax.process_count() == 1 else multihost_utils.process_allgather
    return BucketBatches(ds, batch_size, len(buckets), collate, SKIP_REASONS, drop_remainder=drop_remainder,
                         num_workers=data_cfg.num_workers, gather=gather)
  # Threads overlap file reads and PIL work (which releases the GIL); the buffer
  # holds about two batches of records so the next batch is ready on time.
  num_threads = min(8, os.cpu_count() or 1)
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(2 * batch_size, num_threads)))
  ds = _DropSkippedDataset(ds)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=collate)
  if data_cfg.num_workers:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=data_cfg.num_workers))
  return iter(ds)
