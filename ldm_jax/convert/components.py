"""The model components a converter handles: how to build each one from its config, and its parameter shapes.

    'autoencoder'   `model.*` of a stage-1 config          → AutoencoderKL | VQModel
    'unet'          `model.*` of a stage-2 config          → UNet
    'text_encoder'  {'kind': 'clip' | 'bert', fields…}     → CLIPTextEncoder | BertTextEncoder
    'text_encoder_2'  SDXL's second text encoder (CLIP with projection), configured as 'text_encoder'

`abstract_params` traces `init` (no compilation, no memory) to get the parameter tree that
weights must fill; the converters check files against it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.models import unet as unet_lib
from ldm_jax.models.bert import make_bert_text_encoder
from ldm_jax.models.clip import make_clip_text_encoder

COMPONENTS = ("autoencoder", "unet", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def _plain(cfg) -> dict[str, Any]:
  return dict(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg)


def build(component: str, cfg: Mapping[str, Any]):
  """The linen module of `component` configured by `cfg`."""
  cfg = _plain(cfg)
  if component == "autoencoder":
    return ae_lib.make_autoencoder(cfg)
  if component == "unet":
    return unet_lib.make_unet(cfg)
  if component in TEXT_ENCODERS:
    kind = cfg.get("kind")
    if kind == "clip":
      return make_clip_text_encoder(cfg)
    if kind == "bert":
      return make_bert_text_encoder(cfg)
    raise ValueError(f"text_encoder.kind: {kind!r} is not 'clip' or 'bert'.")
  raise ValueError(f"component {component!r} is not one of {COMPONENTS}.")


def example_inputs(component: str, cfg: Mapping[str, Any]) -> tuple[tuple, dict]:
  """(args, kwargs) for `module.init` (after the rng) that reach every parameter."""
  cfg = _plain(cfg)
  if component == "autoencoder":
    side = 2 * ae_lib.downsampling_factor(cfg)
    return (jnp.zeros((1, side, side, cfg["in_channels"])),), {"method": "init_all"}
  if component == "unet":
    side = unet_lib.downsampling_factor(cfg["channel_mult"])
    context = None if cfg.get("context_dim") is None else jnp.zeros((1, 1, cfg["context_dim"]))
    y = None if cfg.get("num_classes") is None else jnp.zeros((1,), jnp.int32)
    kwargs = {}
    if cfg.get("addition_embed_type") == "text_time":  # any split of the width gives the same parameters
      time_dim = cfg.get("addition_time_embed_dim", 256)
      kwargs = dict(text_embeds=jnp.zeros((1, cfg["addition_embed_dim"] - time_dim)), time_ids=jnp.zeros((1, 1)))
    elif cfg.get("addition_embed_type") == "text":  # the pooled text embedding alone
      kwargs = dict(text_embeds=jnp.zeros((1, cfg["addition_embed_dim"])))
    return (jnp.zeros((1, side, side, cfg["in_channels"])), jnp.zeros((1,), jnp.int32), context, y), kwargs
  if component in TEXT_ENCODERS:
    return (jnp.zeros((1, 2), jnp.int32),), {}
  raise ValueError(f"component {component!r} is not one of {COMPONENTS}.")


def abstract_params(component: str, cfg: Mapping[str, Any], module=None):
  """The parameter tree of `component` as ShapeDtypeStructs (traced, not computed)."""
  module = build(component, cfg) if module is None else module
  args, kwargs = example_inputs(component, cfg)
  return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))["params"]
