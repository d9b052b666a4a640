"""The shared attention: chunked == unchunked == a naive numpy softmax attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.nn import MultiHeadSelfAttention, SpatialSelfAttention, dot_product_attention


def naive_attention(q, k, v, allowed=None):
  """softmax(q kᵀ / √D) v in float64; q [B, Lq, H, D], k/v [B, Lk, H, D]; `allowed` [B, 1, Lq, Lk]
  bool, False logits dropped."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if allowed is not None:
    logits = np.where(allowed, logits, -np.inf)
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


@pytest.mark.parametrize("query_chunk_size", [None, 4, 7])
def test_causal_attention_sees_only_earlier_keys(query_chunk_size):
  kq, kk, kv, km = jax.random.split(jax.random.key(4), 4)
  q, k, v = (jax.random.normal(key, (2, 10, 2, 8)) for key in (kq, kk, kv))
  key_mask = np.array(jax.random.uniform(km, (2, 10)) > 0.3)
  key_mask[:, 0] = True  # every query keeps at least one key
  causal = np.tril(np.ones((10, 10), bool))[None, None]
  out = dot_product_attention(q, k, v, query_chunk_size=query_chunk_size, causal=True)
  np.testing.assert_allclose(out, naive_attention(q, k, v, causal), atol=2e-5, rtol=1e-5)
  out = dot_product_attention(q, k, v, query_chunk_size=query_chunk_size, key_mask=key_mask, causal=True)
  np.testing.assert_allclose(out, naive_attention(q, k, v, causal & key_mask[:, None, None, :]),
                             atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_multi_head_self_attention_names_and_matches_numpy(causal):
  x = jax.random.normal(jax.random.key(5), (2, 6, 16))
  module = MultiHeadSelfAttention(num_heads=2, head_dim=4, qkv_names=("q", "k", "v"), out_name="o",
                                  qkv_bias=False, causal=causal)
  params = module.init(jax.random.key(6), x)["params"]
  assert set(params) == {"q", "k", "v", "o"} and "bias" not in params["q"] and "bias" in params["o"]
  assert params["q"]["kernel"].shape == (16, 8) and params["o"]["kernel"].shape == (8, 16)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  q, k, v = (np.asarray(x, np.float64) @ p[n]["kernel"] for n in ("q", "k", "v"))
  heads = [a.reshape(2, 6, 2, 4) for a in (q, k, v)]
  allowed = np.tril(np.ones((6, 6), bool))[None, None] if causal else None
  expected = naive_attention(*heads, allowed).reshape(2, 6, 8) @ p["o"]["kernel"] + p["o"]["bias"]
  np.testing.assert_allclose(module.apply({"params": params}, x), expected, atol=2e-5, rtol=1e-5)
  # Without an output projection the heads come back concatenated.
  bare = MultiHeadSelfAttention(num_heads=2, out_name=None)
  assert set(bare.init(jax.random.key(6), x)["params"]) == {"to_q", "to_k", "to_v"}


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
