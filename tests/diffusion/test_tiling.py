"""Tiled decoding (`ldm_jax.diffusion.tiling`): the layout, exactness for a per-pixel decoder, the errors.
Against diffusers' `AutoencoderKL.tiled_decode`: tests/convert/test_tiled_decode.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import tiling


def test_tiles_step_by_tile_minus_overlap_and_are_cut_at_the_border():
  assert tiling.tile_starts(20, 8, 2) == [(0, 8), (6, 8), (12, 8), (18, 2)]
  assert tiling.tile_starts(8, 4, 0) == [(0, 4), (4, 4)]
  assert tiling.tile_starts(5, 8, 3) == [(0, 5)]


@pytest.mark.parametrize("shape,tile,overlap", [((2, 13, 10, 4), 6, 2), ((1, 8, 8, 4), 4, 0), ((1, 5, 9, 4), 8, 3),
                                                ((1, 10, 7, 4), 6, 4)])  # the last: three tiles overlap
def test_tiled_decode_equals_untiled_for_a_per_pixel_decoder(shape, tile, overlap):
  f = 4
  w = jax.random.normal(jax.random.key(0), (shape[-1], 3))

  def decode(z):  # a 1×1 "decoder": per latent pixel, then nearest upsampling by f
    y = jnp.tanh(z @ w)
    return jnp.repeat(jnp.repeat(y, f, axis=1), f, axis=2)

  z = jax.random.normal(jax.random.key(1), shape)
  out = jax.jit(functools.partial(tiling.tiled_decode, decode, tile=tile, overlap=overlap, f=f))(z)
  assert out.shape == (shape[0], shape[1] * f, shape[2] * f, 3)
  np.testing.assert_allclose(out, decode(z), rtol=1e-6, atol=1e-6)


def test_the_blend_fades_linearly_from_the_tile_above_and_the_tile_on_the_left():
  """A decoder that paints each tile with its own constant (its first latent value): the image is
  that constant except over each tile's first overlap·f rows / columns, where it ramps from the
  previous tile's value, y/E of the way at row y."""
  f, tile, overlap = 2, 4, 2  # tiles at 0, 2, 4 (the last two pixels wide), blended over E = 4 pixels
  z = jnp.zeros((1, 6, 6, 1)).at[0, 0, 0, 0].set(1.0).at[0, 2, 0, 0].set(5.0).at[0, 4, 0, 0].set(9.0)
  decode = lambda t: jnp.broadcast_to(t[:, :1, :1, :], (t.shape[0], t.shape[1] * f, t.shape[2] * f, 1))
  out = np.asarray(tiling.tiled_decode(decode, z, tile, overlap, f))[0, :, 0, 0]
  # Column 0: tile rows (1), (5), (9); kept rows 0–3 of the first, 0–3 of the second, 0–3 of the third.
  np.testing.assert_allclose(out, [1, 1, 1, 1, 1, 2, 3, 4, 5, 6, 7, 8], atol=1e-6)


def test_tiled_decode_is_close_to_the_untiled_decode_where_the_overlap_covers_the_seams():
  """A convolutional decoder (receptive field ±4 latent pixels, as a VAE's without attention): the
  image is the untiled one away from the tiles' edges and near it over the blends, and the blend
  halves the error of hard seams between tiles of the same size."""
  keys = jax.random.split(jax.random.key(0), 4)
  kernels = [0.15 * jax.random.normal(k, (3, 3, c_in, c_out)) for k, (c_in, c_out) in
             zip(keys, [(4, 16), (16, 16), (16, 16), (16, 3)])]

  def decode(z):
    x = z
    for i, kernel in enumerate(kernels):
      x = jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      x = jnp.tanh(x) if i < 3 else x
      if i == 2:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return x

  z = jax.random.normal(jax.random.key(1), (1, 24, 24, 4))
  untiled = np.asarray(decode(z))
  error = lambda tile, overlap: np.abs(np.asarray(tiling.tiled_decode(decode, z, tile, overlap, f=2)) - untiled)
  wide = error(16, 8)
  # Tiles at 0, 8, 16 along each axis; the first 16 pixel rows and columns are the first tile's
  # alone, and their receptive field (latent rows and columns ≤ 11) lies inside it.
  np.testing.assert_allclose(wide[:, :16, :16], 0, atol=1e-5)
  assert 0 < wide.mean() < 0.1 * untiled.std(), (wide.mean(), untiled.std())
  blended, hard_seams = error(8, 4), error(8, 0)
  assert hard_seams.max() > 2 * blended.max() and hard_seams.mean() > 1.5 * blended.mean(), (
      hard_seams.max(), blended.max(), hard_seams.mean(), blended.mean())


def test_a_latent_within_one_tile_is_decoded_whole():
  calls = []

  def decode(z):
    calls.append(z.shape)
    return jnp.repeat(jnp.repeat(z, 2, axis=1), 2, axis=2)

  tiling.tiled_decode(decode, jnp.ones((1, 6, 8, 3)), tile=8, overlap=2, f=2)
  assert calls == [(1, 6, 8, 3)]


def test_tiled_decode_errors_name_the_argument():
  z = jnp.zeros((1, 8, 8, 4))
  decode = lambda z: jnp.repeat(jnp.repeat(z, 8, axis=1), 8, axis=2)
  with pytest.raises(ValueError, match="overlap: expected an integer in"):
    tiling.tiled_decode(decode, z, tile=4, overlap=4, f=8)
  with pytest.raises(ValueError, match="tile: expected a positive integer"):
    tiling.tiled_decode(decode, z, tile=0, overlap=0, f=8)
  with pytest.raises(ValueError, match="f: decode_fn maps a 4×4 latent tile to 32×32"):
    tiling.tiled_decode(decode, z, tile=4, overlap=1, f=4)
