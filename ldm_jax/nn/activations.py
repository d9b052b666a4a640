"""Activations whose XLA form matters for speed."""

from __future__ import annotations

import math

import jax


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x·Φ(x), written as PyTorch's `F.gelu` computes it: x/2 · (1 + erf(x/√2)).

  `jax.nn.gelu(x, approximate=False)` is the same function through `erfc`, which XLA's CPU
  backend evaluates about 2× slower than `erf` (a GEGLU gate of 16384 × 256: 5.3 against 2.4 ms).
  The two agree to float32 rounding wherever x·Φ(x) is not vanishingly small; for x < -5 this
  form, like torch's, returns values within 1e-6 of 0 rather than the exact tail.
  """
  return x * 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
