"""TFDS source, offline: a tiny array_record dataset built here (PNG bytes, so no TensorFlow)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ldm_jax.data import make_loader, num_classes, tfds_source, validate_data_config
from ldm_jax.config.sections import default_data_config
from ldm_jax.data.sources import make_source

SPLIT_SIZES = {'train': 6, 'test': 2}


def _image(split, i):
  return np.full((8, 8, 3), 10 * i + (100 if split == 'test' else 0), np.uint8)


class LdmJaxTinyImages(tfds.core.GeneratorBasedBuilder):
  """Registered as 'ldm_jax_tiny_images' by being defined."""

  VERSION = tfds.core.Version('1.0.0')
  # TFDS 4.9.10 looks for a builder's code (checksums, metadata) through the
  # `importlib_resources` backport, which is not installed; this builder has none.
  code_path = None

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(8, 8, 3)),
        'label': tfds.features.ClassLabel(names=['a', 'b', 'c']),
        'text': tfds.features.Text(),
    }))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in SPLIT_SIZES}

  def _generate_examples(self, split):
    for i in range(SPLIT_SIZES[split]):
      # A PIL image is stored as its PNG bytes; a numpy array would need TensorFlow to encode.
      yield i, {'image': Image.fromarray(_image(split, i)), 'label': i % 3,
                'text': f'{split} image {i}'}


@pytest.fixture(scope='module')
def data_cfg(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('tfds')
  LdmJaxTinyImages(data_dir=str(data_dir), file_format='array_record').download_and_prepare()
  cfg = default_data_config()
  cfg.source, cfg.name, cfg.tfds_data_dir = 'tfds', 'ldm_jax_tiny_images', str(data_dir)
  cfg.image_size, cfg.caption_key = 8, 'text'
  return cfg


def test_records_through_data_source(data_cfg):
  validate_data_config(data_cfg)
  source = make_source(data_cfg, 'train')
  assert len(source) == 6
  records = sorted((source[i] for i in range(6)), key=lambda r: r['caption'])
  for i, record in enumerate(records):
    assert record['caption'] == f'train image {i}'
    np.testing.assert_array_equal(record['image'], _image('train', i))
    assert record['label'] == i % 3 and record['label'].dtype == np.int32
  assert sorted(source.caption(i) for i in range(6)) == [r['caption'] for r in records]
  assert num_classes(data_cfg) == 3


def test_loader_over_tfds(data_cfg):
  batch = next(make_loader(data_cfg, 'test', batch_size=2, seed=0, shuffle=False))
  assert sorted(batch['caption']) == ['test image 0', 'test image 1']
  assert batch['image'].shape == (2, 8, 8, 3)
  assert batch['image'].min() >= (100 / 127.5 - 1) - 1e-6


def test_unknown_name_split_and_keys(data_cfg):
  cfg = data_cfg.copy_and_resolve_references()
  cfg.name = 'no_such_dataset_xyz'
  with pytest.raises(ValueError, match="data.name: unknown TFDS dataset 'no_such_dataset_xyz'"):
    validate_data_config(cfg)
  cfg = data_cfg.copy_and_resolve_references()
  cfg.image_key = 'picture'
  with pytest.raises(ValueError, match="data.image_key: .* no feature 'picture'"):
    validate_data_config(cfg)
  with pytest.raises(ValueError, match="data.train_split .* split 'validation'"):
    make_source(data_cfg, 'validation')


def test_dataset_present_only_in_data_dir_is_known(tmp_path):
  (tmp_path / 'my_local_dataset').mkdir()
  cfg = default_data_config()
  cfg.source, cfg.name, cfg.tfds_data_dir = 'tfds', 'my_local_dataset/config', str(tmp_path)
  tfds_source.check_name(cfg)


def test_known_but_unprepared_dataset_says_how_to_prepare(tmp_path):
  cfg = default_data_config()
  cfg.source, cfg.name, cfg.tfds_data_dir = 'tfds', 'mnist', str(tmp_path)
  with pytest.raises(ValueError, match='data.name: .*not prepared.*tfds build mnist'):
    validate_data_config(cfg)


def test_feature_mapping_on_plain_records():
  example = {'img': np.zeros((3, 2), np.uint8), 'meta': {'captions': [b'first', b'second']}}
  record = tfds_source.to_record(example, image_key='img', label_key='',
                                 caption_key='meta/captions')
  assert record['image'].shape == (3, 2, 1)
  assert (record['label'], record['caption']) == (-1, 'first')
