"""Fused attention for CPUs and small heads: C++ kernels called through the XLA FFI.

With 2–16 channels per head (the first levels of a small U-Net: 64 or 128 channels in 8 heads) the
products q·kᵀ and p·v are too thin for matmuls, and `blocked` spends its time in them and in
the exponentials' memory traffic. `kernels/attention_cpu.cc` computes softmax(q kᵀ/√D) v with
16 queries (8 with AVX2) in the lanes of a vector register, in one sweep over the keys that holds
at most 64 logits per query (never the [Lq, Lk] matrix), and returns each query's log-sum-exp; its
backward kernel recomputes the probabilities from it in one sweep with the keys in the lanes (the
queries 64 at a time, each square tile of dS transposed into the queries' dq). From 32 channels per head on `blocked` is faster, and
`dot_product_attention` uses it.

The kernels are built on first use (`cpu_kernels`). Without a C++ compiler `available()` is False
and `dot_product_attention` uses `blocked` instead, saying why once (`unavailable_reason()`).
float32, no mask, not causal; head sizes in `HEAD_DIMS`.
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax.nn import cpu_kernels

_SOURCE = cpu_kernels.KERNELS / "attention_cpu.cc"
HEAD_DIMS = (2, 4, 8, 16)  # LDM_HEAD_DIMS in the source: from 32 channels on `blocked` is as fast
unavailable_reason = cpu_kernels.unavailable_reason
available = cpu_kernels.available


def supports(*, head_dim: int, dtype, has_mask: bool, causal: bool) -> bool:
  """Whether the kernel computes this call (it also needs `available()`)."""
  return head_dim in HEAD_DIMS and jnp.dtype(dtype) == jnp.float32 and not has_mask and not causal


@functools.cache
def warn_unavailable_once(reason: str) -> None:
  logging.warning("fused CPU attention unavailable, using 'blocked': %s", reason)


def _forward_call(q, k, v, threads):
  b, q_len, heads, dim = q.shape
  call = jax.ffi.ffi_call("ldm_fused_attention_forward", (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                                           jax.ShapeDtypeStruct((b, heads, q_len), jnp.float32)),
                          vmap_method="sequential")
  return call(q, k, v, scale=np.float32(1.0 / math.sqrt(dim)), threads=np.int64(threads))


def _backward_call(threads, q, k, v, out, lse, d_out):
  call = jax.ffi.ffi_call("ldm_fused_attention_backward", tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32)
                                                             for x in (q, k, v)), vmap_method="sequential")
  return call(q, k, v, out, lse, d_out, scale=np.float32(1.0 / math.sqrt(q.shape[-1])), threads=np.int64(threads))


# On a device mesh (e.g. the batch split over several CPU devices) each device runs the kernels on
# its own examples, heads and (forward) queries: custom_partitioning keeps XLA from gathering the
# operands and running the whole call on every device. Keys and channels stay whole.
def _spec(shape, rank):
  spec = tuple(getattr(shape.sharding, "spec", ()))
  return spec + (None,) * (rank - len(spec))


def _forward_partition(threads, mesh, arg_shapes, result_shape):
  del result_shape
  b, q_len, h, _ = _spec(arg_shapes[0], 4)
  q_sharding = NamedSharding(mesh, P(b, q_len, h, None))
  kv_sharding = NamedSharding(mesh, P(b, None, h, None))
  out_shardings = (q_sharding, NamedSharding(mesh, P(b, h, q_len)))
  return mesh, functools.partial(_forward_call, threads=threads), out_shardings, (q_sharding, kv_sharding, kv_sharding)


def _forward_infer(threads, mesh, arg_shapes, result_shape):
  return _forward_partition(threads, mesh, arg_shapes, result_shape)[2]


def _backward_partition(threads, mesh, arg_shapes, result_shape):
  del result_shape
  b, _, h, _ = _spec(arg_shapes[0], 4)
  rows = NamedSharding(mesh, P(b, None, h, None))
  lse = NamedSharding(mesh, P(b, h, None))
  return mesh, functools.partial(_backward_call, threads), (rows, rows, rows), (rows, rows, rows, rows, lse, rows)


def _backward_infer(threads, mesh, arg_shapes, result_shape):
  return _backward_partition(threads, mesh, arg_shapes, result_shape)[2]


_forward_sharded = custom_partitioning(_forward_call, static_argnums=(3,))
_forward_sharded.def_partition(partition=_forward_partition, infer_sharding_from_operands=_forward_infer,
                               sharding_rule="b q h d, b k h d, b k h d -> b q h d, b h q",
                               need_replication_factors=("d", "k"))  # in the order of first use
_backward_sharded = custom_partitioning(_backward_call, static_argnums=(0,))
_backward_sharded.def_partition(partition=_backward_partition, infer_sharding_from_operands=_backward_infer,
                                sharding_rule="b q h d, b k h d, b k h d, b q h d, b h q, b q h d "
                                              "-> b q h d, b k h d, b k h d",
                                need_replication_factors=("q", "d", "k"))


def _forward(q, k, v, threads):
  if not available():
    raise RuntimeError(f"attention implementation 'fused': {unavailable_reason()}")
  return _forward_sharded(q, k, v, threads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, threads: int = 0) -> jax.Array:
  """softmax(q kᵀ/√D) v for float32 q [B, Lq, H, D], k, v [B, Lk, H, D] by the C++ kernel.

  `threads`: kernel threads per call, 0 = the CPUs this process may run on.
  """
  return _forward(q, k, v, threads)[0]


def _fused_fwd(q, k, v, threads):
  out, lse = _forward(q, k, v, threads)
  return out, (q, k, v, out, lse)


def _fused_bwd(threads, residuals, d_out):
  q, k, v, out, lse = residuals
  return _backward_sharded(threads, q, k, v, out, lse, d_out.astype(jnp.float32))


fused_attention.defvjp(_fused_fwd, _fused_bwd)
