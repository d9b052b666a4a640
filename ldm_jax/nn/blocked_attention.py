"""Memory-efficient attention for CPUs: softmax(q kᵀ/√d) v computed block by block.

`jax.nn.dot_product_attention`'s XLA path materialises the [B, H, Lq, Lk] logits: at a 32×32
latent with 8 heads and batch 16 that is 512 MB of float32, written and read several times —
the step is memory-bound and attention was 85 % of the U-Net's time on CPU. Here the logits
live only as [g, c, Lk] blocks of about `block_bytes` (g example·head pairs, c queries, every key), small
enough to stay in cache, so each block's two matmuls, its softmax and its output happen while
the block is hot. Memory grows linearly in the number of tokens.

The backward pass (`jax.custom_vjp`) is equally frugal: it keeps only the output and each
query's softmax statistics (row maximum m and normaliser l), recomputes each block's
probabilities and forms the gradients from them (the FlashAttention backward, with all keys of
a block at once). It works on the transposed block, keys × queries, which XLA's CPU matmuls
handle about 2.5× faster than the query-major form for the two products that contract over
queries (dk and dv).

Blocks run over (example, head) pairs: g pairs and c queries at a time, so that the matmuls
have c ≥ 128 rows whatever the batch size (with the batch inside each block, a batch of 16 left
32-row matmuls and was 1.5× slower forward and backward). On a device mesh this loop runs
over the sharded batch, which XLA gathers; `dot_product_attention` therefore picks this
implementation only on CPU, where one process rarely shards attention.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# Logits per block: one core's L2 cache on the machine we measured, where 2 and 4 MiB were within
# noise of each other and 0.5 MiB (smaller matmuls) 1.5–3× slower.
DEFAULT_BLOCK_BYTES = 2 * 2**20
_MAX_QUERY_CHUNK = 256
_MIN_QUERY_CHUNK = 16
_NEG = float(jnp.finfo(jnp.float32).min)


def block_sizes(pairs: int, q_len: int, k_len: int, block_bytes: int = DEFAULT_BLOCK_BYTES) -> tuple[int, int]:
  """(pairs per block g, queries per block c) so that a [g, c, k_len] float32 block of logits fits
  in about `block_bytes`; g divides `pairs` (batch × heads)."""
  row_bytes = 4 * k_len
  chunk = min(q_len, max(_MIN_QUERY_CHUNK, min(_MAX_QUERY_CHUNK, block_bytes // row_bytes)))
  group = max(1, block_bytes // (row_bytes * chunk))
  group = max(g for g in range(1, min(group, pairs) + 1) if pairs % g == 0)
  return group, chunk


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_mask: jax.Array | None = None,
                      causal: bool = False, block_bytes: int = DEFAULT_BLOCK_BYTES) -> jax.Array:
  """softmax(q kᵀ/√D) v without materialising [B, H, Lq, Lk]; see `dot_product_attention`.

  Args:
    q: [B, Lq, H, D]; k, v: [B, Lk, H, D].
    key_mask: bool [B, Lk], False = not a key; a query without keys attends uniformly.
    causal: query i attends to keys j ≤ i.
    block_bytes: logits per block.

  Returns:
    [B, Lq, H, D] in q's dtype.
  """
  b, q_len, heads, dim = q.shape
  k_len = k.shape[1]
  pairs = b * heads
  group, chunk = block_sizes(pairs, q_len, k_len, block_bytes)
  num_chunks = -(-q_len // chunk)
  q = jnp.pad(q, ((0, 0), (0, num_chunks * chunk - q_len), (0, 0), (0, 0)))
  # [B, L, H, D] → [B·H/g, n, g, c, D] (queries) and [B·H/g, g, Lk, D] (keys, values)
  qb = (q.transpose(0, 2, 1, 3).reshape(pairs // group, group, num_chunks, chunk, dim).transpose(0, 2, 1, 3, 4))
  kv_blocks = lambda x: x.transpose(0, 2, 1, 3).reshape(pairs // group, group, k_len, dim)
  mask = None
  if key_mask is not None:  # [B, Lk] → [B·H/g, g, Lk], pair p belongs to example p // H
    mask = jnp.repeat(jnp.asarray(key_mask, bool), heads, axis=0).reshape(pairs // group, group, k_len)
  out = _attention(qb, kv_blocks(k), kv_blocks(v), mask, causal, 1.0 / math.sqrt(dim))
  out = out.transpose(0, 2, 1, 3, 4).reshape(b, heads, num_chunks * chunk, dim).transpose(0, 2, 1, 3)
  return out[:, :q_len]


def _valid(mask, chunk_index, chunk, k_len, causal, keys_first):
  """Which (query, key) pairs of a block count: [g, c, Lk] bool (or [g, Lk, c] with `keys_first`;
  size-1 axes broadcast), None when all do. `mask`: this block's [g, Lk] or None."""
  valid = None
  if mask is not None:
    valid = mask[:, None, :]
  if causal:
    queries = chunk_index * chunk + jnp.arange(chunk)
    earlier = (queries[:, None] >= jnp.arange(k_len)[None, :])[None]
    valid = earlier if valid is None else valid & earlier
  if valid is not None and keys_first:
    valid = jnp.swapaxes(valid, -1, -2)
  return valid


def _forward_blocks(q, k, v, mask, causal, scale):
  """q [G, n, g, c, D], k/v [G, g, Lk, D], mask [G, g, Lk] or None → out like q, and the row
  maximum m and 1/l of each query's softmax, [G, n, g, c]."""
  chunk, k_len = q.shape[-2], k.shape[-2]

  def pair_group(args):
    q_group, k_group, v_group, mask_group = args

    def query_chunk(args):
      q_chunk, index = args
      s = jnp.einsum("gqd,gkd->gqk", q_chunk, k_group, preferred_element_type=jnp.float32) * scale
      valid = _valid(mask_group, index, chunk, k_len, causal, keys_first=False)
      if valid is not None:
        s = jnp.where(valid, s, _NEG)
      m = jnp.max(s, axis=-1)
      p = jnp.exp(s - m[..., None])
      inv_l = 1.0 / jnp.sum(p, axis=-1)
      o = jnp.einsum("gqk,gkd->gqd", p.astype(v_group.dtype), v_group, preferred_element_type=jnp.float32)
      return (o * inv_l[..., None]).astype(q_chunk.dtype), m, inv_l

    return jax.lax.map(query_chunk, (q_group, jnp.arange(q_group.shape[0])))

  return jax.lax.map(pair_group, (q, k, v, mask))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention(q, k, v, mask, causal, scale):
  return _forward_blocks(q, k, v, mask, causal, scale)[0]


def _attention_fwd(q, k, v, mask, causal, scale):
  out, m, inv_l = _forward_blocks(q, k, v, mask, causal, scale)
  return out, (q, k, v, mask, out, m, inv_l)


def _attention_bwd(causal, scale, residuals, d_out):
  q, k, v, mask, out, m, inv_l = residuals
  chunk, k_len = q.shape[-2], k.shape[-2]
  f32 = jnp.float32

  def pair_group(args):
    q_group, out_group, d_out_group, m_group, inv_l_group, k_group, v_group, mask_group = args

    def query_chunk(carry, args):
      dk, dv = carry
      q_chunk, o_chunk, do_chunk, m_chunk, inv_l_chunk, index = args
      # Keys × queries: the products over queries (dk, dv) are then plain matmuls.
      s = jnp.einsum("gkd,gqd->gkq", k_group, q_chunk, preferred_element_type=f32) * scale
      valid = _valid(mask_group, index, chunk, k_len, causal, keys_first=True)
      if valid is not None:
        s = jnp.where(valid, s, _NEG)
      p = jnp.exp(s - m_chunk[:, None, :]) * inv_l_chunk[:, None, :]
      dv = dv + jnp.einsum("gkq,gqd->gkd", p.astype(do_chunk.dtype), do_chunk, preferred_element_type=f32)
      dp = jnp.einsum("gkd,gqd->gkq", v_group, do_chunk, preferred_element_type=f32)
      delta = jnp.sum(do_chunk.astype(f32) * o_chunk.astype(f32), axis=-1)
      ds = p * (dp - delta[:, None, :]) * scale
      if valid is not None:
        ds = jnp.where(valid, ds, 0.0)  # no gradient through masked logits, as jnp.where's
      ds = ds.astype(q_chunk.dtype)
      dk = dk + jnp.einsum("gkq,gqd->gkd", ds, q_chunk, preferred_element_type=f32)
      dq = jnp.einsum("gkq,gkd->gqd", ds, k_group, preferred_element_type=f32)
      return (dk, dv), dq.astype(q_chunk.dtype)

    zeros = jnp.zeros(k_group.shape, f32)
    indices = jnp.arange(q_group.shape[0])
    (dk, dv), dq = jax.lax.scan(query_chunk, (zeros, zeros),
                                (q_group, out_group, d_out_group, m_group, inv_l_group, indices))
    return dq, dk.astype(k_group.dtype), dv.astype(v_group.dtype)

  dq, dk, dv = jax.lax.map(pair_group, (q, out, d_out, m, inv_l, k, v, mask))
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)
