"""validate_data_config: each bad value is reported with its key."""

import numpy as np
import pytest
from PIL import Image

from ldm_jax.config.sections import default_data_config
from ldm_jax.data import num_classes, validate_data_config

KEYS = {'source', 'path', 'name', 'tfds_data_dir', 'image_size', 'channels', 'train_split',
        'eval_split', 'random_crop', 'random_flip', 'num_examples', 'labels_from_dirs',
        'image_key', 'label_key', 'caption_key', 'num_workers', 'eval_path', 'min_side',
        'max_aspect_ratio', 'min_caption_length',
        'shapes_layout', 'shapes_holdout', 'holdout_labels', 'unnamed_labels', 'unnamed_caption', 'buckets'}


def _cfg(**overrides):
  cfg = default_data_config()
  cfg.update(overrides)
  return cfg


def test_defaults_have_every_key_and_validate():
  cfg = default_data_config()
  assert set(cfg.keys()) == KEYS
  assert (cfg.source, cfg.channels, cfg.num_workers) == ('shapes', 3, 0)
  validate_data_config(cfg)
  assert num_classes(cfg) == 6


@pytest.mark.parametrize('overrides, message', [
    ({'source': 'foo'}, "data.source: unknown 'foo', expected one of"),
    ({'channels': 2}, 'data.channels must be 1 or 3'),
    ({'image_size': 0}, 'data.image_size: expected an integer >= 1, got 0'),
    ({'num_workers': -1}, 'data.num_workers'),
    ({'num_examples': 0}, 'data.num_examples'),
    ({'shapes_layout': 'grid'}, "data.shapes_layout: unknown 'grid'"),
    ({'shapes_holdout': ('red circle', 'pink star')}, "data.shapes_holdout: 'pink star'"),
    ({'eval_split': 'validation'}, "data.eval_split: .*'validation'"),
    ({'holdout_labels': (9,)}, "data.holdout_labels: only the idx source leaves classes out or unnamed, not 'shapes'"),
    ({'unnamed_labels': (9,)}, "data.unnamed_labels: only the idx source leaves classes out or unnamed, not 'shapes'"),
    ({'source': 'idx', 'path': '/no/such/dir', 'unnamed_labels': (9,), 'min_caption_length': 1},
     r"data.unnamed_labels: their images are captioned '' \(data.unnamed_caption\), which "
     r"data.min_caption_length=1 drops"),
    ({'source': 'idx', 'path': '/no/such/dir', 'unnamed_labels': (9,), 'min_caption_length': 20,
      'unnamed_caption': 'a photo of a'}, r"captioned 'a photo of a' \(data.unnamed_caption\), which "
     r"data.min_caption_length=20 drops"),
    ({'source': 'idx', 'path': '/no/such/fashion-mnist', 'unnamed_labels': (9,), 'min_caption_length': 0,
      'unnamed_caption': 'a photo of a bag'}, r"data.unnamed_caption: 'a photo of a bag' is the caption of class 8"),
    ({'source': 'idx', 'path': '/no/such/dir', 'holdout_labels': (12,)}, 'data.holdout_labels: 12 is not a class'),
    ({'source': 'folder', 'path': ''}, 'data.path: empty'),
    ({'source': 'folder', 'path': '/no/such/dir'}, 'data.path: directory /no/such/dir does not exist'),
    ({'source': 'idx', 'path': '/no/such/dir'}, 'data.path: directory /no/such/dir does not exist'),
    ({'source': 'tfds', 'name': 'foo'}, "data.name: unknown TFDS dataset 'foo'"),
    ({'source': 'tfds', 'name': ''}, 'data.name: empty'),
    ({'source': 'shards', 'path': ''}, 'data.path: empty'),
    ({'source': 'shards', 'path': '/no/such/{0..3}.tar'}, "data.path: '/no/such/0.tar' names no tar shard"),
    ({'min_side': -1}, 'data.min_side'),
    ({'max_aspect_ratio': 0.5}, 'data.max_aspect_ratio: 0.5 is below 1'),
    ({'min_caption_length': -1}, 'data.min_caption_length'),
])
def test_errors_name_the_key(overrides, message):
  with pytest.raises(ValueError, match=message):
    validate_data_config(_cfg(**overrides))


def test_empty_folder_and_missing_idx_files(tmp_path):
  (tmp_path / 'readme.txt').write_text('no images here')
  with pytest.raises(ValueError, match=f'data.path: {tmp_path} is empty \\(no images found'):
    validate_data_config(_cfg(source='folder', path=str(tmp_path)))
  with pytest.raises(ValueError, match='data.path: .* has no train-images-idx3-ubyte'):
    validate_data_config(_cfg(source='idx', path=str(tmp_path)))
  Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / 'image.png')
  validate_data_config(_cfg(source='folder', path=str(tmp_path)))


def test_folder_without_labels_has_no_classes(tmp_path):
  Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / 'x.png')
  with pytest.raises(ValueError, match='data.labels_from_dirs'):
    num_classes(_cfg(source='folder', path=str(tmp_path)))
