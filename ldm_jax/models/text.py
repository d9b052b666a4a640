"""Text encoders τ_θ(y) that turn token ids into a cross-attention context [B, L, dim].

`TransformerTextEncoder` is the paper's text-to-image conditioner (CompVis `BERTEmbedder`: an
x-transformers `TransformerWrapper` around an `Encoder`), trained jointly with the U-Net from
scratch: token embedding + learned absolute positional embedding (both N(0, 0.02²)) →
`depth` pre-LayerNorm blocks [multi-head self-attention, GELU MLP ×4], each residual → final
LayerNorm. The paper's LAION model uses dim 1280, depth 32, 8 heads of 64 channels, 77 tokens.

Unlike CompVis, which runs the encoder without a mask, padding keys are masked here: a
caption's context at its real tokens does not depend on how much padding follows. Padding
positions still get an output (their embedding attending to the real tokens), and the U-Net
cross-attends to all `max_length` positions, as in CompVis and Stable Diffusion.

Parameter paths, and the CompVis names a converter maps them from (`transformer.` prefix):

    token_emb/embedding                              token_emb.weight
    pos_emb/embedding                                pos_emb.emb.weight
    blocks_{i}/attn_norm                             attn_layers.layers.{2i}.0
    blocks_{i}/attn/{to_q, to_k, to_v, to_out}       attn_layers.layers.{2i}.1.{to_q, to_k, to_v, to_out}
    blocks_{i}/ff_norm                               attn_layers.layers.{2i+1}.0
    blocks_{i}/ff/{net_0, net_2}                     attn_layers.layers.{2i+1}.1.net.{0.0, 2}
    norm                                             norm
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.nn.activations import gelu
from ldm_jax.nn.attention import MultiHeadSelfAttention

_LAYER_NORM_EPS = 1e-5  # torch nn.LayerNorm default, as in x-transformers
_EMBED_INIT = nn.initializers.normal(stddev=0.02)  # x-transformers' token and position init


class MLP(nn.Module):
  """`net_0` (linear to mult·C) → exact GELU → `net_2` (linear back to C)."""
  mult: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = gelu(nn.Dense(self.mult * x.shape[-1], dtype=self.dtype, name='net_0')(x))
    return nn.Dense(x.shape[-1], dtype=self.dtype, name='net_2')(h)


class Block(nn.Module):
  """Pre-LayerNorm residual self-attention, then pre-LayerNorm residual MLP. The attention is
  x-transformers' `Attention`: q, k, v projections without bias, `to_out` with."""
  num_heads: int
  head_dim: int
  dropout: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None, deterministic: bool) -> jax.Array:
    """x: [B, L, C], key_mask: bool [B, L] or None → [B, L, C]."""
    norm = lambda name: nn.LayerNorm(epsilon=_LAYER_NORM_EPS, dtype=self.dtype, name=name)
    drop = lambda h: nn.Dropout(self.dropout)(h, deterministic=deterministic)
    attention = MultiHeadSelfAttention(self.num_heads, self.head_dim, qkv_bias=False, dtype=self.dtype, name='attn')
    x = x + drop(attention(norm('attn_norm')(x), key_mask))
    return x + drop(MLP(dtype=self.dtype, name='ff')(norm('ff_norm')(x)))


class TransformerTextEncoder(nn.Module):
  """Token ids → context, the BERT-style encoder trained from scratch with the U-Net.

  Attributes:
    vocab_size: rows of the token embedding; ids must lie in [0, vocab_size).
    max_length: rows of the positional embedding; the longest token sequence.
    dim: width of the tokens and of the output context (the U-Net's `context_dim`).
    depth: number of transformer blocks.
    num_heads: attention heads.
    head_dim: channels per head; None = dim // num_heads (CompVis: 64 whatever the width).
    dropout: rate on the embeddings (CompVis `emb_dropout`) and on each residual branch.
    pad_id: token id of padding, masked out as attention keys; None = no mask (as CompVis).
  """
  vocab_size: int
  max_length: int = 77
  dim: int = 1280
  depth: int = 32
  num_heads: int = 8
  head_dim: int | None = None
  dropout: float = 0.0
  pad_id: int | None = 0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """tokens: int [B, L] with L ≤ max_length → context [B, L, dim] (in `dtype`)."""
    length = tokens.shape[1]
    if length > self.max_length:
      raise ValueError(f'text encoder: {length} tokens exceed max_length={self.max_length} '
                       '(cond.max_length).')
    head_dim = self.head_dim if self.head_dim is not None else self.dim // self.num_heads
    x = nn.Embed(self.vocab_size, self.dim, embedding_init=_EMBED_INIT, name='token_emb')(tokens)
    x = x + nn.Embed(self.max_length, self.dim, embedding_init=_EMBED_INIT, name='pos_emb')(
        jnp.arange(length))[None]
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic).astype(self.dtype)
    key_mask = None if self.pad_id is None else tokens != self.pad_id
    for i in range(self.depth):
      x = Block(self.num_heads, head_dim, self.dropout, self.dtype, name=f'blocks_{i}')(x, key_mask, deterministic)
    return nn.LayerNorm(epsilon=_LAYER_NORM_EPS, dtype=self.dtype, name='norm')(x)
