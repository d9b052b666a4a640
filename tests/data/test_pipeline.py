"""The grain loader: batch contract, determinism, exact resume, and preprocessing values."""

import json
import os

import jax
import numpy as np
import pytest

from ldm_jax.config.sections import default_data_config
from ldm_jax.data import host_batch_size, make_loader, make_source
from ldm_jax.data.pipeline import preprocess

FASHION_MNIST = '/usr/share/datasets/fashion-mnist'


@pytest.fixture
def cfg():
  cfg = default_data_config()
  cfg.num_examples, cfg.image_size = 40, 16
  return cfg


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  for a, b in zip(batches_a, batches_b, strict=True):
    for key in ('image', 'label', 'caption'):
      np.testing.assert_array_equal(a[key], b[key])


def test_batch_contract_and_values(cfg):
  batch = next(make_loader(cfg, 'train', batch_size=8, seed=0, shuffle=False))
  assert batch['image'].shape == (8, 16, 16, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  assert batch['caption'].shape == (8,) and batch['caption'].dtype.kind == 'U'
  # Unshuffled, the first batch holds records 0..7, scaled from uint8 to [-1, 1].
  source = make_source(cfg, 'train')
  for i in range(8):
    record = source[i]
    np.testing.assert_allclose(batch['image'][i], record['image'] / 127.5 - 1, atol=1e-6)
    assert batch['label'][i] == record['label'] and batch['caption'][i] == record['caption']
  assert batch['image'].min() >= -1 and batch['image'].max() <= 1


def test_seed_determines_the_sequence(cfg):
  first = _take(make_loader(cfg, 'train', batch_size=8, seed=3), 6)
  _assert_same(first, _take(make_loader(cfg, 'train', batch_size=8, seed=3), 6))
  other = _take(make_loader(cfg, 'train', batch_size=8, seed=4), 6)
  assert any(list(a['caption']) != list(b['caption']) for a, b in zip(first, other))


def test_one_epoch_visits_every_record_once(cfg):
  batches = list(make_loader(cfg, 'test', batch_size=3, seed=0, num_epochs=1,
                             drop_remainder=False))
  assert [len(b['label']) for b in batches] == [3, 1]  # test split: 40 // 10 = 4 records
  seen = sorted(c for b in batches for c in b['caption'])
  source = make_source(cfg, 'test')
  assert seen == sorted(source.caption(i) for i in range(len(source)))


def test_repeats_forever_with_a_new_order_each_epoch(cfg):
  batches = _take(make_loader(cfg, 'train', batch_size=8, seed=0), 10)  # two epochs of 40
  epochs = [[c for b in batches[e * 5:(e + 1) * 5] for c in b['caption']] for e in (0, 1)]
  assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]


def test_get_state_set_state_resumes_exactly(cfg):
  cfg.random_crop, cfg.random_flip, cfg.image_size = True, True, 12
  uninterrupted = _take(make_loader(cfg, 'train', batch_size=8, seed=1), 9)
  iterator = make_loader(cfg, 'train', batch_size=8, seed=1)
  _take(iterator, 4)
  state = json.loads(json.dumps(iterator.get_state()))  # as stored in a checkpoint
  resumed = make_loader(cfg, 'train', batch_size=8, seed=1)
  resumed.set_state(state)
  _assert_same(_take(resumed, 5), uninterrupted[4:])


def test_host_batch_size(monkeypatch):
  assert host_batch_size(8) == 8
  monkeypatch.setattr(jax, 'process_count', lambda: 3)
  assert host_batch_size(9) == 3
  with pytest.raises(ValueError, match='train.batch_size=8 .* JAX processes \\(3\\)'):
    host_batch_size(8)


def test_hosts_read_disjoint_records(cfg, monkeypatch):
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  captions = []
  for host in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda host=host: host)
    batches = make_loader(cfg, 'train', batch_size=8, seed=0, num_epochs=1, shuffle=False)
    captions.append([c for b in batches for c in b['caption']])
  source = make_source(cfg, 'train')
  assert captions[0] == [source.caption(i) for i in range(0, 40, 2)]
  assert captions[1] == [source.caption(i) for i in range(1, 40, 2)]


def _record(image):
  return {'image': image, 'label': 0, 'caption': ''}


def test_resize_shorter_side_then_center_crop():
  image = np.zeros((20, 40, 3), np.uint8)
  image[:, 20:] = 255  # left half black, right half white
  out = preprocess(_record(image), np.random.default_rng(0), image_size=10, channels=3,
                   random_crop=False, random_flip=False)['image']
  assert out.shape == (10, 10, 3)
  # Resized to 10×20, the center crop spans columns 5..14: black then white.
  np.testing.assert_array_equal(out[:, :4], 0)
  np.testing.assert_array_equal(out[:, 6:], 255)


def test_random_crop_and_flip_are_seeded():
  image = np.arange(8 * 12, dtype=np.uint8).reshape(8, 12, 1)
  kwargs = dict(image_size=8, channels=1, random_crop=True, random_flip=True)
  outs = [preprocess(_record(image), np.random.default_rng(s), **kwargs)['image'][..., 0]
          for s in range(16)]
  crops = {image[:, left:left + 8, 0].tobytes() for left in range(5)}
  flipped = {np.fliplr(image[:, left:left + 8, 0]).tobytes() for left in range(5)}
  kinds = [(o.tobytes() in crops, o.tobytes() in flipped) for o in outs]
  assert all(a or b for a, b in kinds)
  assert any(a for a, _ in kinds) and any(b for _, b in kinds)
  assert len({o.tobytes() for o in outs}) > 3
  again = preprocess(_record(image), np.random.default_rng(5), **kwargs)['image'][..., 0]
  np.testing.assert_array_equal(again, outs[5])


def test_crop_offsets_locate_the_crop_in_the_resized_and_flipped_image():
  """'crop_coords_top_left' (SDXL's crop conditioning) are where the output starts in the resized
  image, mirrored when flipped (diffusers flips, then crops); 'original_size' the input's."""
  rng = np.random.default_rng(0)
  seen = set()
  for shape in ((8, 12), (13, 8), (8, 8)):  # shorter sides of 8: no resize
    image = rng.integers(0, 256, (*shape, 1), dtype=np.uint8)
    for seed in range(12):
      out = preprocess(_record(image), np.random.default_rng(seed), image_size=8, channels=1, random_crop=True,
                       random_flip=True)
      np.testing.assert_array_equal(out['original_size'], shape)
      top, left = out['crop_coords_top_left']
      crop = lambda x: x[top:top + 8, left:left + 8]
      flipped = np.array_equal(out['image'], crop(image[:, ::-1])) and not np.array_equal(out['image'], crop(image))
      assert flipped or np.array_equal(out['image'], crop(image)), (shape, seed)
      seen.add((flipped, int(top) + int(left) > 0))
  assert seen == {(False, False), (False, True), (True, False), (True, True)}
  out = preprocess(_record(np.zeros((20, 40, 3), np.uint8)), None, image_size=10, channels=3, random_crop=False,
                   random_flip=False)
  np.testing.assert_array_equal(out['crop_coords_top_left'], [0, 5])  # resized to 10×20, centred


def test_channel_conversion():
  rgb = np.zeros((4, 4, 3), np.uint8)
  rgb[..., 0] = 200  # pure red → luma 0.299 · 200
  gray = preprocess(_record(rgb), None, image_size=4, channels=1, random_crop=False,
                    random_flip=False)['image']
  assert gray.shape == (4, 4, 1) and abs(int(gray[0, 0, 0]) - round(0.299 * 200)) <= 1
  expanded = preprocess(_record(np.full((4, 4, 1), 90, np.uint8)), None, image_size=4,
                        channels=3, random_crop=False, random_flip=False)['image']
  np.testing.assert_array_equal(expanded, np.full((4, 4, 3), 90))


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason='dataset-fashion-mnist not installed')
def test_fashion_mnist_grayscale_to_rgb_loader():
  cfg = default_data_config()
  cfg.source, cfg.path, cfg.image_size = 'idx', FASHION_MNIST, 32
  batch = next(make_loader(cfg, 'test', batch_size=4, seed=0, shuffle=False))
  assert batch['image'].shape == (4, 32, 32, 3)
  np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])
  assert batch['caption'][0] == 'a photo of an ankle boot'  # t10k[0] is class 9
