"""The sinusoidal timestep embedding against its closed form, and the embedding MLP's layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.nn.embeddings import TimestepEmbedding, timestep_embedding


def _closed_form(t, dim, flip, shift, max_period=10000.0):
  half = dim // 2
  out = np.zeros((len(t), dim))
  for b, step in enumerate(t):
    for i in range(half):
      angle = step * max_period ** (-i / (half - shift))
      first, second = (np.cos(angle), np.sin(angle)) if flip else (np.sin(angle), np.cos(angle))
      out[b, i], out[b, half + i] = first, second
  return out


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("shift", [0.0, 1.0])
@pytest.mark.parametrize("dim", [8, 9])
def test_timestep_embedding_matches_closed_form(flip, shift, dim):
  t = np.array([0, 1, 17, 999], np.int32)
  got = timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
  assert got.shape == (4, dim) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _closed_form(t, dim, flip, shift), atol=2e-4)


def test_timestep_embedding_defaults_are_compvis_cos_first():
  emb = np.asarray(timestep_embedding(jnp.array([0.0]), 6))
  np.testing.assert_allclose(emb[0], [1, 1, 1, 0, 0, 0], atol=1e-7)  # cos(0) first, sin(0) after


def test_timestep_embedding_accepts_fractional_steps():
  emb = timestep_embedding(jnp.array([2.5]), 4, flip_sin_to_cos=False)
  np.testing.assert_allclose(np.asarray(emb), _closed_form([2.5], 4, False, 0.0), atol=1e-6)


def test_timestep_embedding_mlp_is_linear_silu_linear():
  module = TimestepEmbedding(16)
  x = jax.random.normal(jax.random.key(0), (3, 8))
  params = module.init(jax.random.key(1), x)["params"]
  assert set(params) == {"linear_1", "linear_2"}
  assert params["linear_1"]["kernel"].shape == (8, 16)
  p1, p2 = params["linear_1"], params["linear_2"]
  h = x @ p1["kernel"] + p1["bias"]
  expected = jax.nn.silu(h) @ p2["kernel"] + p2["bias"]
  np.testing.assert_allclose(module.apply({"params": params}, x), expected, rtol=1e-5, atol=1e-6)
