"""Conditioning τ_θ(y) of the latent diffusion U-Net: the paper's conditioning keys, as `cond.*`.

`cond.kind` selects how a condition reaches ε_θ(z_t, t, τ(y)):

    'none'    unconditional.
    'class'   class labels; `class_mode` 'embedding': U-Net `y`, a learned embedding added to the
              time embedding (openaimodel `num_classes`); 'crossattn': a `class_embedder` table
              gives a one-token context [B, 1, dim] (CompVis `ClassEmbedder`, the paper's cin models).
    'text'    captions → tokenizer → `TransformerTextEncoder` (trained jointly with the U-Net) →
              context [B, max_length, dim] for cross-attention (the paper's text-to-image LDM);
              with `cond.pooled` also `text_embeds` [B, dim], the mean of the non-padding
              tokens, which the U-Net adds to its time embedding (model.addition_embed_type='text').
    'concat'  extra U-Net input channels at the latent resolution, from `concat_source`:
              'lowres'  the image box-downsampled by `sr_factor` (the super-resolution input), then
                        brought to the latent resolution (nearest upsampling or further box
                        averaging), kept in pixel values [-1, 1] and not encoded — as the paper's
                        SR model and SD's ×4 upscaler, where `sr_factor` equals the autoencoder's f
                        and no resampling happens. `concat_channels` = image channels.
              'inpaint' mask (1 = region to fill) + the latent of the masked image: 1 + latent
                        channels (SD-inpainting order). The mask comes from `batch['mask']` or
                        random rectangles; the trainer encodes the masked image (`inpaint_concat`).
              'map'     a semantic/layout map given in the batch as `batch['map']` [B, H, W,
                        concat_channels], subsampled (nearest) to the latent resolution.
    'hybrid'  'concat' and 'text' together (the paper's `hybrid` conditioning key).

Data flow of one training step:

    batch_cond = prepare_condition(cfg, batch, tokenizer, latent_size=(h, w), rng=np_rng)  # host
    null = null_condition(cfg, batch_size, tokenizer)                                        # once
    batch_cond = drop_condition(rng, batch_cond, null, cfg.dropout_prob)                      # jitted
    out = conditioner.apply(params, batch_cond, deterministic=False)   # {'context', 'y', 'concat'}
    eps = unet.apply(u_params, concat([z_t, out['concat']]), t, context=out['context'], y=out['y'])

Classifier-free guidance drops labels and captions, per example with probability `dropout_prob`,
to the null condition: class index `num_classes` (both class modes keep a row for it) or the empty
caption "" ([CLS] [SEP] [PAD] …); with `null_text='zeros'` (SDXL base, diffusers'
`force_zeros_for_empty_prompt`, sgm's dropped embeddings) the text embeddings themselves are zeroed:
the conditions carry 'text_scale' (1, the null condition 0) that the conditioner multiplies them by.

SDXL's pretrained conditioning (`ldm_jax.diffusion.latent_diffusion.TextEncoderConditioner`) reads
'tokens' (first tokenizer), 'tokens_2' (the second, `tokenizer_2`) and, with `micro_conditioning`,
'time_ids' float32 [B, 6] = (original H, W, crop top, left, target H, W) ('target_size', the base
model) or [B, 5] = (original H, W, crop top, left, aesthetic score) ('aesthetic_score', the
refiner), from the batch's 'original_size', 'crop_coords_top_left', 'target_size' /
'aesthetic_score'. Concat maps are never dropped — in LDM practice (SR, inpainting,
SD's upscaler and inpainting models) the unconditional branch of guidance sees the same concat
input — so `null_condition` has no 'concat' entry and the sampler reuses the conditional one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax.config.sections import default_cond_config
from ldm_jax.models.text import TransformerTextEncoder

KINDS = ('none', 'class', 'text', 'concat', 'hybrid')
CLASS_MODES = ('embedding', 'crossattn')
TEXT_ENCODERS = ('scratch', 'pretrained')
CONCAT_SOURCES = ('lowres', 'inpaint', 'map')
NULL_TEXTS = ('empty_prompt', 'zeros')
MICRO_CONDITIONING = ('none', 'target_size', 'aesthetic_score')
_TIME_ID_FIELDS = {'target_size': ('original_size', 'crop_coords_top_left', 'target_size'),
                   'aesthetic_score': ('original_size', 'crop_coords_top_left', 'aesthetic_score')}
_TEXT_KINDS = ('text', 'hybrid')
_CONCAT_KINDS = ('concat', 'hybrid')


class Tokenizer(Protocol):
  """What conditioning needs of a tokenizer; `ldm_jax.data.tokenizer.Tokenizer` is one.

  (Models do not import `ldm_jax.data`; `ldm_jax.data.tokenizer.build_tokenizer` loads or
  trains the tokenizer a `cond` section asks for.)
  """

  @property
  def vocab_size(self) -> int: ...

  @property
  def pad_id(self) -> int: ...

  @property
  def max_length(self) -> int: ...

  def tokenize(self, texts: Sequence[str]) -> np.ndarray: ...


def uses_text(cond_cfg: ml_collections.ConfigDict) -> bool:
  """Whether the conditioning tokenizes captions (kinds 'text' and 'hybrid')."""
  return cond_cfg.kind in _TEXT_KINDS


def _check_int(cfg, key: str, minimum: int) -> None:
  value = cfg[key]
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f'cond.{key}: expected an integer >= {minimum}, got {value!r}.')


def validate_cond_config(cond_cfg: ml_collections.ConfigDict) -> None:
  """Checks `cond.*` on its own (cheap, before anything compiles); ValueError naming the key."""
  known = set(default_cond_config().keys())
  unknown = sorted(set(cond_cfg.keys()) - known)
  if unknown:
    raise ValueError(f'cond.{unknown[0]}: not a conditioning setting; known keys: {", ".join(sorted(known))}.')
  missing = sorted(known - set(cond_cfg.keys()))
  if missing:
    raise ValueError(f'cond.{missing[0]}: missing; start the section from default_cond_config().')
  kind = cond_cfg.kind
  if kind not in KINDS:
    raise ValueError(f'cond.kind: unknown {kind!r}, expected one of {KINDS}.')
  prob = cond_cfg.dropout_prob
  if not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
    raise ValueError(f'cond.dropout_prob: {prob!r} is not a probability in [0, 1].')

  if kind == 'class':
    _check_int(cond_cfg, 'num_classes', 0)  # 0 is resolved from the data set by the trainer
    if cond_cfg.class_mode not in CLASS_MODES:
      raise ValueError(f'cond.class_mode: unknown {cond_cfg.class_mode!r}, expected one of {CLASS_MODES}.')
    if cond_cfg.class_mode == 'crossattn':
      _check_int(cond_cfg, 'dim', 1)

  if kind in _TEXT_KINDS:
    if cond_cfg.text_encoder not in TEXT_ENCODERS:
      raise ValueError(f'cond.text_encoder: unknown {cond_cfg.text_encoder!r}, expected one of {TEXT_ENCODERS}.')
    _check_int(cond_cfg, 'vocab_size', 5)
    for key in ('max_length', 'dim', 'depth', 'num_heads'):
      _check_int(cond_cfg, key, 2 if key == 'max_length' else 1)
    if cond_cfg.head_dim == -1:
      if cond_cfg.dim % cond_cfg.num_heads:
        raise ValueError(f'cond.num_heads: {cond_cfg.num_heads} does not divide cond.dim={cond_cfg.dim} '
                         '(cond.head_dim=-1); set cond.head_dim.')
    else:
      _check_int(cond_cfg, 'head_dim', 1)
    if not 0.0 <= cond_cfg.text_dropout < 1.0:
      raise ValueError(f'cond.text_dropout: {cond_cfg.text_dropout!r} is not in [0, 1).')
    if cond_cfg.null_text not in NULL_TEXTS:
      raise ValueError(f'cond.null_text: unknown {cond_cfg.null_text!r}, expected one of {NULL_TEXTS}.')
    if cond_cfg.tokenizer_dir and not os.path.isdir(cond_cfg.tokenizer_dir):
      raise ValueError(f'cond.tokenizer_dir: directory {cond_cfg.tokenizer_dir} does not exist '
                       "('' trains a tokenizer on the training captions).")

  if not isinstance(cond_cfg.pooled, bool):
    raise ValueError(f'cond.pooled: expected true or false, got {cond_cfg.pooled!r}.')
  if cond_cfg.pooled and (kind not in _TEXT_KINDS or cond_cfg.text_encoder != 'scratch'):
    raise ValueError(f"cond.pooled: the pooled text embedding is that of a text encoder trained from scratch "
                     f"(cond.kind 'text' or 'hybrid', cond.text_encoder='scratch'); got kind={kind!r}, "
                     f"text_encoder={cond_cfg.text_encoder!r}.")

  if cond_cfg.micro_conditioning not in MICRO_CONDITIONING:
    raise ValueError(f'cond.micro_conditioning: unknown {cond_cfg.micro_conditioning!r}, expected one of '
                     f'{MICRO_CONDITIONING}.')
  if cond_cfg.micro_conditioning != 'none' and (kind != 'text' or cond_cfg.text_encoder != 'pretrained'):
    raise ValueError(f"cond.micro_conditioning: {cond_cfg.micro_conditioning!r} is SDXL's, for cond.kind='text' "
                     f"with cond.text_encoder='pretrained'; got kind={kind!r}, text_encoder={cond_cfg.text_encoder!r}.")

  if kind in _CONCAT_KINDS:
    source = cond_cfg.concat_source
    if source not in CONCAT_SOURCES:
      raise ValueError(f'cond.concat_source: unknown {source!r}, expected one of {CONCAT_SOURCES}.')
    if source == 'inpaint':
      _check_int(cond_cfg, 'concat_channels', 0)
    else:
      _check_int(cond_cfg, 'concat_channels', 1)
    if source == 'lowres':
      _check_int(cond_cfg, 'sr_factor', 1)


def context_dim(cond_cfg: ml_collections.ConfigDict) -> int | None:
  """Channels of the cross-attention context the conditioner gives (model.context_dim), or None."""
  if cond_cfg.kind in _TEXT_KINDS or (cond_cfg.kind == 'class' and cond_cfg.class_mode == 'crossattn'):
    return cond_cfg.dim
  return None


def concat_channels(cond_cfg: ml_collections.ConfigDict, latent_channels: int) -> int:
  """Channels concatenated to the latent (model.in_channels = latent_channels + this)."""
  if cond_cfg.kind not in _CONCAT_KINDS:
    return 0
  if cond_cfg.concat_source == 'inpaint':
    derived = 1 + latent_channels
    if cond_cfg.concat_channels not in (0, derived):
      raise ValueError(f'cond.concat_channels: inpainting concatenates a mask and the {latent_channels}-channel '
                       f'masked-image latent, {derived} channels, not {cond_cfg.concat_channels}; set 0 or {derived}.')
    return derived
  return cond_cfg.concat_channels


def num_class_embeddings(cond_cfg: ml_collections.ConfigDict) -> int | None:
  """The U-Net's model.num_classes in 'embedding' class mode (its table adds the null row), else None."""
  if cond_cfg.kind == 'class' and cond_cfg.class_mode == 'embedding':
    return _num_classes(cond_cfg)
  return None


def _num_classes(cond_cfg) -> int:
  if cond_cfg.num_classes < 1:
    raise ValueError(f'cond.num_classes: {cond_cfg.num_classes}; set it, or resolve 0 from the data '
                     '(ldm_jax.data.num_classes) before building the model.')
  return cond_cfg.num_classes


def check_tokenizer(cond_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer) -> None:
  """ValueError naming the `cond.*` key that `tokenizer` does not fit."""
  if tokenizer.vocab_size > cond_cfg.vocab_size:
    raise ValueError(f'cond.vocab_size: {cond_cfg.vocab_size} rows cannot embed the tokenizer\'s '
                     f'{tokenizer.vocab_size} tokens; set cond.vocab_size >= {tokenizer.vocab_size}.')
  if tokenizer.max_length != cond_cfg.max_length:
    raise ValueError(f'cond.max_length: {cond_cfg.max_length}, but the tokenizer pads to '
                     f'{tokenizer.max_length} tokens.')


class Conditioner(nn.Module):
  """τ_θ: prepared conditions → what the U-Net consumes. Holds the trainable conditioning weights.

  Attributes mirror `cond.*` (see `make_conditioner`); `pad_id` is the tokenizer's padding id
  masked in the text encoder, or None for no mask.
  """
  kind: str = 'none'
  num_classes: int = 0
  class_mode: str = 'embedding'
  vocab_size: int = 30522
  max_length: int = 77
  dim: int = 1280
  depth: int = 32
  num_heads: int = 8
  head_dim: int | None = 64
  text_dropout: float = 0.0
  pad_id: int | None = 0
  pooled: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, batch_cond: Mapping[str, jax.Array], *,
               deterministic: bool) -> dict[str, jax.Array | None]:
    """Maps `batch_cond` (from `prepare_condition`, after `drop_condition`) to the U-Net's inputs.

    Returns:
      {'context': [B, L, dim] or None, 'y': int32 [B] or None, 'concat': [B, h, w, Cc] or None}.
    """
    out = {'context': None, 'y': None, 'concat': None}
    if self.kind == 'class':
      label = self._get(batch_cond, 'label')
      if self.class_mode == 'embedding':
        out['y'] = label
      else:
        table = nn.Embed(self.num_classes + 1, self.dim, dtype=self.dtype, name='class_embedder')
        out['context'] = table(label)[:, None, :]
    if self.kind in _TEXT_KINDS:
      encoder = TransformerTextEncoder(
          vocab_size=self.vocab_size, max_length=self.max_length, dim=self.dim, depth=self.depth,
          num_heads=self.num_heads, head_dim=self.head_dim, dropout=self.text_dropout,
          pad_id=self.pad_id, dtype=self.dtype, name='text_encoder')
      tokens = self._get(batch_cond, 'tokens')
      out['context'] = encoder(tokens, deterministic=deterministic)
      if self.pooled:
        out['text_embeds'] = _mean_over_tokens(out['context'], tokens, self.pad_id)
    if self.kind in _CONCAT_KINDS:
      out['concat'] = self._get(batch_cond, 'concat')
    return out

  def _get(self, batch_cond, key):
    if key not in batch_cond:
      raise ValueError(f"Conditioner (cond.kind={self.kind!r}) needs batch_cond[{key!r}], which "
                       f"prepare_condition provides; got keys {sorted(batch_cond)}.")
    return batch_cond[key]


def _mean_over_tokens(context: jax.Array, tokens: jax.Array, pad_id: int | None) -> jax.Array:
  """[B, L, D] → [B, D] float32: the mean over the tokens that are not padding (all with pad_id None)."""
  weights = jnp.ones(tokens.shape, jnp.float32) if pad_id is None else (tokens != pad_id).astype(jnp.float32)
  total = jnp.einsum('bld,bl->bd', context.astype(jnp.float32), weights)
  return total / jnp.maximum(weights.sum(axis=1, keepdims=True), 1.0)


def make_conditioner(cond_cfg: ml_collections.ConfigDict, tokenizer: Tokenizer | None = None,
                     dtype: jnp.dtype = jnp.float32) -> Conditioner:
  """The Conditioner of a validated `cond` section; text kinds need their tokenizer."""
  pad_id = None
  if cond_cfg.kind in _TEXT_KINDS:
    if cond_cfg.text_encoder == 'pretrained':
      raise ValueError("cond.text_encoder: 'pretrained' encoders come with their weights; wrap one in "
                       'ldm_jax.diffusion.latent_diffusion.TextEncoderConditioner (ldm_jax.load.make_conditioner).')
    if tokenizer is None:
      raise ValueError(f'cond.kind={cond_cfg.kind!r} needs a tokenizer (ldm_jax.data.tokenizer.build_tokenizer).')
    check_tokenizer(cond_cfg, tokenizer)
    pad_id = tokenizer.pad_id if cond_cfg.mask_padding else None
  return Conditioner(
      kind=cond_cfg.kind, num_classes=_num_classes(cond_cfg) if cond_cfg.kind == 'class' else 0,
      class_mode=cond_cfg.class_mode,
      vocab_size=cond_cfg.vocab_size, max_length=cond_cfg.max_length, dim=cond_cfg.dim,
      depth=cond_cfg.depth, num_heads=cond_cfg.num_heads,
      head_dim=None if cond_cfg.head_dim == -1 else cond_cfg.head_dim,
      text_dropout=cond_cfg.text_dropout, pad_id=pad_id, pooled=bool(cond_cfg.get('pooled', False)), dtype=dtype)


def num_time_ids(cond_cfg: ml_collections.ConfigDict) -> int:
  """Numbers in each example's SDXL `time_ids` (6 base, 5 refiner, 0 without micro-conditioning)."""
  fields = _TIME_ID_FIELDS.get(cond_cfg.micro_conditioning, ())
  return sum(1 if f == 'aesthetic_score' else 2 for f in fields)


def time_ids(cond_cfg: ml_collections.ConfigDict, batch: Mapping[str, Any], batch_size: int) -> np.ndarray:
  """SDXL's `time_ids` float32 [B, 6 | 5] from the batch's sizes, crop offsets and target size or
  aesthetic score (each given per example, [B, 2] / [B], or once, [2] / scalar)."""
  columns = []
  for field in _TIME_ID_FIELDS[cond_cfg.micro_conditioning]:
    width = 1 if field == 'aesthetic_score' else 2
    value = np.asarray(_field(batch, field, f'{cond_cfg.kind}, micro_conditioning={cond_cfg.micro_conditioning}'),
                       np.float32)
    if value.ndim == (0 if width == 1 else 1):  # one value for the whole batch
      value = np.broadcast_to(value.reshape(1, width), (batch_size, width))
    elif value.ndim == 1:
      value = value[:, None]
    if value.shape != (batch_size, width):
      raise ValueError(f"cond.micro_conditioning: batch[{field!r}] has shape {value.shape}; expected "
                       f"{'[B] or a scalar' if width == 1 else '[B, 2] or [2]'} (B = {batch_size}).")
    columns.append(value.reshape(batch_size, width))
  return np.concatenate(columns, axis=1)


def prepare_condition(cond_cfg: ml_collections.ConfigDict, batch: Mapping[str, Any],
                      tokenizer: Tokenizer | None = None, *, latent_size: tuple[int, int] | None = None,
                      rng: np.random.Generator | None = None,
                      tokenizer_2: Tokenizer | None = None) -> dict[str, np.ndarray]:
  """Host-side (numpy) conditions of a data batch, the input of `Conditioner`.

  Args:
    cond_cfg: the `cond` section.
    batch: a data batch; reads only what `cond.kind` needs: 'label' int [B], 'caption' str [B],
      'image' [B, H, W, C] in [-1, 1] (lowres, inpaint), 'mask' [B, H, W(, 1)] (inpaint,
      optional), 'map' [B, H, W, concat_channels] (map). For sampling, {'caption': prompts}
      or {'label': labels} is enough.
    tokenizer: for text kinds (SDXL: the first of two; the refiner has only `tokenizer_2`).
    latent_size: (h, w) of the latents, for 'lowres' and 'map'.
    rng: draws random inpainting rectangles when the batch has no 'mask'.
    tokenizer_2: SDXL's second tokenizer (its OpenCLIP bigG encoder), or None.

  Returns:
    'label' int32 [B] (class), 'tokens' int32 [B, max_length] (text, hybrid), 'tokens_2' (with
    tokenizer_2), 'text_scale' float32 [B] of ones (null_text='zeros'), 'time_ids' float32 [B, n]
    (micro_conditioning), 'concat' float32
    [B, h, w, Cc] (lowres, map) or 'mask' float32 [B, H, W, 1] and 'masked_image' float32
    [B, H, W, C] (inpaint: `inpaint_concat` turns them into 'concat' with the autoencoder).
  """
  kind = cond_cfg.kind
  out = {}
  if kind == 'class':
    label = np.asarray(_field(batch, 'label', kind), np.int32)
    num_classes = _num_classes(cond_cfg)
    bad = label[(label < 0) | (label >= num_classes)]
    if bad.size:
      raise ValueError(f'cond.num_classes: label {int(bad[0])} is outside [0, {num_classes}) '
                       '(unlabelled data gives -1).')
    out['label'] = label
  if kind in _TEXT_KINDS:
    if tokenizer is None and tokenizer_2 is None:
      raise ValueError(f'cond.kind={kind!r}: prepare_condition needs the tokenizer.')
    captions = list(_field(batch, 'caption', kind))
    out.update(_tokens(captions, tokenizer, tokenizer_2))
    if cond_cfg.null_text == 'zeros':
      out['text_scale'] = np.ones((len(captions),), np.float32)
  if cond_cfg.micro_conditioning != 'none':
    out['time_ids'] = time_ids(cond_cfg, batch, len(_field(batch, 'caption', kind)))
  if kind in _CONCAT_KINDS:
    source = cond_cfg.concat_source
    if source == 'inpaint':
      out.update(_inpaint_inputs(batch, rng, kind))
    else:
      if latent_size is None or len(latent_size) != 2:
        raise ValueError(f"cond.concat_source={source!r}: prepare_condition needs latent_size=(h, w).")
      if source == 'lowres':
        image = np.asarray(_field(batch, 'image', kind), np.float32)
        concat = _resize_lowres(_box_downsample(image, cond_cfg.sr_factor, 'cond.sr_factor'), latent_size)
      else:
        concat = _subsample_map(np.asarray(_field(batch, 'map', kind), np.float32), latent_size)
      if concat.shape[-1] != cond_cfg.concat_channels:
        raise ValueError(f'cond.concat_channels: {cond_cfg.concat_channels}, but the {source} input has '
                         f'{concat.shape[-1]} channels.')
      out['concat'] = concat
  return out


def _tokens(captions, tokenizer, tokenizer_2) -> dict[str, np.ndarray]:
  out = {}
  if tokenizer is not None:
    out['tokens'] = tokenizer.tokenize(captions)
  if tokenizer_2 is not None:
    out['tokens_2'] = tokenizer_2.tokenize(captions)
  return out


def null_condition(cond_cfg: ml_collections.ConfigDict, batch_size: int, tokenizer: Tokenizer | None = None,
                   tokenizer_2: Tokenizer | None = None) -> dict[str, np.ndarray]:
  """The unconditional input of guidance: label `num_classes`, tokens of "" (with null_text='zeros',
  'text_scale' 0: zeroed embeddings). No concat entry, no time_ids: the conditional ones are used."""
  out = {}
  if cond_cfg.kind == 'class':
    out['label'] = np.full((batch_size,), _num_classes(cond_cfg), np.int32)
  if cond_cfg.kind in _TEXT_KINDS:
    if tokenizer is None and tokenizer_2 is None:
      raise ValueError(f'cond.kind={cond_cfg.kind!r}: null_condition needs the tokenizer.')
    out.update(_tokens([''] * batch_size, tokenizer, tokenizer_2))
    if cond_cfg.null_text == 'zeros':
      out['text_scale'] = np.zeros((batch_size,), np.float32)
  return out


def drop_condition(rng: jax.Array, batch_cond: Mapping[str, jax.Array], null_cond: Mapping[str, jax.Array],
                   prob: float | jax.Array) -> dict[str, jax.Array]:
  """Per example, with probability `prob`, replaces every field of `null_cond` by its null value.

  Jit-able. Fields absent from `null_cond` (concat maps) pass through unchanged. `null_cond`
  rows are [B, …] or broadcastable [1, …].
  """
  out = dict(batch_cond)
  if not null_cond:
    return out
  batch_size = batch_cond[next(iter(null_cond))].shape[0]
  drop = jax.random.bernoulli(rng, prob, (batch_size,))
  for key, null in null_cond.items():
    value = jnp.asarray(batch_cond[key])
    where = drop.reshape((batch_size,) + (1,) * (value.ndim - 1))
    out[key] = jnp.where(where, jnp.asarray(null, value.dtype), value)
  return out


def inpaint_concat(batch_cond: Mapping[str, jax.Array],
                   encode: Callable[[jax.Array], jax.Array]) -> dict[str, jax.Array]:
  """'mask' + 'masked_image' → 'concat' [B, h, w, 1 + c] = [mask at latent resolution, encode(masked image)].

  Jit-able. `encode` maps images [B, H, W, C] to latents [B, h, w, c] as the U-Net sees them
  (the frozen autoencoder, times scale_factor). The mask is subsampled by the stride H/h
  (torch nearest interpolation, as SD's inpainting pipeline).
  """
  out = {k: v for k, v in batch_cond.items() if k not in ('mask', 'masked_image')}
  latent = encode(batch_cond['masked_image'])
  mask = jnp.asarray(batch_cond['mask'])
  sh, sw = mask.shape[1] // latent.shape[1], mask.shape[2] // latent.shape[2]
  out['concat'] = jnp.concatenate([mask[:, ::sh, ::sw].astype(latent.dtype), latent], axis=-1)
  return out


def _field(batch, key, kind):
  if key not in batch:
    raise ValueError(f"cond.kind={kind!r} needs batch[{key!r}]; the batch has {sorted(batch)}.")
  return batch[key]


def _box_downsample(x: np.ndarray, factor: int, key: str) -> np.ndarray:
  """[B, H, W, C] → [B, H/f, W/f, C], the mean of each f×f cell."""
  b, h, w, c = x.shape
  if h % factor or w % factor:
    raise ValueError(f'{key}: {factor} does not divide the {h}×{w} images.')
  return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def _resize_lowres(low: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Brings the low-resolution image to the latent size by integer nearest up- or box downsampling."""
  (_, h, w, _), (th, tw) = low.shape, size
  if (h, w) == (th, tw):
    return low
  if th % h == 0 and tw % w == 0 and th // h == tw // w:
    return np.repeat(np.repeat(low, th // h, axis=1), tw // w, axis=2)
  if h % th == 0 and w % tw == 0 and h // th == w // tw:
    return _box_downsample(low, h // th, 'cond.sr_factor')
  raise ValueError(f'cond.sr_factor: the {h}×{w} low-resolution image cannot be brought to the {th}×{tw} '
                   'latents by an integer factor.')


def _subsample_map(semantic_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[B, H, W, C] map → [B, h, w, C] by nearest (stride) subsampling, which keeps labels discrete."""
  if semantic_map.ndim != 4:
    raise ValueError(f"cond.concat_source='map': batch['map'] must be [B, H, W, C], got {semantic_map.shape}.")
  (_, h, w, _), (th, tw) = semantic_map.shape, size
  if h % th or w % tw:
    raise ValueError(f"cond.concat_source='map': the {h}×{w} map does not subsample to the {th}×{tw} latents.")
  return semantic_map[:, ::h // th, ::w // tw]


def _inpaint_inputs(batch, rng: np.random.Generator | None, kind: str) -> dict[str, np.ndarray]:
  image = np.asarray(_field(batch, 'image', kind), np.float32)
  b, h, w, _ = image.shape
  if 'mask' in batch:
    mask = np.asarray(batch['mask'], np.float32).reshape(b, h, w, 1)
  else:
    if rng is None:
      raise ValueError("cond.concat_source='inpaint': the batch has no 'mask'; pass rng to draw random "
                       'rectangles.')
    mask = np.zeros((b, h, w, 1), np.float32)
    for i in range(b):  # one rectangle with sides in [1/4, 3/4] of the image
      mh, mw = rng.integers(h // 4, 3 * h // 4 + 1), rng.integers(w // 4, 3 * w // 4 + 1)
      top, left = rng.integers(0, h - mh + 1), rng.integers(0, w - mw + 1)
      mask[i, top:top + mh, left:left + mw] = 1.0
  return {'mask': mask, 'masked_image': image * (1.0 - mask)}
