"""`tfds`: datasets prepared by TensorFlow Datasets, read by random access without TensorFlow.

Reading goes through `tfds.data_source`, which needs the dataset prepared in
the `array_record` (or `parquet`) file format. Preparing usually needs
TensorFlow, once, on any machine that shares the data directory::

    tfds build oxford_flowers102 --data_dir=/data/tfds --file_format=array_record

then, in a config::

    config.data.source = 'tfds'
    config.data.name = 'oxford_flowers102'      # 'name', 'name/config' or 'name:version'
    config.data.tfds_data_dir = '/data/tfds'    # '' → $TFDS_DATA_DIR or ~/tensorflow_datasets
    config.data.train_split = 'train'           # TFDS split syntax works: 'train[:90%]'
    config.data.image_key = 'image'
    config.data.label_key = 'label'             # '' when the dataset has no labels
    config.data.caption_key = ''                # e.g. 'captions/text' for coco_captions

Feature keys may be '/'-separated paths into nested features; when the caption
feature holds several captions (a sequence), the first one is used.
"""

import os
import re
from typing import Any

import numpy as np


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (optional, seconds to import)
  return tfds


def _base_name(name: str) -> str:
  return re.split(r'[/:]', name, maxsplit=1)[0]


def _data_dir(data_cfg) -> str:
  return data_cfg.tfds_data_dir or _tfds().core.constants.DATA_DIR


def check_name(data_cfg) -> None:
  """Raises ValueError naming data.name unless TFDS knows the dataset.

  Known means registered with TFDS (built into the package or imported by the
  user) or already present under the data directory; checked before any
  builder is created, so a typo never triggers a download attempt.
  """
  name = data_cfg.name
  if not name:
    raise ValueError("data.name: empty; the tfds source needs a TFDS dataset name, e.g. 'mnist'")
  base = _base_name(name)
  # Community datasets are skipped: listing them needs network access and TensorFlow.
  if (base not in _tfds().list_builders(with_community_datasets=False)
      and not os.path.isdir(os.path.join(_data_dir(data_cfg), base))):
    raise ValueError(f'data.name: unknown TFDS dataset {name!r} (not a registered TFDS builder '
                     f'and not found in data.tfds_data_dir={_data_dir(data_cfg)!r})')


def prepared_builder(data_cfg) -> "tfds.core.DatasetBuilder":
  """The dataset's builder; ValueError naming data.name when it cannot be read offline."""
  check_name(data_cfg)
  name, data_dir = data_cfg.name, _data_dir(data_cfg)
  builder = _tfds().builder(name, data_dir=data_dir)
  how = (f'prepare it once with TensorFlow installed: `tfds build {_base_name(name)} '
         f'--data_dir={data_dir} --file_format=array_record`')
  if not builder.is_prepared():
    raise ValueError(f'data.name: TFDS dataset {name!r} is not prepared in {data_dir}; {how}')
  file_format = builder.info.file_format
  if file_format is None or file_format.value not in ('array_record', 'parquet'):
    raise ValueError(f'data.name: TFDS dataset {name!r} in {data_dir} is stored as '
                     f'{file_format}, which has no random access; {how}')
  return builder


def _feature(features, key: str):
  for part in key.split('/'):
    features = features[part]
  return features


def check_keys(builder, data_cfg) -> None:
  for cfg_key in ('image_key', 'label_key', 'caption_key'):
    key = data_cfg[cfg_key]
    if not key:
      if cfg_key == 'image_key':
        raise ValueError('data.image_key: empty; name the image feature, e.g. "image"')
      continue
    try:
      _feature(builder.info.features, key)
    except KeyError:
      raise ValueError(
          f'data.{cfg_key}: TFDS dataset {data_cfg.name!r} has no feature {key!r}; features: '
          f'{list(builder.info.features.keys())} (set data.{cfg_key}="" if absent)') from None


def to_record(example: dict[str, Any], *, image_key: str, label_key: str,
              caption_key: str) -> dict[str, Any]:
  """Maps a decoded TFDS example to `{'image': uint8 [H, W, C], 'label', 'caption'}`."""
  image = np.asarray(_feature(example, image_key))
  if image.ndim == 2:
    image = image[..., None]
  label = int(_feature(example, label_key)) if label_key else -1
  return {'image': image, 'label': np.int32(label),
          'caption': _caption(example, caption_key) if caption_key else ''}


def _caption(example: dict[str, Any], caption_key: str) -> str:
  caption = _feature(example, caption_key)
  if isinstance(caption, (list, tuple, np.ndarray)):
    caption = caption[0] if len(caption) else ''
  return caption.decode('utf-8') if isinstance(caption, bytes) else str(caption)


def _skip_decoding(key: str):
  """A TFDS `decoders` tree that leaves the (possibly nested) feature `key` encoded."""
  tree = _tfds().decode.SkipDecoding()
  for part in reversed(key.split('/')):
    tree = {part: tree}
  return tree


class TfdsSource:
  """Random-access source of `{'image': uint8 [H, W, C], 'label', 'caption'}` from TFDS."""

  def __init__(self, data_cfg, split: str):
    builder = prepared_builder(data_cfg)
    check_keys(builder, data_cfg)
    self._name, self._split, self._data_dir = data_cfg.name, split, _data_dir(data_cfg)
    self._keys = {k: data_cfg[k] for k in ('image_key', 'label_key', 'caption_key')}
    self._source = self._data_source()
    self._caption_source = None

  def _data_source(self, decoders=None):
    try:
      return _tfds().data_source(self._name, split=self._split, data_dir=self._data_dir,
                              download=False, decoders=decoders)
    except ValueError as e:
      raise ValueError(f'data.train_split / data.eval_split: TFDS dataset {self._name!r} '
                       f'cannot read split {self._split!r}: {e}') from e

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return to_record(self._source[index], **self._keys)

  def caption(self, index: int) -> str:
    """The caption of record `index`, reading it without decoding the image."""
    if not self._keys['caption_key']:
      return ''
    if self._caption_source is None:
      self._caption_source = self._data_source(_skip_decoding(self._keys['image_key']))
    return _caption(self._caption_source[index], self._keys['caption_key'])


def num_classes(data_cfg) -> int:
  """The number of classes of the label feature, from the builder's info."""
  builder = prepared_builder(data_cfg)
  check_keys(builder, data_cfg)
  if not data_cfg.label_key:
    raise ValueError(f'data.label_key: empty, so TFDS dataset {data_cfg.name!r} has no classes')
  feature = _feature(builder.info.features, data_cfg.label_key)
  if not hasattr(feature, 'num_classes'):
    raise ValueError(f'data.label_key: feature {data_cfg.label_key!r} of {data_cfg.name!r} '
                     'is not a ClassLabel')
  return feature.num_classes
