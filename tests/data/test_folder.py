"""Image folders: recursion, captions beside images, labels from directories, bad files."""

import logging

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data import folder, make_loader, sources
from ldm_jax.config.sections import default_data_config


def _save(path, array, **kwargs):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


@pytest.fixture
def tree(tmp_path):
  """cat/a.png, cat/sub/b.png, dog/bad.png (garbage), dog/c.bmp + c.txt, dog/d.gif, ignored files."""
  rng = np.random.default_rng(0)
  images = {
      'cat/a.png': rng.integers(0, 256, (6, 5, 3), dtype=np.uint8),
      'cat/sub/b.png': np.full((3, 4), 77, np.uint8),
      'dog/c.bmp': rng.integers(0, 256, (4, 4, 3), dtype=np.uint8),
      'dog/d.gif': np.full((2, 3, 3), (10, 200, 30), np.uint8),
  }
  for name, array in images.items():
    _save(tmp_path / name, array)
  (tmp_path / 'dog/c.txt').write_text('  a dog on grass\n')
  (tmp_path / 'dog/bad.png').write_bytes(b'this is not a png at all')
  _save(tmp_path / '.cache/hidden.png', np.zeros((2, 2), np.uint8))
  (tmp_path / 'notes.md').write_text('not an image')
  return tmp_path, images


def test_recursive_listing_pixels_and_captions(tree):
  root, images = tree
  source = folder.FolderSource(str(root), 'train')
  assert [p[len(str(root)) + 1:] for p in source._paths] == [
      'cat/a.png', 'cat/sub/b.png', 'dog/bad.png', 'dog/c.bmp', 'dog/d.gif']
  a = source[0]
  np.testing.assert_array_equal(a['image'], images['cat/a.png'])
  assert (a['label'], a['caption']) == (-1, '')
  b = source[1]
  assert b['image'].shape == (3, 4, 1)  # grayscale files stay one channel
  np.testing.assert_array_equal(b['image'][..., 0], images['cat/sub/b.png'])
  c = source[3]
  np.testing.assert_array_equal(c['image'], images['dog/c.bmp'])
  assert c['caption'] == 'a dog on grass'
  np.testing.assert_array_equal(source[4]['image'], images['dog/d.gif'])  # palette → RGB
  assert list(sources.captions(_cfg(root), 'train')) == ['', '', '', 'a dog on grass', '']


def test_corrupt_file_is_skipped_and_counted(tree, caplog):
  root, images = tree
  source = folder.FolderSource(str(root), 'train')
  assert source.num_skipped == 0
  with caplog.at_level(logging.WARNING):
    record = source[2]  # dog/bad.png → falls through to the next readable file, dog/c.bmp
  np.testing.assert_array_equal(record['image'], images['dog/c.bmp'])
  assert source.num_skipped == 1
  assert 'bad.png' in caplog.text
  source[2]
  assert source.num_skipped == 1  # counted once per file


def test_labels_from_first_level_dirs(tree):
  root, _ = tree
  source = folder.FolderSource(str(root), 'train', labels_from_dirs=True)
  assert source.class_names == ['cat', 'dog']
  assert [int(source[i]['label']) for i in (0, 1, 3, 4)] == [0, 0, 1, 1]
  cfg = _cfg(root)
  cfg.labels_from_dirs = True
  assert sources.num_classes(cfg) == 2
  _save(root / 'stray.png', np.zeros((2, 2, 3), np.uint8))
  with pytest.raises(ValueError, match='data.labels_from_dirs: .*stray.png'):
    folder.FolderSource(str(root), 'train', labels_from_dirs=True)


def test_split_subdirectories(tmp_path):
  _save(tmp_path / 'train/x.png', np.full((2, 2, 3), 10, np.uint8))
  _save(tmp_path / 'train/y.png', np.full((2, 2, 3), 20, np.uint8))
  _save(tmp_path / 'test/z.png', np.full((2, 2, 3), 30, np.uint8))
  assert len(folder.FolderSource(str(tmp_path), 'train')) == 2
  test = folder.FolderSource(str(tmp_path), 'test')
  assert len(test) == 1 and test[0]['image'][0, 0, 0] == 30
  # Without a sub-directory for the split, the whole folder serves it.
  assert len(folder.FolderSource(str(tmp_path / 'train'), 'test')) == 2


def test_transparency_is_composited_on_white(tmp_path):
  rgba = np.zeros((2, 2, 4), np.uint8)
  rgba[0, 0] = (255, 0, 0, 255)
  _save(tmp_path / 'icon.png', rgba)
  image = folder.FolderSource(str(tmp_path), 'train')[0]['image']
  np.testing.assert_array_equal(image[0, 0], (255, 0, 0))
  np.testing.assert_array_equal(image[1, 1], (255, 255, 255))


def test_only_unreadable_files_raise_a_clear_error(tmp_path):
  (tmp_path / 'a.jpg').write_bytes(b'garbage')
  source = folder.FolderSource(str(tmp_path), 'train')
  with pytest.raises(ValueError, match='data.path: none of the 1 images'):
    source[0]


def _cfg(root):
  cfg = default_data_config()
  cfg.source, cfg.path = 'folder', str(root)
  return cfg


def test_sixteen_bit_png_keeps_the_high_byte(tmp_path):
  Image.fromarray(np.array([[0, 0x1234], [0xFF00, 0xFFFF]], np.uint16)).save(tmp_path / 'd.png')
  image = folder.FolderSource(str(tmp_path), 'train')[0]['image']
  np.testing.assert_array_equal(image[..., 0], [[0, 0x12], [0xFF, 0xFF]])


def test_large_jpeg_is_decoded_at_a_reduced_scale_above_min_size(tmp_path):
  _save(tmp_path / 'big.jpg', np.full((48, 64, 3), 128, np.uint8), quality=95)
  assert folder.FolderSource(str(tmp_path), 'train')[0]['image'].shape == (48, 64, 3)
  reduced = folder.FolderSource(str(tmp_path), 'train', min_size=10)[0]['image']
  assert reduced.shape == (12, 16, 3)  # 1/4 scale; 1/8 would give a side below 10
  assert abs(int(reduced.mean()) - 128) <= 2


def test_original_size_is_the_files_whatever_the_decoded_scale_and_rotation(tmp_path):
  """SDXL's size conditioning reads 'original_size' (h, w): the file's, after EXIF rotation, even when
  the JPEG is decoded at a reduced scale; the loader's batches carry it."""
  _save(tmp_path / 'a_big.jpg', np.full((48, 64, 3), 128, np.uint8), quality=95)
  exif = Image.Exif()
  exif[0x0112] = 6  # stored 40 wide and 24 high, shown rotated by 90°: 24 wide, 40 high
  _save(tmp_path / 'b_rotated.jpg', np.full((24, 40, 3), 90, np.uint8), exif=exif)
  _save(tmp_path / 'c_small.png', np.zeros((10, 17, 3), np.uint8))
  source = folder.FolderSource(str(tmp_path), 'train', min_size=10)
  assert source[0]['image'].shape == (12, 16, 3)
  assert [tuple(source[i]['original_size']) for i in range(3)] == [(48, 64), (40, 24), (10, 17)]
  assert source[1]['image'].shape == (20, 12, 3)  # decoded at half scale, rotated
  cfg = _cfg(tmp_path)
  cfg.image_size = 10
  batch = next(make_loader(cfg, 'train', batch_size=3, seed=0, shuffle=False))
  np.testing.assert_array_equal(batch['original_size'], [[48, 64], [40, 24], [10, 17]])
  # Center crops of the images resized to 10 × 13, 17 × 10 and 10 × 17.
  np.testing.assert_array_equal(batch['crop_coords_top_left'], [[0, 1], [3, 0], [0, 3]])
