"""The shared attention: chunked == unchunked == a naive numpy softmax attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.nn import SpatialSelfAttention, dot_product_attention


def naive_attention(q, k, v):
  """softmax(q kᵀ / √D) v in float64; q [B, Lq, H, D], k/v [B, Lk, H, D]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def naive_group_norm(x, scale, bias, groups, eps):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def test_dot_product_attention_matches_numpy_chunked_or_not():
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = 2.0 * jax.random.normal(kq, (2, 20, 3, 8))
  k = 2.0 * jax.random.normal(kk, (2, 13, 3, 8))
  v = jax.random.normal(kv, (2, 13, 3, 8))
  expected = naive_attention(q, k, v)
  full = dot_product_attention(q, k, v)
  np.testing.assert_allclose(full, expected, atol=2e-5, rtol=1e-5)
  for chunk in (4, 7, 64):  # 7 does not divide 20: padded last chunk; 64 ≥ 20: unchunked
    chunked = dot_product_attention(q, k, v, query_chunk_size=chunk)
    assert chunked.shape == full.shape
    np.testing.assert_allclose(chunked, full, atol=1e-6, rtol=1e-6)


def test_dot_product_attention_bfloat16_stays_close_and_in_dtype():
  kq, kk, kv = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(key, (1, 16, 2, 8)).astype(jnp.bfloat16) for key in (kq, kk, kv))
  out = dot_product_attention(q, k, v, query_chunk_size=5)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), naive_attention(q, k, v), atol=3e-2)


@pytest.mark.parametrize("query_chunk_size", [None, 5])
def test_spatial_self_attention_matches_numpy(query_chunk_size):
  x = jax.random.normal(jax.random.key(2), (2, 4, 3, 32))
  module = SpatialSelfAttention(num_groups=8, epsilon=1e-6, query_chunk_size=query_chunk_size)
  # Random parameters drawn in numpy (no `init` to compile); the norm's affine parameters away
  # from identity, so that a mix-up of scale and bias would show.
  rng = np.random.default_rng(3)
  draw = lambda path, leaf: jnp.asarray(
      (1 if path[-1].key == "scale" else 0) + 0.3 * rng.normal(size=leaf.shape), jnp.float32)
  params = jax.tree_util.tree_map_with_path(draw, jax.eval_shape(module.init, jax.random.key(0), x)["params"])
  out = jax.jit(module.apply)({"params": params}, x)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  xn = np.asarray(x, np.float64)
  y = naive_group_norm(xn, p["group_norm"]["scale"], p["group_norm"]["bias"], 8, 1e-6)
  y = y.reshape(2, 12, 32)
  q, k, v = (y @ p[n]["kernel"] + p[n]["bias"] for n in ("to_q", "to_k", "to_v"))
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(32)  # single head: scale 1/√C
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  y = (weights @ v) @ p["to_out_0"]["kernel"] + p["to_out_0"]["bias"]
  expected = xn + y.reshape(xn.shape)
  np.testing.assert_allclose(out, expected, atol=5e-5, rtol=1e-5)
