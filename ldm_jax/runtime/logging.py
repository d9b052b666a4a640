"""Run outputs: TensorBoard scalars and images, `metrics.jsonl`, PNG grids. Process 0 writes.

Every scalar logged goes to both TensorBoard (`workdir/events/`) and one JSON line per step in
`workdir/metrics.jsonl` (`{"step": 100, "train/loss": 0.12, ...}`), so that runs can be read
with and without TensorBoard. Image grids go to `workdir/samples/<name>_<step>.png` and to
TensorBoard.
"""

from __future__ import annotations

import json
import math
import os

import logging as py_logging

import jax
import numpy as np
from absl import logging
from PIL import Image


class _DropLibraryInfo(py_logging.Filter):
  """Keeps warnings from everywhere but INFO lines only from outside the noisy libraries."""
  NOISY = ("/orbax/", "/grain/", "/jax/_src/")

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or not any(p in record.pathname for p in self.NOISY)


def setup_logging() -> None:
  """INFO for ldm_jax; orbax's per-save chatter (dozens of lines per checkpoint) is dropped."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_DropLibraryInfo())


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


class MetricWriter:
  """Writes scalars and images of one run; a no-op on processes other than 0."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.active = jax.process_index() == 0
    if not self.active:
      return
    from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it
    self._tb = SummaryWriter(os.path.join(workdir, "events"))
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write_scalars(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, step)
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()

  def write_image(self, step: int, name: str, grid: np.ndarray) -> str | None:
    """Saves a uint8 [H, W, C] grid as `samples/<name>_<step>.png` and to TensorBoard."""
    if not self.active:
      return None
    path = os.path.join(self.workdir, "samples", f"{name}_{step:07d}.png")
    save_png(path, grid)
    self._tb.add_image(name, grid, step, dataformats="HWC")
    return path

  def flush(self) -> None:
    if self.active:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self.active:
      self._tb.close()
      self._jsonl.close()
