"""Textual inversion (Gal et al. 2022): placeholder tokens, their embedding rows, and their files.

    tokenizer, params['text_encoder'], ids = add_placeholder_tokens(
        tokenizer, params['text_encoder'], '<my-shape>', num_vectors=2, initializer_token='circle')
    text_encoder = text_encoder.clone(vocab_size=token_embedding(params['text_encoder']).shape[0])
    …train only those rows (`row_mask` on the updates, or `set_rows` with the rows as the parameter)…
    save_learned_embeds(out_dir, '<my-shape>', token_embedding(params['text_encoder'])[ids])

A placeholder of n vectors is n added tokens, `tok`, `tok_1`, …, `tok_{n-1}` (diffusers' convention,
which `ldm_jax.data.tokenizer.Tokenizer` expands in captions), with n new rows of the text encoder's
token-embedding table.

`learned_embeds.safetensors` as diffusers' `load_textual_inversion` reads it: one tensor, named by the
token, [n, dim] (or [dim] for one vector) — what diffusers' textual_inversion.py writes. Also read:
A1111/kohya safetensors embeddings, `{'emb_params': [n, dim]}`, whose token is the file name unless
one is given (diffusers reads those only with `token=`).
"""

from __future__ import annotations

import os

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.convert.safetensors_io import read_safetensors, write_safetensors
from ldm_jax.data.tokenizer import Tokenizer

WEIGHTS_NAME = "learned_embeds.safetensors"
# The token-embedding table of each text encoder: CLIP, BERT, the scratch transformer.
EMBEDDING_PATHS = ("embeddings/token_embedding/embedding", "embeddings/word_embeddings/embedding",
                   "token_emb/embedding")
_A1111_KEY = "emb_params"


def _embedding_path(params) -> str:
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  for path in EMBEDDING_PATHS:
    if path in flat:
      return path
  raise ValueError(f"text encoder parameters: no token-embedding table (looked for {', '.join(EMBEDDING_PATHS)}).")


def token_embedding(params) -> jax.Array:
  """The token-embedding table [rows, dim] of a text encoder's parameters."""
  return flax.traverse_util.flatten_dict(params, sep="/")[_embedding_path(params)]


def placeholder_names(token: str, num_vectors: int) -> list[str]:
  """`tok`, `tok_1`, …, `tok_{n-1}`: the added tokens of a placeholder of `num_vectors` vectors."""
  return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def set_rows(params, ids, rows: jax.Array):
  """`params` with rows `ids` of the token-embedding table replaced by `rows` [len(ids), dim] (jit-able;
  differentiating with respect to `rows` trains those rows and nothing else)."""
  path = _embedding_path(params)
  flat = dict(flax.traverse_util.flatten_dict(params, sep="/"))
  table = flat[path]
  flat[path] = jnp.asarray(table).at[jnp.asarray(ids)].set(jnp.asarray(rows).astype(table.dtype))
  return flax.traverse_util.unflatten_dict(flat, sep="/")


def row_mask(params, ids):
  """A tree like `params`: 1 on rows `ids` of the token-embedding table ([rows, 1]), 0 for every other leaf.

  Multiply the optimizer's *updates* by it (`jax.tree.map(jnp.multiply, updates, mask)`), not only the
  gradients: weight decay and Adam's moments would otherwise still move the masked rows.
  """
  path = _embedding_path(params)
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  rows = np.zeros((np.shape(flat[path])[0], 1), np.float32)
  rows[np.asarray(ids)] = 1
  mask = {k: (rows if k == path else np.zeros((), np.float32)) for k in flat}
  return flax.traverse_util.unflatten_dict(mask, sep="/")


def add_placeholder_tokens(tokenizer: Tokenizer, params, token: str, *, num_vectors: int | None = None,
                           initializer_token: str | None = None, vectors=None):
  """Adds a placeholder of n vectors to the tokenizer and the text encoder's token-embedding table.

  Args:
    tokenizer: the text encoder's tokenizer.
    params: the text encoder's parameters.
    token: the placeholder ('<my-shape>'); it and `tok_1`… must be new to the vocabulary.
    num_vectors: n, when the rows are initialised from `initializer_token`.
    initializer_token: a word the tokenizer encodes as one token; every new row starts as its row.
    vectors: [n, dim] or [dim] initial rows instead (a learned_embeds file).

  Returns:
    (tokenizer with the tokens added, params with a table of max(rows, new ids + 1) rows, the new ids).
    Rebuild the text encoder with `vocab_size` = the table's rows.

  Raises:
    ValueError naming the token, the initializer or the vectors' shape when they do not fit.
  """
  table = token_embedding(params)
  dim = table.shape[1]
  if vectors is not None:
    if initializer_token is not None:
      raise ValueError(f"add_placeholder_tokens: {token}: give vectors or an initializer_token, not both.")
    vectors = np.atleast_2d(np.asarray(vectors, np.float32))
    if vectors.ndim != 2 or vectors.shape[1] != dim or (num_vectors not in (None, vectors.shape[0])):
      raise ValueError(f"add_placeholder_tokens: {token}: vectors of shape {list(np.shape(vectors))}; the text "
                       f"encoder's embeddings are [n, {dim}]" + (f" with n = {num_vectors}." if num_vectors else "."))
  else:
    if initializer_token is None or not num_vectors or num_vectors < 1:
      raise ValueError(f"add_placeholder_tokens: {token}: give vectors, or num_vectors ≥ 1 and an initializer_token.")
    pieces = tokenizer.backend.encode(initializer_token, add_special_tokens=False)
    if len(pieces.ids) != 1:
      raise ValueError(f"add_placeholder_tokens: initializer_token {initializer_token!r} is {len(pieces.ids)} "
                       f"tokens {pieces.tokens}; choose a word the tokenizer keeps whole.")
    vectors = np.repeat(np.asarray(table[pieces.ids[0]], np.float32)[None], num_vectors, axis=0)
  names = placeholder_names(token, vectors.shape[0])
  tokenizer = tokenizer.add_tokens(names)
  ids = [tokenizer.token_id(name) for name in names]
  rows = max(table.shape[0], max(ids) + 1)
  if rows > table.shape[0]:
    grown = np.zeros((rows, dim), np.asarray(table).dtype)
    grown[:table.shape[0]] = np.asarray(table)
    path = _embedding_path(params)
    flat = dict(flax.traverse_util.flatten_dict(params, sep="/"))
    flat[path] = grown
    params = flax.traverse_util.unflatten_dict(flat, sep="/")
  return tokenizer, set_rows(params, ids, jnp.asarray(vectors)), ids


def read_learned_embeds(path: str, token: str | None = None) -> tuple[str, np.ndarray]:
  """(token, vectors float32 [n, dim]) of a textual-inversion file.

  Args:
    path: a `.safetensors` file, or a directory holding `learned_embeds.safetensors`.
    token: the placeholder to use instead of the file's (needed for nothing; A1111 files default
      to their file name).

  Raises:
    ValueError naming the file when it holds more or less than one tensor or a tensor not [n, dim].
  """
  path = os.path.join(path, WEIGHTS_NAME) if os.path.isdir(path) else path
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such textual-inversion file.")
  state = read_safetensors(path)
  if len(state) != 1:
    raise ValueError(f"{path}: {len(state)} tensors ({', '.join(sorted(state)[:4])}); a textual-inversion file "
                     "holds one, named by its token (SD-XL files with clip_l/clip_g are not read).")
  (name, vectors), = state.items()
  vectors = np.atleast_2d(np.asarray(vectors, np.float32))
  if vectors.ndim != 2:
    raise ValueError(f"{path}: tensor {name} is {list(np.shape(vectors))}; expected [n, dim] or [dim].")
  if token is None:
    token = os.path.splitext(os.path.basename(path))[0] if name == _A1111_KEY else name
  return token, vectors


def save_learned_embeds(path: str, token: str, vectors) -> str:
  """Writes `{token: vectors [n, dim]}` as diffusers' textual_inversion.py does; a directory `path`
  gets `learned_embeds.safetensors`. Returns the file written."""
  target = path if path.endswith(".safetensors") else os.path.join(path, WEIGHTS_NAME)
  vectors = np.atleast_2d(np.asarray(vectors, np.float32))
  write_safetensors(target, {token: vectors}, metadata={"format": "pt"})
  return target
