"""Tiled decoding: a latent too large for the decoder's activations, decoded tile by tile.

The layout and the blend are diffusers' `AutoencoderKL.tiled_decode` (`enable_tiling()`), so that
a tiled image here is a tiled image there. Along each axis the tiles start every `tile − overlap`
latent pixels from 0 and are `tile` long, the last ones cut at the border:

    starts 0, s, 2s, … < size   (s = tile − overlap),   tile k covers [k·s, min(k·s + tile, size)).

Each tile is decoded on its own (the decoder's receptive field and attention stop at the tile's
edge). In row-major order each decoded tile then blends into its first E = overlap·f pixel rows
the last E rows of the tile above, and into its first E columns the last E columns of the tile on
its left (both already blended), with linear weights: row y < E becomes
above[−E + y]·(1 − y/E) + own[y]·(y/E). The first s·f rows and columns of every tile make the
image. The blend removes visible seams; it is not the untiled image (the decoder sees less
context), and it is equal to it for a decoder that acts per latent pixel.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def tile_starts(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
  """(start, length) of the tiles along an axis of `size` latent pixels (see the module docstring)."""
  return [(s, min(tile, size - s)) for s in range(0, size, tile - overlap)]


def _blend(previous: jax.Array, current: jax.Array, extent: int, axis: int) -> jax.Array:
  """`current` with its first `extent` slices along `axis` faded in from `previous`'s last ones."""
  e = min(previous.shape[axis], current.shape[axis], extent)
  if e == 0:
    return current
  shape = [1] * current.ndim
  shape[axis] = e
  w = jnp.asarray(np.arange(e) / e, jnp.float32).reshape(shape)
  tail = jax.lax.slice_in_dim(previous, previous.shape[axis] - e, previous.shape[axis], axis=axis)
  head = jax.lax.slice_in_dim(current, 0, e, axis=axis)
  rest = jax.lax.slice_in_dim(current, e, current.shape[axis], axis=axis)
  return jnp.concatenate([tail * (1 - w) + head * w, rest], axis=axis)


def tiled_decode(decode_fn: Callable[[jax.Array], jax.Array], z: jax.Array, tile: int, overlap: int,
                 f: int) -> jax.Array:
  """Decodes `z` in overlapping tiles blended as diffusers' `tiled_decode` (module docstring).

  Args:
    decode_fn: [B, h, w, c] → [B, h·f, w·f, C], e.g. the autoencoder's decode with params closed over.
    z: [B, H, W, c] latent.
    tile: tile side in latent pixels (diffusers' `tile_latent_min_size`).
    overlap: latent pixels shared by neighbouring tiles, 0 ≤ overlap < tile (diffusers:
      tile·`tile_overlap_factor`, 0.25 by default).
    f: the decoder's upsampling factor.
  Returns:
    [B, H·f, W·f, C] float32. A latent no larger than `tile` either way is decoded whole, as diffusers
    does. Tiles of one shape are decoded one after the other (`lax.map`), so the decoder's peak
    memory is one tile's.
  """
  B, H, W, _ = np.shape(z)
  if not isinstance(tile, (int, np.integer)) or isinstance(tile, bool) or tile < 1:
    raise ValueError(f"tile: expected a positive integer (latent pixels), got {tile!r}.")
  if not isinstance(overlap, (int, np.integer)) or isinstance(overlap, bool) or not 0 <= overlap < tile:
    raise ValueError(f"overlap: expected an integer in [0, tile = {tile}), got {overlap!r}.")
  if H <= tile and W <= tile:
    return decode_fn(z).astype(jnp.float32)
  ys, xs = tile_starts(H, tile, overlap), tile_starts(W, tile, overlap)
  by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
  for i, (_, h) in enumerate(ys):
    for j, (_, w) in enumerate(xs):
      by_shape.setdefault((h, w), []).append((i, j))
  decoded = {}
  for (h, w), members in by_shape.items():
    crops = jnp.stack([z[:, ys[i][0]:ys[i][0] + h, xs[j][0]:xs[j][0] + w] for i, j in members])
    out = jax.lax.map(decode_fn, crops).astype(jnp.float32)
    if out.shape[2:4] != (h * f, w * f):
      raise ValueError(f"f: decode_fn maps a {h}×{w} latent tile to {out.shape[2]}×{out.shape[3]} pixels, "
                       f"not {h * f}×{w * f}.")
    decoded.update({member: out[k] for k, member in enumerate(members)})
  extent, keep = overlap * f, (tile - overlap) * f
  rows = []
  for i in range(len(ys)):
    row = []
    for j in range(len(xs)):
      current = decoded[i, j]
      if i > 0:
        current = _blend(decoded[i - 1, j], current, extent, axis=1)
      if j > 0:
        current = _blend(decoded[i, j - 1], current, extent, axis=2)
      decoded[i, j] = current
      row.append(current[:, :keep, :keep])
    rows.append(jnp.concatenate(row, axis=2))
  return jnp.concatenate(rows, axis=1)
