"""diffusers configs ↔ ldm_jax configs, and diffusers component folders ↔ (config, params).

A diffusers component folder is `config.json` + `diffusion_pytorch_model.safetensors` (or a sharded
index, or an `.fp16` variant). The ldm_jax models carry diffusers' parameter names, so weights
convert with the generic rule of `ldm_jax.convert.naming`; this module translates the configs:

    AutoencoderKL / VQModel        model.* of `ldm_jax.models.autoencoder.make_autoencoder`
      block_out_channels             ch = block_out_channels[0], ch_mult = block_out_channels / ch
      layers_per_block               num_res_blocks
      latent_channels                z_channels (= embed_dim for KL; VQ: embed_dim = vq_embed_dim)
      Attn{Down,Up}…Block2D          attn_resolutions (the side at that level, from sample_size)
      num_vq_embeddings              n_embed
      norm_num_groups                num_groups (written only when not 32)
      scaling_factor                 the latent scale_factor (returned beside the config)
    UNet2DConditionModel           model.* of `ldm_jax.models.unet.make_unet`
      block_out_channels             model_channels, channel_mult
      CrossAttn{Down,Up}Block2D      attention_resolutions (2^level)
      attention_head_dim             heads per level (diffusers' legacy name): equal counts →
                                     num_heads; equal widths (SD 2.x: 64) → num_head_channels
      cross_attention_dim            context_dim (a per-level list equal to the widths: None,
                                     the layout of a U-Net whose attn2 attends to itself)
      transformer_layers_per_block   transformer_depth (one, or one per level: SDXL);
                                     use_linear_projection (SD 2.x, SDXL)
      resnet_time_scale_shift        use_scale_shift_norm ('scale_shift')
      num_class_embeds               num_classes + 1 (ldm_jax's last row is the null class)
      addition_embed_type 'text_time'   addition_embed_type (SDXL micro-conditioning), with
      addition_time_embed_dim           addition_time_embed_dim and
      projection_class_embeddings_input_dim   addition_embed_dim
    DDIMScheduler, PNDMScheduler…  diffusion.* (beta_schedule, num_timesteps, linear_start/end,
                                   zero_terminal_snr, parameterization)

Settings with no ldm_jax equivalent (other block types, act_fn ≠ silu, SpatialNorm VQ decoders,
addition embeddings other than SDXL's 'text_time', …) raise a ValueError naming the key, rather than loading a model that
computes something else.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from collections.abc import Mapping
from typing import Any

from ldm_jax.convert import naming
from ldm_jax.convert.safetensors_io import read_weights, write_safetensors
from ldm_jax.models import autoencoder as ae_lib

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model.fp16.safetensors", "model.safetensors", "model.safetensors.index.json",
                "model.fp16.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin")
DIFFUSERS_VERSION = "0.40.0"  # written into exported configs; any diffusers ≥ 0.40 reads them
_AE_CLASSES = ("AutoencoderKL", "VQModel")
_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


# ---------------------------------------------------------------------------------------------
# Folders

def read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: not found.")
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj: Mapping) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def weight_file(directory: str) -> str:
  """The weight file of a diffusers/transformers component folder (safetensors preferred)."""
  for name in WEIGHT_FILES:
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return path
  raise FileNotFoundError(f"{directory}: no weights; expected one of {', '.join(WEIGHT_FILES)}.")


def read_component(directory: str) -> tuple[dict, dict]:
  """(config.json, state dict) of a component folder."""
  return read_json(os.path.join(directory, "config.json")), read_weights(weight_file(directory))


def write_component(directory: str, config: Mapping, state: Mapping, weights_name: str) -> None:
  """Writes `config.json` and `weights_name` (safetensors with metadata format 'pt')."""
  write_json(os.path.join(directory, "config.json"), config)
  write_safetensors(os.path.join(directory, weights_name), state, metadata={"format": "pt"})


def diffusers_version() -> str:
  """The installed diffusers version, for exported configs (DIFFUSERS_VERSION without diffusers)."""
  try:
    return importlib.metadata.version("diffusers")
  except importlib.metadata.PackageNotFoundError:
    return DIFFUSERS_VERSION


def _require(cfg: Mapping, key: str, allowed, where: str, default=None) -> None:
  value = cfg.get(key, default)
  if value not in allowed:
    raise ValueError(f"{where}: config.json {key}={value!r} has no ldm_jax equivalent (supported: "
                     f"{', '.join(map(repr, allowed))}).")


def _levels(block_out_channels, where: str) -> tuple[int, tuple[int, ...]]:
  boc = [int(c) for c in block_out_channels]
  base = boc[0]
  if any(c % base for c in boc):
    raise ValueError(f"{where}: block_out_channels={boc} are not multiples of the first, so they are no "
                     "ch × ch_mult.")
  return base, tuple(c // base for c in boc)


def _side(sample_size) -> int:
  return int(sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size)


# ---------------------------------------------------------------------------------------------
# Autoencoders

def autoencoder_config_from_diffusers(cfg: Mapping[str, Any], where: str = "vae") -> tuple[dict, float]:
  """diffusers AutoencoderKL/VQModel config → (ldm_jax `model.*` autoencoder config, scaling_factor)."""
  cls = cfg.get("_class_name")
  _require(cfg, "_class_name", _AE_CLASSES, where)
  _require(cfg, "act_fn", ("silu",), where, "silu")
  _require(cfg, "mid_block_add_attention", (True,), where, True)
  if cls == "AutoencoderKL":
    for key in ("use_quant_conv", "use_post_quant_conv"):
      _require(cfg, key, (True,), where, True)
    for key in ("shift_factor", "latents_mean", "latents_std"):
      _require(cfg, key, (None,), where, None)
  else:
    _require(cfg, "norm_type", ("group",), where, "group")
  ch, ch_mult = _levels(cfg.get("block_out_channels", (64,)), where)
  down = list(cfg.get("down_block_types", ("DownEncoderBlock2D",)))
  up = list(cfg.get("up_block_types", ("UpDecoderBlock2D",)))
  if len(down) != len(ch_mult) or len(up) != len(ch_mult):
    raise ValueError(f"{where}: {len(down)} down and {len(up)} up blocks for {len(ch_mult)} block_out_channels.")
  attn = []
  for i, (d, u) in enumerate(zip(down, reversed(up))):
    _require({"down_block_types": d}, "down_block_types", ("DownEncoderBlock2D", "AttnDownEncoderBlock2D"), where)
    _require({"up_block_types": u}, "up_block_types", ("UpDecoderBlock2D", "AttnUpDecoderBlock2D"), where)
    if d.startswith("Attn") != u.startswith("Attn"):
      raise ValueError(f"{where}: down_block_types[{i}]={d} and up_block_types[{len(up) - 1 - i}]={u} differ in "
                       "attention; ldm_jax's decoder mirrors the encoder.")
    attn.append(d.startswith("Attn"))
  f = ae_lib.downsampling_factor({"ch_mult": ch_mult})
  resolution = _side(cfg.get("sample_size", 32))
  if resolution % f:
    resolution = f * max(1, round(resolution / f))
  in_channels = int(cfg.get("in_channels", 3))
  if int(cfg.get("out_channels", 3)) != in_channels:
    raise ValueError(f"{where}: out_channels={cfg.get('out_channels')} differs from in_channels={in_channels}; "
                     "ldm_jax autoencoders reconstruct their input channels.")
  latent = int(cfg.get("latent_channels", 4 if cls == "AutoencoderKL" else 3))
  model = dict(kind="kl" if cls == "AutoencoderKL" else "vq", embed_dim=latent, z_channels=latent, ch=ch,
               ch_mult=ch_mult, num_res_blocks=int(cfg.get("layers_per_block", 1)),
               attn_resolutions=tuple(resolution // 2**i for i, a in enumerate(attn) if a),
               dropout=0.0, in_channels=in_channels, resolution=resolution)
  if int(cfg.get("norm_num_groups", 32)) != 32:
    model["num_groups"] = int(cfg["norm_num_groups"])
  if cls == "VQModel":
    model.update(n_embed=int(cfg.get("num_vq_embeddings", 256)),
                 embed_dim=int(cfg.get("vq_embed_dim") or latent))
  return model, float(cfg.get("scaling_factor", 0.18215))


def autoencoder_config_to_diffusers(model: Mapping[str, Any], scale_factor: float = 1.0) -> dict:
  """ldm_jax autoencoder `model.*` → diffusers AutoencoderKL/VQModel config.json."""
  kind, ch_mult = model["kind"], tuple(model["ch_mult"])
  if kind == "identity":
    raise ValueError("model.kind: 'identity' — a pixel-space run has no autoencoder, and diffusers' latent "
                     "pipelines need one. Export with --format safetensors.")
  if ch_mult[0] != 1:
    raise ValueError(f"model.ch_mult: {ch_mult} starts with {ch_mult[0]}; diffusers' first level keeps the "
                     "conv_in width, so it needs ch_mult[0] = 1. Export with --format safetensors.")
  if kind == "kl" and model["embed_dim"] != model["z_channels"]:
    raise ValueError(f"model.embed_dim: {model['embed_dim']} ≠ z_channels={model['z_channels']}; diffusers' "
                     "AutoencoderKL has one latent width. Export with --format safetensors.")
  reached = [model["resolution"] // 2**i for i in range(len(ch_mult))]
  attn = [r in tuple(model["attn_resolutions"]) for r in reached]
  cfg = {
      "_class_name": "AutoencoderKL" if kind == "kl" else "VQModel", "_diffusers_version": diffusers_version(),
      "in_channels": model["in_channels"], "out_channels": model["in_channels"],
      "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
      "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)],
      "block_out_channels": [model["ch"] * m for m in ch_mult], "layers_per_block": model["num_res_blocks"],
      "act_fn": "silu", "latent_channels": model["z_channels"], "norm_num_groups": int(model.get("num_groups", 32)),
      "sample_size": model["resolution"], "scaling_factor": float(scale_factor),
      "mid_block_add_attention": True,
  }
  if kind == "kl":
    cfg.update(force_upcast=True, use_quant_conv=True, use_post_quant_conv=True)
  else:
    cfg.update(num_vq_embeddings=model["n_embed"], vq_embed_dim=model["embed_dim"], norm_type="group",
               lookup_from_codebook=False, force_upcast=False)
  return cfg


VQ_OVERRIDES = {"quantize/embedding": "quantize.embedding.weight"}


# ---------------------------------------------------------------------------------------------
# U-Net

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
_UNET_FIXED = {  # key: (supported values, diffusers default)
    "center_input_sample": ((False,), False), "mid_block_type": (("UNetMidBlock2DCrossAttn",), "UNetMidBlock2DCrossAttn"),
    "only_cross_attention": ((False,), False), "downsample_padding": ((1,), 1),
    "mid_block_scale_factor": ((1, 1.0), 1), "act_fn": (("silu",), "silu"), "norm_eps": ((1e-5,), 1e-5),
    "encoder_hid_dim": ((None,), None), "encoder_hid_dim_type": ((None,), None),
    "dual_cross_attention": ((False,), False), "class_embed_type": ((None,), None),
    "addition_embed_type": ((None, "text_time"), None), "resnet_skip_time_act": ((False,), False),
    "resnet_out_scale_factor": ((1, 1.0), 1.0), "time_embedding_type": (("positional",), "positional"),
    "time_embedding_dim": ((None,), None), "time_embedding_act_fn": ((None,), None),
    "timestep_post_act": ((None,), None), "time_cond_proj_dim": ((None,), None),
    "conv_in_kernel": ((3,), 3), "conv_out_kernel": ((3,), 3),
    "attention_type": (("default",), "default"),
    "class_embeddings_concat": ((False,), False), "mid_block_only_cross_attention": ((None, False), None),
    "cross_attention_norm": ((None,), None), "num_attention_heads": ((None,), None),
    "reverse_transformer_layers_per_block": ((None,), None),
}


def _per_level(value, n: int, key: str, where: str) -> list:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"{where}: config.json {key} has {len(value)} entries for {n} blocks.")
    return list(value)
  return [value] * n


def unet_config_from_diffusers(cfg: Mapping[str, Any], where: str = "unet") -> dict:
  """diffusers UNet2DConditionModel config → ldm_jax `model.*` U-Net config."""
  _require(cfg, "_class_name", ("UNet2DConditionModel",), where)
  for key, (allowed, default) in _UNET_FIXED.items():
    _require(cfg, key, allowed, where, default)
  _require(cfg, "resnet_time_scale_shift", ("default", "scale_shift"), where, "default")
  model_channels, channel_mult = _levels(cfg.get("block_out_channels", (320, 640, 1280, 1280)), where)
  n = len(channel_mult)
  widths = [model_channels * m for m in channel_mult]
  down = list(cfg.get("down_block_types", ()))
  up = list(cfg.get("up_block_types", ()))
  if len(down) != n or len(up) != n:
    raise ValueError(f"{where}: {len(down)} down and {len(up)} up blocks for {n} block_out_channels.")
  attended = []
  for i, (d, u) in enumerate(zip(down, reversed(up))):
    _require({"down_block_types": d}, "down_block_types", _DOWN, where)
    _require({"up_block_types": u}, "up_block_types", _UP, where)
    if d.startswith("CrossAttn") != u.startswith("CrossAttn"):
      raise ValueError(f"{where}: down_block_types[{i}]={d} and up_block_types[{n - 1 - i}]={u} differ in "
                       "attention; ldm_jax's U-Net attends at the same levels on both paths.")
    attended.append(d.startswith("CrossAttn"))
  layers = _per_level(cfg.get("layers_per_block", 2), n, "layers_per_block", where)
  if len(set(layers)) != 1:
    raise ValueError(f"{where}: layers_per_block={layers} differs per level; ldm_jax has one num_res_blocks.")
  depth = _per_level(cfg.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block", where)
  if not all(isinstance(d, int) for d in depth):
    raise ValueError(f"{where}: transformer_layers_per_block={cfg.get('transformer_layers_per_block')}; ldm_jax "
                     "takes one depth per level, the same on the way down and up (not per block).")
  transformer_depth = depth[0] if len(set(depth)) == 1 else tuple(depth)
  addition: dict[str, Any] = {}
  if cfg.get("addition_embed_type") == "text_time":
    if cfg.get("projection_class_embeddings_input_dim") is None:
      raise ValueError(f"{where}: addition_embed_type='text_time' needs projection_class_embeddings_input_dim.")
    addition = dict(addition_embed_type="text_time",
                    addition_time_embed_dim=int(cfg.get("addition_time_embed_dim") or 256),
                    addition_embed_dim=int(cfg["projection_class_embeddings_input_dim"]))
  elif cfg.get("projection_class_embeddings_input_dim") is not None:
    raise ValueError(f"{where}: config.json projection_class_embeddings_input_dim="
                     f"{cfg['projection_class_embeddings_input_dim']} without addition_embed_type='text_time' "
                     "(a projected class embedding) has no ldm_jax equivalent.")

  heads = _per_level(cfg.get("attention_head_dim", 8), n, "attention_head_dim", where)
  used = sorted({level for level, a in enumerate(attended) if a} | {n - 1})  # the mid block uses the last
  if len({heads[level] for level in used}) == 1:
    num_heads, num_head_channels = int(heads[used[0]]), -1
  else:
    head_widths = {widths[level] // heads[level] for level in used}
    if len(head_widths) != 1 or any(widths[level] % heads[level] for level in used):
      raise ValueError(f"{where}: attention_head_dim={cfg.get('attention_head_dim')} gives neither one head "
                       "count nor one head width on the attended levels; ldm_jax needs one of the two.")
    num_heads, num_head_channels = 8, head_widths.pop()

  cross = cfg.get("cross_attention_dim", 1280)
  if isinstance(cross, (list, tuple)):
    if list(cross) != widths:
      raise ValueError(f"{where}: cross_attention_dim={list(cross)} per block; ldm_jax supports one context "
                       f"width, or the block widths {widths} (attn2 attending to the image tokens).")
    context_dim = None
  else:
    context_dim = int(cross)
  num_class_embeds = cfg.get("num_class_embeds")
  if num_class_embeds is not None and num_class_embeds < 2:
    raise ValueError(f"{where}: num_class_embeds={num_class_embeds}; ldm_jax's class table needs ≥ 2 rows "
                     "(classes + the null class).")
  return dict(
      in_channels=int(cfg.get("in_channels", 4)), out_channels=int(cfg.get("out_channels", 4)),
      model_channels=model_channels, channel_mult=channel_mult, num_res_blocks=int(layers[0]),
      attention_resolutions=tuple(2**level for level, a in enumerate(attended) if a),
      num_heads=num_heads, num_head_channels=num_head_channels, transformer_depth=transformer_depth,
      context_dim=context_dim, use_spatial_transformer=True,
      use_linear_projection=bool(cfg.get("use_linear_projection", False)),
      use_scale_shift_norm=cfg.get("resnet_time_scale_shift", "default") == "scale_shift",
      resblock_updown=False, num_classes=None if num_class_embeds is None else int(num_class_embeds) - 1,
      dropout=float(cfg.get("dropout", 0.0)), num_groups=int(cfg.get("norm_num_groups", 32)),
      flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)), freq_shift=float(cfg.get("freq_shift", 0)),
      **addition)


def unet_config_to_diffusers(model: Mapping[str, Any], sample_size: int | None = None) -> dict:
  """ldm_jax U-Net `model.*` → diffusers UNet2DConditionModel config.json."""
  if not model.get("use_spatial_transformer", True):
    raise ValueError("model.use_spatial_transformer: False (openaimodel AttentionBlock) has no "
                     "UNet2DConditionModel equivalent. Export with --format safetensors.")
  if model.get("resblock_updown", False):
    raise ValueError("model.resblock_updown: True has no UNet2DConditionModel equivalent. Export with "
                     "--format safetensors.")
  if model.get("addition_embed_type") == "text":
    raise ValueError("model.addition_embed_type: 'text' (the pooled embedding of a text encoder trained from "
                     "scratch) has no UNet2DConditionModel equivalent. Export with --format safetensors.")
  mult = tuple(model["channel_mult"])
  if mult[0] != 1:
    raise ValueError(f"model.channel_mult: {mult} starts with {mult[0]}; diffusers' first level keeps the "
                     "conv_in width, so it needs channel_mult[0] = 1. Export with --format safetensors.")
  n = len(mult)
  widths = [model["model_channels"] * m for m in mult]
  attended = [2**level in tuple(model["attention_resolutions"]) for level in range(n)]
  if model.get("num_head_channels", -1) == -1:
    heads: Any = int(model.get("num_heads", 8))
  else:
    heads = [max(1, w // model["num_head_channels"]) for w in widths]
  context_dim = model.get("context_dim")
  num_classes = model.get("num_classes")
  depth = model.get("transformer_depth", 1)
  text_time = model.get("addition_embed_type") == "text_time"
  return {
      "_class_name": "UNet2DConditionModel", "_diffusers_version": diffusers_version(),
      "sample_size": sample_size, "in_channels": model["in_channels"], "out_channels": model["out_channels"],
      "center_input_sample": False, "flip_sin_to_cos": bool(model.get("flip_sin_to_cos", True)),
      "freq_shift": float(model.get("freq_shift", 0.0)),
      "down_block_types": [_DOWN[0] if a else _DOWN[1] for a in attended],
      "mid_block_type": "UNetMidBlock2DCrossAttn",
      "up_block_types": [_UP[0] if a else _UP[1] for a in reversed(attended)],
      "only_cross_attention": False, "block_out_channels": widths, "layers_per_block": model["num_res_blocks"],
      "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": float(model.get("dropout", 0.0)),
      "act_fn": "silu", "norm_num_groups": int(model.get("num_groups", 32)), "norm_eps": 1e-5,
      "cross_attention_dim": widths if context_dim is None else int(context_dim),
      "transformer_layers_per_block": int(depth) if isinstance(depth, int) else [int(d) for d in depth],
      "attention_head_dim": heads, "use_linear_projection": bool(model.get("use_linear_projection", False)),
      "num_class_embeds": None if num_classes is None else int(num_classes) + 1,
      "upcast_attention": False,
      "resnet_time_scale_shift": "scale_shift" if model.get("use_scale_shift_norm", False) else "default",
      "addition_embed_type": "text_time" if text_time else None,
      "addition_time_embed_dim": int(model.get("addition_time_embed_dim", 256)) if text_time else None,
      "projection_class_embeddings_input_dim": int(model["addition_embed_dim"]) if text_time else None,
  }


# ---------------------------------------------------------------------------------------------
# Schedulers

def diffusion_config_from_scheduler(cfg: Mapping[str, Any], where: str = "scheduler") -> dict:
  """diffusers scheduler_config.json → ldm_jax `diffusion.*` keys (schedule and parameterization)."""
  if cfg.get("trained_betas") is not None:
    raise ValueError(f"{where}: trained_betas are not supported; ldm_jax schedules are "
                     f"{', '.join(_BETA_SCHEDULES)}.")
  _require(cfg, "beta_schedule", tuple(_BETA_SCHEDULES), where, "linear")
  _require(cfg, "prediction_type", tuple(_PREDICTION_TYPES), where, "epsilon")
  return dict(beta_schedule=_BETA_SCHEDULES[cfg.get("beta_schedule", "linear")],
              num_timesteps=int(cfg.get("num_train_timesteps", 1000)),
              linear_start=float(cfg.get("beta_start", 0.0001)), linear_end=float(cfg.get("beta_end", 0.02)),
              zero_terminal_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
              parameterization=_PREDICTION_TYPES[cfg.get("prediction_type", "epsilon")])


def scheduler_config_from_diffusion(diffusion: Mapping[str, Any]) -> dict:
  """ldm_jax `diffusion.*` → a DDIMScheduler config as Stable Diffusion's (leading spacing, offset 1)."""
  names = {v: k for k, v in _BETA_SCHEDULES.items()}
  predictions = {v: k for k, v in _PREDICTION_TYPES.items()}
  zero_snr = bool(diffusion.get("zero_terminal_snr", False))
  return {
      "_class_name": "DDIMScheduler", "_diffusers_version": diffusers_version(),
      "beta_schedule": names[diffusion.get("beta_schedule", "scaled_linear")],
      "beta_start": float(diffusion.get("linear_start", 0.00085)), "beta_end": float(diffusion.get("linear_end", 0.012)),
      "num_train_timesteps": int(diffusion.get("num_timesteps", 1000)), "clip_sample": False,
      "set_alpha_to_one": False, "steps_offset": 1, "trained_betas": None,
      "prediction_type": predictions[diffusion.get("parameterization", "eps")],
      "rescale_betas_zero_snr": zero_snr, "timestep_spacing": "trailing" if zero_snr else "leading",
  }


# ---------------------------------------------------------------------------------------------
# Component folders ↔ params

def load_autoencoder(directory: str, expected) -> dict:
  """Params of the diffusers AutoencoderKL/VQModel in `directory`; `expected` is the model's tree."""
  cfg, state = read_component(directory)
  return naming.torch_to_flax(state, expected, what=f"diffusers {cfg.get('_class_name')} in {directory}")


def autoencoder_state(model: Mapping[str, Any], params) -> dict:
  """The diffusers state dict of ldm_jax autoencoder params."""
  return naming.flax_to_torch(params, overrides=VQ_OVERRIDES if model["kind"] == "vq" else None)


def load_unet(directory: str, expected) -> dict:
  """Params of the diffusers UNet2DConditionModel in `directory`."""
  cfg, state = read_component(directory)
  return naming.torch_to_flax(state, expected, what=f"diffusers {cfg.get('_class_name')} in {directory}")


def unet_state(params) -> dict:
  return naming.flax_to_torch(params)


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
