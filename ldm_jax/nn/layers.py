"""Convolutional building blocks shared by the autoencoder and the U-Net (NHWC).

Parameter names follow diffusers (`ResnetBlock2D`, `Downsample2D`, `Upsample2D`) so that weight
converters are renaming tables: `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`,
`conv_shortcut`, `conv`.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.nn.conv import Conv1x1, Conv3x3, nearest_upsample


def _group_mean(per_channel_sum: jax.Array, num_groups: int, count: int) -> jax.Array:
  """[B, C] sums over the spatial axes → [B, G] means over each group's `count` elements."""
  batch, channels = per_channel_sum.shape
  return per_channel_sum.reshape(batch, num_groups, channels // num_groups).sum(-1) / count


def _to_channels(per_group: jax.Array, like: jax.Array) -> jax.Array:
  """[B, G] → [B, 1, ..., 1, C], each group's value repeated over its channels, to broadcast on `like`."""
  batch, channels = like.shape[0], like.shape[-1]
  repeated = jnp.repeat(per_group, channels // per_group.shape[1], axis=1)
  return repeated.reshape((batch,) + (1,) * (like.ndim - 2) + (channels,))


def _spatial_axes(x: jax.Array) -> tuple[int, ...]:
  return tuple(range(1, x.ndim - 1))


def _group_count(x: jax.Array, num_groups: int) -> int:
  return x[0].size // num_groups


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
               epsilon: float) -> jax.Array:
  """(x − mean) / √(var + ε) · scale + bias per example and group of channels, in float32.

  x: [B, ..., C] float32; scale, bias: [C]. The variance is two-pass (mean first, then centred
  squares), as torch's and unlike flax's default E[x²] − E[x]², which loses digits when
  |mean| ≫ std. The backward is written out (two per-channel reductions of the output gradient,
  then one elementwise pass) rather than left to autodiff, which differentiates the reductions
  one by one and is up to 1.6x slower than flax's backward.
  """
  return _group_norm_fwd(x, scale, bias, num_groups, epsilon)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon):
  # Sums over the spatial axes per channel first (the channels stay in the vector lanes), then
  # over each group's channels: 2-3x faster on XLA's CPU backend than reducing the
  # [B, ..., G, C/G] view in one go.
  spatial, count = _spatial_axes(x), _group_count(x, num_groups)
  mean = _to_channels(_group_mean(x.sum(spatial), num_groups, count), x)
  var = _group_mean(jnp.square(x - mean).sum(spatial), num_groups, count)
  rstd = _to_channels(jax.lax.rsqrt(var + epsilon), x)
  return (x - mean) * rstd * scale + bias, (x, mean, rstd, scale)


def _group_norm_bwd(num_groups, epsilon, residuals, dy):
  del epsilon
  x, mean, rstd, scale = residuals
  spatial, count = _spatial_axes(x), _group_count(x, num_groups)
  xhat = (x - mean) * rstd
  dbias, dscale = dy.sum(spatial), (dy * xhat).sum(spatial)  # [B, C] per example
  # dx = rstd · (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂)) with dx̂ = dy · scale, means over the group.
  mean_dxhat = _to_channels(_group_mean(dbias * scale, num_groups, count), x)
  mean_dxhat_xhat = _to_channels(_group_mean(dscale * scale, num_groups, count), x)
  dx = rstd * (dy * scale - mean_dxhat - xhat * mean_dxhat_xhat)
  return dx, dscale.sum(0), dbias.sum(0)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
  """`flax.linen.GroupNorm` (parameters `scale`, `bias`; normalised over every axis but the batch
  and channels) computed by `group_norm`: 2.4x faster forward on CPU for the autoencoder's
  256x256x64 activations, and 100x closer to the float64 result than flax's one-pass variance.

  Statistics are float32 whatever `dtype` is; the output is cast to `dtype` (default: x's).
  """
  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: jnp.dtype | None = None
  scale_init: nn.initializers.Initializer = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, ..., C] → the same shape."""
    channels = x.shape[-1]
    check_group_norm(channels, self.num_groups, f"GroupNorm {self.name}")
    scale = self.param("scale", self.scale_init, (channels,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), jnp.float32)
    f32 = lambda a: a.astype(jnp.float32)
    y = group_norm(f32(x), f32(scale), f32(bias), self.num_groups, self.epsilon)
    return y.astype(self.dtype or x.dtype)


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
    norm = lambda name: GroupNorm(self.num_groups, epsilon=self.epsilon, dtype=self.dtype, name=name)
    h = nn.silu(norm("norm1")(x))
    if self.resample is not None:
      h, x = _resample(h, self.resample), _resample(x, self.resample)
    h = Conv3x3(out_channels, dtype=self.dtype, name="conv1")(h)
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
    h = Conv3x3(out_channels, dtype=self.dtype, name="conv2")(h)
    if x.shape[-1] != out_channels:
      x = Conv1x1(out_channels, dtype=self.dtype, name="conv_shortcut")(x)
    return x + h


def _resample(x: jax.Array, mode: str) -> jax.Array:
  if mode == "up":
    return nearest_upsample(x)
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
  """Doubles H and W by nearest-neighbour repetition, then a 3×3 conv named `conv` (on CPU as one
  2×2 convolution at the input's size with four outputs per pixel: `conv.upsample_conv3x3`)."""
  out_channels: int | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] → [B, 2H, 2W, out_channels]."""
    return Conv3x3(self.out_channels or x.shape[-1], dtype=self.dtype, upsample=True, name="conv")(x)
