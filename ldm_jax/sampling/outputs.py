"""What a request writes: grid.png, images/NNNNN.png, samples.npz, [intermediates.png], sampling.json, all at once."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import numpy as np

from ldm_jax.runtime.images import image_grid, save_png

GRID_MAX_IMAGES = 64  # grid.png shows the first 64 images; every image has its own PNG
INTERMEDIATE_ROWS = 8  # intermediates.png shows the denoising of the first 8 samples


def write_outputs(out: str, images: np.ndarray, *, labels=None, prompts=None, x0_images=None,
                  grid_cols: int | None = None, settings: dict | None = None) -> str:
  """Writes `out/` at once: grid.png, images/NNNNN.png, samples.npz, [intermediates.png], sampling.json.

  Files go to a staging directory beside `out` that is renamed to `out` at the end (removed on
  any error), so `out` either holds every output or does not exist. `out` may exist if empty.

  samples.npz: `images` uint8 [N, H, W, C], `labels` int32 [N] (class-conditional), `prompts`
  str [N] (text-conditional). intermediates.png: one row per sample (the first 8), the x0
  predictions at the requested steps, then the final image.
  """
  out = os.path.abspath(out)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".partial", dir=parent)
  try:
    shown = images[:GRID_MAX_IMAGES]
    save_png(os.path.join(staging, "grid.png"), image_grid(shown, num_cols=min(grid_cols or 0, len(shown)) or None))
    for i, image in enumerate(images):
      save_png(os.path.join(staging, "images", f"{i:05d}.png"), image)
    arrays = {"images": images}
    if labels is not None:
      arrays["labels"] = np.asarray(labels, np.int32)
    if prompts is not None:
      arrays["prompts"] = np.asarray(prompts, dtype=str)
    np.savez(os.path.join(staging, "samples.npz"), **arrays)
    if x0_images is not None:
      rows = min(len(images), INTERMEDIATE_ROWS)
      sequence = np.concatenate([x0_images[:, :rows], images[None, :rows]])  # [K + 1, rows, H, W, C]
      sequence = sequence.transpose(1, 0, 2, 3, 4).reshape((-1,) + images.shape[1:])
      save_png(os.path.join(staging, "intermediates.png"), image_grid(sequence, num_cols=len(x0_images) + 1))
    with open(os.path.join(staging, "sampling.json"), "w") as f:
      json.dump(settings or {}, f, indent=2, sort_keys=True)
    if os.path.isdir(out):
      os.rmdir(out)  # empty (checked before sampling); a non-empty one makes this fail, not merge
    os.rename(staging, out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return out
