"""Timestep embeddings: the sinusoidal features of a diffusion step and the MLP that lifts them.

The features follow "Attention Is All You Need" applied to the (possibly fractional) timestep t:
for i < half = dim // 2,

    freq_i = exp(-ln(max_period) · i / (half - freq_shift)),   features = [sin(t·freq), cos(t·freq)].

CompVis `timestep_embedding` puts cos first with no shift; diffusers `get_timestep_embedding`
exposes both choices as `flip_sin_to_cos` (cos first) and `downscale_freq_shift` (here `freq_shift`).
Stable Diffusion and the LDM U-Nets use cos first and shift 0, the defaults here.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal features of timesteps.

  Args:
    t: [B] timesteps, integer or float (fractional steps are allowed).
    dim: number of features; when odd, the last feature is zero.
    flip_sin_to_cos: put the cosines first (CompVis, Stable Diffusion).
    freq_shift: diffusers' `downscale_freq_shift`; 0 spans frequencies 1 … max_period^-(half-1)/half,
      1 spans exactly 1 … 1/max_period.
    max_period: the longest wavelength.

  Returns:
    [B, dim] float32.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = jnp.asarray(t, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """`linear_1` → SiLU → `linear_2` (diffusers `TimestepEmbedding`, CompVis `time_embed`).

  Attributes:
    features: output width (4 × model_channels in the U-Net).
  """
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, D] → [B, features]."""
    x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))
