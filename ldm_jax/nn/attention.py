"""The one attention implementation of ldm_jax, shared by the autoencoder, the U-Net and the
text encoders.

`dot_product_attention` goes through `jax.nn.dot_product_attention`, so XLA picks fused
kernels (cuDNN flash attention on GPU, Pallas/Splash on TPU) where they exist; logits and
softmax are computed in float32 even when the inputs are bfloat16. For long sequences
(a 64×64 latent is 4096 tokens, and a 256 px autoencoder mid-block attends over 4096 too)
the query axis can be split into chunks so that only a [chunk, L] block of logits lives at
once — memory grows linearly instead of quadratically in the sequence length.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          query_chunk_size: int | None = None,
                          key_mask: jax.Array | None = None, causal: bool = False) -> jax.Array:
  """Scaled dot-product attention, softmax(q kᵀ / √d) v.

  Args:
    q: [B, Lq, H, D] queries.
    k: [B, Lk, H, D] keys.
    v: [B, Lk, H, D] values.
    query_chunk_size: if set and smaller than Lq, queries are processed in chunks of this
      many tokens (`lax.map`), bounding the logits memory to [B, H, chunk, Lk].
    key_mask: optional bool [B, Lk]; False keys (padding tokens) get no attention weight.
      A query whose keys are all masked attends uniformly instead of producing NaNs.
    causal: query i attends only to keys j ≤ i (CLIP's text transformer; Lq = Lk).

  Returns:
    [B, Lq, H, D], in the dtype of `q`.
  """
  length = q.shape[1]
  key_mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, Lk]

  def attend(q_chunk, start):
    """q_chunk: the queries from position `start` on."""
    mask = key_mask
    if causal:
      earlier = (start + jnp.arange(q_chunk.shape[1]))[:, None] >= jnp.arange(k.shape[1])
      earlier = earlier[None, None]  # [1, 1, Lq_chunk, Lk]: key j ≤ query i
      mask = earlier if mask is None else mask & earlier
    return _attend(q_chunk, k, v, mask)

  if query_chunk_size is None or query_chunk_size >= length:
    return attend(q, 0)
  num_chunks = math.ceil(length / query_chunk_size)
  pad = num_chunks * query_chunk_size - length
  q_padded = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  chunks = q_padded.reshape(q.shape[0], num_chunks, query_chunk_size, *q.shape[2:])
  starts = jnp.arange(num_chunks) * query_chunk_size
  out = jax.lax.map(lambda args: attend(*args), (jnp.moveaxis(chunks, 1, 0), starts))
  out = jnp.moveaxis(out, 0, 1).reshape(q.shape[0], -1, *q.shape[2:])
  return out[:, :length]


def _attend(q, k, v, mask):
  if q.dtype == jnp.float32:
    return jax.nn.dot_product_attention(q, k, v, mask=mask)
  # jax.nn.dot_product_attention's XLA path already accumulates the logits in f32; the explicit
  # form below keeps the softmax in f32 for low-precision inputs on every backend.
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v, preferred_element_type=jnp.float32).astype(q.dtype)


class SpatialSelfAttention(nn.Module):
  """Single-head self-attention over the pixels of a feature map, with a residual.

  The autoencoder's mid-block attention (CompVis `AttnBlock`, diffusers `Attention` with
  `group_norm`): GroupNorm → q, k, v projections → softmax(q kᵀ/√C) v → output projection.
  Parameter names follow diffusers (`group_norm`, `to_q`, `to_k`, `to_v`, `to_out_0`).

  Attributes:
    num_groups: GroupNorm groups.
    epsilon: GroupNorm epsilon (1e-6 in the autoencoder).
    query_chunk_size: see `dot_product_attention`.
  """
  num_groups: int = 32
  epsilon: float = 1e-6
  query_chunk_size: int | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] → [B, H, W, C]."""
    b, h, w, c = x.shape
    y = nn.GroupNorm(self.num_groups, epsilon=self.epsilon, dtype=self.dtype, name="group_norm")(x)
    y = y.reshape(b, h * w, 1, c)
    q, k, v = (nn.Dense(c, dtype=self.dtype, name=name)(y) for name in ("to_q", "to_k", "to_v"))
    y = dot_product_attention(q, k, v, query_chunk_size=self.query_chunk_size)
    y = nn.Dense(c, dtype=self.dtype, name="to_out_0")(y.reshape(b, h * w, c))
    return x + y.reshape(b, h, w, c)


class MultiHeadSelfAttention(nn.Module):
  """Multi-head self-attention over tokens, the text encoders' attention: q, k, v projections →
  `dot_product_attention` per head → output projection.

  The projection names are fields, so that each encoder keeps its checkpoint's parameter layout:
  x-transformers `to_q, to_k, to_v, to_out`; CLIP `q_proj, k_proj, v_proj, out_proj`; BERT
  `query, key, value` with its output projection in a separate block (`out_name=None`).

  Attributes:
    num_heads: attention heads.
    head_dim: channels per head; None = C // num_heads.
    qkv_names: names of the q, k, v projections.
    out_name: name of the output projection back to C channels; None = no output projection
      (the heads are returned concatenated, [B, L, num_heads·head_dim]).
    qkv_bias: whether the q, k, v projections have biases (the output projection always has one).
    causal: token i attends only to tokens j ≤ i.
  """
  num_heads: int
  head_dim: int | None = None
  qkv_names: tuple[str, str, str] = ("to_q", "to_k", "to_v")
  out_name: str | None = "to_out"
  qkv_bias: bool = True
  causal: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    """x: [B, L, C], key_mask: bool [B, L] (False = padding) or None → [B, L, C]."""
    b, length, channels = x.shape
    head_dim = channels // self.num_heads if self.head_dim is None else self.head_dim
    q, k, v = (nn.Dense(self.num_heads * head_dim, use_bias=self.qkv_bias, dtype=self.dtype, name=name)(x)
               .reshape(b, length, self.num_heads, head_dim) for name in self.qkv_names)
    out = dot_product_attention(q, k, v, key_mask=key_mask, causal=self.causal).reshape(b, length, -1)
    if self.out_name is None:
      return out
    return nn.Dense(channels, dtype=self.dtype, name=self.out_name)(out)
