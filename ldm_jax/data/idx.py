"""`idx`: MNIST-style idx files (Fashion-MNIST, MNIST, KMNIST, ...) from a directory.

`data.path` holds `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
`t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each optionally gzipped
(`.gz`). Split 'train' reads `train-*`, split 'test' reads `t10k-*`. The whole
split is loaded into memory (Fashion-MNIST train: 47 MB).

Captions name the class, "a photo of a sneaker", with Fashion-MNIST class names
when the directory path contains "fashion" (case-insensitive), and "a photo of
the digit 7" otherwise. Labels are the file's labels (10 classes).
`holdout_labels` (`data.holdout_labels`) leaves those classes out of the train
split (the test split keeps them): a class a model has never seen, to teach it
later from a few images. `unnamed_labels` (`data.unnamed_labels`) keeps those
classes' train images but captions them `unnamed_caption` (`data.unnamed_caption`):
a model that can draw the class but has no word for it, textual inversion's
setting. With '' (the default) the caption is the unconditional one, so
classifier-free guidance pushes away from the class; 'a photo of a' (the
template without the class word) gives the class a caption of its own.
"""

import gzip
import os
import zlib
from typing import Any

import numpy as np

FASHION_MNIST_CLASSES = ('t-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt',
                         'sneaker', 'bag', 'ankle boot')
NUM_CLASSES = 10
SPLIT_PREFIXES = {'train': 'train', 'test': 't10k'}

# idx header byte 3 → big-endian element type.
_IDX_DTYPES = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}


def read_idx(path: str) -> np.ndarray:
  """Reads one idx file (gzipped when the name ends in .gz) into an array."""
  opener = gzip.open if path.endswith('.gz') else open
  try:
    with opener(path, 'rb') as f:
      data = f.read()
  except (EOFError, OSError, zlib.error) as e:  # a truncated or damaged .gz (BadGzipFile is an OSError)
    raise ValueError(f'{path}: cannot be read, the file is truncated or damaged '
                     f'({type(e).__name__}: {e}); download it again') from e
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(f'{path}: not an idx file (bad magic number {data[:4].hex()})')
  ndim = data[3]
  shape = tuple(int(d) for d in np.frombuffer(data, '>u4', count=ndim, offset=4))
  dtype = np.dtype(_IDX_DTYPES[data[2]])
  offset = 4 + 4 * ndim
  if len(data) - offset != int(np.prod(shape)) * dtype.itemsize:
    raise ValueError(f'{path}: header shape {shape} does not match {len(data) - offset} data bytes')
  return np.frombuffer(data, dtype, offset=offset).reshape(shape).astype(dtype.newbyteorder('='))


def split_files(directory: str, split: str) -> tuple[str, str]:
  """Paths of the (images, labels) files of `split`; ValueError naming data.path if absent."""
  if split not in SPLIT_PREFIXES:
    raise ValueError(f"idx source: unknown split {split!r}, expected one of "
                     f"{tuple(SPLIT_PREFIXES)} (data.train_split / data.eval_split)")
  prefix = SPLIT_PREFIXES[split]
  found = []
  for kind in ('images-idx3-ubyte', 'labels-idx1-ubyte'):
    candidates = [os.path.join(directory, f'{prefix}-{kind}{ext}') for ext in ('', '.gz')]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
      raise ValueError(f'data.path: {directory} has no {prefix}-{kind}[.gz] for split {split!r}')
    found.append(path)
  return found[0], found[1]


def class_captions(directory: str) -> tuple[str, ...]:
  """One caption per label, e.g. "a photo of an ankle boot" or "a photo of the digit 7"."""
  if 'fashion' in os.path.abspath(directory).lower():
    return tuple(f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}"
                 for name in FASHION_MNIST_CLASSES)
  return tuple(f'a photo of the digit {d}' for d in range(NUM_CLASSES))


class IdxSource:
  """Random-access source of `{'image': uint8 [28, 28, 1], 'label', 'caption'}`."""

  def __init__(self, directory: str, split: str, holdout_labels=(), unnamed_labels=(), unnamed_caption: str = ''):
    images_path, labels_path = split_files(directory, split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
      raise ValueError(f'{images_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}')
    if labels.shape != images.shape[:1]:
      raise ValueError(f'{labels_path}: {labels.shape[0]} labels for {images.shape[0]} images')
    if labels.size and not 0 <= labels.min() <= labels.max() < NUM_CLASSES:
      raise ValueError(f'{labels_path}: labels must lie in [0, {NUM_CLASSES}), got '
                       f'[{labels.min()}, {labels.max()}]')
    holdout, unnamed = check_label_sets(holdout_labels, unnamed_labels) if split == 'train' else ((), ())
    if holdout:
      keep = ~np.isin(labels, holdout)
      images, labels = images[keep], labels[keep]
    self._images = images[..., None]
    self._labels = labels.astype(np.int32)
    if unnamed:
      check_unnamed_caption(directory, unnamed_caption)
    self._captions = tuple(unnamed_caption if label in unnamed else caption
                           for label, caption in enumerate(class_captions(directory)))

  def __len__(self) -> int:
    return len(self._labels)

  def caption(self, index: int) -> str:
    return self._captions[self._labels[index]]

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {
        'image': self._images[index],
        'label': self._labels[index],
        'caption': self.caption(index),
    }


def _check_labels(key: str, labels) -> tuple[int, ...]:
  labels = tuple(labels)
  for label in labels:
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < NUM_CLASSES:
      raise ValueError(f'{key}: {label!r} is not a class index in [0, {NUM_CLASSES})')
  return labels


def check_label_sets(holdout_labels, unnamed_labels=()) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """`data.holdout_labels` and `data.unnamed_labels` as tuples of class indices; ValueError naming the key."""
  holdout = _check_labels('data.holdout_labels', holdout_labels)
  if len(set(holdout)) >= NUM_CLASSES:
    raise ValueError(f'data.holdout_labels: {holdout} leaves no class to train on')
  unnamed = _check_labels('data.unnamed_labels', unnamed_labels)
  both = sorted(set(holdout) & set(unnamed))
  if both:
    raise ValueError(f'data.unnamed_labels: {both} are in data.holdout_labels too (left out of training, so '
                     'there is nothing to leave unnamed)')
  return holdout, unnamed


def check_unnamed_caption(directory: str, caption: str) -> None:
  """ValueError naming `data.unnamed_caption` when it is a class's own caption (which names the class)."""
  named = class_captions(directory)
  if caption in named:
    raise ValueError(f'data.unnamed_caption: {caption!r} is the caption of class {named.index(caption)}, '
                     'which names it')
