"""The from-scratch transformer text encoder (CompVis BERTEmbedder) and its padding mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.text import TransformerTextEncoder
from ldm_jax.nn.attention import dot_product_attention

VOCAB, LENGTH, DIM = 20, 8, 16
TOKENS = np.array([[2, 5, 6, 7, 3, 0, 0, 0],
                   [2, 9, 3, 0, 0, 0, 0, 0]], np.int32)


def _encoder(**kwargs):
  fields = dict(vocab_size=VOCAB, max_length=LENGTH, dim=DIM, depth=2, num_heads=2, pad_id=0)
  fields.update(kwargs)
  return TransformerTextEncoder(**fields)


@pytest.fixture(scope='module')
def encoded():
  """(module, params, apply) of a 2-block encoder; LayerNorm affines randomised so they show."""
  module = _encoder()
  params = module.init(jax.random.key(0), TOKENS)['params']
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p + 0.2 * rng.normal(size=p.shape) if 'norm' in jax.tree_util.keystr(path) else p, params)
  return module, params, jax.jit(lambda p, t: module.apply({'params': p}, t))


def test_parameter_layout_follows_compvis():
  module = _encoder(head_dim=8, num_heads=3)
  shapes = jax.tree_util.tree_map(jnp.shape, jax.eval_shape(module.init, jax.random.key(0), TOKENS)['params'])
  assert set(shapes) == {'token_emb', 'pos_emb', 'blocks_0', 'blocks_1', 'norm'}
  assert shapes['token_emb']['embedding'] == (VOCAB, DIM)
  assert shapes['pos_emb']['embedding'] == (LENGTH, DIM)
  block = shapes['blocks_0']
  assert set(block) == {'attn_norm', 'attn', 'ff_norm', 'ff'}
  # x-transformers: q/k/v project to heads·head_dim without bias (independent of dim), to_out has one.
  assert block['attn']['to_q'] == {'kernel': (DIM, 24)}
  assert block['attn']['to_out'] == {'kernel': (24, DIM), 'bias': (DIM,)}
  assert block['ff']['net_0']['kernel'] == (DIM, 4 * DIM) and block['ff']['net_2']['kernel'] == (4 * DIM, DIM)


def test_matches_a_numpy_forward(encoded):
  """Pre-LN blocks, GELU MLP, masked padding keys and a final LayerNorm, written out in numpy."""
  module, params, apply = encoded
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)

  def layer_norm(x, q):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * q['scale'] + q['bias']

  def gelu(x):
    from scipy.special import erf  # pylint: disable=g-import-not-at-top
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))

  x = p['token_emb']['embedding'][TOKENS] + p['pos_emb']['embedding'][None]
  keep = TOKENS != 0
  for i in range(module.depth):
    b = p[f'blocks_{i}']
    h = layer_norm(x, b['attn_norm'])
    q, k, v = (h @ b['attn'][n]['kernel'] for n in ('to_q', 'to_k', 'to_v'))
    split = lambda a: a.reshape(*a.shape[:2], 2, -1)
    logits = np.einsum('bqhd,bkhd->bhqk', split(q), split(k)) / np.sqrt(DIM // 2)
    logits = np.where(keep[:, None, None, :], logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    a = np.einsum('bhqk,bkhd->bqhd', w, split(v)).reshape(x.shape)
    x = x + a @ b['attn']['to_out']['kernel'] + b['attn']['to_out']['bias']
    h = layer_norm(x, b['ff_norm'])
    h = gelu(h @ b['ff']['net_0']['kernel'] + b['ff']['net_0']['bias'])
    x = x + h @ b['ff']['net_2']['kernel'] + b['ff']['net_2']['bias']
  expected = layer_norm(x, p['norm'])
  out = apply(params, TOKENS)
  assert out.shape == (2, LENGTH, DIM) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, atol=2e-5, rtol=1e-4)


def test_padding_does_not_change_real_tokens(encoded):
  _, params, apply = encoded
  full = apply(params, TOKENS)
  # The first caption alone without its padding: same context at its 5 real tokens.
  np.testing.assert_allclose(apply(params, TOKENS[:1, :5])[0], full[0, :5], atol=1e-5)
  np.testing.assert_allclose(apply(params, TOKENS[1:, :3])[0], full[1, :3], atol=1e-5)
  # Without the mask (CompVis), padding leaks into the real tokens.
  module = _encoder(pad_id=None)
  unmasked = module.apply({'params': params}, TOKENS)
  assert np.abs(unmasked[0, :5] - module.apply({'params': params}, TOKENS[:1, :5])[0]).max() > 1e-3


def test_output_depends_on_tokens_and_positions(encoded):
  _, params, apply = encoded
  base = apply(params, TOKENS)
  changed = TOKENS.copy()
  changed[0, 2] = 11
  out = apply(params, changed)
  assert np.abs(out[0] - base[0]).max() > 1e-2            # another word changes the caption's context
  np.testing.assert_allclose(out[1], base[1], atol=1e-6)  # and nothing of the other caption
  # Swapping two real tokens is not a mere permutation of the outputs: positions matter.
  swapped = TOKENS.copy()
  swapped[0, [1, 2]] = swapped[0, [2, 1]]
  out = apply(params, swapped)
  assert np.abs(out[0, [2, 1]] - base[0, [1, 2]]).max() > 1e-2


def test_dropout_is_active_only_when_not_deterministic():
  module = _encoder(dropout=0.5, depth=1)
  params = module.init(jax.random.key(0), TOKENS)['params']
  det = module.apply({'params': params}, TOKENS)
  np.testing.assert_array_equal(det, module.apply({'params': params}, TOKENS, deterministic=True))
  noisy = module.apply({'params': params}, TOKENS, deterministic=False, rngs={'dropout': jax.random.key(1)})
  assert np.abs(noisy - det).max() > 1e-2


def test_too_many_tokens_is_an_error():
  with pytest.raises(ValueError, match='max_length'):
    _encoder().init(jax.random.key(0), np.zeros((1, LENGTH + 1), np.int32))


@pytest.mark.parametrize('dtype,chunk', [(jnp.float32, None), (jnp.float32, 3), (jnp.bfloat16, 3)])
def test_attention_key_mask_equals_dropping_the_masked_keys(dtype, chunk):
  """dot_product_attention(key_mask=…) — added for the text encoder — on every path."""
  kq, kk, kv = jax.random.split(jax.random.key(2), 3)
  q, k, v = (jax.random.normal(key, (2, 7, 2, 4)).astype(dtype) for key in (kq, kk, kv))
  mask = np.ones((2, 7), bool)
  mask[0, 4:] = False
  out = dot_product_attention(q, k, v, key_mask=mask, query_chunk_size=chunk)
  assert out.dtype == dtype
  np.testing.assert_allclose(np.asarray(out[:1], np.float32),
                             np.asarray(dot_product_attention(q[:1], k[:1, :4], v[:1, :4]), np.float32),
                             atol=1e-6 if dtype == jnp.float32 else 2e-2)
  np.testing.assert_allclose(np.asarray(out[1:], np.float32),
                             np.asarray(dot_product_attention(q[1:], k[1:], v[1:]), np.float32), atol=1e-6)
  # A query with no key left attends uniformly (no NaN).
  none = dot_product_attention(q, k, v, key_mask=np.zeros((2, 7), bool), query_chunk_size=chunk)
  np.testing.assert_allclose(np.asarray(none, np.float32),
                             np.broadcast_to(np.asarray(v, np.float32).mean(1, keepdims=True), none.shape),
                             atol=1e-5 if dtype == jnp.float32 else 3e-2)
