"""BERT (Devlin et al. 2019) as a frozen text encoder τ(y), in linen — transformers' `BertModel`.

Token ids [B, L] → last hidden state [B, L, dim]: word + absolute position + token-type embeddings
→ LayerNorm → `depth` post-LayerNorm blocks [x = LN(x + attn(x)); x = LN(x + W₂·gelu(W₁·x))].
Padding keys are masked when `pad_id` is set (transformers' `attention_mask`); with `pad_id=None`
every token attends to every token (transformers without an attention mask). The pooler
(tanh on the [CLS] token) is not part of a conditioner and is not loaded.

Parameter paths follow transformers (the converter's generic renaming rule applies):

    embeddings/{word_embeddings, position_embeddings, token_type_embeddings}/embedding, embeddings/LayerNorm
    encoder/layer_{i}/attention/self/{query, key, value}, encoder/layer_{i}/attention/output/{dense, LayerNorm}
    encoder/layer_{i}/intermediate/dense, encoder/layer_{i}/output/{dense, LayerNorm}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.nn.activations import gelu
from ldm_jax.nn.attention import MultiHeadSelfAttention


class _Residual(nn.Module):
  """LN(residual + dense(x)): transformers' `BertSelfOutput` / `BertOutput`."""
  features: int
  layer_norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x, residual):
    h = nn.Dense(self.features, dtype=self.dtype, name="dense")(x)
    return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(residual + h)


class _Attention(nn.Module):
  num_heads: int
  layer_norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x, key_mask):
    h = MultiHeadSelfAttention(self.num_heads, qkv_names=("query", "key", "value"), out_name=None,
                               dtype=self.dtype, name="self")(x, key_mask)
    return _Residual(x.shape[-1], self.layer_norm_eps, self.dtype, name="output")(h, x)


class _Intermediate(nn.Module):
  features: int
  dtype: Any

  @nn.compact
  def __call__(self, x):
    return gelu(nn.Dense(self.features, dtype=self.dtype, name="dense")(x))


class BertLayer(nn.Module):
  """One post-LayerNorm transformer block."""
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    x = _Attention(self.num_heads, self.layer_norm_eps, self.dtype, name="attention")(x, key_mask)
    h = _Intermediate(self.mlp_dim, self.dtype, name="intermediate")(x)
    return _Residual(x.shape[-1], self.layer_norm_eps, self.dtype, name="output")(h, x)


class _Embeddings(nn.Module):
  vocab_size: int
  max_length: int
  type_vocab_size: int
  dim: int
  layer_norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, tokens, token_type_ids):
    init = nn.initializers.normal(0.02)
    embed = lambda n, name: nn.Embed(n, self.dim, embedding_init=init, name=name)
    x = embed(self.vocab_size, "word_embeddings")(tokens)
    x = x + embed(self.max_length, "position_embeddings")(jnp.arange(tokens.shape[1]))[None]
    x = x + embed(self.type_vocab_size, "token_type_embeddings")(token_type_ids)
    return nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="LayerNorm")(x.astype(self.dtype))


class _Encoder(nn.Module):
  depth: int
  num_heads: int
  mlp_dim: int
  layer_norm_eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x, key_mask):
    for i in range(self.depth):
      x = BertLayer(self.num_heads, self.mlp_dim, self.layer_norm_eps, self.dtype, name=f"layer_{i}")(x, key_mask)
    return x


class BertTextEncoder(nn.Module):
  """tokens int [B, L] → last hidden state [B, L, dim]. Defaults: bert-base-uncased.

  Attributes:
    vocab_size, max_length, type_vocab_size: embedding rows (word, position, token type).
    dim, depth, num_heads, mlp_dim: width, blocks, heads, MLP hidden width.
    layer_norm_eps: LayerNorm epsilon (1e-12).
    pad_id: token id whose keys are masked; None = no mask.
  """
  vocab_size: int = 30522
  max_length: int = 512
  type_vocab_size: int = 2
  dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  layer_norm_eps: float = 1e-12
  pad_id: int | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, token_type_ids: jax.Array | None = None) -> jax.Array:
    if tokens.shape[1] > self.max_length:
      raise ValueError(f"text encoder: {tokens.shape[1]} tokens exceed max_length={self.max_length}.")
    token_type_ids = jnp.zeros_like(tokens) if token_type_ids is None else token_type_ids
    key_mask = None if self.pad_id is None else tokens != self.pad_id
    x = _Embeddings(self.vocab_size, self.max_length, self.type_vocab_size, self.dim, self.layer_norm_eps,
                    self.dtype, name="embeddings")(tokens, token_type_ids)
    return _Encoder(self.depth, self.num_heads, self.mlp_dim, self.layer_norm_eps, self.dtype,
                    name="encoder")(x, key_mask)


_FIELDS = ("vocab_size", "max_length", "type_vocab_size", "dim", "depth", "num_heads", "mlp_dim",
           "layer_norm_eps", "pad_id")


def make_bert_text_encoder(cfg: Mapping[str, Any], dtype=jnp.float32) -> BertTextEncoder:
  """Builds `BertTextEncoder` from {'kind': 'bert', fields…}; ValueError names a bad key."""
  unknown = sorted(set(cfg) - set(_FIELDS) - {"kind"})
  if unknown:
    raise ValueError(f"text_encoder.{unknown[0]}: not a BERT text encoder setting; known: {sorted(_FIELDS)}.")
  fields = {k: cfg[k] for k in _FIELDS if k in cfg}
  for key in ("vocab_size", "max_length", "type_vocab_size", "dim", "depth", "num_heads", "mlp_dim"):
    if key in fields and (not isinstance(fields[key], int) or fields[key] < 1):
      raise ValueError(f"text_encoder.{key}: expected a positive integer, got {fields[key]!r}.")
  module = BertTextEncoder(**fields, dtype=dtype)
  if module.dim % module.num_heads:
    raise ValueError(f"text_encoder.num_heads: {module.num_heads} does not divide dim={module.dim}.")
  return module
