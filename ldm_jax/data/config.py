"""The `data` config section: defaults and validation (cheap, before anything compiles)."""

import os

import ml_collections

from ldm_jax import config as checks
from ldm_jax.data import folder, idx, shapes, shards, sources, tfds_source
from ldm_jax.data.buckets import check_buckets
from ldm_jax.data.sources import SOURCES


def validate_data_config(data_cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the offending `data.*` key; touches only metadata."""
  if data_cfg.source not in SOURCES:
    raise ValueError(f'data.source: unknown {data_cfg.source!r}, expected one of {SOURCES}')
  if data_cfg.channels not in (1, 3):
    raise ValueError(f'data.channels must be 1 or 3, got {data_cfg.channels!r}')
  checks.check_number('data.image_size', data_cfg.image_size, integer=True, ge=1)
  checks.check_number('data.num_workers', data_cfg.num_workers, integer=True, ge=0)
  checks.check_number('data.min_side', data_cfg.min_side, integer=True, ge=0)
  checks.check_number('data.max_aspect_ratio', data_cfg.max_aspect_ratio, ge=0)
  if 0 < data_cfg.max_aspect_ratio < 1:
    raise ValueError(f'data.max_aspect_ratio: {data_cfg.max_aspect_ratio} is below 1 (long side / short side); '
                     'use 0 for no limit')
  checks.check_number('data.min_caption_length', data_cfg.min_caption_length, integer=True, ge=0)
  check_buckets(data_cfg.get('buckets', ()))
  splits = {'data.train_split': data_cfg.train_split, 'data.eval_split': data_cfg.eval_split}
  holdout, unnamed = data_cfg.get('holdout_labels', ()), data_cfg.get('unnamed_labels', ())
  if holdout or unnamed:
    key = 'data.holdout_labels' if holdout else 'data.unnamed_labels'
    if data_cfg.source != 'idx':
      raise ValueError(f'{key}: only the idx source leaves classes out or unnamed, not {data_cfg.source!r} '
                       '(shapes: data.shapes_holdout)')
    idx.check_label_sets(holdout, unnamed)
    if unnamed:
      caption = data_cfg.get('unnamed_caption', '')
      idx.check_unnamed_caption(data_cfg.path, caption)
      if len(caption.strip()) < data_cfg.min_caption_length:
        raise ValueError(f'data.unnamed_labels: their images are captioned {caption!r} (data.unnamed_caption), '
                         f'which data.min_caption_length={data_cfg.min_caption_length} drops (all of them); '
                         'set data.min_caption_length=0 or a longer data.unnamed_caption')

  if data_cfg.source == 'shapes':
    checks.check_number('data.num_examples', data_cfg.num_examples, integer=True, ge=1)
    if data_cfg.shapes_layout not in shapes.LAYOUTS:
      raise ValueError(f'data.shapes_layout: unknown {data_cfg.shapes_layout!r}, expected one of '
                       f'{shapes.LAYOUTS}')
    shapes.check_holdout(data_cfg.shapes_holdout)
    for key, split in splits.items():
      if split not in shapes.SPLITS:
        raise ValueError(f'{key}: the shapes source has splits {shapes.SPLITS}, got {split!r}')

  elif data_cfg.source in ('idx', 'folder'):
    path = data_cfg.path
    if not path:
      raise ValueError(f'data.path: empty; the {data_cfg.source} source reads a directory')
    if not os.path.isdir(path):
      raise ValueError(f'data.path: directory {path} does not exist')
    if data_cfg.source == 'idx':
      for key, split in splits.items():
        if split not in idx.SPLIT_PREFIXES:
          raise ValueError(f'{key}: the idx source has splits {tuple(idx.SPLIT_PREFIXES)}, '
                           f'got {split!r}')
        idx.split_files(path, split)
    else:
      for split in splits.values():
        root = folder.split_dir(path, split)
        if next(folder.iter_images(root), None) is None:
          raise ValueError(f'data.path: {root} is empty (no images found with extensions '
                           f'{folder.IMAGE_EXTENSIONS})')
        folder.FolderSource(path, split)[0]  # raises naming data.path when no image can be read

  elif data_cfg.source == 'shards':
    for split in splits.values():
      shards.shard_paths(*sources.shards_spec(data_cfg, split))

  else:
    tfds_source.check_keys(tfds_source.prepared_builder(data_cfg), data_cfg)
