"""Run logs: absl logging setup, TensorBoard scalars and images, `metrics.jsonl`. Process 0 writes.

Every scalar logged goes to both TensorBoard (`workdir/events/`) and one JSON line per step in
`workdir/metrics.jsonl` (`{"step": 100, "train/loss": 0.12, ...}`), so that runs can be read
with and without TensorBoard. Image grids go to `workdir/samples/<name>_<step>.png` and to
TensorBoard.
"""

from __future__ import annotations

import json
import os

import logging as py_logging

import jax
import numpy as np
from absl import logging

from ldm_jax.runtime.images import save_png


class _DropLibraryInfo(py_logging.Filter):
  """Keeps warnings from everywhere but INFO lines only from outside the noisy libraries."""
  NOISY = ("/orbax/", "/grain/", "/jax/_src/")

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or not any(p in record.pathname for p in self.NOISY)


def setup_logging() -> None:
  """INFO for ldm_jax; orbax's per-save chatter (dozens of lines per checkpoint) is dropped."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_DropLibraryInfo())


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
