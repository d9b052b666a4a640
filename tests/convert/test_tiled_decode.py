"""Tiled decoding against diffusers' `AutoencoderKL.enable_tiling()` on the same random weights."""

import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ldm_jax.diffusion import tiling  # noqa: E402
from ldm_jax.load import load_pretrained  # noqa: E402
from tests.convert.reference import nchw, nhwc  # noqa: E402


def _tiled_decoder(folder):
  modules, params, _ = load_pretrained(folder)
  model = modules["autoencoder"]
  decode = functools.partial(model.apply, {"params": params["autoencoder"]}, method=model.decode)
  return jax.jit(functools.partial(tiling.tiled_decode, decode, f=2), static_argnames=("tile", "overlap"))


@pytest.mark.parametrize("tile_pixels, factor", [(16, 0.25), (24, 0.5)])
def test_tiled_decode_matches_diffusers(diffusers_models, tile_pixels, factor):
  """The tiny SD-layout VAE (f = 2, attention in the decoder): a 20×28 latent in tiles of
  `tile_pixels` (diffusers' default 16 = its sample_size, then 24) overlapping by `factor`."""
  folder, vae = diffusers_models["vae"]
  tiled = _tiled_decoder(folder)
  z = np.random.default_rng(0).normal(size=(2, 20, 28, 4)).astype(np.float32)
  vae.enable_tiling()
  vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = tile_pixels, tile_pixels // 2, factor
  try:
    with torch.no_grad():
      reference = nhwc(vae.decode(nchw(z)).sample)
      vae.disable_tiling()
      untiled = nhwc(vae.decode(nchw(z)).sample)
  finally:
    vae.disable_tiling()
  tile = tile_pixels // 2
  ours = tiled(z, tile=tile, overlap=tile - int(tile * (1 - factor)))
  assert ours.shape == reference.shape == (2, 40, 56, 3)
  np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
  assert np.abs(reference - untiled).max() > 0.05  # the tiles are not the whole image: the blend mattered

