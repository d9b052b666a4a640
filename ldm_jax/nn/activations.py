"""Activations in the form XLA's CPU backend evaluates fastest."""

from __future__ import annotations

import math

import jax


def gelu(x: jax.Array) -> jax.Array:
  """Exact GELU, x·Φ(x), written as PyTorch's `F.gelu` computes it: x/2 · (1 + erf(x/√2)).

  `jax.nn.gelu(x, approximate=False)` is the same function through `erfc`, which XLA's CPU
  backend evaluates about 2× slower than `erf` (a GEGLU gate of 16384 × 256: 5.3 against 2.4 ms).
  Over [-12, 12] this form is within 1.2e-6 of float64's GELU (torch's and the erfc form: 4e-7);
  for x < -2, where 1 + erf(x/√2) < 0.05 cancels, the error is absolute, not relative.
  """
  return x * 0.5 * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
