"""Caption tokenizers: a BERT-style WordPiece tokenizer trained on the captions, or any local HF folder.

    tok = train_tokenizer(captions(data_cfg, 'train'), vocab_size=8192, max_length=77)
    tok.save(workdir + '/tokenizer')            # tokenizer.json + tokenizer_config.json
    tok = load_tokenizer(workdir + '/tokenizer')
    ids = tok.tokenize(['a red circle', ''])    # int32 [2, 77]: [CLS] … [SEP] [PAD] …

The paper's text-to-image LDM tokenizes with BERT's uncased WordPiece tokenizer (CompVis
`BERTTokenizer`, 77 tokens, padded to max length). Without the hub we build the same kind of
tokenizer from the training captions with HF `tokenizers` (lowercasing BERT normaliser, BERT
pre-tokenizer, WordPiece, `[CLS] … [SEP]` template, `[PAD]` = 0), or read one from a local folder.
The saved folder is also a valid `transformers` tokenizer folder (`AutoTokenizer.from_pretrained`).
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
import tokenizers
from absl import logging
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors

from ldm_jax.models import conditioning

SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]')  # ids 0..3 of a trained tokenizer
_PAD_CANDIDATES = ('[PAD]', '<pad>', '<|pad|>')
_CONFIG_FILE = 'tokenizer_config.json'
_UNSET_MAX_LENGTH = 10**6  # transformers writes ~1e30 when a tokenizer has no length limit


class Tokenizer:
  """Turns captions into fixed-length int32 token ids, deterministically.

  Wraps an HF `tokenizers.Tokenizer` (whose special-token template, e.g. `[CLS] $A [SEP]`, is
  applied). Captions are truncated to `max_length` tokens, special tokens included, and padded
  with `pad_id` after the last token.

  Placeholder tokens of textual inversion (`add_tokens`) follow diffusers: a token of n vectors is
  the added tokens `tok`, `tok_1`, …, `tok_{n-1}`, and a caption that contains `tok` has it
  replaced by `tok tok_1 … tok_{n-1}` before encoding (`StableDiffusionPipeline.maybe_convert_prompt`).
  """

  def __init__(self, backend: tokenizers.Tokenizer, *, max_length: int, pad_id: int,
               source: str = 'tokenizer'):
    if not isinstance(max_length, int) or max_length < 2:
      raise ValueError(f'tokenizer max_length must be an integer >= 2, got {max_length!r}')
    if backend.get_vocab_size(with_added_tokens=False) == 0:
      raise ValueError(f'{source}: the tokenizer vocabulary is empty')
    # A private copy: the caller's object keeps its own padding/truncation settings.
    self._backend = tokenizers.Tokenizer.from_str(backend.to_str())
    self._backend.no_padding()
    self._backend.enable_truncation(max_length=max_length)
    self._max_length = max_length
    self._pad_id = pad_id
    self._warned_truncation = False
    added = {t.content for t in self._backend.get_added_tokens_decoder().values() if not t.special}
    self._expansions = {}
    for token in added:
      n = 1
      while f'{token}_{n}' in added:
        n += 1
      if n > 1:
        self._expansions[token] = ' '.join([token] + [f'{token}_{i}' for i in range(1, n)])

  @property
  def vocab_size(self) -> int:
    """Number of token ids (special tokens included); ids lie in [0, vocab_size)."""
    return self._backend.get_vocab_size()

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def backend(self) -> tokenizers.Tokenizer:
    """The underlying HF `tokenizers.Tokenizer` (truncating to max_length, not padding)."""
    return self._backend

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    """texts: B captions → int32 [B, max_length] token ids, padded with `pad_id`."""
    texts = [self._expand(str(t)) for t in texts]
    ids = np.full((len(texts), self._max_length), self._pad_id, np.int32)
    for i, encoding in enumerate(self._backend.encode_batch(texts)):
      ids[i, :len(encoding.ids)] = encoding.ids
      if encoding.overflowing and not self._warned_truncation:
        # Once per tokenizer: a data set with long captions would otherwise flood the log.
        self._warned_truncation = True
        logging.warning('Caption truncated to max_length=%d tokens (further truncations are not '
                        'reported): %r', self._max_length, texts[i])
    return ids

  def _expand(self, text: str) -> str:
    """Multi-vector placeholder tokens → all their vectors' tokens (diffusers' rule, on the raw text)."""
    if not self._expansions:
      return text
    for token in set(self._backend.encode(text, add_special_tokens=False).tokens):
      if token in self._expansions:
        text = text.replace(token, self._expansions[token])
    return text

  def add_tokens(self, tokens: Sequence[str]) -> 'Tokenizer':
    """A new tokenizer with `tokens` added (ids vocab_size, vocab_size + 1, … in order), as
    transformers' `add_tokens` adds them: matched in the normalised text, never split.

    Raises:
      ValueError naming a token that is empty, repeated or already in the vocabulary.
    """
    for i, token in enumerate(tokens):
      if not isinstance(token, str) or not token.strip():
        raise ValueError(f'add_tokens: token {i} is {token!r}; expected a non-empty string.')
      if self._backend.token_to_id(token) is not None or token in tokens[:i]:
        raise ValueError(f'add_tokens: {token!r} is already in the vocabulary; choose another placeholder '
                         '(e.g. <my-concept>).')
    backend = tokenizers.Tokenizer.from_str(self._backend.to_str())
    backend.add_tokens([tokenizers.AddedToken(t, normalized=True, special=False) for t in tokens])
    return Tokenizer(backend, max_length=self._max_length, pad_id=self._pad_id)

  def token_id(self, token: str) -> int | None:
    """The id of a token of the vocabulary (None if it has none)."""
    return self._backend.token_to_id(token)

  def decode(self, ids: Sequence[int]) -> str:
    """Token ids → text, special tokens and padding skipped."""
    return self._backend.decode([int(i) for i in ids], skip_special_tokens=True)

  def save(self, directory: str) -> None:
    """Writes `tokenizer.json` and `tokenizer_config.json` (max length, pad token) to `directory`."""
    os.makedirs(directory, exist_ok=True)
    backend = tokenizers.Tokenizer.from_str(self._backend.to_str())
    backend.no_truncation()
    backend.save(os.path.join(directory, 'tokenizer.json'))
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'model_max_length': self._max_length,
              'pad_token': backend.id_to_token(self._pad_id)}
    config.update({name: token for name, token in zip(('unk_token', 'cls_token', 'sep_token'),
                                                       SPECIAL_TOKENS[1:])
                   if backend.token_to_id(token) is not None})
    with open(os.path.join(directory, _CONFIG_FILE), 'w') as f:
      json.dump(config, f, indent=2)


def train_tokenizer(captions: Iterable[str], vocab_size: int, *, max_length: int) -> Tokenizer:
  """Builds an uncased BERT-style WordPiece tokenizer from `captions`.

  The vocabulary is the special tokens, every character of the captions (as a word start and as
  a `##` continuation; the most frequent ones if they alone overflow `vocab_size`), then whole
  words by decreasing frequency (ties alphabetically) until `vocab_size`. WordPiece's greedy
  longest match then encodes a known word as one token and an unseen one as its longest known
  prefix plus pieces ('circles' → 'circle', '##s'), so only unseen characters become `[UNK]`.
  HF's `WordPieceTrainer` is not used: its merges depend on hash-map order, and two runs on the
  same captions give different vocabularies.

  Args:
    captions: the training captions (e.g. `ldm_jax.data.captions(data_cfg, 'train')`).
    vocab_size: upper bound on the vocabulary, special tokens included.
    max_length: token sequence length of `tokenize`, `[CLS]` and `[SEP]` included.

  Returns:
    A tokenizer whose vocabulary depends only on the multiset of captions.
  """
  if not isinstance(vocab_size, int) or vocab_size <= len(SPECIAL_TOKENS):
    raise ValueError(f'tokenizer vocab_size must be an integer > {len(SPECIAL_TOKENS)}, got {vocab_size!r}')
  normalizer = normalizers.BertNormalizer(lowercase=True)
  pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  words = collections.Counter()
  for caption in captions:
    words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(str(caption))))
  if not words:
    raise ValueError('train_tokenizer: the captions are empty; no vocabulary can be learned')
  chars = collections.Counter()
  for word, count in words.items():
    for char in word:
      chars[char] += count
  by_frequency = lambda counter: sorted(counter, key=lambda item: (-counter[item], item))
  budget = vocab_size - len(SPECIAL_TOKENS)
  alphabet = sorted(by_frequency(chars)[:budget // 2])
  vocab = list(SPECIAL_TOKENS) + alphabet + ['##' + c for c in alphabet]
  known = set(vocab)
  vocab += [w for w in by_frequency(words) if w not in known][:vocab_size - len(vocab)]

  backend = tokenizers.Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token='[UNK]'))
  backend.normalizer = normalizer
  backend.pre_tokenizer = pre_tokenizer
  backend.decoder = decoders.WordPiece()
  backend.add_special_tokens(list(SPECIAL_TOKENS))
  backend.post_processor = processors.TemplateProcessing(
      single='[CLS] $A [SEP]', pair='[CLS] $A [SEP] $B:1 [SEP]:1',
      special_tokens=[('[CLS]', vocab.index('[CLS]')), ('[SEP]', vocab.index('[SEP]'))])
  return Tokenizer(backend, max_length=max_length, pad_id=vocab.index('[PAD]'))


def load_tokenizer(directory: str, *, max_length: int | None = None) -> Tokenizer:
  """Reads a local HF tokenizer folder.

  Accepted layouts: `tokenizer.json` (HF `tokenizers`, what `Tokenizer.save` writes), or a
  `transformers` folder that `AutoTokenizer.from_pretrained` reads (e.g. BERT's `vocab.txt`
  or CLIP's `vocab.json` + `merges.txt`, with `tokenizer_config.json` naming the class).
  A bare `vocab.txt` without config is read as an uncased BERT WordPiece vocabulary.

  Args:
    directory: the folder.
    max_length: token sequence length; None takes `model_max_length` from `tokenizer_config.json`.

  Raises:
    ValueError naming `directory` when it is missing, holds no tokenizer, has an empty
    vocabulary, no padding token, or no length limit while `max_length` is None.
  """
  if not os.path.isdir(directory):
    raise ValueError(f'tokenizer folder {directory} does not exist')
  config = {}
  config_path = os.path.join(directory, _CONFIG_FILE)
  if os.path.exists(config_path):
    with open(config_path) as f:
      config = json.load(f)

  json_path = os.path.join(directory, 'tokenizer.json')
  if os.path.exists(json_path):
    try:
      backend = tokenizers.Tokenizer.from_file(json_path)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'tokenizer folder {directory}: cannot read tokenizer.json: {e}') from e
    pad_token = config.get('pad_token')
    if isinstance(pad_token, dict):  # older transformers store AddedToken dicts
      pad_token = pad_token.get('content')
    pad_id = _pad_id(backend, pad_token)
  else:
    backend, pad_id = _load_with_transformers(directory, config)

  if backend.get_vocab_size(with_added_tokens=False) == 0:
    raise ValueError(f'tokenizer folder {directory}: the vocabulary is empty')
  if pad_id is None:
    raise ValueError(f'tokenizer folder {directory}: no padding token (none of {_PAD_CANDIDATES}, '
                     f'and no pad_token in {_CONFIG_FILE})')
  if max_length is None:
    max_length = config.get('model_max_length')
    if not isinstance(max_length, int) or max_length >= _UNSET_MAX_LENGTH:
      raise ValueError(f'tokenizer folder {directory}: {_CONFIG_FILE} sets no model_max_length; '
                       'pass max_length')
  return Tokenizer(backend, max_length=max_length, pad_id=pad_id, source=f'tokenizer folder {directory}')


def build_tokenizer(cond_cfg, captions: Iterable[str]) -> Tokenizer | None:
  """The tokenizer a `cond` config section asks for; None when it does not use text.

  Reads `cond.tokenizer_dir`, or trains on `captions` (consumed only then, so the lazy
  `ldm_jax.data.captions(data_cfg, data_cfg.train_split)` costs nothing otherwise), and checks
  that it fits `cond.vocab_size` and `cond.max_length`. Save it in the workdir: resuming and
  sampling must use the same ids.
  """
  if not conditioning.uses_text(cond_cfg):
    return None
  if cond_cfg.tokenizer_dir:
    tokenizer = load_tokenizer(cond_cfg.tokenizer_dir, max_length=cond_cfg.max_length)
  else:
    tokenizer = train_tokenizer(captions, cond_cfg.vocab_size, max_length=cond_cfg.max_length)
  conditioning.check_tokenizer(cond_cfg, tokenizer)
  return tokenizer


def _pad_id(backend: tokenizers.Tokenizer, pad_token: str | None) -> int | None:
  for token in ((pad_token,) if pad_token else ()) + _PAD_CANDIDATES:
    token_id = backend.token_to_id(token)
    if token_id is not None:
      return token_id
  if backend.padding is not None:
    return backend.padding['pad_id']
  return None


def _load_with_transformers(directory: str, config: dict) -> tuple[tokenizers.Tokenizer, int | None]:
  """A `transformers` tokenizer folder without tokenizer.json → (backend, pad id)."""
  # transformers is imported only here: it is slow to import and most runs never need it.
  import transformers  # pylint: disable=g-import-not-at-top
  vocab_txt = os.path.join(directory, 'vocab.txt')
  has_bpe = all(os.path.exists(os.path.join(directory, f)) for f in ('vocab.json', 'merges.txt'))
  if not config and not has_bpe and os.path.exists(vocab_txt):
    # transformers 5 cannot infer a class from a bare vocab.txt, and silently ignores
    # `vocab_file=`; pass the vocabulary itself.
    with open(vocab_txt, encoding='utf-8') as f:
      vocab = {line.rstrip('\n'): i for i, line in enumerate(f) if line.rstrip('\n')}
    if not vocab:
      raise ValueError(f'tokenizer folder {directory}: the vocabulary {vocab_txt} is empty')
    if '[UNK]' not in vocab:
      raise ValueError(f'tokenizer folder {directory}: {vocab_txt} has no [UNK] token; '
                       'it is not a BERT WordPiece vocabulary')
    hf = transformers.BertTokenizerFast(vocab=vocab, do_lower_case=True)
  elif config or has_bpe:
    try:
      hf = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'tokenizer folder {directory}: transformers cannot read it ({e})') from e
  else:
    raise ValueError(f'tokenizer folder {directory}: no tokenizer.json, vocab.txt or '
                     'vocab.json + merges.txt')
  backend = getattr(hf, 'backend_tokenizer', None)
  if backend is None:
    raise ValueError(f'tokenizer folder {directory}: {type(hf).__name__} has no fast (tokenizers) '
                     'backend; add a tokenizer.json')
  pad_id = hf.pad_token_id if hf.pad_token_id is not None else _pad_id(backend, None)
  return backend, pad_id
