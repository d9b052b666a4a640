"""Convolutional building blocks shared by the autoencoder and the U-Net (NHWC).

Parameter names follow diffusers (`ResnetBlock2D`, `Downsample2D`, `Upsample2D`) so that weight
converters are renaming tables: `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`,
`conv_shortcut`, `conv`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def check_group_norm(channels: int, num_groups: int, key: str) -> None:
  """Raises ValueError naming `key` when GroupNorm cannot split `channels` into groups."""
  if channels % num_groups:
    raise ValueError(f"{key}: {channels} channels are not divisible by the {num_groups} "
                     f"GroupNorm groups; choose a multiple of {num_groups}.")


class ResnetBlock(nn.Module):
  """GroupNorm → SiLU → 3×3 conv (+ time embedding) → GroupNorm → SiLU → dropout → 3×3 conv, residual.

  With `time_embedding_norm='scale_shift'` the time embedding modulates the second norm as
  `norm2(h) · (1 + scale) + shift` (openaimodel `use_scale_shift_norm`); with 'default' it is
  added after the first conv. A 1×1 `conv_shortcut` matches channels when they change.
  With `resample` the block also halves ('down', 2×2 average pooling) or doubles ('up', nearest)
  H and W, resampling both paths after the first norm and SiLU (openaimodel `ResBlock(up|down)`,
  diffusers `ResnetBlock2D(up|down)`, used by the U-Net's `resblock_updown`).

  Attributes:
    out_channels: output channels (None = input channels).
    num_groups, epsilon: GroupNorm settings (autoencoder 32/1e-6, U-Net 32/1e-5).
    dropout: dropout rate before the second conv.
    time_embedding_norm: 'default' | 'scale_shift'.
    resample: None | 'up' | 'down'.
  """
  out_channels: int | None = None
  num_groups: int = 32
  epsilon: float = 1e-6
  dropout: float = 0.0
  time_embedding_norm: str = "default"
  resample: str | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
    """x: [B, H, W, Cin], temb: [B, T] or None → [B, H, W, out_channels]."""
    out_channels = self.out_channels or x.shape[-1]
    norm = lambda name: nn.GroupNorm(self.num_groups, epsilon=self.epsilon, dtype=self.dtype, name=name)
    conv = lambda features, kernel, name: nn.Conv(features, (kernel, kernel), padding=kernel // 2,
                                                  dtype=self.dtype, name=name)
    h = nn.silu(norm("norm1")(x))
    if self.resample is not None:
      h, x = _resample(h, self.resample), _resample(x, self.resample)
    h = conv(out_channels, 3, "conv1")(h)
    if temb is not None:
      scale_shift = self.time_embedding_norm == "scale_shift"
      emb = nn.Dense(out_channels * (2 if scale_shift else 1), dtype=self.dtype,
                     name="time_emb_proj")(nn.silu(temb))[:, None, None, :]
      if scale_shift:
        scale, shift = jnp.split(emb, 2, axis=-1)
        h = norm("norm2")(h) * (1 + scale) + shift
      else:
        h = norm("norm2")(h + emb)
    else:
      h = norm("norm2")(h)
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=deterministic)
    h = conv(out_channels, 3, "conv2")(h)
    if x.shape[-1] != out_channels:
      x = conv(out_channels, 1, "conv_shortcut")(x)
    return x + h


def _resample(x: jax.Array, mode: str) -> jax.Array:
  if mode == "up":
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  if mode == "down":
    return nn.avg_pool(x, (2, 2), strides=(2, 2))
  raise ValueError(f"ResnetBlock.resample: {mode!r} is not one of None, 'up', 'down'.")


class Downsample(nn.Module):
  """Halves H and W with a stride-2 3×3 conv named `conv`.

  `padding='asymmetric'` pads one pixel on the bottom and right only (the CompVis/diffusers
  autoencoder); `padding='symmetric'` pads one on every side (the U-Net). The two give
  different outputs for the same weights, so loaded checkpoints must keep their own.
  """
  out_channels: int | None = None
  padding: str = "asymmetric"
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] → [B, ceil(H/2), ceil(W/2), out_channels]."""
    pad = {"asymmetric": ((0, 1), (0, 1)), "symmetric": ((1, 1), (1, 1))}[self.padding]
    return nn.Conv(self.out_channels or x.shape[-1], (3, 3), strides=(2, 2), padding=pad,
                   dtype=self.dtype, name="conv")(x)


class Upsample(nn.Module):
  """Doubles H and W by nearest-neighbour repetition, then a 3×3 conv named `conv`."""
  out_channels: int | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] → [B, 2H, 2W, out_channels]."""
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(self.out_channels or x.shape[-1], (3, 3), padding=1, dtype=self.dtype, name="conv")(x)
