"""Image I/O at the edges: [-1, 1] floats → uint8, PNG grids and files (NHWC, C = 1 or 3)."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats → uint8 in [0, 255] (round to nearest), any leading shape.

  A NaN or infinity is a ValueError: a diverged model must not pass for a black picture.
  """
  images = np.asarray(images, dtype=np.float32)
  finite = np.isfinite(images)
  if not finite.all():
    raise ValueError(f"images: {finite.size - np.count_nonzero(finite)} of {finite.size} values are NaN or "
                     "infinite (a diverged model, or an extreme setting such as the guidance scale); nothing "
                     "is written as black pixels.")
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images, num_cols: int | None = None, pad: int = 2) -> np.ndarray:
  """Tiles [N, H, W, C] images (uint8, or floats in [-1, 1]) into one [H', W', C] uint8 grid."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    images = to_uint8(images)
  n, h, w, c = images.shape
  num_cols = num_cols or math.ceil(math.sqrt(n))
  num_rows = math.ceil(n / num_cols)
  grid = np.full((num_rows * (h + pad) + pad, num_cols * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    r, col = divmod(i, num_cols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = image
  return grid


def save_png(path: str, image: np.ndarray) -> None:
  """Writes a [H, W, C] uint8 image (C = 1 or 3) as PNG, creating the directory."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  image = np.asarray(image)
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
