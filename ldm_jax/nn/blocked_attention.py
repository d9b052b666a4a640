"""Memory-efficient attention for CPUs: softmax(q kᵀ/√d) v computed block by block.

`jax.nn.dot_product_attention`'s XLA path materialises the [B, H, Lq, Lk] logits: at a 32×32
latent with 8 heads and batch 16 that is 512 MB of float32, written and read several times —
the step is memory-bound and attention was 85 % of the U-Net's time on CPU. Here the logits
live only as [B, g, c, Lk] blocks of about `block_bytes` (g heads, c queries, every key), small
enough to stay in cache, so each block's two matmuls, its softmax and its output happen while
the block is hot. Memory grows linearly in the number of tokens.

The backward pass (`jax.custom_vjp`) is equally frugal: it keeps only the output and each
query's softmax statistics (row maximum m and normaliser l), recomputes each block's
probabilities and forms the gradients from them (the FlashAttention backward, with all keys of
a block at once). It works on the transposed block, keys × queries, which XLA's CPU matmuls
handle about 2.5× faster than the query-major form for the two products that contract over
queries (dk and dv).

The batch axis stays a free axis of every block (the loops run over head groups and query
chunks), so a batch sharded over a device mesh stays sharded inside the loops.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

# Logits per block; 2 MiB is one core's L2 cache on the machines we measured (see
# benchmarks/attention.py: 1–4 MiB are within a few per cent of each other).
DEFAULT_BLOCK_BYTES = 2 * 2**20
_MAX_QUERY_CHUNK = 256
_MIN_QUERY_CHUNK = 16
_NEG = float(jnp.finfo(jnp.float32).min)


def block_sizes(batch: int, heads: int, q_len: int, k_len: int,
                block_bytes: int = DEFAULT_BLOCK_BYTES) -> tuple[int, int]:
  """(heads per block g, queries per block c) so that a [batch, g, c, k_len] float32 block of
  logits fits in about `block_bytes`; g divides `heads`."""
  row_bytes = 4 * batch * k_len
  chunk = max(_MIN_QUERY_CHUNK, min(_MAX_QUERY_CHUNK, block_bytes // row_bytes))
  chunk = min(chunk, q_len)
  group = max(1, block_bytes // (row_bytes * chunk))
  group = max(g for g in range(1, heads + 1) if heads % g == 0 and g <= group)
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
  group, chunk = block_sizes(b, heads, q_len, k_len, block_bytes)
  num_chunks = -(-q_len // chunk)
  pad = num_chunks * chunk - q_len
  q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  # [B, L, H, D] → [H/g, n, B, g, c, D] (queries) and [H/g, B, g, Lk, D] (keys, values)
  qb = q.reshape(b, num_chunks, chunk, heads // group, group, dim).transpose(3, 1, 0, 4, 2, 5)
  kv_blocks = lambda x: x.reshape(b, k_len, heads // group, group, dim).transpose(2, 0, 3, 1, 4)
  mask = None if key_mask is None else jnp.asarray(key_mask, bool)
  out = _attention(qb, kv_blocks(k), kv_blocks(v), mask, causal, 1.0 / math.sqrt(dim))
  out = out.transpose(2, 1, 4, 0, 3, 5).reshape(b, num_chunks * chunk, heads, dim)
  return out[:, :q_len]


def _valid(mask, chunk_index, chunk, k_len, causal, keys_first):
  """Which (query, key) pairs of a block count: [B, 1, c, Lk] bool (or [B, 1, Lk, c] with
  `keys_first`), None when all do."""
  valid = None
  if mask is not None:
    valid = mask[:, None, None, :]
  if causal:
    queries = chunk_index * chunk + jnp.arange(chunk)
    earlier = queries[:, None] >= jnp.arange(k_len)[None, :]
    valid = earlier[None, None] if valid is None else valid & earlier
  if valid is not None and keys_first:
    valid = jnp.swapaxes(valid, -1, -2)
  return valid


def _forward_blocks(q, k, v, mask, causal, scale):
  """q [H/g, n, B, g, c, D], k/v [H/g, B, g, Lk, D] → out like q, row max m and 1/l [H/g, n, B, g, c]."""
  chunk, k_len = q.shape[-2], k.shape[-2]

  def head_group(args):
    q_group, k_group, v_group = args

    def query_chunk(args):
      q_chunk, index = args
      s = jnp.einsum("bgqd,bgkd->bgqk", q_chunk, k_group, preferred_element_type=jnp.float32) * scale
      valid = _valid(mask, index, chunk, k_len, causal, keys_first=False)
      if valid is not None:
        s = jnp.where(valid, s, _NEG)
      m = jnp.max(s, axis=-1)
      p = jnp.exp(s - m[..., None])
      inv_l = 1.0 / jnp.sum(p, axis=-1)
      o = jnp.einsum("bgqk,bgkd->bgqd", p.astype(v_group.dtype), v_group, preferred_element_type=jnp.float32)
      return (o * inv_l[..., None]).astype(q_chunk.dtype), m, inv_l

    return jax.lax.map(query_chunk, (q_group, jnp.arange(q_group.shape[0])))

  return jax.lax.map(head_group, (q, k, v))


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

  def head_group(args):
    q_group, out_group, d_out_group, m_group, inv_l_group, k_group, v_group = args

    def query_chunk(carry, args):
      dk, dv = carry
      q_chunk, o_chunk, do_chunk, m_chunk, inv_l_chunk, index = args
      # Keys × queries: the products over queries (dk, dv) are then plain matmuls.
      s = jnp.einsum("bgkd,bgqd->bgkq", k_group, q_chunk, preferred_element_type=f32) * scale
      valid = _valid(mask, index, chunk, k_len, causal, keys_first=True)
      if valid is not None:
        s = jnp.where(valid, s, _NEG)
      p = jnp.exp(s - m_chunk[..., None, :]) * inv_l_chunk[..., None, :]
      dv = dv + jnp.einsum("bgkq,bgqd->bgkd", p.astype(do_chunk.dtype), do_chunk, preferred_element_type=f32)
      dp = jnp.einsum("bgkd,bgqd->bgkq", v_group, do_chunk, preferred_element_type=f32)
      delta = jnp.sum(do_chunk.astype(f32) * o_chunk.astype(f32), axis=-1)
      ds = p * (dp - delta[..., None, :]) * scale
      if valid is not None:
        ds = jnp.where(valid, ds, 0.0)  # no gradient through masked logits, as jnp.where's
      ds = ds.astype(q_chunk.dtype)
      dk = dk + jnp.einsum("bgkq,bgqd->bgkd", ds, q_chunk, preferred_element_type=f32)
      dq = jnp.einsum("bgkq,bgkd->bgqd", ds, k_group, preferred_element_type=f32)
      return (dk, dv), dq.astype(q_chunk.dtype)

    zeros = jnp.zeros(k_group.shape, f32)
    indices = jnp.arange(q_group.shape[0])
    (dk, dv), dq = jax.lax.scan(query_chunk, (zeros, zeros),
                                (q_group, out_group, d_out_group, m_group, inv_l_group, indices))
    return dq, dk.astype(k_group.dtype), dv.astype(v_group.dtype)

  dq, dk, dv = jax.lax.map(head_group, (q, out, d_out, m, inv_l, k, v))
  return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)
