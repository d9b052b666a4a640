"""Conditioning keys: config checks, host-side preparation, condition dropout and the Conditioner."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.data.tokenizer import train_tokenizer
from ldm_jax.models import conditioning as cond_lib
from ldm_jax.config.sections import default_cond_config, default_unet_config
from ldm_jax.models.conditioning import (concat_channels, context_dim, drop_condition, inpaint_concat, make_conditioner, null_condition,
                                         prepare_condition, validate_cond_config)
from ldm_jax.models.unet import validate_unet_config

CAPTIONS = ['a red circle', 'a blue square left of a red circle', 'a green star on a white background',
            'a small red star', 'a large blue circle']


def _cfg(kind, **overrides):
  cfg = default_cond_config()
  cfg.kind = kind
  small = dict(num_classes=10, vocab_size=64, max_length=8, dim=16, depth=1, num_heads=2, head_dim=-1)
  for key, value in {**small, **overrides}.items():
    cfg[key] = value
  return cfg


@pytest.fixture(scope='module')
def tokenizer():
  return train_tokenizer(CAPTIONS, 64, max_length=8)


def test_defaults_are_the_papers_and_valid():
  cfg = default_cond_config()
  assert (cfg.kind, cfg.dropout_prob, cfg.class_mode, cfg.text_encoder) == ('none', 0.1, 'embedding', 'scratch')
  # LAION txt2img BERTEmbedder: 1280 wide, 32 blocks, 8 heads of 64, 77 tokens, BERT's vocabulary.
  assert (cfg.dim, cfg.depth, cfg.num_heads, cfg.head_dim, cfg.max_length, cfg.vocab_size) == (
      1280, 32, 8, 64, 77, 30522)
  for kind in cond_lib.KINDS:
    validate_cond_config(_cfg(kind, concat_channels=3))


@pytest.mark.parametrize('overrides,key', [
    (dict(kind='txt'), 'cond.kind'),
    (dict(dropout_prob=1.5), 'cond.dropout_prob'),
    (dict(kind='class', num_classes=-1), 'cond.num_classes'),
    (dict(kind='class', class_mode='film'), 'cond.class_mode'),
    (dict(kind='text', text_encoder='clip'), 'cond.text_encoder'),
    (dict(kind='text', num_heads=3), 'cond.num_heads'),
    (dict(kind='text', depth=0), 'cond.depth'),
    (dict(kind='text', tokenizer_dir='/no/such/dir'), 'cond.tokenizer_dir'),
    (dict(kind='hybrid', text_dropout=1.0), 'cond.text_dropout'),
    (dict(kind='concat', concat_source='depth'), 'cond.concat_source'),
    (dict(kind='concat', concat_source='lowres', concat_channels=0), 'cond.concat_channels'),
    (dict(kind='concat', concat_source='lowres', concat_channels=3, sr_factor=0), 'cond.sr_factor'),
    (dict(kind='hybrid', concat_source='map', concat_channels=-1), 'cond.concat_channels'),
])
def test_bad_config_names_the_key(overrides, key):
  cfg = _cfg('none')
  for name, value in overrides.items():
    cfg[name] = value
  with pytest.raises(ValueError, match=key.replace('.', r'\.')):
    validate_cond_config(cfg)


def test_unknown_key_is_named():
  cfg = _cfg('none')
  cfg.unlock()
  cfg.droput_prob = 0.2
  with pytest.raises(ValueError, match=r'cond\.droput_prob'):
    validate_cond_config(cfg)


def test_context_and_concat_channels_validate_the_unet():
  assert context_dim(_cfg('none')) is None and concat_channels(_cfg('none'), 4) == 0
  assert context_dim(_cfg('class')) is None
  assert cond_lib.num_class_embeddings(_cfg('class')) == 10  # model.num_classes of the U-Net
  assert cond_lib.num_class_embeddings(_cfg('class', class_mode='crossattn')) is None
  assert context_dim(_cfg('class', class_mode='crossattn')) == 16
  assert context_dim(_cfg('text')) == 16 and context_dim(_cfg('hybrid')) == 16
  assert concat_channels(_cfg('concat', concat_source='lowres', concat_channels=3), 4) == 3
  assert concat_channels(_cfg('hybrid', concat_source='inpaint'), 4) == 5
  assert concat_channels(_cfg('concat', concat_source='inpaint', concat_channels=5), 4) == 5
  with pytest.raises(ValueError, match=r'cond\.concat_channels'):
    concat_channels(_cfg('concat', concat_source='inpaint', concat_channels=3), 4)
  cfg = _cfg('hybrid', concat_source='inpaint')
  model = default_unet_config()
  model.update(in_channels=9, out_channels=4, model_channels=32, channel_mult=(1, 2), attention_resolutions=(1,),
               num_heads=2, context_dim=16)
  validate_unet_config(model, (8, 8, 4), context_dim(cfg), concat_channels=concat_channels(cfg, 4))
  model.context_dim = 768
  with pytest.raises(ValueError, match=r'model\.context_dim'):
    validate_unet_config(model, (8, 8, 4), context_dim(cfg), concat_channels=concat_channels(cfg, 4))


def test_prepare_and_null_condition_class():
  cfg = _cfg('class')
  batch = {'label': np.array([3, 0, 9]), 'caption': ['x'] * 3, 'image': np.zeros((3, 4, 4, 3))}
  prepared = prepare_condition(cfg, batch)
  assert set(prepared) == {'label'} and prepared['label'].dtype == np.int32
  np.testing.assert_array_equal(prepared['label'], [3, 0, 9])
  np.testing.assert_array_equal(null_condition(cfg, 3)['label'], [10, 10, 10])  # null = num_classes
  with pytest.raises(ValueError, match=r'cond\.num_classes'):
    prepare_condition(cfg, {'label': np.array([-1, 2])})  # an unlabelled source
  unresolved = _cfg('class', num_classes=0)  # 0 = from the data: valid, but must be resolved before use
  validate_cond_config(unresolved)
  for use in (lambda: null_condition(unresolved, 2), lambda: make_conditioner(unresolved),
              lambda: cond_lib.num_class_embeddings(unresolved)):
    with pytest.raises(ValueError, match=r'cond\.num_classes'):
      use()


def test_prepare_and_null_condition_text(tokenizer):
  cfg = _cfg('text')
  prepared = prepare_condition(cfg, {'caption': CAPTIONS[:2], 'label': np.array([-1, -1])}, tokenizer)
  np.testing.assert_array_equal(prepared['tokens'], tokenizer.tokenize(CAPTIONS[:2]))
  null = null_condition(cfg, 2, tokenizer)['tokens']
  cls_id, sep_id = tokenizer.backend.token_to_id('[CLS]'), tokenizer.backend.token_to_id('[SEP]')
  np.testing.assert_array_equal(null, [[cls_id, sep_id] + [tokenizer.pad_id] * 6] * 2)  # the empty caption
  with pytest.raises(ValueError, match='tokenizer'):
    prepare_condition(cfg, {'caption': CAPTIONS[:2]})


def test_sdxl_time_ids_tokens_2_and_zeroed_null(tokenizer):
  cfg = _cfg('text', text_encoder='pretrained', null_text='zeros', micro_conditioning='target_size')
  validate_cond_config(cfg)
  batch = {'caption': CAPTIONS[:2], 'original_size': [[1024, 768], [512, 512]], 'crop_coords_top_left': (0, 8),
           'target_size': (1024, 1024)}
  prepared = prepare_condition(cfg, batch, tokenizer, tokenizer_2=tokenizer)
  np.testing.assert_array_equal(prepared['time_ids'], [[1024, 768, 0, 8, 1024, 1024], [512, 512, 0, 8, 1024, 1024]])
  np.testing.assert_array_equal(prepared['tokens_2'], prepared['tokens'])
  np.testing.assert_array_equal(prepared['text_scale'], [1, 1])
  null = null_condition(cfg, 2, tokenizer, tokenizer)
  assert sorted(null) == ['text_scale', 'tokens', 'tokens_2'] and not null['text_scale'].any()
  refiner = _cfg('text', text_encoder='pretrained', micro_conditioning='aesthetic_score')
  prepared = prepare_condition(refiner, {'caption': CAPTIONS[:2], 'original_size': (64, 48),
                                         'crop_coords_top_left': (0, 0), 'aesthetic_score': 6.0}, tokenizer_2=tokenizer)
  assert sorted(prepared) == ['time_ids', 'tokens_2']
  np.testing.assert_array_equal(prepared['time_ids'], [[64, 48, 0, 0, 6]] * 2)
  with pytest.raises(ValueError, match=r"needs batch\['aesthetic_score'\]"):
    prepare_condition(refiner, {'caption': CAPTIONS[:2], 'original_size': (64, 48), 'crop_coords_top_left': (0, 0)},
                      tokenizer_2=tokenizer)
  with pytest.raises(ValueError, match="cond.micro_conditioning: 'target_size' is SDXL's"):
    validate_cond_config(_cfg('text', micro_conditioning='target_size'))


@pytest.mark.parametrize('prob', [0.0, 0.1, 0.5, 1.0])
def test_drop_condition_rate(prob):
  """Each example becomes null with probability prob (binomial 5σ), all its fields together."""
  n = 4000
  batch = {'label': np.arange(n, dtype=np.int32) % 7,
           'tokens': np.tile(np.array([[2, 5, 6, 3]], np.int32), (n, 1)),
           'concat': np.ones((n, 2, 2, 1), np.float32)}
  null = {'label': np.full((n,), 7, np.int32), 'tokens': np.tile(np.array([[2, 3, 0, 0]], np.int32), (n, 1))}
  out = jax.jit(drop_condition)(jax.random.key(0), batch, null, prob)
  dropped_label = np.asarray(out['label']) == 7
  dropped_tokens = (np.asarray(out['tokens']) == null['tokens']).all(axis=1)
  np.testing.assert_array_equal(dropped_label, dropped_tokens)
  kept = ~dropped_label
  np.testing.assert_array_equal(np.asarray(out['label'])[kept], batch['label'][kept])
  np.testing.assert_array_equal(np.asarray(out['tokens'])[kept], batch['tokens'][kept])
  np.testing.assert_array_equal(out['concat'], batch['concat'])  # concat maps are never dropped
  rate = dropped_label.mean()
  if prob in (0.0, 1.0):
    assert rate == prob
  else:
    assert abs(rate - prob) < 5 * np.sqrt(prob * (1 - prob) / n)
  assert out['label'].dtype == jnp.int32 and out['tokens'].dtype == jnp.int32


def test_drop_condition_varies_with_the_key_and_without_null_fields_is_identity():
  batch = {'label': np.zeros((64,), np.int32)}
  null = {'label': np.ones((1,), np.int32)}  # broadcast null rows are accepted
  a = np.asarray(drop_condition(jax.random.key(1), batch, null, 0.5)['label'])
  b = np.asarray(drop_condition(jax.random.key(2), batch, null, 0.5)['label'])
  assert 0 < a.sum() < 64 and (a != b).any()
  concat_only = {'concat': np.ones((4, 2, 2, 3), np.float32)}
  np.testing.assert_array_equal(drop_condition(jax.random.key(0), concat_only, {}, 1.0)['concat'],
                                concat_only['concat'])


def _init_apply(conditioner, batch_cond):
  params = conditioner.init(jax.random.key(0), batch_cond, deterministic=True)
  return params, conditioner.apply(params, batch_cond, deterministic=True)


def test_conditioner_class_embedding_mode_passes_labels():
  conditioner = make_conditioner(_cfg('class'))
  params, out = _init_apply(conditioner, {'label': np.array([1, 10], np.int32)})
  assert jax.tree_util.tree_leaves(params) == []
  assert out['context'] is None and out['concat'] is None
  np.testing.assert_array_equal(out['y'], [1, 10])


def test_conditioner_class_crossattn_gives_one_token_context():
  conditioner = make_conditioner(_cfg('class', class_mode='crossattn'))
  labels = np.array([3, 10, 3], np.int32)
  params, out = _init_apply(conditioner, {'label': labels})
  table = params['params']['class_embedder']['embedding']
  assert table.shape == (11, 16)  # num_classes + the null class
  assert out['context'].shape == (3, 1, 16) and out['y'] is None
  np.testing.assert_array_equal(out['context'][:, 0], table[labels])


def test_conditioner_text_context(tokenizer):
  cfg = _cfg('text')
  conditioner = make_conditioner(cfg, tokenizer)
  assert conditioner.pad_id == tokenizer.pad_id and conditioner.head_dim is None
  batch_cond = prepare_condition(cfg, {'caption': CAPTIONS[:3]}, tokenizer)
  params, out = _init_apply(conditioner, batch_cond)
  assert set(params['params']) == {'text_encoder'}
  assert out['context'].shape == (3, 8, 16) and out['y'] is None and out['concat'] is None
  null = conditioner.apply(params, null_condition(cfg, 3, tokenizer), deterministic=True)['context']
  assert np.abs(null - out['context']).max() > 1e-2
  np.testing.assert_allclose(null[0], null[1], atol=1e-6)
  assert make_conditioner(_cfg('text', mask_padding=False), tokenizer).pad_id is None
  with pytest.raises(ValueError, match=r'cond\.vocab_size'):
    make_conditioner(_cfg('text', vocab_size=8), tokenizer)
  with pytest.raises(ValueError, match=r"batch_cond\['tokens'\]"):
    conditioner.init(jax.random.key(0), {'label': np.zeros((1,), np.int32)}, deterministic=True)


def test_pooled_text_embedding_is_the_mean_of_the_non_padding_tokens(tokenizer):
  cfg = _cfg('text', pooled=True)
  conditioner = make_conditioner(cfg, tokenizer)
  batch_cond = prepare_condition(cfg, {'caption': CAPTIONS[:3]}, tokenizer)
  params, out = _init_apply(conditioner, batch_cond)
  tokens, context = np.asarray(batch_cond['tokens']), np.asarray(out['context'])
  keep = tokens != tokenizer.pad_id
  assert 0 < keep.sum(axis=1).min() < tokens.shape[1]  # padding present, so the mask matters
  expected = np.stack([context[i][keep[i]].mean(axis=0) for i in range(3)])
  np.testing.assert_allclose(out['text_embeds'], expected, rtol=1e-5, atol=1e-6)
  assert 'text_embeds' not in make_conditioner(_cfg('text'), tokenizer).apply(params, batch_cond, deterministic=True)
  with pytest.raises(ValueError, match=r'cond\.pooled'):
    validate_cond_config(_cfg('class', pooled=True))


def test_lowres_concat_is_the_box_downsampled_image_at_latent_size():
  image = np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  cfg = _cfg('concat', concat_source='lowres', concat_channels=3, sr_factor=4)
  # sr_factor == f: the 2×2 low-resolution image is the concat input itself.
  concat = prepare_condition(cfg, {'image': image}, latent_size=(2, 2))['concat']
  np.testing.assert_allclose(concat[0, 1, 0], image[0, 4:8, 0:4].mean(axis=(0, 1)), rtol=1e-6)
  # sr_factor > f: nearest-upsampled to the 4×4 latents.
  up = prepare_condition(cfg, {'image': image}, latent_size=(4, 4))['concat']
  np.testing.assert_array_equal(up, np.repeat(np.repeat(concat, 2, axis=1), 2, axis=2))
  cfg.sr_factor = 2  # sr_factor < f: box-averaged further
  np.testing.assert_allclose(prepare_condition(cfg, {'image': image}, latent_size=(2, 2))['concat'], concat,
                             rtol=1e-5, atol=1e-6)
  cfg.sr_factor = 3
  with pytest.raises(ValueError, match=r'cond\.sr_factor'):
    prepare_condition(cfg, {'image': image}, latent_size=(2, 2))
  cfg.sr_factor, cfg.concat_channels = 4, 1
  with pytest.raises(ValueError, match=r'cond\.concat_channels'):
    prepare_condition(cfg, {'image': image}, latent_size=(2, 2))


def test_concat_passes_through_the_conditioner_and_hybrid_adds_text(tokenizer):
  semantic_map = np.eye(5, dtype=np.float32)[np.random.default_rng(1).integers(0, 5, (2, 8, 8))]
  cfg = _cfg('hybrid', concat_source='map', concat_channels=5)
  batch_cond = prepare_condition(cfg, {'map': semantic_map, 'caption': CAPTIONS[:2]}, tokenizer, latent_size=(4, 4))
  np.testing.assert_array_equal(batch_cond['concat'], semantic_map[:, ::2, ::2])
  assert set(null_condition(cfg, 2, tokenizer)) == {'tokens'}
  _, out = _init_apply(make_conditioner(cfg, tokenizer), batch_cond)
  np.testing.assert_array_equal(out['concat'], batch_cond['concat'])
  assert out['context'].shape == (2, 8, 16) and out['y'] is None
  with pytest.raises(ValueError, match='latent_size'):
    prepare_condition(cfg, {'map': semantic_map, 'caption': CAPTIONS[:2]}, tokenizer)
  with pytest.raises(ValueError, match=r"batch\['map'\]"):
    prepare_condition(cfg, {'caption': CAPTIONS[:2]}, tokenizer, latent_size=(4, 4))


def test_inpaint_concat_is_mask_and_masked_image_latent():
  cfg = _cfg('concat', concat_source='inpaint')
  image = np.random.default_rng(2).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
  mask = np.zeros((2, 8, 8), np.float32)
  mask[0, :4, :4] = 1.0
  prepared = prepare_condition(cfg, {'image': image, 'mask': mask})
  np.testing.assert_array_equal(prepared['masked_image'][0, :4, :4], 0.0)
  np.testing.assert_array_equal(prepared['masked_image'][0, 4:], image[0, 4:])
  encode = lambda x: x[:, ::2, ::2, :2] * 0.5  # a stand-in autoencoder: f = 2, 2 latent channels
  out = jax.jit(lambda b: inpaint_concat(b, encode))(prepared)
  assert set(out) == {'concat'} and out['concat'].shape == (2, 4, 4, concat_channels(cfg, 2))
  np.testing.assert_array_equal(out['concat'][..., 0], mask[:, ::2, ::2])
  np.testing.assert_allclose(out['concat'][..., 1:], encode(prepared['masked_image']))
  # Without masks in the batch: random rectangles, reproducible from the numpy generator.
  drawn = [prepare_condition(cfg, {'image': image}, rng=np.random.default_rng(5))['mask'] for _ in range(2)]
  np.testing.assert_array_equal(drawn[0], drawn[1])
  assert set(np.unique(drawn[0])) == {0.0, 1.0} and 0.05 < drawn[0].mean() < 0.6
  with pytest.raises(ValueError, match='rng'):
    prepare_condition(cfg, {'image': image})
