"""The CLIP text transformer, Stable Diffusion's frozen text encoder τ(y), in linen.

Token ids [B, L] → context [B, L, dim]: token embedding + learned absolute position embedding →
`depth` pre-LayerNorm blocks [causal multi-head self-attention, MLP] each residual → final
LayerNorm. The MLP activation is `quick_gelu`, x·σ(1.702x), in OpenAI's CLIP (SD 1.x, ViT-L/14)
and the exact GELU in OpenCLIP (SD 2.x, ViT-H/14). The attention is causal, as CLIP was trained,
so a token's context does not depend on the padding after it; no padding mask is applied (SD).

Which layer feeds the U-Net: SD 1.x takes the last layer; SD 2.x the penultimate one, then the
final LayerNorm (`skip_last_layers=1`). diffusers' SD 2.x folders store the text encoder with its
last layer already removed (23 of 24 layers), so they load with `skip_last_layers=0`. SDXL takes
the penultimate layer of both its encoders *without* the final LayerNorm (diffusers'
`hidden_states[-2]`: `skip_last_layers=1, norm_output=False`).

The pooled output (`return_pooled=True`; transformers' `CLIPTextModelWithProjection.text_embeds`,
SDXL's second conditioning vector) is the last layer, final LayerNorm, at the first end-of-text
token (`eos_token_id`; transformers' legacy configs with eos_token_id 2 take the largest token
id, which is the end-of-text token of CLIP's vocabulary), times `text_projection` (no bias).

Parameter paths follow transformers' `CLIPTextModel` (its `text_model.` prefix dropped), so the
converter is the generic renaming rule of `ldm_jax.convert.naming`:

    embeddings/{token_embedding, position_embedding}/embedding
    encoder/layers_{i}/{layer_norm1, self_attn/{q_proj, k_proj, v_proj, out_proj}, layer_norm2, mlp/{fc1, fc2}}
    final_layer_norm, text_projection (with projection_dim)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.nn.activations import gelu
from ldm_jax.nn.attention import MultiHeadSelfAttention

ACTIVATIONS = ("quick_gelu", "gelu")


def _activation(name: str, x: jax.Array) -> jax.Array:
  if name == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  if name == "gelu":
    return gelu(x)
  raise ValueError(f"text_encoder.activation: {name!r} is not one of {ACTIVATIONS}.")


class CLIPMLP(nn.Module):
  """fc1 → activation → fc2."""
  mlp_dim: int
  activation: str
  dtype: Any

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="fc2")(_activation(self.activation, h))


class CLIPEncoderLayer(nn.Module):
  """x + attn(LN(x)), then x + mlp(LN(x)); causal attention, q, k, v and out projections with biases."""
  num_heads: int
  mlp_dim: int
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name=name)
    attention = MultiHeadSelfAttention(self.num_heads, qkv_names=("q_proj", "k_proj", "v_proj"),
                                       out_name="out_proj", causal=True, dtype=self.dtype, name="self_attn")
    x = x + attention(norm("layer_norm1")(x))
    return x + CLIPMLP(self.mlp_dim, self.activation, self.dtype, name="mlp")(norm("layer_norm2")(x))


class _Embeddings(nn.Module):
  vocab_size: int
  max_length: int
  dim: int
  dtype: Any

  @nn.compact
  def __call__(self, tokens):
    init = nn.initializers.normal(0.02)
    x = nn.Embed(self.vocab_size, self.dim, embedding_init=init, name="token_embedding")(tokens)
    pos = nn.Embed(self.max_length, self.dim, embedding_init=init, name="position_embedding")(
        jnp.arange(tokens.shape[1]))
    return (x + pos[None]).astype(self.dtype)


class _Encoder(nn.Module):
  depth: int
  num_heads: int
  mlp_dim: int
  activation: str
  layer_norm_eps: float
  num_used: int
  dtype: Any

  @nn.compact
  def __call__(self, x, run_all: bool):
    """→ (output of layer `num_used` − 1, output of the last layer or None unless `run_all`)."""
    used = x
    for i in range(self.depth):
      layer = CLIPEncoderLayer(self.num_heads, self.mlp_dim, self.activation, self.layer_norm_eps, self.dtype,
                               name=f"layers_{i}")
      if i < self.num_used or run_all:
        x = layer(x)
      elif self.is_initializing():
        layer(x)  # the skipped layers still get parameters, so full checkpoints load unchanged
      if i == self.num_used - 1:
        used = x
    return used, (x if run_all else None)


class CLIPTextEncoder(nn.Module):
  """tokens int [B, L] (L ≤ max_length) → context [B, L, dim]. Defaults: SD 1.x (CLIP ViT-L/14).

  Attributes:
    vocab_size: token embedding rows (49408 for CLIP's BPE).
    max_length: position embedding rows (77).
    dim: width (768 ViT-L/14, 1024 ViT-H/14).
    depth: encoder layers (12; SD 2.x: 24 in OpenCLIP, 23 in diffusers' copy).
    num_heads: attention heads (12; 16).
    mlp_dim: MLP hidden width (3072; 4096).
    activation: 'quick_gelu' (OpenAI CLIP) or 'gelu' (OpenCLIP).
    layer_norm_eps: LayerNorm epsilon (1e-5).
    skip_last_layers: 0 takes the last layer, 1 the penultimate (SD 2.x original, SDXL), ….
    norm_output: apply the final LayerNorm to the layer taken (SD 1.x, SD 2.x, diffusers'
      `clip_skip`); SDXL does not.
    projection_dim: width of `text_projection` for the pooled output (CLIPTextModelWithProjection),
      or None (no projection, no pooled output).
    eos_token_id: the end-of-text token whose position the pooled output takes.
  """
  vocab_size: int = 49408
  max_length: int = 77
  dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  skip_last_layers: int = 0
  norm_output: bool = True
  projection_dim: int | None = None
  eos_token_id: int = 49407
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, return_pooled: bool = False):
    """tokens int [B, L] → context [B, L, dim]; with `return_pooled`, (context, pooled [B, projection_dim])."""
    if tokens.shape[1] > self.max_length:
      raise ValueError(f"text encoder: {tokens.shape[1]} tokens exceed max_length={self.max_length}.")
    if not 0 <= self.skip_last_layers < self.depth:
      raise ValueError(f"text_encoder.skip_last_layers: {self.skip_last_layers} is not in [0, {self.depth}).")
    x = _Embeddings(self.vocab_size, self.max_length, self.dim, self.dtype, name="embeddings")(tokens)
    if return_pooled and self.projection_dim is None:
      raise ValueError("text encoder: a pooled output needs text_encoder.projection_dim (CLIPTextModelWithProjection).")
    run_all = return_pooled or (self.projection_dim is not None and self.is_initializing())
    used, last = _Encoder(self.depth, self.num_heads, self.mlp_dim, self.activation, self.layer_norm_eps,
                          self.depth - self.skip_last_layers, self.dtype, name="encoder")(x, run_all)
    final_norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")
    context = final_norm(used) if self.norm_output else used
    if not self.norm_output and self.is_initializing():
      final_norm(used)  # unused (SDXL's first encoder), but full checkpoints carry it and load unchanged
    if not run_all:
      return context
    last = final_norm(last)
    if self.eos_token_id == 2:  # transformers' legacy rule
      position = jnp.argmax(tokens, axis=-1)
    else:
      position = jnp.argmax(tokens == self.eos_token_id, axis=-1)
    pooled = jnp.take_along_axis(last, position[:, None, None], axis=1)[:, 0]
    pooled = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype, name="text_projection")(pooled)
    return (context, pooled) if return_pooled else context


def clip_config(**overrides) -> dict[str, Any]:
  """The `text_encoder` config of a CLIP text encoder: {'kind': 'clip', fields…} (SD 1.x defaults)."""
  cfg = dict(kind="clip", vocab_size=49408, max_length=77, dim=768, depth=12, num_heads=12, mlp_dim=3072,
             activation="quick_gelu", layer_norm_eps=1e-5, skip_last_layers=0, norm_output=True,
             projection_dim=None, eos_token_id=49407)
  unknown = sorted(set(overrides) - set(cfg))
  if unknown:
    raise ValueError(f"text_encoder.{unknown[0]}: not a CLIP text encoder setting; known: {sorted(cfg)}.")
  cfg.update(overrides)
  return cfg


def make_clip_text_encoder(cfg: Mapping[str, Any], dtype=jnp.float32) -> CLIPTextEncoder:
  """Builds `CLIPTextEncoder` from a `clip_config`-style mapping; ValueError names a bad key."""
  cfg = clip_config(**{k: v for k, v in cfg.items() if k != "kind"})
  for key in ("vocab_size", "max_length", "dim", "depth", "num_heads", "mlp_dim"):
    if not isinstance(cfg[key], int) or cfg[key] < 1:
      raise ValueError(f"text_encoder.{key}: expected a positive integer, got {cfg[key]!r}.")
  if cfg["dim"] % cfg["num_heads"]:
    raise ValueError(f"text_encoder.num_heads: {cfg['num_heads']} does not divide dim={cfg['dim']}.")
  if cfg["activation"] not in ACTIVATIONS:
    raise ValueError(f"text_encoder.activation: {cfg['activation']!r} is not one of {ACTIVATIONS}.")
  return CLIPTextEncoder(**{k: v for k, v in cfg.items() if k != "kind"}, dtype=dtype)
