"""THE attention of ldm_jax: one entry point that picks the fastest correct implementation for
the backend and the shapes, used by every attention in the project (the U-Net's self- and
cross-attention, the autoencoder's mid-block, the text encoders).

Implementations (`model.attention`, `sample.py --attention`):

  auto     the default: the choice below per call.
  xla      `jax.nn.dot_product_attention`'s XLA path (logits [B, H, Lq, Lk] in float32), optionally
           with `query_chunk_size` queries at a time (`lax.map`), bounding the logits to
           [B, H, chunk, Lk]. Right for short sequences, and the fallback everywhere.
  fused    `fused_attention`: C++ kernels (XLA FFI, built on first use for this CPU), forward and
           backward, that keep the logits in registers; CPU only. float32 without mask or
           causality, heads of 2–16 channels (`fused_attention.HEAD_DIMS`); other calls take
           `blocked`.
  blocked  `blocked_attention`: cache-sized blocks with a recomputing backward; memory linear in
           the tokens. Pure JAX, so it runs on every backend.
  cudnn    cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`); GPU only,
           float16/bfloat16, head_dim a multiple of 8 and ≤ 128.
  pallas   the Pallas flash-attention kernel shipped with JAX (`jax.experimental.pallas.ops.tpu`);
           TPU only, sequence lengths multiples of 128.

`auto` takes `fused` on CPU where it applies and could be built, else `blocked` once the logits
of one call would pass `CPU_BLOCKED_MIN_BYTES`; `cudnn` on GPU and `pallas` on TPU where their
conditions hold; and `xla` otherwise (`select_implementation`, unit-tested per backend). Logits
and softmax are float32 in every implementation, also for bfloat16 inputs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.nn import fused_attention as fused_lib
from ldm_jax.nn.blocked_attention import blocked_attention
from ldm_jax.nn.layers import GroupNorm

IMPLEMENTATIONS = ("auto", "xla", "blocked", "fused", "cudnn", "pallas")
_BACKEND_OF = {"fused": "cpu", "cudnn": "gpu", "pallas": "tpu"}

# Below this many bytes of float32 logits per call the XLA path's few large ops beat the loops of
# `blocked` on CPU (benchmarks/attention.py: the two meet between 1 and 4 MiB).
CPU_BLOCKED_MIN_BYTES = 2 * 2**20
_PALLAS_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
  """How a module computes attention (hashable: a field of flax modules).

  Attributes:
    implementation: one of `IMPLEMENTATIONS`.
    query_chunk_size: for `xla`, queries per `lax.map` step (None = all at once).
  """
  implementation: str = "auto"
  query_chunk_size: int | None = None


def check_implementation(implementation: str, key: str = "model.attention", backend: str | None = None) -> None:
  """Raises ValueError naming `key` if `implementation` is unknown or cannot run on `backend`
  (default: JAX's default backend)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"{key}: {implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}.")
  backend = backend or jax.default_backend()
  needed = _BACKEND_OF.get(implementation)
  if needed is not None and backend != needed:
    raise ValueError(f"{key}: {implementation!r} needs a {needed.upper()}, but JAX runs on {backend}; "
                     "use 'auto' (picks the fastest available), 'blocked' or 'xla'.")
  if implementation == "fused" and (reason := fused_lib.unavailable_reason()) is not None:
    raise ValueError(f"{key}: 'fused' is unavailable here: {reason}. Use 'auto' or 'blocked'.")


def select_implementation(implementation: str, *, backend: str, batch: int, heads: int, q_len: int,
                          k_len: int, head_dim: int, dtype: Any, has_mask: bool, causal: bool = False,
                          fused_available: bool | None = None) -> str:
  """The implementation `dot_product_attention` runs for this call (resolves 'auto', and 'fused'
  where the kernel does not apply). `fused_available`: whether the CPU kernel could be built
  (None: find out)."""
  fused_applies = fused_lib.supports(head_dim=head_dim, dtype=dtype, has_mask=has_mask, causal=causal)
  if implementation == "fused":
    return "fused" if fused_applies else "blocked"
  if implementation != "auto":
    return implementation
  if backend == "cpu":
    if fused_applies:
      if fused_available is None:
        fused_available = fused_lib.available()
        if not fused_available:
          fused_lib.warn_unavailable_once(fused_lib.unavailable_reason())
      if fused_available:
        return "fused"
    logits_bytes = 4 * batch * heads * q_len * k_len
    return "blocked" if logits_bytes >= CPU_BLOCKED_MIN_BYTES else "xla"
  if backend == "gpu":
    if (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
        and not has_mask):
      return "cudnn"
    return "xla"
  if backend == "tpu":
    if q_len % _PALLAS_BLOCK == 0 and k_len % _PALLAS_BLOCK == 0:
      return "pallas"
    return "xla"
  return "xla"


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_mask: jax.Array | None = None,
                          causal: bool = False, implementation: str = "auto",
                          query_chunk_size: int | None = None) -> jax.Array:
  """Scaled dot-product attention, softmax(q kᵀ / √d) v.

  Args:
    q: [B, Lq, H, D] queries.
    k: [B, Lk, H, D] keys.
    v: [B, Lk, H, D] values.
    key_mask: optional bool [B, Lk]; False keys (padding tokens) get no attention weight.
      A query whose keys are all masked attends uniformly instead of producing NaNs.
    causal: query i attends only to keys j ≤ i (CLIP's text transformer; Lq = Lk).
    implementation: one of `IMPLEMENTATIONS`; see the module docstring.
    query_chunk_size: for the `xla` implementation, queries per `lax.map` step, bounding the
      logits memory to [B, H, chunk, Lk].

  Returns:
    [B, Lq, H, D], in the dtype of `q`.
  """
  check_implementation(implementation, key="attention implementation")
  b, q_len, heads, head_dim = q.shape
  chosen = select_implementation(implementation, backend=jax.default_backend(), batch=b, heads=heads,
                                 q_len=q_len, k_len=k.shape[1], head_dim=head_dim, dtype=q.dtype,
                                 has_mask=key_mask is not None, causal=causal)
  if chosen == "fused":
    return fused_lib.fused_attention(q, k, v)
  if chosen == "blocked":
    return blocked_attention(q, k, v, key_mask=key_mask, causal=causal)
  if chosen == "cudnn":
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation="cudnn")
  if chosen == "pallas":
    return _pallas_attention(q, k, v, key_mask, causal)
  return _xla_attention(q, k, v, key_mask, causal, query_chunk_size)


def _pallas_attention(q, k, v, key_mask, causal):
  from jax.experimental.pallas.ops.tpu import flash_attention as pallas_flash  # pylint: disable=g-import-not-at-top
  to_heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # the kernel wants [B, H, L, D]
  segment_ids = None
  if key_mask is not None:  # a key in segment 0 is invisible to the queries, all in segment 1
    segment_ids = pallas_flash.SegmentIds(q=jnp.ones(q.shape[:2], jnp.int32), kv=key_mask.astype(jnp.int32))
  out = pallas_flash.flash_attention(to_heads_first(q), to_heads_first(k), to_heads_first(v),
                                     segment_ids=segment_ids, causal=causal, sm_scale=1.0 / math.sqrt(q.shape[-1]))
  return to_heads_first(out)


def _xla_attention(q, k, v, key_mask, causal, query_chunk_size):
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
    attention: implementation options of `dot_product_attention`.
  """
  num_groups: int = 32
  epsilon: float = 1e-6
  attention: AttentionConfig = AttentionConfig()
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] → [B, H, W, C]."""
    b, h, w, c = x.shape
    y = GroupNorm(self.num_groups, epsilon=self.epsilon, dtype=self.dtype, name="group_norm")(x)
    y = y.reshape(b, h * w, 1, c)
    q, k, v = (nn.Dense(c, dtype=self.dtype, name=name)(y) for name in ("to_q", "to_k", "to_v"))
    y = dot_product_attention(q, k, v, **dataclasses.asdict(self.attention))
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
    attention: implementation options of `dot_product_attention`.
  """
  num_heads: int
  head_dim: int | None = None
  qkv_names: tuple[str, str, str] = ("to_q", "to_k", "to_v")
  out_name: str | None = "to_out"
  qkv_bias: bool = True
  causal: bool = False
  attention: AttentionConfig = AttentionConfig()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    """x: [B, L, C], key_mask: bool [B, L] (False = padding) or None → [B, L, C]."""
    b, length, channels = x.shape
    head_dim = channels // self.num_heads if self.head_dim is None else self.head_dim
    q, k, v = (nn.Dense(self.num_heads * head_dim, use_bias=self.qkv_bias, dtype=self.dtype, name=name)(x)
               .reshape(b, length, self.num_heads, head_dim) for name in self.qkv_names)
    out = dot_product_attention(q, k, v, key_mask=key_mask, causal=self.causal, **dataclasses.asdict(self.attention))
    out = out.reshape(b, length, -1)
    if self.out_name is None:
      return out
    return nn.Dense(channels, dtype=self.dtype, name=self.out_name)(out)
