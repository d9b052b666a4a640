"""First-stage autoencoders of latent diffusion: Encoder, Decoder, AutoencoderKL, VQModel (NHWC).

The encoder E maps an image x ∈ [-1, 1]^{H×W×C} to a latent z of shape [H/f, W/f, c], where the
downsampling factor f = 2^(len(ch_mult) − 1); the decoder D maps z back to an image (no tanh at
the end, as CompVis and diffusers). Two regularisations of z, as in the LDM paper:

- KL (`AutoencoderKL`): E predicts a diagonal Gaussian posterior q(z|x) (`DiagonalGaussian`),
  trained with a small KL to N(0, I).
- VQ (`VQModel`): E predicts a continuous z that `VectorQuantizer` snaps to its codebook. The
  quantizer is "absorbed by the decoder": `encode` returns the *pre-quantization* latent, which is
  what the diffusion model of stage 2 is trained on, and `decode` quantizes before decoding.
- none (`IdentityFirstStage`, model.kind='identity'): z = x, f = 1 — diffusion on the pixels
  themselves (the paper's LDM-1 baseline), with the same U-Net, trainer and sampler.

Architecture and numerics follow CompVis `ldm/modules/diffusionmodules/model.py`; parameter names
follow diffusers (`AutoencoderKL`, `VQModel`) so that weight converters are renaming tables:

    encoder/conv_in, encoder/down_blocks_{i}/{resnets_{j}, attentions_{j}, downsamplers_0},
    encoder/mid_block/{resnets_0, attentions_0, resnets_1}, encoder/conv_norm_out, encoder/conv_out,
    quant_conv, [quantize/embedding], post_quant_conv,
    decoder/conv_in, decoder/mid_block/..., decoder/up_blocks_{i}/{resnets_{j}, attentions_{j},
    upsamplers_0}, decoder/conv_norm_out, decoder/conv_out.

diffusers orders `up_blocks` from the deepest level (`up_blocks_0` works at the lowest resolution),
CompVis `decoder.up` from the shallowest; converters map `up.{n-1-i}` ↔ `up_blocks_{i}`. The last
layer of the decoder, whose gradients set the adaptive GAN weight of the stage-1 loss, is
`decoder/conv_out/kernel`.

`attn_resolutions` keeps the CompVis meaning: the side length, in pixels, of the feature maps
after which self-attention is added inside a level, counted from `resolution` (the training image
size, fixed by the config so that the parameter tree does not depend on the input size). diffusers'
VAEs have attention only in the mid block, i.e. `attn_resolutions=()`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from ldm_jax.nn import (AttentionConfig, Conv1x1, Downsample, GroupNorm, ResnetBlock, SpatialSelfAttention,
                        Upsample, check_group_norm, check_implementation)

NUM_GROUPS = 32
EPSILON = 1e-6
KINDS = ("kl", "vq", "identity")


def _conv(features: int, kernel: int, dtype, name: str) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), padding=kernel // 2, dtype=dtype, name=name)


class _ResnetBlock(ResnetBlock):
  """ResnetBlock with `deterministic` positional, so that `nn.remat` can mark it static."""

  def __call__(self, x, deterministic):  # pylint: disable=arguments-differ
    return super().__call__(x, deterministic=deterministic)


class _Blocks(nn.Module):
  """Fields of a block of the encoder or decoder, and its ResnetBlock and self-attention layers;
  with `remat` their activations are recomputed in the backward pass instead of stored (same
  parameters, less memory)."""
  dropout: float
  attention_config: AttentionConfig
  dtype: Any
  remat: bool
  num_groups: int

  def resnet(self, name: str, features: int | None = None) -> nn.Module:
    block = nn.remat(_ResnetBlock, static_argnums=(2,)) if self.remat else _ResnetBlock
    return block(features, num_groups=self.num_groups, epsilon=EPSILON, dropout=self.dropout, dtype=self.dtype,
                 name=name)

  def attention(self, name: str) -> nn.Module:
    attention = nn.remat(SpatialSelfAttention) if self.remat else SpatialSelfAttention
    return attention(self.num_groups, EPSILON, self.attention_config, dtype=self.dtype, name=name)


class _Level(_Blocks):
  """One resolution level: `num_layers` ResnetBlocks (each optionally followed by attention) and
  an optional resampler; diffusers' `DownEncoderBlock2D` / `UpDecoderBlock2D` (Attn* variants)."""
  out_channels: int
  num_layers: int
  add_attention: bool
  resample: str | None  # None | 'down' | 'up'

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    for j in range(self.num_layers):
      x = self.resnet(f"resnets_{j}", self.out_channels)(x, deterministic)
      if self.add_attention:
        x = self.attention(f"attentions_{j}")(x)
    if self.resample == "down":
      x = Downsample(self.out_channels, padding="asymmetric", dtype=self.dtype, name="downsamplers_0")(x)
    elif self.resample == "up":
      x = Upsample(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
    return x


class _MidBlock(_Blocks):
  """ResnetBlock → self-attention → ResnetBlock at the lowest resolution (diffusers `UNetMidBlock2D`)."""

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    x = self.resnet("resnets_0")(x, deterministic)
    x = self.attention("attentions_0")(x)
    return self.resnet("resnets_1")(x, deterministic)


def _out(x: jax.Array, features: int, dtype, num_groups: int) -> jax.Array:
  x = GroupNorm(num_groups, epsilon=EPSILON, dtype=dtype, name="conv_norm_out")(x)
  return _conv(features, 3, dtype, "conv_out")(nn.silu(x))


class _CoderFields(nn.Module):
  """Hyperparameters shared by `Encoder`, `Decoder` and both autoencoders (see `Encoder`)."""
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: tuple[int, ...] = ()
  resolution: int = 256
  dropout: float = 0.0
  attention: str = "auto"
  query_chunk_size: int | None = None
  dtype: Any = jnp.float32
  remat: bool = False
  num_groups: int = NUM_GROUPS

  def _coder_fields(self) -> dict[str, Any]:
    return dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                attn_resolutions=tuple(self.attn_resolutions), resolution=self.resolution,
                dropout=self.dropout, attention=self.attention, query_chunk_size=self.query_chunk_size,
                dtype=self.dtype, remat=self.remat, num_groups=self.num_groups)

  def _block_fields(self) -> dict[str, Any]:
    return dict(dropout=self.dropout, attention_config=AttentionConfig(self.attention, self.query_chunk_size),
                dtype=self.dtype, remat=self.remat, num_groups=self.num_groups)

  def _level(self, i: int, num_layers: int, res: int, resample: str | None, name: str) -> _Level:
    """Level i (ch·ch_mult[i] channels) working at `res` pixels of the training resolution."""
    return _Level(out_channels=self.ch * self.ch_mult[i], num_layers=num_layers,
                  add_attention=res in self.attn_resolutions, resample=resample, name=name,
                  **self._block_fields())

  def _mid_block(self) -> _MidBlock:
    return _MidBlock(name="mid_block", **self._block_fields())


class Encoder(_CoderFields):
  """x [B, H, W, in_channels] → [B, H/f, W/f, z_channels (×2 if double_z)], f = 2^(len(ch_mult)−1).

  Attributes:
    ch: base channels; level i has ch·ch_mult[i] channels (multiples of the 32 GroupNorm groups).
    ch_mult: channel multiplier per resolution level.
    num_res_blocks: ResnetBlocks per level.
    attn_resolutions: feature-map side lengths (pixels, counted from `resolution`) whose levels get
      self-attention after every ResnetBlock.
    resolution: training image side length; only places the attention layers.
    in_channels: image channels.
    z_channels: latent channels; `double_z` doubles them for the mean and log-variance of q(z|x).
    dropout: dropout rate inside the ResnetBlocks.
    attention: attention implementation ('auto', 'xla', 'blocked', …; see `ldm_jax.nn.attention`).
    query_chunk_size: queries per step of the 'xla' attention (see `dot_product_attention`).
    remat: rematerialize ResnetBlocks and attention in the backward pass (less memory).
  """
  in_channels: int = 3
  z_channels: int = 4
  double_z: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    h = _conv(self.ch, 3, self.dtype, "conv_in")(x)
    res = self.resolution
    for i in range(len(self.ch_mult)):
      last = i == len(self.ch_mult) - 1
      h = self._level(i, self.num_res_blocks, res, None if last else "down", f"down_blocks_{i}")(h, deterministic)
      if not last:
        res //= 2
    h = self._mid_block()(h, deterministic)
    return _out(h, 2 * self.z_channels if self.double_z else self.z_channels, self.dtype, self.num_groups)


class Decoder(_CoderFields):
  """z [B, h, w, c] → x [B, h·f, w·f, out_ch]; the mirror of `Encoder` with num_res_blocks + 1
  ResnetBlocks per level. `up_blocks_0` is the deepest level (diffusers order). See `Encoder` for
  the attributes."""
  out_ch: int = 3

  @nn.compact
  def __call__(self, z: jax.Array, *, deterministic: bool = True) -> jax.Array:
    levels = len(self.ch_mult)
    h = _conv(self.ch * self.ch_mult[-1], 3, self.dtype, "conv_in")(z)
    h = self._mid_block()(h, deterministic)
    res = self.resolution // 2 ** (levels - 1)
    for k, i in enumerate(reversed(range(levels))):
      h = self._level(i, self.num_res_blocks + 1, res, "up" if i else None, f"up_blocks_{k}")(h, deterministic)
      if i:
        res *= 2
    return _out(h, self.out_ch, self.dtype, self.num_groups)


@struct.dataclass
class DiagonalGaussian:
  """q(z|x) = N(mean, diag(exp(logvar))), per latent element; a pytree, so jit can return it.

  Build it with `from_moments`, which clamps logvar to [−30, 20] as CompVis does (keeps exp()
  finite in float32). All reductions sum over H, W, C and return one value per example [B].
  """
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
    """moments: [B, h, w, 2c], mean in the first c channels, logvar in the last c."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    """z = mean + std·ε, ε ~ N(0, I) (reparameterised, differentiable in mean and logvar)."""
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self, other: DiagonalGaussian | None = None) -> jax.Array:
    """KL(self ‖ other) → [B]; other=None is N(0, I): ½ Σ (μ² + σ² − 1 − log σ²)."""
    if other is None:
      terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
    else:
      terms = (jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0
               - self.logvar + other.logvar)
    return 0.5 * jnp.sum(terms, axis=(1, 2, 3))

  def nll(self, x: jax.Array) -> jax.Array:
    """−log q(x) → [B]: ½ Σ (log 2π + logvar + (x − mean)²/var)."""
    return 0.5 * jnp.sum(jnp.log(2.0 * jnp.pi) + self.logvar + jnp.square(x - self.mean) / self.var,
                         axis=(1, 2, 3))


class _AutoencoderFields(_CoderFields):
  """Hyperparameters shared by both autoencoders (CompVis `ddconfig`)."""
  embed_dim: int = 4
  in_channels: int = 3
  out_ch: int | None = None
  z_channels: int = 4

  def _coders(self, double_z: bool) -> tuple[Encoder, Decoder]:
    return (Encoder(in_channels=self.in_channels, z_channels=self.z_channels, double_z=double_z,
                    name="encoder", **self._coder_fields()),
            Decoder(out_ch=self.out_ch or self.in_channels, name="decoder", **self._coder_fields()))


class AutoencoderKL(_AutoencoderFields):
  """KL-regularised autoencoder (CompVis `AutoencoderKL`, diffusers `AutoencoderKL`).

  Encoder (double_z) → `quant_conv` 1×1 → 2·embed_dim moments → `DiagonalGaussian`;
  z [B, H/f, W/f, embed_dim] → `post_quant_conv` 1×1 → Decoder.

  Attributes:
    embed_dim: latent channels c (CompVis name; diffusers `latent_channels`). Other fields: see
      `Encoder`; `out_ch` defaults to `in_channels`.

  Randomness: dropout uses the 'dropout' rng stream; posterior sampling in `__call__` uses `rng`,
  or the 'sample' stream when `rng` is None.
  """

  def setup(self):
    self.encoder, self.decoder = self._coders(double_z=True)
    self.quant_conv = Conv1x1(2 * self.embed_dim, dtype=self.dtype)
    self.post_quant_conv = Conv1x1(self.z_channels, dtype=self.dtype)

  def encode(self, x: jax.Array, *, deterministic: bool = True) -> DiagonalGaussian:
    """x [B, H, W, in_channels] in [-1, 1] → q(z|x) over z [B, H/f, W/f, embed_dim] (float32)."""
    moments = self.quant_conv(self.encoder(x, deterministic=deterministic))
    return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

  def decode(self, z: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """z [B, h, w, embed_dim] → x [B, h·f, w·f, out_ch]."""
    return self.decoder(self.post_quant_conv(z), deterministic=deterministic)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None, *, sample_posterior: bool = True,
               deterministic: bool = True) -> tuple[jax.Array, DiagonalGaussian]:
    """x → (x_rec, posterior); z is a posterior sample, or its mode if not `sample_posterior`."""
    posterior = self.encode(x, deterministic=deterministic)
    if sample_posterior:
      z = posterior.sample(self.make_rng("sample") if rng is None else rng)
    else:
      z = posterior.mode()
    return self.decode(z, deterministic=deterministic), posterior

  def init_all(self, x: jax.Array) -> jax.Array:
    """Touches every parameter with only the 'params' rng: `model.init(key, x, method='init_all')`."""
    return self.decode(self.encode(x).mode())


class VectorQuantizer(nn.Module):
  """Nearest-neighbour vector quantisation with a learned codebook (taming `VectorQuantizer2`).

  z [B, h, w, embed_dim] → (z_q, loss, info):
    - index k* = argmin_k ‖z − e_k‖², computed as ‖z‖² − 2 z·e_k + ‖e_k‖² (one matmul, no
      [N, K, D] difference tensor);
    - z_q = z + sg(e_k* − z): the straight-through estimator, forward value e_k*, gradient identity;
    - with c = mean ‖sg(e_k*) − z‖² (commitment, trains the encoder) and
      q = mean ‖e_k* − sg(z)‖² (codebook, trains the embeddings):
        legacy=True  (taming's default, used to train the LDM VQ models): loss = c + β·q
        legacy=False (the VQ-VAE paper; taming's fix):                   loss = β·c + q
      The two have the same value, (1 + β)·mean‖e_k* − z‖²; only the gradients differ.
    - info: `indices` [B, h, w] int32, `perplexity` exp(H(code frequencies)) of this batch
      (= n when n codes are used equally), `usage` fraction of the n_embed codes used in the batch.

  Computed in float32 whatever the input dtype. Codebook parameter `embedding` [n_embed, embed_dim]
  (diffusers/CompVis `quantize.embedding.weight`), initialised uniform(−1/n_embed, 1/n_embed).
  """
  n_embed: int
  embed_dim: int
  beta: float = 0.25
  legacy: bool = True

  @nn.compact
  def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    bound = 1.0 / self.n_embed
    codebook = self.param(
        "embedding", lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound),
        (self.n_embed, self.embed_dim))
    z = z.astype(jnp.float32)
    flat = z.reshape(-1, self.embed_dim)
    distances = (jnp.sum(jnp.square(flat), axis=1, keepdims=True) - 2.0 * flat @ codebook.T
                 + jnp.sum(jnp.square(codebook), axis=1))
    indices = jnp.argmin(distances, axis=1).astype(jnp.int32)
    z_q = jnp.take(codebook, indices, axis=0).reshape(z.shape)

    commitment = jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z))
    codebook_loss = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(z)))
    if self.legacy:
      loss = commitment + self.beta * codebook_loss
    else:
      loss = self.beta * commitment + codebook_loss
    z_q = z + jax.lax.stop_gradient(z_q - z)

    counts = jnp.bincount(indices, length=self.n_embed)
    probs = counts / indices.shape[0]
    info = {
        "indices": indices.reshape(z.shape[:-1]),
        "perplexity": jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10))),
        "usage": jnp.mean((counts > 0).astype(jnp.float32)),
    }
    return z_q, loss, info


class VQModel(_AutoencoderFields):
  """VQ-regularised autoencoder (CompVis `VQModelInterface`, diffusers `VQModel`).

  Encoder → `quant_conv` 1×1 → h [B, H/f, W/f, embed_dim] (pre-quantization: what `encode` returns
  and stage 2 trains on) → `quantize` → `post_quant_conv` 1×1 → Decoder.

  Attributes:
    embed_dim: codebook vector size = latent channels c.
    n_embed: codebook size.
    beta, legacy_loss: `VectorQuantizer` loss weighting (taming defaults 0.25, legacy).
    Other fields: see `Encoder`.
  """
  n_embed: int = 8192
  beta: float = 0.25
  legacy_loss: bool = True

  def setup(self):
    self.encoder, self.decoder = self._coders(double_z=False)
    self.quant_conv = Conv1x1(self.embed_dim, dtype=self.dtype)
    self.quantize = VectorQuantizer(self.n_embed, self.embed_dim, self.beta, self.legacy_loss)
    self.post_quant_conv = Conv1x1(self.z_channels, dtype=self.dtype)

  def encode(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """x [B, H, W, in_channels] → pre-quantization h [B, H/f, W/f, embed_dim]."""
    return self.quant_conv(self.encoder(x, deterministic=deterministic))

  def decode(self, h: jax.Array, *, force_not_quantize: bool = False,
             deterministic: bool = True) -> jax.Array:
    """h [B, h, w, embed_dim] → x; h is quantized first unless `force_not_quantize`."""
    if not force_not_quantize:
      h, _, _ = self.quantize(h)
    return self.decoder(self.post_quant_conv(h), deterministic=deterministic)

  def __call__(self, x: jax.Array, *, deterministic: bool = True
               ) -> tuple[jax.Array, jax.Array, dict[str, jax.Array]]:
    """x → (x_rec, codebook loss, quantizer info); see `VectorQuantizer`."""
    z_q, qloss, info = self.quantize(self.encode(x, deterministic=deterministic))
    x_rec = self.decoder(self.post_quant_conv(z_q), deterministic=deterministic)
    return x_rec, qloss, info

  def init_all(self, x: jax.Array) -> jax.Array:
    """Touches every parameter: `model.init(key, x, method='init_all')`."""
    return self(x)[0]


class IdentityFirstStage(nn.Module):
  """No autoencoder: `encode` and `decode` return their input (CompVis `IdentityFirstStage`).

  A stage-2 run on it diffuses the pixels in [-1, 1] (f = 1, c = the image channels): the
  paper's pixel-space baseline LDM-1, trained and sampled by the same code as the latent models.
  No parameters; `train_autoencoder.py` only writes the run's config and an empty checkpoint.
  """
  in_channels: int = 3
  ch_mult: tuple[int, ...] = (1,)  # f = 1, read by tiled decoding
  dtype: Any = jnp.float32  # the other first stages' field (`load_autoencoder(dtype=)`); nothing computes

  def encode(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """x [B, H, W, in_channels] → z = x (float32)."""
    del deterministic
    return x.astype(jnp.float32)

  def decode(self, z: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """z → x = z."""
    del deterministic
    return z

  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
    return self.decode(self.encode(x))

  def init_all(self, x: jax.Array) -> jax.Array:
    return self(x)


# ----------------------------------------------------------------------------------------------
# Config helpers. `model_cfg` is the `model` ConfigDict (or any mapping) of an autoencoder config.

_REQUIRED = ("kind", "embed_dim", "ch", "ch_mult", "num_res_blocks", "attn_resolutions",
             "z_channels", "dropout", "in_channels", "resolution")


def downsampling_factor(model_cfg: Mapping[str, Any]) -> int:
  """f = 2^(len(model.ch_mult) − 1): one Downsample between consecutive levels."""
  return 2 ** (len(model_cfg["ch_mult"]) - 1)


def _image_hw(image_size: int | Sequence[int]) -> tuple[int, int]:
  return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def _check_image_size(model_cfg: Mapping[str, Any], image_size: int | Sequence[int]) -> None:
  f = downsampling_factor(model_cfg)
  ch_mult = tuple(model_cfg["ch_mult"])
  for side in set(_image_hw(image_size)):
    if side < f:
      raise ValueError(f"data.image_size: {side} is smaller than the downsampling factor f={f} of "
                       f"model.ch_mult={ch_mult} (too deep); use fewer levels in model.ch_mult.")
    if side % f:
      raise ValueError(f"data.image_size: {side} is not divisible by the downsampling factor f={f} "
                       f"of model.ch_mult={ch_mult}; use a multiple of {f} or change model.ch_mult.")


def latent_shape(model_cfg: Mapping[str, Any], image_size: int | Sequence[int]) -> tuple[int, int, int]:
  """(h, w, c) of the latent z of an image of side `image_size` (int, or (H, W))."""
  _check_image_size(model_cfg, image_size)
  f = downsampling_factor(model_cfg)
  height, width = _image_hw(image_size)
  return height // f, width // f, int(model_cfg["embed_dim"])


def _positive_int(model_cfg, key: str, minimum: int = 1) -> int:
  value = model_cfg[key]
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"model.{key}: {value!r} must be an integer ≥ {minimum}.")
  return value


def validate_autoencoder_config(model_cfg: Mapping[str, Any], image_size: int | Sequence[int]) -> None:
  """Raises ValueError naming the offending key, before anything is built or compiled."""
  kind = model_cfg.get("kind")
  if kind not in KINDS:
    raise ValueError(f"model.kind: {kind!r} is not one of {', '.join(map(repr, KINDS))}.")
  if kind == "identity":
    _validate_identity(model_cfg, image_size)
    return
  for key in _REQUIRED + (("n_embed",) if kind == "vq" else ()):
    if key not in model_cfg:
      raise ValueError(f"model.{key}: missing; a '{kind}' autoencoder needs it.")
  for key in ("embed_dim", "ch", "z_channels", "in_channels", "resolution", "num_res_blocks"):
    _positive_int(model_cfg, key)
  if kind == "vq":
    _positive_int(model_cfg, "n_embed", minimum=2)
  if not 0.0 <= model_cfg["dropout"] < 1.0:
    raise ValueError(f"model.dropout: {model_cfg['dropout']!r} must be in [0, 1).")
  check_implementation(model_cfg.get("attention", "auto"), "model.attention")

  ch_mult = tuple(model_cfg["ch_mult"])
  if not ch_mult or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in ch_mult):
    raise ValueError(f"model.ch_mult: {ch_mult} must be a non-empty tuple of positive integers, one "
                     f"per resolution level; f = 2^(len − 1).")
  ch = model_cfg["ch"]
  # conv_in feeds `ch` channels to the first GroupNorm, level i runs at ch·ch_mult[i].
  num_groups = _positive_int(model_cfg, "num_groups") if "num_groups" in model_cfg else NUM_GROUPS
  for i, mult in ((None, 1),) + tuple(enumerate(ch_mult)):
    where = "model.ch" if i is None else f"model.ch={ch} × model.ch_mult[{i}]={mult}"
    check_group_norm(ch * mult, num_groups, where)

  _check_image_size(model_cfg, image_size)
  f = downsampling_factor(model_cfg)
  resolution = model_cfg["resolution"]
  if resolution % f:
    raise ValueError(f"model.resolution: {resolution} is not divisible by the downsampling factor "
                     f"f={f} of model.ch_mult={ch_mult}.")
  reached = tuple(resolution // 2 ** i for i in range(len(ch_mult)))
  for res in tuple(model_cfg["attn_resolutions"]):
    if res not in reached:
      raise ValueError(f"model.attn_resolutions: {res} is never reached; with model.resolution="
                       f"{resolution} and model.ch_mult={ch_mult} the levels run at {reached} px.")


def _validate_identity(model_cfg: Mapping[str, Any], image_size: int | Sequence[int]) -> None:
  """model.kind='identity': z = x, so f = 1 (ch_mult (1,)) and c = the image's channels."""
  for key in ("in_channels", "embed_dim", "ch_mult"):
    if key not in model_cfg:
      raise ValueError(f"model.{key}: missing; an 'identity' first stage needs it.")
  channels = _positive_int(model_cfg, "in_channels")
  if tuple(model_cfg["ch_mult"]) != (1,):
    raise ValueError(f"model.ch_mult: {tuple(model_cfg['ch_mult'])}, but an 'identity' first stage does not "
                     "downsample (f = 1); set model.ch_mult=(1,).")
  if model_cfg["embed_dim"] != channels:
    raise ValueError(f"model.embed_dim: {model_cfg['embed_dim']!r}, but an 'identity' first stage's latent is the "
                     f"image itself; set it to model.in_channels = {channels}.")
  _check_image_size(model_cfg, image_size)


def make_autoencoder(model_cfg: Mapping[str, Any]) -> AutoencoderKL | VQModel | IdentityFirstStage:
  """Builds `AutoencoderKL` (model.kind='kl'), `VQModel` ('vq') or `IdentityFirstStage` ('identity').

  Required keys: see `validate_autoencoder_config` (call it first; this only builds). Optional keys:
  `attention` ('auto'), `query_chunk_size` (None), `dtype` ('float32'; computation dtype, parameters stay float32),
  `remat` (False; recompute block activations in the backward pass), `num_groups` (32, GroupNorm groups) and,
  for 'vq', `beta` (0.25) and `legacy_loss` (True); see `VectorQuantizer`.
  """
  kind = model_cfg["kind"]
  if kind not in KINDS:
    raise ValueError(f"model.kind: {kind!r} is not one of {', '.join(map(repr, KINDS))}.")
  if kind == "identity":
    return IdentityFirstStage(in_channels=model_cfg["in_channels"])
  fields = dict(
      embed_dim=model_cfg["embed_dim"], ch=model_cfg["ch"], ch_mult=tuple(model_cfg["ch_mult"]),
      num_res_blocks=model_cfg["num_res_blocks"],
      attn_resolutions=tuple(model_cfg["attn_resolutions"]), resolution=model_cfg["resolution"],
      in_channels=model_cfg["in_channels"], z_channels=model_cfg["z_channels"],
      dropout=float(model_cfg["dropout"]), attention=model_cfg.get("attention", "auto"),
      query_chunk_size=model_cfg.get("query_chunk_size"),
      dtype=jnp.dtype(model_cfg.get("dtype", "float32")), remat=bool(model_cfg.get("remat", False)),
      num_groups=int(model_cfg.get("num_groups", NUM_GROUPS)))
  if kind == "kl":
    return AutoencoderKL(**fields)
  return VQModel(n_embed=model_cfg["n_embed"], beta=float(model_cfg.get("beta", 0.25)),
                 legacy_loss=bool(model_cfg.get("legacy_loss", True)), **fields)
