"""The denoising U-Net of latent diffusion, ε_θ(z_t, t, τ(y)) (NHWC).

Structure and numerics follow CompVis `openaimodel.UNetModel` (with `use_spatial_transformer`) and
diffusers `UNet2DConditionModel`; parameter paths follow diffusers so that weight converters are
renaming tables:

    time_embedding/{linear_1, linear_2}       class_embedding (num_classes + 1 rows)
    add_embedding/{linear_1, linear_2}        (addition_embed_type='text_time', SDXL)
    conv_in
    down_blocks_{i}/{resnets_{j}, attentions_{j}, downsamplers_0}      i = level, shallowest first
    mid_block/{resnets_0, attentions_0, resnets_1}
    up_blocks_{i}/{resnets_{j}, attentions_{j}, upsamplers_0}          i = 0 is the deepest level
    conv_norm_out, conv_out

An attention module is a `SpatialTransformer` (diffusers `Transformer2DModel`):
`norm`, `proj_in`, `transformer_blocks_{k}/{norm1, attn1, norm2, attn2, norm3, ff/{net_0/proj, net_2}}`,
`proj_out`, with `attn*/{to_q, to_k, to_v, to_out_0}`. With `use_spatial_transformer=False` it is
the plain multi-head self-attention of the paper's unconditional LDMs (openaimodel
`AttentionBlock`, diffusers `Attention` with `group_norm`): `group_norm`, `to_q`, `to_k`, `to_v`,
`to_out_0`. openaimodel stores that block's q, k, v as one `qkv` conv whose output channels
are ordered per head (q, k, v of head 0, then head 1, …); a converter must de-interleave them.

Level l has `model_channels · channel_mult[l]` channels and downsampling factor ds = 2^l.
`attention_resolutions` lists the factors ds that get attention (CompVis semantics: SD 1.x uses
(4, 2, 1) with four levels, so the deepest level, ds 8, has none). The middle block always has one.
`transformer_depth` is one depth for every SpatialTransformer, or one per level (SDXL base: 1, 2,
10 — level 0 has no attention there, so its entry is unused); the middle block takes the deepest
level's, as diffusers' `transformer_layers_per_block[-1]`.

SDXL's micro-conditioning (`addition_embed_type='text_time'`, diffusers' name): the `time_ids`
[B, n] (original size, crop offsets, then target size or aesthetic score) get the sinusoidal
features of `addition_time_embed_dim` channels each, are concatenated after the pooled text
embedding `text_embeds` [B, D], and `add_embedding` (linear_1 → SiLU → linear_2) lifts the
`addition_embed_dim` = D + n · addition_time_embed_dim features to the time embedding's width,
to which they are added (sgm's `label_emb` on its `vector` condition).
`addition_embed_type='text'` adds only the pooled text embedding `text_embeds` [B, D] that way
(Imagen: a pooled text embedding added to the timestep embedding; the text encoders trained from
scratch give the mean of their output tokens with `cond.pooled`); `addition_embed_dim` = D.

Numerics that loaded weights depend on: GroupNorm eps 1e-5 in ResnetBlocks, the attention block's
norm and `conv_norm_out`, but 1e-6 in the SpatialTransformer's `norm`; LayerNorm eps 1e-5; GEGLU
with the exact (erf) GELU; attention scale 1/√head_dim; stride-2 3×3 downsampling conv padded by
one pixel on every side. As in CompVis, `proj_out` of attention blocks and `conv_out` start at
zero, so the untrained network outputs zeros.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from ldm_jax.nn.activations import gelu
from ldm_jax.nn.attention import AttentionConfig, check_implementation, dot_product_attention
from ldm_jax.nn.conv import Conv1x1
from ldm_jax.nn.embeddings import TimestepEmbedding, timestep_embedding
from ldm_jax.nn.layers import Downsample, GroupNorm, ResnetBlock, Upsample, check_group_norm

_RESNET_EPS = 1e-5  # openaimodel GroupNorm32 / diffusers resnet_eps
_TRANSFORMER_NORM_EPS = 1e-6  # CompVis `Normalize`, diffusers Transformer2DModel
_LAYER_NORM_EPS = 1e-5  # torch nn.LayerNorm default, used by both references


def attention_heads(channels: int, num_heads: int, num_head_channels: int) -> tuple[int, int]:
  """(heads, head_dim) of an attention layer over `channels`.

  `num_head_channels` = -1 splits the channels into `num_heads` heads; otherwise every head has
  `num_head_channels` channels (SD 2.x, the paper's LDMs).
  """
  if num_head_channels == -1:
    if num_heads <= 0 or channels % num_heads:
      raise ValueError(f"model.num_heads: {num_heads} does not divide {channels} channels.")
    return num_heads, channels // num_heads
  if num_head_channels <= 0 or channels % num_head_channels:
    raise ValueError(f"model.num_head_channels: {num_head_channels} does not divide {channels} channels.")
  return channels // num_head_channels, num_head_channels


def repeat_rows(a: jax.Array, n: int) -> jax.Array:
  """`a` [B, …] with each row repeated k times in place, n = k·B rows (row i·k + j is row i; k = 1:
  `a` itself). On a mesh that splits the batch every device keeps its own rows: no communication."""
  if a.shape[0] == n:
    return a
  return jnp.repeat(a, n // a.shape[0], axis=0)


def _multi_head(q, k, v, num_heads, attention: AttentionConfig):
  """q: [B, Lq, H·D], k, v: [B, Lk, H·D] → [B, Lq, H·D]; head h owns channels h·D … (h+1)·D − 1."""
  split = lambda a: a.reshape(*a.shape[:2], num_heads, a.shape[-1] // num_heads)
  out = dot_product_attention(split(q), split(k), split(v), **dataclasses.asdict(attention))
  return out.reshape(*out.shape[:2], -1)


class Attention(nn.Module):
  """Multi-head attention of `x` to `context` (to itself when `context` is None).

  diffusers `Attention` / CompVis `CrossAttention`: `to_q`, `to_k`, `to_v` without bias,
  `to_out_0` with bias; softmax(q kᵀ/√head_dim) v per head.
  """
  num_heads: int
  head_dim: int
  attention: AttentionConfig = AttentionConfig()
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    """x: [B, L, C], context: [B, Lc, Cc] or None → [B, L, C]."""
    context = x if context is None else context
    inner = self.num_heads * self.head_dim
    dense = lambda name: nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)
    q, k, v = dense("to_q")(x), dense("to_k")(context), dense("to_v")(context)
    out = _multi_head(q, k, v, self.num_heads, self.attention)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
  """`proj` to 2·features, then value · GELU(gate) (exact GELU, as torch's F.gelu)."""
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    value, gate = jnp.split(nn.Dense(2 * self.features, dtype=self.dtype, name="proj")(x), 2, axis=-1)
    return value * gelu(gate)


class FeedForward(nn.Module):
  """`net_0` (GEGLU to 4·C) → `net_2` (linear back to C); diffusers' `net_1` is a parameterless dropout."""
  mult: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = GEGLU(self.mult * x.shape[-1], dtype=self.dtype, name="net_0")(x)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """Pre-LayerNorm self-attention, cross-attention and GEGLU feed-forward, each residual.

  `attn2` attends to `context`, or to the tokens themselves when `context` is None.
  """
  num_heads: int
  head_dim: int
  attention: AttentionConfig = AttentionConfig()
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    """x: [B, L, C], context: [B, Lc, Cc] or None → [B, L, C]."""
    norm = lambda name: nn.LayerNorm(epsilon=_LAYER_NORM_EPS, dtype=self.dtype, name=name)
    attn = lambda name: Attention(self.num_heads, self.head_dim, self.attention, self.dtype, name=name)
    x = x + attn("attn1")(norm("norm1")(x))
    if context is not None:  # the first condition-dependent layer: one row per (input, condition)
      x = repeat_rows(x, context.shape[0])
    x = x + attn("attn2")(norm("norm2")(x), context)
    return x + FeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x))


class SpatialTransformer(nn.Module):
  """A transformer over the pixels of a feature map, with a residual (diffusers `Transformer2DModel`).

  GroupNorm (eps 1e-6) → `proj_in` (1×1 conv, or Dense with `use_linear_projection`) →
  `depth` × BasicTransformerBlock → `proj_out` → + input.
  """
  num_heads: int
  head_dim: int
  depth: int = 1
  use_linear_projection: bool = False
  num_groups: int = 32
  attention: AttentionConfig = AttentionConfig()
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    """x: [B, H, W, C], context: [B, Lc, Cc] or None → [B, H, W, C]."""
    b, height, width, channels = x.shape
    inner = self.num_heads * self.head_dim
    h = GroupNorm(self.num_groups, epsilon=_TRANSFORMER_NORM_EPS, dtype=self.dtype, name="norm")(x)
    if self.use_linear_projection:
      h = nn.Dense(inner, dtype=self.dtype, name="proj_in")(h.reshape(b, height * width, channels))
    else:
      h = Conv1x1(inner, dtype=self.dtype, name="proj_in")(h).reshape(b, height * width, inner)
    block_cls = nn.remat(BasicTransformerBlock) if self.remat else BasicTransformerBlock
    for k in range(self.depth):
      h = block_cls(self.num_heads, self.head_dim, self.attention, self.dtype,
                    name=f"transformer_blocks_{k}")(h, context)
    rows = h.shape[0]  # k·B when the blocks took the input to one row per condition
    if self.use_linear_projection:
      h = nn.Dense(channels, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="proj_out")(h)
      h = h.reshape(rows, height, width, channels)
    else:
      h = Conv1x1(channels, kernel_init=nn.initializers.zeros, dtype=self.dtype,
                  name="proj_out")(h.reshape(rows, height, width, inner))
    return repeat_rows(x, rows) + h


class AttentionBlock(nn.Module):
  """Multi-head self-attention over pixels without a transformer (openaimodel `AttentionBlock`).

  GroupNorm (eps 1e-5) → `to_q`, `to_k`, `to_v` (with bias) → attention → `to_out_0` → + input.
  Used by the paper's unconditional LDMs (`use_spatial_transformer=False`).
  """
  num_heads: int
  num_groups: int = 32
  attention: AttentionConfig = AttentionConfig()
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    """x: [B, H, W, C] → [B, H, W, C]; `context` must be None."""
    if context is not None:
      raise ValueError("AttentionBlock has no cross-attention; set model.use_spatial_transformer=True.")
    b, height, width, channels = x.shape
    h = GroupNorm(self.num_groups, epsilon=_RESNET_EPS, dtype=self.dtype, name="group_norm")(x)
    h = h.reshape(b, height * width, channels)
    q, k, v = (nn.Dense(channels, dtype=self.dtype, name=n)(h) for n in ("to_q", "to_k", "to_v"))
    h = _multi_head(q, k, v, self.num_heads, self.attention)
    h = nn.Dense(channels, kernel_init=nn.initializers.zeros, dtype=self.dtype, name="to_out_0")(h)
    return x + h.reshape(b, height, width, channels)


class _ResnetBlock(ResnetBlock):
  """ResnetBlock with `deterministic` positional, so that `nn.remat` can mark it static."""

  def __call__(self, x, temb, deterministic):  # pylint: disable=arguments-differ
    return super().__call__(x, repeat_rows(temb, x.shape[0]), deterministic=deterministic)


_RematResnetBlock = nn.remat(_ResnetBlock, static_argnums=(3,))


@dataclasses.dataclass(frozen=True)
class _Layers:
  """The U-Net-wide settings every block needs, and factories for its layers."""
  num_groups: int
  dropout: float
  use_scale_shift_norm: bool
  num_heads: int
  num_head_channels: int
  use_spatial_transformer: bool
  use_linear_projection: bool
  attention_config: AttentionConfig
  remat: bool
  dtype: Any

  def resnet(self, out_channels: int, name: str, resample: str | None = None) -> nn.Module:
    cls = _RematResnetBlock if self.remat else _ResnetBlock
    return cls(out_channels, num_groups=self.num_groups, epsilon=_RESNET_EPS, dropout=self.dropout,
               time_embedding_norm="scale_shift" if self.use_scale_shift_norm else "default",
               resample=resample, dtype=self.dtype, name=name)

  def attention(self, channels: int, depth: int, name: str) -> nn.Module:
    heads, head_dim = attention_heads(channels, self.num_heads, self.num_head_channels)
    if self.use_spatial_transformer:
      return SpatialTransformer(heads, head_dim, depth, self.use_linear_projection,
                                self.num_groups, self.attention_config, self.remat, self.dtype, name=name)
    return AttentionBlock(heads, self.num_groups, self.attention_config, self.dtype, name=name)


class _DownBlock(nn.Module):
  """`num_layers` × (ResnetBlock [+ attention]) [→ downsampler]; returns h and every skip."""
  layers: _Layers
  out_channels: int
  num_layers: int
  attention: bool
  depth: int
  downsample: bool
  resblock_updown: bool

  @nn.compact
  def __call__(self, h, temb, context, deterministic):
    skips = []
    for j in range(self.num_layers):
      h = self.layers.resnet(self.out_channels, f"resnets_{j}")(h, temb, deterministic)
      if self.attention:
        h = self.layers.attention(self.out_channels, self.depth, f"attentions_{j}")(h, context)
      skips.append(h)
    if self.downsample:
      if self.resblock_updown:
        h = self.layers.resnet(self.out_channels, "downsamplers_0", resample="down")(h, temb, deterministic)
      else:
        h = Downsample(self.out_channels, padding="symmetric", dtype=self.layers.dtype, name="downsamplers_0")(h)
      skips.append(h)
    return h, skips


class _MidBlock(nn.Module):
  layers: _Layers
  depth: int

  @nn.compact
  def __call__(self, h, temb, context, deterministic):
    channels = h.shape[-1]
    h = self.layers.resnet(channels, "resnets_0")(h, temb, deterministic)
    h = self.layers.attention(channels, self.depth, "attentions_0")(h, context)
    return self.layers.resnet(channels, "resnets_1")(h, temb, deterministic)


class _UpBlock(nn.Module):
  """`num_layers` × (concat skip → ResnetBlock [+ attention]) [→ upsampler]."""
  layers: _Layers
  out_channels: int
  num_layers: int
  attention: bool
  depth: int
  upsample: bool
  resblock_updown: bool

  @nn.compact
  def __call__(self, h, skips, temb, context, deterministic):
    skips = list(skips)
    for j in range(self.num_layers):
      h = jnp.concatenate([h, repeat_rows(skips.pop(), h.shape[0])], axis=-1)
      h = self.layers.resnet(self.out_channels, f"resnets_{j}")(h, temb, deterministic)
      if self.attention:
        h = self.layers.attention(self.out_channels, self.depth, f"attentions_{j}")(h, context)
    if self.upsample:
      if self.resblock_updown:
        h = self.layers.resnet(self.out_channels, "upsamplers_0", resample="up")(h, temb, deterministic)
      else:
        h = Upsample(self.out_channels, dtype=self.layers.dtype, name="upsamplers_0")(h)
    return h


class UNet(nn.Module):
  """ε_θ(x_t, t, context, y): the latent-diffusion U-Net. Defaults are the SD 1.x U-Net.

  Attributes:
    in_channels: input channels: latent channels plus any concat-conditioning channels.
    out_channels: output channels (the latent channels).
    model_channels: channels of level 0; the time embedding has 4× as many.
    channel_mult: per-level channel multipliers; len − 1 downsamplings.
    num_res_blocks: ResnetBlocks per level on the way down (one more on the way up).
    attention_resolutions: downsampling factors ds ∈ {1, 2, 4, …} whose levels get attention.
    num_heads: attention heads, used when `num_head_channels` is −1.
    num_head_channels: channels per head (−1: use `num_heads`).
    transformer_depth: BasicTransformerBlocks per SpatialTransformer: one number, or one per level.
    context_dim: channels of the cross-attention context; None = no cross-attention
      (the transformers' `attn2` then attends to the image tokens).
    use_spatial_transformer: SpatialTransformer attention (True) or openaimodel's AttentionBlock.
    use_linear_projection: Dense instead of 1×1 conv for proj_in/proj_out (SD 2.x).
    use_scale_shift_norm: the time embedding scales and shifts the second norm of each ResnetBlock.
    resblock_updown: resample with ResnetBlocks (avg-pool / nearest inside) instead of conv layers.
    num_classes: number of classes for a class embedding added to the time embedding, or None.
      The table has `num_classes + 1` rows: label `num_classes` is the null class that
      classifier-free guidance trains with and samples from.
    addition_embed_type: None, 'text_time' (SDXL: pooled text embedding + size/crop conditions
      → `add_embedding`, added to the time embedding) or 'text' (the pooled text embedding alone).
    addition_time_embed_dim: sinusoidal features per time id ('text_time').
    addition_embed_dim: input width of `add_embedding`: pooled text width + number of time ids ×
      addition_time_embed_dim (SDXL base 1280 + 6·256 = 2816, refiner 1280 + 5·256 = 2560); for
      'text' the pooled width.
    dropout: dropout in the ResnetBlocks.
    num_groups: GroupNorm groups.
    flip_sin_to_cos, freq_shift: see `ldm_jax.nn.embeddings.timestep_embedding`.
    attention: attention implementation, one of `ldm_jax.nn.attention.IMPLEMENTATIONS` ('auto':
      the fastest for the backend and shapes).
    query_chunk_size: queries per step of the 'xla' attention (see `dot_product_attention`).
    remat: rematerialize ResnetBlocks and transformer blocks in the backward pass (less memory).
  """
  in_channels: int = 4
  out_channels: int = 4
  model_channels: int = 320
  channel_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (4, 2, 1)
  num_heads: int = 8
  num_head_channels: int = -1
  transformer_depth: int | Sequence[int] = 1
  context_dim: int | None = 768
  use_spatial_transformer: bool = True
  use_linear_projection: bool = False
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  num_classes: int | None = None
  addition_embed_type: str | None = None
  addition_time_embed_dim: int = 256
  addition_embed_dim: int | None = None
  dropout: float = 0.0
  num_groups: int = 32
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  attention: str = "auto"
  query_chunk_size: int | None = None
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  @property
  def null_class(self) -> int:
    """The label of the null class (classifier-free guidance's unconditional branch)."""
    if self.num_classes is None:
      raise ValueError("model.num_classes: the U-Net is not class-conditional, it has no null class.")
    return self.num_classes

  def depths(self) -> tuple[int, ...]:
    """Transformer blocks per SpatialTransformer of each level (the middle block takes the last)."""
    return level_depths(self.transformer_depth, len(self.channel_mult))

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array | None = None,
               y: jax.Array | None = None, *, text_embeds: jax.Array | None = None,
               time_ids: jax.Array | None = None, deterministic: bool = True) -> jax.Array:
    """Predicts eps, x0 or v (per the training parameterization) for a noisy latent.

    The conditions may hold k·B rows for the B inputs: each input is then evaluated under k
    conditions, output row i·k + j being input i under condition row i·k + j (classifier-free
    guidance: k = 2, each input's conditional then unconditional condition). With a cross-attention
    context as the only condition, what precedes the first cross-attention (conv_in, the layers
    before it, that block's self-attention) is computed once per input, not k times; labels and
    pooled embeddings enter the time embedding, so with them every layer runs on k·B rows.

    Args:
      x: [B, H, W, in_channels] noisy latents (concatenated with concat conditioning).
      t: [B] timesteps, integer or float (a scalar is broadcast).
      context: [N, L, context_dim] cross-attention context, required iff `context_dim` is set;
        N = k·B (k ≥ 1), as every condition.
      y: [N] integer labels in [0, num_classes] (num_classes = null), required iff `num_classes` is set.
      text_embeds: [N, D] pooled text embedding, time_ids: [N, n] size/crop conditions; both
        required iff `addition_embed_type='text_time'`, text_embeds alone iff 'text'.
      deterministic: disables dropout; training passes False and a 'dropout' rng.

    Returns:
      [N, H, W, out_channels].
    """
    rows = self._check_inputs(x, context, y, text_embeds, time_ids)
    depths = self.depths()
    layers = _Layers(self.num_groups, self.dropout, self.use_scale_shift_norm, self.num_heads,
                     self.num_head_channels, self.use_spatial_transformer,
                     self.use_linear_projection, AttentionConfig(self.attention, self.query_chunk_size),
                     self.remat, self.dtype)
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    if y is not None or text_embeds is not None:  # conditions of the time embedding: all layers on N rows
      x, t = repeat_rows(x, rows), repeat_rows(t, rows)
    temb = timestep_embedding(t, self.model_channels, flip_sin_to_cos=self.flip_sin_to_cos,
                              freq_shift=self.freq_shift)
    temb = TimestepEmbedding(4 * self.model_channels, dtype=self.dtype, name="time_embedding")(temb)
    if self.num_classes is not None:
      temb = temb + nn.Embed(self.num_classes + 1, 4 * self.model_channels, dtype=self.dtype,
                             name="class_embedding")(y)
    if self.addition_embed_type == "text_time":
      b, n = time_ids.shape
      time_features = timestep_embedding(time_ids.reshape(-1), self.addition_time_embed_dim,
                                         flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift)
      add = jnp.concatenate([text_embeds.astype(jnp.float32), time_features.reshape(b, n * self.addition_time_embed_dim)],
                            axis=-1)
      temb = temb + TimestepEmbedding(4 * self.model_channels, dtype=self.dtype, name="add_embedding")(add)
    elif self.addition_embed_type == "text":
      temb = temb + TimestepEmbedding(4 * self.model_channels, dtype=self.dtype, name="add_embedding")(
          text_embeds.astype(jnp.float32))

    h = nn.Conv(self.model_channels, (3, 3), padding=1, dtype=self.dtype, name="conv_in")(x)
    skips = [h]
    levels = len(self.channel_mult)
    for level, mult in enumerate(self.channel_mult):
      h, level_skips = _DownBlock(layers, self.model_channels * mult, self.num_res_blocks,
                                  2**level in self.attention_resolutions, depths[level], level < levels - 1,
                                  self.resblock_updown, name=f"down_blocks_{level}")(h, temb, context, deterministic)
      skips += level_skips
    h = _MidBlock(layers, depths[-1], name="mid_block")(h, temb, context, deterministic)
    for i, level in enumerate(reversed(range(levels))):
      n = self.num_res_blocks + 1
      h = _UpBlock(layers, self.model_channels * self.channel_mult[level], n,
                   2**level in self.attention_resolutions, depths[level], level > 0, self.resblock_updown,
                   name=f"up_blocks_{i}")(h, skips[-n:], temb, context, deterministic)
      skips = skips[:-n]

    h = GroupNorm(self.num_groups, epsilon=_RESNET_EPS, dtype=self.dtype, name="conv_norm_out")(h)
    out = nn.Conv(self.out_channels, (3, 3), padding=1, kernel_init=nn.initializers.zeros,
                  dtype=self.dtype, name="conv_out")(nn.silu(h))
    return repeat_rows(out, rows)  # a U-Net without cross-attention never took its input to N rows

  def _check_inputs(self, x, context, y, text_embeds, time_ids) -> int:
    """Raises ValueError naming the input (and model key) that does not fit; returns N, the
    conditions' batch (B without conditions)."""
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"U-Net input: expected [B, H, W, {self.in_channels}] (model.in_channels), got {x.shape}.")
    factor = downsampling_factor(self.channel_mult)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"U-Net input: {x.shape[1]}×{x.shape[2]} is not divisible by {factor}, the "
                       f"downsampling factor of model.channel_mult={tuple(self.channel_mult)}.")
    if self.context_dim is None and context is not None:
      raise ValueError("U-Net input: got a context but model.context_dim is None (no cross-attention).")
    if self.context_dim is not None:
      if context is None:
        raise ValueError(f"U-Net input: model.context_dim={self.context_dim} needs a context "
                         f"[B, L, {self.context_dim}]; the null condition is a context too.")
      if context.ndim != 3 or context.shape[-1] != self.context_dim:
        raise ValueError(f"U-Net input: context {context.shape} is not [B, L, {self.context_dim}] "
                         f"(model.context_dim).")
    if (y is None) != (self.num_classes is None):
      raise ValueError("U-Net input: labels y are required if and only if model.num_classes is set "
                       f"(num_classes={self.num_classes}).")
    text_time = self.addition_embed_type == "text_time"
    if self.addition_embed_type == "text":
      if text_embeds is None or time_ids is not None or text_embeds.shape[1:] != (self.addition_embed_dim,):
        raise ValueError("U-Net input: model.addition_embed_type='text' needs text_embeds "
                         f"[B, {self.addition_embed_dim}] (model.addition_embed_dim) and no time_ids; got "
                         f"{None if text_embeds is None else text_embeds.shape} and "
                         f"{None if time_ids is None else time_ids.shape}.")
    elif (text_embeds is None or time_ids is None) == text_time:
      raise ValueError("U-Net input: text_embeds and time_ids are required if and only if "
                       f"model.addition_embed_type='text_time' (it is {self.addition_embed_type!r}).")
    if text_time:
      width = text_embeds.shape[-1] + time_ids.shape[-1] * self.addition_time_embed_dim
      if text_embeds.ndim != 2 or time_ids.ndim != 2 or width != self.addition_embed_dim:
        raise ValueError(f"U-Net input: text_embeds {text_embeds.shape} and time_ids {time_ids.shape} give "
                         f"{width} features for add_embedding; model.addition_embed_dim is {self.addition_embed_dim} "
                         f"(pooled width + time ids × model.addition_time_embed_dim={self.addition_time_embed_dim}).")
    given = {name: a.shape[0] for name, a in
             (("context", context), ("y", y), ("text_embeds", text_embeds), ("time_ids", time_ids))
             if a is not None and a.ndim}
    batches, b = set(given.values()), x.shape[0]
    if len(batches) > 1 or any(n % b for n in batches) or 0 in batches:
      raise ValueError(f"U-Net input: the conditions' batches {given} must be one N = k·B, a multiple of "
                       f"x's batch B = {b} (k conditions per input, rows i·k … i·k + k − 1 for input i; "
                       "guidance has k = 2).")
    return batches.pop() if batches else b


# --- configuration -----------------------------------------------------------------------------

def level_depths(transformer_depth, levels: int) -> tuple[int, ...]:
  """`model.transformer_depth` (one number, or one per level) as one depth per level."""
  if isinstance(transformer_depth, int):
    return (transformer_depth,) * levels
  depths = tuple(transformer_depth)
  if len(depths) != levels:
    raise ValueError(f"model.transformer_depth: {len(depths)} depths {depths} for {levels} levels "
                     "(model.channel_mult); give one number or one per level.")
  return depths


def downsampling_factor(channel_mult) -> int:
  """2^(len(channel_mult) − 1): one Downsample between consecutive levels; latent sides must be multiples."""
  return 2 ** (len(channel_mult) - 1)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(UNet)
             if f.name not in ("parent", "name") and f.default is not dataclasses.MISSING}


def _unet_kwargs(cfg) -> dict[str, Any]:
  """Reads `model.*` into UNet keyword arguments, filling defaults; unknown keys are errors."""
  cfg = dict(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg)
  unknown = sorted(set(cfg) - set(_DEFAULTS))
  if unknown:
    raise ValueError(f"model.{unknown[0]}: not a U-Net setting; known keys: {', '.join(sorted(_DEFAULTS))}.")
  kwargs = {**_DEFAULTS, **cfg}
  for key in ("channel_mult", "attention_resolutions"):
    value = kwargs[key]
    if isinstance(value, int) or not all(isinstance(v, int) for v in value):
      raise ValueError(f"model.{key}: expected a sequence of integers, got {value!r}.")
    kwargs[key] = tuple(value)
  if not isinstance(kwargs["transformer_depth"], int):
    kwargs["transformer_depth"] = tuple(kwargs["transformer_depth"])
  try:
    kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
  except TypeError as e:
    raise ValueError(f"model.dtype: {kwargs['dtype']!r} is not a dtype (e.g. 'float32', 'bfloat16').") from e
  _check_static(kwargs)
  return kwargs


# None; 'text_time' (SDXL); 'text': the pooled text embedding alone (Imagen adds it to the time embedding).
ADDITION_EMBED_TYPES = (None, "text_time", "text")


def _check_static(k: dict[str, Any]) -> None:
  """Checks the U-Net settings on their own (no data or conditioner needed)."""
  mult, mc = k["channel_mult"], k["model_channels"]
  for key in ("in_channels", "out_channels", "model_channels", "num_res_blocks", "addition_time_embed_dim"):
    if not isinstance(k[key], int) or k[key] < 1:
      raise ValueError(f"model.{key}: expected a positive integer, got {k[key]!r}.")
  depths = level_depths(k["transformer_depth"], len(mult))
  if any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in depths):
    raise ValueError(f"model.transformer_depth: expected positive integers, got {k['transformer_depth']!r}.")
  if k["addition_embed_type"] not in ADDITION_EMBED_TYPES:
    raise ValueError(f"model.addition_embed_type: {k['addition_embed_type']!r} is not one of {ADDITION_EMBED_TYPES}.")
  if k["addition_embed_type"] == "text" and (not isinstance(k["addition_embed_dim"], int) or k["addition_embed_dim"] < 1):
    raise ValueError(f"model.addition_embed_dim: {k['addition_embed_dim']!r}; 'text' needs the width of the "
                     "pooled text embedding (cond.dim).")
  if k["addition_embed_type"] == "text_time":
    dim = k["addition_embed_dim"]
    if not isinstance(dim, int) or dim <= k["addition_time_embed_dim"]:
      raise ValueError(f"model.addition_embed_dim: {dim!r}; 'text_time' needs the width of the pooled text "
                       "embedding + time ids × model.addition_time_embed_dim (SDXL base: 1280 + 6·256 = 2816).")
  if not mult or any(m < 1 for m in mult):
    raise ValueError(f"model.channel_mult: expected positive multipliers, got {mult}.")
  check_group_norm(mc, k["num_groups"], "model.model_channels")
  for level, m in enumerate(mult):
    check_group_norm(mc * m, k["num_groups"], f"model.channel_mult: level {level} ({mc}×{m})")

  factors = [2**level for level in range(len(mult))]
  for ds in k["attention_resolutions"]:
    if ds not in factors:
      raise ValueError(f"model.attention_resolutions: {ds} is never reached by channel_mult={mult} "
                       f"(downsampling factors {', '.join(map(str, factors))}).")
  attended = [level for level in range(len(mult)) if 2**level in k["attention_resolutions"]]
  for level in sorted(set(attended) | {len(mult) - 1}):  # the middle block always attends
    channels = mc * mult[level]
    if k["num_head_channels"] == -1:
      if k["num_heads"] < 1 or channels % k["num_heads"]:
        raise ValueError(f"model.num_heads: {k['num_heads']} does not divide the {channels} channels "
                         f"of level {level}; or set model.num_head_channels.")
    elif k["num_head_channels"] < 1 or channels % k["num_head_channels"]:
      raise ValueError(f"model.num_head_channels: {k['num_head_channels']} does not divide the "
                       f"{channels} channels of level {level} (use -1 to split by model.num_heads).")

  if k["context_dim"] is not None:
    if not isinstance(k["context_dim"], int) or k["context_dim"] < 1:
      raise ValueError(f"model.context_dim: expected a positive integer or None, got {k['context_dim']!r}.")
    if not k["use_spatial_transformer"]:
      raise ValueError("model.context_dim: cross-attention needs model.use_spatial_transformer=True.")
  if k["num_classes"] is not None and (not isinstance(k["num_classes"], int) or k["num_classes"] < 1):
    raise ValueError(f"model.num_classes: expected a positive integer or None, got {k['num_classes']!r}.")
  if not 0.0 <= k["dropout"] < 1.0:
    raise ValueError(f"model.dropout: {k['dropout']} is not in [0, 1).")
  if k["query_chunk_size"] is not None and k["query_chunk_size"] < 1:
    raise ValueError(f"model.query_chunk_size: expected a positive integer or None, got {k['query_chunk_size']}.")
  check_implementation(k["attention"], "model.attention")


def validate_unet_config(cfg, latent_shape: Sequence[int], context_dim_of_conditioner: int | None = None,
                         *, concat_channels: int = 0) -> None:
  """Checks `model.*` against itself, the latent shape and the conditioner, before anything compiles.

  Args:
    cfg: the `model` ConfigDict (keys of `ldm_jax.config.sections.default_unet_config`).
    latent_shape: (H, W, C) of the autoencoder's latents.
    context_dim_of_conditioner: channels of the cross-attention context the conditioner produces,
      or None when it produces none (unconditional, class-only, concat-only).
    concat_channels: channels concatenated to the latent as conditioning (masks, low-res images).

  Raises:
    ValueError naming the offending key.
  """
  k = _unet_kwargs(cfg)
  if len(latent_shape) != 3:
    raise ValueError(f"latent shape: expected (H, W, C), got {tuple(latent_shape)}.")
  height, width, channels = latent_shape
  factor = downsampling_factor(k["channel_mult"])
  if height % factor or width % factor:
    raise ValueError(f"model.channel_mult: {len(k['channel_mult'])} levels downsample by {factor}, which "
                     f"does not divide the {height}×{width} latents; change the levels or the image size.")
  if k["out_channels"] != channels:
    raise ValueError(f"model.out_channels: {k['out_channels']} does not match the autoencoder's "
                     f"{channels} latent channels.")
  if k["in_channels"] != channels + concat_channels:
    raise ValueError(f"model.in_channels: {k['in_channels']} does not match the {channels} latent channels "
                     f"+ {concat_channels} concat-conditioning channels = {channels + concat_channels}.")
  if context_dim_of_conditioner is None:
    if k["context_dim"] is not None:
      raise ValueError(f"model.context_dim: {k['context_dim']}, but the conditioner gives no cross-attention "
                       "context; set it to None.")
  elif k["context_dim"] != context_dim_of_conditioner:
    raise ValueError(f"model.context_dim: {k['context_dim']} does not match the conditioner's "
                     f"{context_dim_of_conditioner}.")


def make_unet(cfg) -> UNet:
  """Builds the U-Net from the `model` ConfigDict (see `ldm_jax.config.sections.default_unet_config`)."""
  return UNet(**_unet_kwargs(cfg))
