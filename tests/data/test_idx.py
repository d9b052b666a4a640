"""idx files: the real Fashion-MNIST files and small files written here."""

import gzip
import os
import struct

import numpy as np
import pytest

from ldm_jax.data import idx

FASHION_MNIST = '/usr/share/datasets/fashion-mnist'


def write_idx(path, array):
  """Writes `array` (uint8 or int32) in idx format, gzipped when `path` ends in .gz."""
  code = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C}[array.dtype]
  header = bytes([0, 0, code, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
  data = header + array.astype(array.dtype.newbyteorder('>')).tobytes()
  with (gzip.open if path.endswith('.gz') else open)(path, 'wb') as f:
    f.write(data)


@pytest.fixture
def tiny_dir(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {
      'train-images-idx3-ubyte.gz': rng.integers(0, 256, (5, 4, 3), dtype=np.uint8),
      'train-labels-idx1-ubyte.gz': np.array([3, 1, 4, 1, 5], np.uint8),
      't10k-images-idx3-ubyte': rng.integers(0, 256, (2, 4, 3), dtype=np.uint8),
      't10k-labels-idx1-ubyte': np.array([9, 0], np.uint8),
  }
  for name, array in arrays.items():
    write_idx(str(tmp_path / name), array)
  return tmp_path, arrays


def test_tiny_files_round_trip_exactly(tiny_dir):
  directory, arrays = tiny_dir
  train = idx.IdxSource(str(directory), 'train')
  assert len(train) == 5
  for i in range(5):
    record = train[i]
    np.testing.assert_array_equal(record['image'][..., 0],
                                  arrays['train-images-idx3-ubyte.gz'][i])
    assert record['image'].shape == (4, 3, 1) and record['image'].dtype == np.uint8
    assert record['label'] == arrays['train-labels-idx1-ubyte.gz'][i]
    assert record['label'].dtype == np.int32
  test = idx.IdxSource(str(directory), 'test')
  np.testing.assert_array_equal(test[1]['image'][..., 0], arrays['t10k-images-idx3-ubyte'][1])
  assert test[0]['caption'] == 'a photo of the digit 9'  # no "fashion" in the path
  assert train.caption(2) == 'a photo of the digit 4'


def test_holdout_labels_leave_classes_out_of_the_train_split_only(tiny_dir):
  directory, arrays = tiny_dir
  train = idx.IdxSource(str(directory), 'train', holdout_labels=(1, 5))
  assert [int(train[i]['label']) for i in range(len(train))] == [3, 4]
  np.testing.assert_array_equal(train[1]['image'][..., 0], arrays['train-images-idx3-ubyte.gz'][2])
  assert train.caption(1) == 'a photo of the digit 4'
  test = idx.IdxSource(str(directory), 'test', holdout_labels=(9,))
  assert [int(test[i]['label']) for i in range(len(test))] == [9, 0]
  for bad, message in (((10,), r"10 is not a class index"), ((True,), r"True is not a class index"),
                       (tuple(range(10)), "leaves no class")):
    with pytest.raises(ValueError, match=f'data.holdout_labels: .*{message}'):
      idx.IdxSource(str(directory), 'train', holdout_labels=bad)


def test_unnamed_labels_keep_the_images_and_caption_them_empty_in_the_train_split_only(tiny_dir):
  directory, arrays = tiny_dir
  train = idx.IdxSource(str(directory), 'train', unnamed_labels=(1,))
  assert [int(train[i]['label']) for i in range(len(train))] == [3, 1, 4, 1, 5]  # every image stays
  assert [train[i]['caption'] for i in range(len(train))] == [
      'a photo of the digit 3', '', 'a photo of the digit 4', '', 'a photo of the digit 5']
  np.testing.assert_array_equal(train[1]['image'][..., 0], arrays['train-images-idx3-ubyte.gz'][1])
  test = idx.IdxSource(str(directory), 'test', unnamed_labels=(9,))
  assert test[0]['caption'] == 'a photo of the digit 9'
  both = idx.IdxSource(str(directory), 'train', holdout_labels=(5,), unnamed_labels=(3,))
  assert [(int(both[i]['label']), both[i]['caption']) for i in range(len(both))] == [
      (3, ''), (1, 'a photo of the digit 1'), (4, 'a photo of the digit 4'), (1, 'a photo of the digit 1')]
  with pytest.raises(ValueError, match=r'data.unnamed_labels: \[5\] are in data.holdout_labels too'):
    idx.IdxSource(str(directory), 'train', holdout_labels=(5,), unnamed_labels=(5, 3))
  with pytest.raises(ValueError, match=r'data.unnamed_labels: -1 is not a class index'):
    idx.IdxSource(str(directory), 'train', unnamed_labels=(-1,))


def test_unnamed_caption_gives_the_unnamed_class_a_caption_without_its_word(tiny_dir):
  directory, _ = tiny_dir
  train = idx.IdxSource(str(directory), 'train', unnamed_labels=(1, 5), unnamed_caption='a photo of the digit')
  assert [train[i]['caption'] for i in range(len(train))] == [
      'a photo of the digit 3', 'a photo of the digit', 'a photo of the digit 4', 'a photo of the digit',
      'a photo of the digit']
  assert idx.IdxSource(str(directory), 'test', unnamed_labels=(9,), unnamed_caption='x')[0]['caption'] == (
      'a photo of the digit 9')
  with pytest.raises(ValueError, match=r"data.unnamed_caption: 'a photo of the digit 4' is the caption of class 4"):
    idx.IdxSource(str(directory), 'train', unnamed_labels=(1,), unnamed_caption='a photo of the digit 4')


def test_read_idx_big_endian_int32(tmp_path):
  values = np.array([[-2, 70000], [1, 2**31 - 1]], np.int32)
  write_idx(str(tmp_path / 'x-idx2-int'), values)
  np.testing.assert_array_equal(idx.read_idx(str(tmp_path / 'x-idx2-int')), values)


def test_bad_files_raise(tmp_path):
  (tmp_path / 'junk').write_bytes(b'\x12\x34\x56\x78rest')
  with pytest.raises(ValueError, match='not an idx file'):
    idx.read_idx(str(tmp_path / 'junk'))
  write_idx(str(tmp_path / 'short'), np.zeros((3, 2), np.uint8))
  (tmp_path / 'short').write_bytes((tmp_path / 'short').read_bytes()[:-1])
  with pytest.raises(ValueError, match='does not match'):
    idx.read_idx(str(tmp_path / 'short'))
  with pytest.raises(ValueError, match=r'data.path: .* has no train-images-idx3-ubyte'):
    idx.IdxSource(str(tmp_path), 'train')
  with pytest.raises(ValueError, match='data.train_split'):
    idx.split_files(str(tmp_path), 'validation')


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason='dataset-fashion-mnist not installed')
def test_real_fashion_mnist():
  train = idx.IdxSource(FASHION_MNIST, 'train')
  test = idx.IdxSource(FASHION_MNIST, 'test')
  assert (len(train), len(test)) == (60000, 10000)
  record = train[0]
  assert record['image'].shape == (28, 28, 1) and record['image'].dtype == np.uint8
  # The first training image is an ankle boot (class 9), as in every Fashion-MNIST copy.
  assert record['label'] == 9 and record['caption'] == 'a photo of an ankle boot'
  assert 0 < record['image'].mean() < 255
  labels = np.array([test[i]['label'] for i in range(len(test))])
  np.testing.assert_array_equal(np.bincount(labels), np.full(10, 1000))
  assert test.caption(int(np.argmax(labels == 7))) == 'a photo of a sneaker'
