"""PatchGAN discriminator of the stage-1 adversarial loss (taming `NLayerDiscriminator`, pix2pix).

x [B, H, W, C] in [-1, 1] → logits [B, h, w, 1], one real/fake logit per overlapping patch:

    conv_0  4×4 s2, ndf                       + LeakyReLU(0.2)
    conv_n  4×4 s2, ndf·min(2^n, 8) + norm_n  + LeakyReLU(0.2)      n = 1 … n_layers−1
    conv_L  4×4 s1, ndf·min(2^L, 8) + norm_L  + LeakyReLU(0.2)      L = n_layers
    conv_{L+1} 4×4 s1, 1 channel                                     (logits, no activation)

Every conv pads 1 pixel on each side, as torch, so each stride-2 conv maps s → ⌊s/2⌋ and each
stride-1 conv s → s − 1: 256 px → 30×30 and 32 px → 2×2 patches with n_layers=3.
Parameter names: `conv_{k}` (kernel, bias), `norm_{k}` (scale, bias); taming's `main.{i}` is
`conv_0` ↔ `main.0`, `conv_k` ↔ `main.{3k−1}`, `norm_k` ↔ `main.{3k}` (k ≥ 1).

Initialisation as taming's `weights_init`: conv kernels N(0, 0.02), norm scales N(1, 0.02), norm
biases 0. Conv biases start at 0 (torch's default is uniform ±1/√fan_in; taming leaves it).

Normalisation (`norm`):
  - 'batch' (default, taming's BatchNorm2d): normalise with the statistics of the *current* batch,
    over B, H, W per channel, with no running averages. taming keeps the discriminator in train
    mode throughout training, so every training forward pass uses batch statistics — this is what
    'batch' reproduces, without a mutable `batch_stats` collection in the train state. It differs
    from taming only in eval mode (taming then uses running averages; here logits still depend on
    the batch) and, under data parallelism, in that statistics are over the global batch (a jitted
    mean over a sharded batch axis is a cross-device reduction, i.e. synchronised BatchNorm), where
    taming's DDP uses per-device statistics. As in taming, convs followed by it have no bias.
  - 'group': GroupNorm with 32 groups (stateless, per example; channels must be multiples of 32).
  - 'none': no normalisation.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.nn import GroupNorm, check_group_norm

NORMS = ("batch", "group", "none")


def _normal(mean: float, stddev: float):
  def init(key, shape, dtype=jnp.float32):
    return mean + stddev * jax.random.normal(key, shape, dtype)
  return init


class BatchStatNorm(nn.Module):
  """Per-channel normalisation with the current batch's mean and (biased) variance over all but
  the last axis, then an affine `scale`, `bias`; torch BatchNorm2d in train mode without running
  statistics. Statistics are computed in float32."""
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", _normal(1.0, 0.02), (x.shape[-1],))
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x32, axis=axes)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes)
    return ((x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(self.dtype)


class NLayerDiscriminator(nn.Module):
  """PatchGAN discriminator; see the module docstring for layers, names and normalisation.

  Attributes:
    ndf: channels of the first conv; layer n has ndf·min(2^n, 8).
    n_layers: number of stride-2 convs (≥ 1); the patch (receptive field) grows with it.
    norm: 'batch' | 'group' | 'none'.
  """
  ndf: int = 64
  n_layers: int = 3
  norm: str = "batch"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B, H, W, C] → patch logits [B, h, w, 1]."""
    if self.norm not in NORMS:
      raise ValueError(f"NLayerDiscriminator.norm: {self.norm!r} is not one of {NORMS}.")
    if self.n_layers < 1:
      raise ValueError(f"NLayerDiscriminator.n_layers: {self.n_layers} must be ≥ 1.")

    def conv(features, stride, use_bias, name):
      return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                     use_bias=use_bias, kernel_init=_normal(0.0, 0.02), dtype=self.dtype, name=name)

    h = nn.leaky_relu(conv(self.ndf, 2, True, "conv_0")(x), 0.2)
    for n in range(1, self.n_layers + 1):
      features = self.ndf * min(2 ** n, 8)
      stride = 2 if n < self.n_layers else 1
      h = conv(features, stride, self.norm != "batch", f"conv_{n}")(h)
      h = nn.leaky_relu(self._norm(features, f"norm_{n}")(h), 0.2)
    return conv(1, 1, True, f"conv_{self.n_layers + 1}")(h)

  def _norm(self, features: int, name: str):
    if self.norm == "batch":
      return BatchStatNorm(dtype=self.dtype, name=name)
    if self.norm == "group":
      check_group_norm(features, 32, f"NLayerDiscriminator.ndf={self.ndf} ({name})")
      return GroupNorm(32, epsilon=1e-5, scale_init=_normal(1.0, 0.02), dtype=self.dtype, name=name)
    return lambda h: h
