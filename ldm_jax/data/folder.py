"""`folder`: images found recursively under a directory, with optional captions and labels.

* Images: files ending in .png .jpg .jpeg .webp .bmp .gif (any case), hidden files
  and directories skipped, in sorted path order. GIFs give their first frame;
  transparent images are composited onto white; EXIF rotation is applied.
* Captions: `photo.txt` beside `photo.jpg` (same stem), stripped; '' when absent.
* Labels: with `data.labels_from_dirs`, the index of the image's first-level
  sub-directory among the sorted sub-directory names (`cat/x.png` → 0,
  `dog/sub/y.png` → 1); every image must then lie in a sub-directory. Without
  it, labels are -1.
* Splits: when `data.path/<split>` is a directory (e.g. `train/`, `test/`),
  the split reads it; otherwise `data.path` itself serves every split.
* Unreadable images are skipped, never fatal: record `i` falls through to the
  next readable file (deterministically), the path is logged once as a warning,
  and `num_skipped` counts the distinct unreadable files met so far.
"""

import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from absl import logging
from PIL import ExifTags, Image, ImageOps

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif')
# EXIF orientations that rotate the image by 90° (transpose, 90° clockwise, transverse, 270°).
_QUARTER_TURNS = (5, 6, 7, 8)


def split_dir(path: str, split: str) -> str:
  candidate = os.path.join(path, split)
  return candidate if os.path.isdir(candidate) else path


def iter_images(root: str) -> Iterator[str]:
  """Yields image paths under `root` in sorted order, lazily (cheap to test for emptiness)."""
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
    for name in sorted(filenames):
      if not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS):
        yield os.path.join(dirpath, name)


def read_caption(image_path: str) -> str:
  """The caption of an image: its `.txt` beside it (same stem), stripped; '' when absent."""
  try:
    with open(os.path.splitext(image_path)[0] + '.txt', encoding='utf-8', errors='replace') as f:
      return f.read().strip()
  except FileNotFoundError:
    return ''


def class_names(root: str) -> list[str]:
  """Sorted first-level sub-directories of `root` that contain at least one image."""
  return sorted(d for d in os.listdir(root)
                if not d.startswith('.') and os.path.isdir(os.path.join(root, d))
                and next(iter_images(os.path.join(root, d)), None) is not None)


def decode_image(path, min_size: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
  """Reads an image file (a path or a file object): (uint8 [H, W, 1] (grayscale files) or
  [H, W, 3], its original size (height, width)).

  With `min_size`, JPEGs may be decoded at a reduced scale (libjpeg's DCT
  scaling, several times faster) that keeps both sides >= min_size; the
  original size is the file's, after EXIF rotation, whatever the decoded scale.
  """
  with Image.open(path) as image:
    width, height = image.size
    if image.getexif().get(ExifTags.Base.Orientation, 1) in _QUARTER_TURNS:
      width, height = height, width
    if min_size:
      image.draft(image.mode, (min_size, min_size))
    image = ImageOps.exif_transpose(image)
    if image.mode in ('RGBA', 'LA', 'PA') or 'transparency' in image.info:
      rgba = image.convert('RGBA')
      image = Image.alpha_composite(Image.new('RGBA', rgba.size, (255, 255, 255, 255)), rgba)
      array = np.asarray(image.convert('RGB'))
    elif image.mode.startswith('I'):  # 16-bit grayscale: keep the high byte
      array = (np.asarray(image, np.uint32) >> 8).astype(np.uint8)
    elif image.mode in ('1', 'L', 'F'):
      array = np.asarray(image.convert('L'))
    else:
      array = np.asarray(image.convert('RGB'))
  return (array[..., None] if array.ndim == 2 else array), (height, width)


class FolderSource:
  """Random-access source of `{'image': uint8 [H, W, 1|3], 'label', 'caption', 'original_size': int32 [2]}`
  (the file's (h, w): JPEGs may be decoded smaller, see `decode_image`)."""

  def __init__(self, path: str, split: str, *, labels_from_dirs: bool = False,
               min_size: int = 0):
    """`min_size` (the output image size) lets JPEG decoding skip resolution never used."""
    self.root = split_dir(path, split)
    self._min_size = min_size
    self._paths = list(iter_images(self.root))
    if not self._paths:
      raise ValueError(f'data.path: {self.root} is empty (no images found)')
    self.class_names = class_names(self.root) if labels_from_dirs else []
    self._labels = self._dir_labels() if labels_from_dirs else None
    self._unreadable: set[int] = set()

  def _dir_labels(self) -> list[int]:
    index = {name: i for i, name in enumerate(self.class_names)}
    labels = []
    for path in self._paths:
      parts = os.path.relpath(path, self.root).split(os.sep)
      if len(parts) < 2:
        raise ValueError(f'data.labels_from_dirs: {path} is not inside a class '
                         f'sub-directory of {self.root}')
      labels.append(index[parts[0]])
    return labels

  @property
  def num_skipped(self) -> int:
    """Number of distinct unreadable image files met so far."""
    return len(self._unreadable)

  def __len__(self) -> int:
    return len(self._paths)

  def caption(self, index: int) -> str:
    return read_caption(self._paths[index])

  def __getitem__(self, index: int) -> dict[str, Any]:
    for offset in range(len(self._paths)):
      i = (index + offset) % len(self._paths)
      if i in self._unreadable:
        continue
      try:
        image, original_size = decode_image(self._paths[i], self._min_size)
      except Exception as e:  # pylint: disable=broad-except
        # Broken files make PIL raise many types (OSError, SyntaxError, struct.error, ...);
        # one bad file must not stop a long run.
        if i not in self._unreadable:
          self._unreadable.add(i)
          logging.warning('Skipping unreadable image %s: %s', self._paths[i], e)
        continue
      return {
          'image': image,
          'label': np.int32(self._labels[i] if self._labels is not None else -1),
          'caption': self.caption(i),
          'original_size': np.array(original_size, np.int32),
      }
    raise ValueError(f'data.path: none of the {len(self._paths)} images under {self.root} '
                     'could be read')
