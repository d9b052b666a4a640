"""Caption tokenizers: trained WordPiece on shapes captions, save/load, local transformers folders."""

import json
import logging

import numpy as np
import pytest

from ldm_jax.config.sections import default_cond_config, default_data_config
from ldm_jax.data import captions
from ldm_jax.data.tokenizer import SPECIAL_TOKENS, Tokenizer, build_tokenizer, load_tokenizer, train_tokenizer

MAX_LENGTH = 12


@pytest.fixture(scope='module')
def shapes_captions():
  cfg = default_data_config()
  cfg.num_examples = 300
  return list(captions(cfg, 'train'))


@pytest.fixture(scope='module')
def tokenizer(shapes_captions):
  return train_tokenizer(shapes_captions, 1000, max_length=MAX_LENGTH)


def test_trained_tokenizer_round_trips_known_words_and_pads(tokenizer, shapes_captions):
  assert SPECIAL_TOKENS == ('[PAD]', '[UNK]', '[CLS]', '[SEP]')
  assert tokenizer.pad_id == 0 and tokenizer.max_length == MAX_LENGTH
  assert len(SPECIAL_TOKENS) < tokenizer.vocab_size <= 1000
  vocab = tokenizer.backend.get_vocab()
  ids = tokenizer.tokenize(['A Red circle', 'a red circle', ''])
  assert ids.dtype == np.int32 and ids.shape == (3, MAX_LENGTH)
  # Lowercased; whole words of the captions are single tokens between [CLS] and [SEP].
  expected = [vocab['[CLS]'], vocab['a'], vocab['red'], vocab['circle'], vocab['[SEP]']]
  np.testing.assert_array_equal(ids[0, :5], expected)
  np.testing.assert_array_equal(ids[0], ids[1])
  assert (ids[0, 5:] == tokenizer.pad_id).all()
  np.testing.assert_array_equal(ids[2], [vocab['[CLS]'], vocab['[SEP]']] + [0] * (MAX_LENGTH - 2))
  assert tokenizer.decode(ids[0]) == 'a red circle'
  short = [c for c in shapes_captions if len(c.split()) <= MAX_LENGTH - 2][:20]
  assert short and all(tokenizer.decode(row) == c for row, c in zip(tokenizer.tokenize(short), short))
  # Unseen words: longest known prefix + continuation pieces; unseen characters: [UNK].
  assert tokenizer.backend.encode('circles').tokens == ['[CLS]', 'circle', '##s', '[SEP]']
  assert tokenizer.backend.encode('a red ∆').tokens == ['[CLS]', 'a', 'red', '[UNK]', '[SEP]']


def test_training_is_deterministic_and_bounded(tokenizer, shapes_captions):
  shuffled = list(np.random.default_rng(0).permutation(shapes_captions))
  for _ in range(3):
    again = train_tokenizer(shuffled, 1000, max_length=MAX_LENGTH)
    assert again.backend.get_vocab() == tokenizer.backend.get_vocab()
  num_chars = len(set(''.join(shapes_captions).replace(' ', '')))
  small = train_tokenizer(shapes_captions, 4 + 2 * num_chars + 3, max_length=MAX_LENGTH)
  assert small.vocab_size == 4 + 2 * num_chars + 3
  # The three most frequent words made it; every caption still encodes without [UNK].
  assert {'a', 'on', 'background'} <= set(small.backend.get_vocab())
  assert not (small.tokenize(shapes_captions[:50]) == 1).any()


def test_long_caption_is_truncated_with_one_warning(shapes_captions, caplog):
  tok = train_tokenizer(shapes_captions, 1000, max_length=6)
  long_caption = 'a small red circle above a large blue square'
  with caplog.at_level(logging.WARNING):
    ids = tok.tokenize([long_caption, 'a red circle'])
    tok.tokenize([long_caption + ' again'])
  vocab = tok.backend.get_vocab()
  # [CLS] + the first four words + [SEP]: the template's special tokens survive truncation.
  np.testing.assert_array_equal(ids[0], [vocab[w] for w in ('[CLS]', 'a', 'small', 'red', 'circle', '[SEP]')])
  np.testing.assert_array_equal(ids[1], [vocab[w] for w in ('[CLS]', 'a', 'red', 'circle', '[SEP]', '[PAD]')])
  warnings = [r.getMessage() for r in caplog.records if 'truncated' in r.getMessage()]
  assert len(warnings) == 1
  assert long_caption in warnings[0] and 'max_length=6' in warnings[0]


def test_save_load_gives_identical_ids(tokenizer, shapes_captions, tmp_path):
  tokenizer.save(str(tmp_path))
  loaded = load_tokenizer(str(tmp_path))
  assert (loaded.vocab_size, loaded.pad_id, loaded.max_length) == (tokenizer.vocab_size, 0, MAX_LENGTH)
  texts = shapes_captions[:50] + ['', 'UNSEEN words here']
  np.testing.assert_array_equal(loaded.tokenize(texts), tokenizer.tokenize(texts))
  assert load_tokenizer(str(tmp_path), max_length=20).tokenize(['a']).shape == (1, 20)


def test_saved_folder_is_a_transformers_tokenizer(tokenizer, tmp_path):
  transformers = pytest.importorskip('transformers')
  tokenizer.save(str(tmp_path))
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
  text = 'a blue square left of a red circle'
  assert hf(text)['input_ids'] == [int(i) for i in tokenizer.tokenize([text])[0] if i != 0]
  assert hf.pad_token_id == tokenizer.pad_id


def test_bert_style_transformers_folder_loads(tmp_path):
  transformers = pytest.importorskip('transformers')
  words = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'red', 'circle', '##s']
  vocab = {w: i for i, w in enumerate(words)}
  # A folder as older transformers wrote BERT's: vocab.txt + tokenizer_config.json, no tokenizer.json.
  (tmp_path / 'vocab.txt').write_text('\n'.join(words) + '\n')
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
      {'tokenizer_class': 'BertTokenizer', 'do_lower_case': True, 'model_max_length': 8}))
  tok = load_tokenizer(str(tmp_path))
  assert tok.max_length == 8 and tok.pad_id == 0 and tok.vocab_size == len(words)
  np.testing.assert_array_equal(tok.tokenize(['A red circles, a blue circle']),
                                [[2, 5, 6, 7, 8, 1, 5, 3]])  # 'circles' → circle ##s; ',' unknown
  # The same folder written by save_pretrained from an in-memory vocabulary (tokenizer.json path).
  saved = tmp_path / 'saved'
  transformers.BertTokenizerFast(vocab=vocab, do_lower_case=True).save_pretrained(str(saved))
  np.testing.assert_array_equal(load_tokenizer(str(saved), max_length=8).tokenize(['a red circle']),
                                [[2, 5, 6, 7, 3, 0, 0, 0]])
  # A bare vocab.txt (no config) is read as uncased BERT.
  bare = tmp_path / 'bare'
  bare.mkdir()
  (bare / 'vocab.txt').write_text('\n'.join(words) + '\n')
  np.testing.assert_array_equal(load_tokenizer(str(bare), max_length=6).tokenize(['RED']), [[2, 6, 3, 0, 0, 0]])


def test_clip_style_bpe_folder_loads(tmp_path):
  pytest.importorskip('transformers')
  vocab = {'<|startoftext|>': 0, '<|endoftext|>': 1, 'a</w>': 2, 'r': 3, 'e': 4, 'd</w>': 5, 're': 6, 'red</w>': 7}
  (tmp_path / 'vocab.json').write_text(json.dumps(vocab))
  (tmp_path / 'merges.txt').write_text('#version: 0.2\nr e\nre d</w>\n')
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(
      {'tokenizer_class': 'CLIPTokenizer', 'model_max_length': 6, 'pad_token': '<|endoftext|>'}))
  tok = load_tokenizer(str(tmp_path))
  assert tok.pad_id == 1
  np.testing.assert_array_equal(tok.tokenize(['a red']), [[0, 2, 7, 1, 1, 1]])


@pytest.mark.parametrize('layout', ['missing', 'no_files', 'empty_vocab_txt', 'empty_vocab_with_config',
                                    'empty_tokenizer_json'])
def test_unusable_folder_errors_name_the_path(tmp_path, layout):
  folder = tmp_path / layout
  if layout != 'missing':
    folder.mkdir()
  if layout == 'empty_vocab_txt':
    (folder / 'vocab.txt').write_text('')
  elif layout == 'empty_vocab_with_config':
    (folder / 'vocab.txt').write_text('')
    (folder / 'tokenizer_config.json').write_text(json.dumps({'tokenizer_class': 'BertTokenizer'}))
  elif layout == 'empty_tokenizer_json':
    import tokenizers  # pylint: disable=g-import-not-at-top
    tokenizers.Tokenizer(tokenizers.models.WordLevel({}, unk_token='[UNK]')).save(str(folder / 'tokenizer.json'))
  with pytest.raises(ValueError, match=str(folder)):
    load_tokenizer(str(folder), max_length=8)


def test_folder_without_length_needs_max_length(tokenizer, tmp_path):
  tokenizer.save(str(tmp_path))
  config = json.loads((tmp_path / 'tokenizer_config.json').read_text())
  config['model_max_length'] = int(1e30)  # what transformers writes for "no limit"
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match='max_length'):
    load_tokenizer(str(tmp_path))


def test_bad_arguments():
  with pytest.raises(ValueError, match='vocab_size'):
    train_tokenizer(['a b'], 3, max_length=8)
  with pytest.raises(ValueError, match='empty'):
    train_tokenizer([], 100, max_length=8)
  with pytest.raises(ValueError, match='max_length'):
    train_tokenizer(['a b'], 100, max_length=1)
  assert isinstance(train_tokenizer(['a b'], 100, max_length=4), Tokenizer)


def _text_cond(**overrides):
  cfg = default_cond_config()
  cfg.update({'kind': 'text', 'vocab_size': 1000, 'max_length': MAX_LENGTH, **overrides})
  return cfg


def test_build_tokenizer_trains_or_loads_and_fits_the_config(tokenizer, shapes_captions, tmp_path):
  cfg = _text_cond()
  cfg.kind = 'class'
  assert build_tokenizer(cfg, iter(())) is None  # no text: the captions are not even read
  texts = shapes_captions[:20]
  trained = build_tokenizer(_text_cond(), shapes_captions)
  np.testing.assert_array_equal(trained.tokenize(texts), tokenizer.tokenize(texts))
  tokenizer.save(str(tmp_path))
  loaded = build_tokenizer(_text_cond(tokenizer_dir=str(tmp_path)), iter(()))
  np.testing.assert_array_equal(loaded.tokenize(texts), tokenizer.tokenize(texts))
  with pytest.raises(ValueError, match=r'cond\.vocab_size'):
    build_tokenizer(_text_cond(vocab_size=tokenizer.vocab_size - 1, tokenizer_dir=str(tmp_path)), iter(()))
