"""Builds the record source a `data` config names, and answers questions about it.

Every source is random access (`len(source)`, `source[i]`) and returns records
`{'image': uint8 [H, W, C], 'label': int32 scalar, 'caption': str}` with C in
{1, 3}, label -1 and caption '' when the source has none. `folder` and `shards`
add 'original_size' (h, w), the file's size, since they may decode JPEGs at a reduced
scale (the pipeline takes the image's own size for the others); `shards` gives
`{'skip': 'corrupt'}` for a sample it cannot read. Each also has a cheap `caption(i)`
that skips the image.
"""

from collections.abc import Iterator

import ml_collections

from ldm_jax.data import folder, idx, shapes, shards, tfds_source

SOURCES = ('shapes', 'idx', 'folder', 'tfds', 'shards')
# Sources that split themselves between hosts (whole shards per host) instead of by record.
HOST_SHARDED = ('shards',)


def shards_spec(data_cfg: ml_collections.ConfigDict, split: str) -> tuple[str, str]:
  """(paths spec, its config key) of the `shards` source's `split`: `data.eval_path` for the eval
  split when set, else `data.path`."""
  if split == data_cfg.eval_split and split != data_cfg.train_split and data_cfg.eval_path:
    return data_cfg.eval_path, 'data.eval_path'
  return data_cfg.path, 'data.path'


def make_source(data_cfg: ml_collections.ConfigDict, split: str, *, shard_index: int = 0, shard_count: int = 1):
  """The source of `data_cfg.source` for `split` (e.g. data_cfg.train_split).

  Sources in `HOST_SHARDED` hold only the shards `shard_index::shard_count` (a host's share);
  the others ignore these and hold the whole split.
  """
  if data_cfg.source == 'shards':
    spec, key = shards_spec(data_cfg, split)
    return shards.ShardsSource(shards.shard_paths(spec, key), caption_key=data_cfg.caption_key,
                               label_key=data_cfg.label_key, min_size=data_cfg.image_size,
                               shard_index=shard_index, shard_count=shard_count, key=key)
  if data_cfg.source == 'shapes':
    return shapes.ShapesSource(split, num_examples=data_cfg.num_examples, image_size=data_cfg.image_size,
                               layout=data_cfg.get('shapes_layout', 'relations'),
                               holdout=data_cfg.get('shapes_holdout', ()))
  if data_cfg.source == 'idx':
    return idx.IdxSource(data_cfg.path, split, holdout_labels=data_cfg.get('holdout_labels', ()),
                         unnamed_labels=data_cfg.get('unnamed_labels', ()),
                         unnamed_caption=data_cfg.get('unnamed_caption', ''))
  if data_cfg.source == 'folder':
    return folder.FolderSource(data_cfg.path, split, labels_from_dirs=data_cfg.labels_from_dirs,
                               min_size=data_cfg.image_size)
  if data_cfg.source == 'tfds':
    return tfds_source.TfdsSource(data_cfg, split)
  raise ValueError(f'data.source: unknown {data_cfg.source!r}, expected one of {SOURCES}')


def num_classes(data_cfg: ml_collections.ConfigDict) -> int:
  """Number of label classes (labels lie in [0, num_classes)); ValueError when unlabelled."""
  if data_cfg.source == 'shapes':
    return len(shapes.KINDS)
  if data_cfg.source == 'idx':
    return idx.NUM_CLASSES
  if data_cfg.source == 'folder':
    if not data_cfg.labels_from_dirs:
      raise ValueError('data.labels_from_dirs is False, so the folder source has no labels')
    return len(folder.class_names(folder.split_dir(data_cfg.path, data_cfg.train_split)))
  if data_cfg.source == 'tfds':
    return tfds_source.num_classes(data_cfg)
  if data_cfg.source == 'shards':
    raise ValueError('data.source: the shards source has no class count; set cond.num_classes')
  raise ValueError(f'data.source: unknown {data_cfg.source!r}, expected one of {SOURCES}')


def class_captions(data_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The caption of each class, indexed by label, for sources whose captions name the class and
  nothing else (idx: "a photo of a sneaker"); ValueError naming `data.source` for the others."""
  if data_cfg.source == 'idx':
    return idx.class_captions(data_cfg.path)
  raise ValueError(f'data.source: {data_cfg.source!r} has no caption per class (only idx captions name '
                   'the class alone)')


def captions(data_cfg: ml_collections.ConfigDict, split: str) -> Iterator[str]:
  """Yields the caption of every record of `split`, in index order, without decoding images.

  For the folder source this includes captions of images that turn out to be
  unreadable, which is harmless for its purpose (training a tokenizer).
  """
  source = make_source(data_cfg, split)
  for i in range(len(source)):
    yield source.caption(i)
