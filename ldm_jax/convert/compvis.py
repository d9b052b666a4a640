"""CompVis / Stability single-file checkpoints: key maps to diffusers names, and configs from shapes.

Each part of a file (see `ldm_jax.convert.single_file` for the prefixes) is renamed to diffusers
names (CompVis `down.{i}.block.{j}` → `down_blocks.{i}.resnets.{j}`, openaimodel `input_blocks.{n}` →
`down_blocks.{level}.…`, SDXL's `label_emb.0.{0,2}` → `add_embedding.linear_{1,2}`) and then
loaded by the generic rule of `ldm_jax.convert.naming`, which reports every missing, unexpected or
mis-shaped tensor at once. The paper's BERTEmbedder conditioner (x-transformers names) maps to
ldm_jax's `TransformerTextEncoder`; pretrained text encoders are `ldm_jax.convert.single_file_text`'s.

The architecture is read from the tensor shapes. Not in the weights: the U-Net's attention head
counts (SD 1.x: 8 heads; SD 2.x and SDXL: 64 channels per head — guessed from the projection type
unless given) and, for SDXL, the number of time ids of `label_emb.0.0` (given by the caller).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ldm_jax.config.sections import default_cond_config
from ldm_jax.convert import components, naming
from ldm_jax.convert.single_file_text import SGM_PREFIX
from ldm_jax.diffusion.schedule import beta_schedule
from ldm_jax.models import conditioning
from ldm_jax.models.unet import attention_heads

UNET_PREFIX = "model.diffusion_model."
AE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."


def strip_prefix(state: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _ints(keys, pattern: str) -> list[int]:
  regex = re.compile(pattern)
  return sorted({int(m.group(1)) for k in keys if (m := regex.match(k))})


# ---------------------------------------------------------------------------------------------
# First stage (CompVis ldm/modules/diffusionmodules/model.py)

_AE_RESNET = {"nin_shortcut": "conv_shortcut"}
_AE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def autoencoder_config_from_state(state: Mapping[str, np.ndarray], resolution: int = 256) -> dict:
  """The `model.*` of a CompVis first stage, from its shapes (attention placed from `resolution`)."""
  keys = list(state)
  if "encoder.conv_in.weight" not in state:
    raise ValueError("first stage: no encoder.conv_in.weight; not a CompVis autoencoder.")
  ch = int(state["encoder.conv_in.weight"].shape[0])
  levels = _ints(keys, r"encoder\.down\.(\d+)\.")
  ch_mult = tuple(int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) // ch for i in levels)
  num_res_blocks = len(_ints(keys, r"encoder\.down\.0\.block\.(\d+)\."))
  attn = [any(k.startswith(f"encoder.down.{i}.attn.") for k in keys) for i in levels]
  vq = "quantize.embedding.weight" in state
  z = int(state["encoder.conv_out.weight"].shape[0]) // (1 if vq else 2)
  embed = int(state["quant_conv.weight"].shape[0]) // (1 if vq else 2)
  cfg = dict(kind="vq" if vq else "kl", embed_dim=embed, z_channels=z, ch=ch, ch_mult=ch_mult,
             num_res_blocks=num_res_blocks, attn_resolutions=tuple(resolution // 2**i for i, a in enumerate(attn) if a),
             dropout=0.0, in_channels=int(state["encoder.conv_in.weight"].shape[1]), resolution=resolution)
  if vq:
    cfg["n_embed"] = int(state["quantize.embedding.weight"].shape[0])
  return cfg


def autoencoder_key(key: str, num_levels: int) -> str | None:
  """CompVis first-stage key → diffusers AutoencoderKL/VQModel key (None: not a model weight)."""
  if key.startswith("loss."):
    return None
  parts = key.split(".")
  if parts[0] not in ("encoder", "decoder"):
    return key  # quant_conv, post_quant_conv, quantize.embedding
  coder, rest = parts[0], parts[1:]
  if rest[0] in ("down", "up"):
    level = int(rest[1]) if rest[0] == "down" else num_levels - 1 - int(rest[1])
    block = f"{'down' if rest[0] == 'down' else 'up'}_blocks.{level}"
    kind = rest[2]
    if kind == "block":
      return ".".join([coder, block, "resnets", rest[3], _AE_RESNET.get(rest[4], rest[4])] + rest[5:])
    if kind == "attn":
      return ".".join([coder, block, "attentions", rest[3], _AE_ATTN[rest[4]]] + rest[5:])
    if kind in ("downsample", "upsample"):
      return ".".join([coder, block, f"{kind}rs", "0"] + rest[3:])
  if rest[0] == "mid":
    sub = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}[rest[1]]
    name = _AE_ATTN[rest[2]] if rest[1] == "attn_1" else _AE_RESNET.get(rest[2], rest[2])
    return ".".join([coder, "mid_block", sub, name] + rest[3:])
  if rest[0] == "norm_out":
    return ".".join([coder, "conv_norm_out"] + rest[1:])
  return key


def load_autoencoder_state(state: Mapping[str, np.ndarray], cfg: Mapping[str, Any], where: str) -> dict:
  n = len(cfg["ch_mult"])
  return naming.torch_to_flax(state, components.abstract_params("autoencoder", cfg), what=where,
                              rename=lambda k: autoencoder_key(k, n))


# ---------------------------------------------------------------------------------------------
# U-Net (CompVis ldm/modules/diffusionmodules/openaimodel.py)

_UNET_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def _resnet_name(rest: list[str]) -> list[str]:
  for old, new in _UNET_RESNET.items():
    n = len(old.split("."))
    if ".".join(rest[:n]) == old:
      return [new] + rest[n:]
  raise KeyError(".".join(rest))


def unet_config_from_state(state: Mapping[str, np.ndarray], *, num_heads: int | None = None,
                           num_head_channels: int | None = None, text_time: tuple[int, int] | None = None) -> dict:
  """The `model.*` of an openaimodel U-Net, from its shapes; heads as given, else the SD guess.

  `text_time`: (pooled text width, number of time ids) of the SDXL conditioner that feeds
  `label_emb.0` (sgm's `vector` condition, diffusers' `add_embedding`); its input width less the
  pooled width, divided by the ids, is the Fourier width of each id (SDXL: 256).
  """
  keys = list(state)
  model_channels = int(state["input_blocks.0.0.weight"].shape[0])
  outputs = _ints(keys, r"output_blocks\.(\d+)\.")
  # The first up block ends with the first upsampler (a conv, or a ResnetBlock with resblock_updown).
  upsamplers = [n for n in outputs for k in (1, 2)
                if f"output_blocks.{n}.{k}.conv.weight" in state or f"output_blocks.{n}.{k}.in_layers.0.weight" in state]
  per_level = upsamplers[0] + 1 if upsamplers else len(outputs)
  num_levels = len(outputs) // per_level
  if num_levels * per_level != len(outputs):
    raise ValueError(f"U-Net: {len(outputs)} output blocks do not split into levels of {per_level}.")
  num_res_blocks = per_level - 1
  widths, attended = [], []
  for level in range(num_levels):
    first = 1 + level * per_level
    widths.append(int(state[f"input_blocks.{first}.0.out_layers.3.weight"].shape[0]))
    attended.append(any(k.startswith(f"input_blocks.{first}.1.") for k in keys))
  spatial = any(".transformer_blocks." in k for k in keys)
  linear = spatial and state["middle_block.1.proj_in.weight"].ndim == 2
  cfg: dict[str, Any] = dict(
      in_channels=int(state["input_blocks.0.0.weight"].shape[1]), out_channels=int(state["out.2.weight"].shape[0]),
      model_channels=model_channels, channel_mult=tuple(w // model_channels for w in widths),
      num_res_blocks=num_res_blocks, attention_resolutions=tuple(2**l for l, a in enumerate(attended) if a),
      use_spatial_transformer=spatial, use_linear_projection=linear,
      use_scale_shift_norm=int(state["input_blocks.1.0.emb_layers.1.weight"].shape[0]) == 2 * widths[0],
      resblock_updown=bool(upsamplers) and f"output_blocks.{upsamplers[0]}.{1 if not attended[-1] else 2}.in_layers.0.weight" in state,
      num_classes=int(state["label_emb.0.weight"].shape[0]) - 1 if "label_emb.0.weight" in state else None,
      context_dim=None, transformer_depth=1)
  if spatial:
    cfg["transformer_depth"] = _transformer_depth(keys, attended, per_level)
    cfg["context_dim"] = int(state["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1])
    if cfg["context_dim"] == widths[-1] and cfg["num_classes"] is not None:
      cfg["context_dim"] = None  # a class-conditional U-Net whose attn2 attends to the image
  if "label_emb.0.0.weight" in state:
    cfg.update(_text_time(int(state["label_emb.0.0.weight"].shape[1]), text_time))
  if num_heads is None and num_head_channels is None:
    num_head_channels = 64 if linear else -1
    num_heads = 8
    logging.warning("U-Net attention heads are not stored in the weights; assuming %s (pass num_heads / "
                    "num_head_channels or the YAML config to override).",
                    "64 channels per head (SD 2.x, SDXL)" if linear else "8 heads (SD 1.x)")
  cfg["num_heads"] = 8 if num_heads is None else int(num_heads)
  cfg["num_head_channels"] = -1 if num_head_channels is None else int(num_head_channels)
  return cfg


def _transformer_depth(keys, attended: list[bool], per_level: int) -> int | tuple[int, ...]:
  """One depth for every SpatialTransformer, or one per level (SDXL base: 1, 2, 10; a level without
  attention gets diffusers' 1, the deepest one the middle block's, which ldm_jax's middle block takes)."""
  mid = len(_ints(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
  depths = [len(_ints(keys, rf"input_blocks\.{1 + level * per_level}\.1\.transformer_blocks\.(\d+)\."))
            if a else None for level, a in enumerate(attended)]
  if depths[-1] is not None and depths[-1] != mid:
    raise ValueError(f"U-Net: the middle block has {mid} transformer blocks and the deepest level {depths[-1]}; "
                     "ldm_jax's middle block takes the deepest level's depth.")
  if {d for d in depths if d is not None} <= {mid}:
    return mid
  depths[-1] = mid
  return tuple(1 if d is None else d for d in depths)


def _text_time(width: int, text_time: tuple[int, int] | None) -> dict:
  """`model.addition_*` of an SDXL U-Net whose `label_emb.0.0` takes `width` features."""
  if text_time is None:
    raise ValueError(f"U-Net: label_emb.0.0 takes a {width}-wide vector condition, which ldm_jax reads as "
                     "SDXL's add_embedding only with the SDXL conditioner in the same file (its OpenCLIP "
                     f"bigG, {SGM_PREFIX}N.model.*, gives the pooled width); unCLIP's image embedding "
                     "has no ldm_jax equivalent.")
  pooled, ids = text_time
  time_dim, rest = divmod(width - pooled, ids)
  if rest or time_dim <= 0:
    raise ValueError(f"U-Net: label_emb.0.0 takes {width} features, which is not the {pooled} of the pooled "
                     f"text embedding + {ids} time ids × a Fourier width (SDXL: 1280 + 6·256 base, 5·256 refiner).")
  return dict(addition_embed_type="text_time", addition_time_embed_dim=time_dim, addition_embed_dim=width)


def unet_key(key: str, cfg: Mapping[str, Any]) -> str | None:
  """openaimodel key → diffusers UNet2DConditionModel key. SpatialTransformer names are diffusers' already;
  the paper's plain AttentionBlock (`norm`, `qkv`, `proj_out`) is renamed by `_split_legacy_qkv`."""
  r = cfg["num_res_blocks"]
  levels = len(cfg["channel_mult"])
  attended = [2**l in tuple(cfg["attention_resolutions"]) for l in range(levels)]
  parts = key.split(".")
  head = parts[0]
  if head == "time_embed":
    return f"time_embedding.linear_{1 if parts[1] == '0' else 2}.{parts[2]}"
  if head == "label_emb":
    if len(parts) == 4:  # SDXL: label_emb.0 = Sequential(Linear, SiLU, Linear), diffusers' add_embedding
      linear = {"0": "linear_1", "2": "linear_2"}.get(parts[2])
      return f"add_embedding.{linear}.{parts[3]}" if linear else key
    return f"class_embedding.{parts[2]}"
  if head == "out":
    return f"{'conv_norm_out' if parts[1] == '0' else 'conv_out'}.{parts[2]}"
  if head == "input_blocks":
    n = int(parts[1])
    if n == 0:
      return f"conv_in.{parts[3]}"
    level, j = divmod(n - 1, r + 1)
    rest = parts[3:]
    if j == r:  # the downsampler
      if rest[0] == "op":
        return ".".join([f"down_blocks.{level}.downsamplers.0.conv"] + rest[1:])
      return ".".join([f"down_blocks.{level}.downsamplers.0"] + _resnet_name(rest))
    if parts[2] == "0":
      return ".".join([f"down_blocks.{level}.resnets.{j}"] + _resnet_name(rest))
    return ".".join([f"down_blocks.{level}.attentions.{j}"] + rest)
  if head == "middle_block":
    rest = parts[2:]
    if parts[1] == "1":
      return ".".join(["mid_block.attentions.0"] + rest)
    return ".".join([f"mid_block.resnets.{0 if parts[1] == '0' else 1}"] + _resnet_name(rest))
  if head == "output_blocks":
    i, j = divmod(int(parts[1]), r + 1)
    level = levels - 1 - i
    sub, rest = int(parts[2]), parts[3:]
    if sub == 0:
      return ".".join([f"up_blocks.{i}.resnets.{j}"] + _resnet_name(rest))
    if sub == 1 and attended[level]:
      return ".".join([f"up_blocks.{i}.attentions.{j}"] + rest)
    if rest[0] == "conv":
      return ".".join([f"up_blocks.{i}.upsamplers.0.conv"] + rest[1:])
    return ".".join([f"up_blocks.{i}.upsamplers.0"] + _resnet_name(rest))
  return key


def _split_legacy_qkv(state: dict[str, np.ndarray], cfg: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """openaimodel AttentionBlock: `qkv` conv1d [3C, C, 1] (per head: q, k, v rows) → to_q/to_k/to_v;
  `norm` → group_norm, `proj_out` → to_out.0."""
  if cfg["use_spatial_transformer"]:
    return state
  out = {}
  for key, value in state.items():
    prefix, _, leaf = key.rpartition(".")
    module, _, name = prefix.rpartition(".")
    if name == "qkv":
      channels = value.shape[1] if leaf == "weight" else value.shape[0] // 3
      heads, _ = _legacy_heads(channels, cfg)
      value = np.asarray(value).reshape(heads, 3, channels // heads, *value.shape[1:])
      for idx, proj in enumerate(("to_q", "to_k", "to_v")):
        part = value[:, idx].reshape(channels, *value.shape[3:])
        out[f"{module}.{proj}.{leaf}"] = part[..., 0] if part.ndim == 3 else part
    elif name in ("norm", "proj_out") and ".attentions." in module:
      value = np.asarray(value)
      out[f"{module}.{'group_norm' if name == 'norm' else 'to_out.0'}.{leaf}"] = value[..., 0] if value.ndim == 3 else value
    else:
      out[key] = value
  return out


def _legacy_heads(channels: int, cfg: Mapping[str, Any]) -> tuple[int, int]:
  return attention_heads(channels, cfg["num_heads"], cfg["num_head_channels"])


def load_unet_state(state: Mapping[str, np.ndarray], cfg: Mapping[str, Any], where: str) -> dict:
  renamed = {}
  for key, value in state.items():
    new = unet_key(key, cfg)
    if new is not None:
      renamed[new] = value
  renamed = _split_legacy_qkv(renamed, cfg)
  return naming.torch_to_flax(renamed, components.abstract_params("unet", cfg), what=where)


# ---------------------------------------------------------------------------------------------
# Text encoders

def bert_embedder_from_state(state: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
  """(cond.* config, Conditioner params) of CompVis' BERTEmbedder (`cond_stage_model.transformer.*`).

  x-transformers' `TransformerWrapper(Encoder)`, the paper's txt2img conditioner, is ldm_jax's
  `TransformerTextEncoder` (see its docstring for the names); CompVis runs it without a padding
  mask, so `cond.mask_padding` is False. The tokenizer (BERT's uncased WordPiece) is not in the file.
  """
  params: dict[str, Any] = {}
  depth = len(_ints(state, r"attn_layers\.layers\.(\d+)\.")) // 2

  def put(path, value):
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = np.asarray(value, np.float32)

  unexpected = []
  for key, value in state.items():
    m = re.match(r"attn_layers\.layers\.(\d+)\.(\d)\.(?:(.+)\.)?(weight|bias)$", key)
    if key in ("token_emb.weight", "pos_emb.emb.weight"):
      put([key.split(".")[0], "embedding"], value)
    elif key in ("norm.weight", "norm.bias"):
      put(["norm", "scale" if key.endswith("weight") else "bias"], value)
    elif m and (m.group(2) == "0") == (m.group(3) is None):
      index, sub, name, leaf = int(m.group(1)), m.group(2), m.group(3), m.group(4)
      block = f"blocks_{index // 2}"
      if sub == "0":
        put([block, "ff_norm" if index % 2 else "attn_norm", "scale" if leaf == "weight" else "bias"], value)
      else:
        module = (["attn", name] if index % 2 == 0 else
                  ["ff", {"net.0.0": "net_0", "net.2": "net_2"}.get(name, name)])
        put([block] + module + ["kernel" if leaf == "weight" else "bias"], np.asarray(value).T if leaf == "weight" else value)
    else:
      unexpected.append(key)
  if unexpected:
    raise naming.WeightMismatchError("BERTEmbedder (cond_stage_model.transformer.*)", unexpected=unexpected)
  dim = int(state["token_emb.weight"].shape[1])
  heads_dim = int(state["attn_layers.layers.0.1.to_q.weight"].shape[0])
  cfg = default_cond_config().to_dict()
  cfg.update(kind="text", text_encoder="scratch", vocab_size=int(state["token_emb.weight"].shape[0]),
             max_length=int(state["pos_emb.emb.weight"].shape[0]), dim=dim, depth=depth, num_heads=heads_dim // 64,
             head_dim=64, mask_padding=False)
  return cfg, {"text_encoder": params}


# ---------------------------------------------------------------------------------------------
# Schedule

def diffusion_config_from_betas(betas: np.ndarray) -> dict | None:
  """diffusion.* keys of a saved `betas` buffer, when it is one of ldm_jax's schedules."""
  betas = np.asarray(betas, np.float64)
  start, end, n = float(betas[0]), float(betas[-1]), len(betas)
  for name in ("scaled_linear", "linear", "cosine"):
    if np.allclose(beta_schedule(name, n, start, end), betas, rtol=1e-4, atol=1e-7):
      return dict(beta_schedule=name, num_timesteps=n, linear_start=start, linear_end=end)
  return None


def check_conditioner(cond_cfg: Mapping[str, Any], params, where: str) -> None:
  """WeightMismatchError unless `params` fill exactly the Conditioner that `cond_cfg` builds."""
  cfg = ml_collections.ConfigDict(dict(cond_cfg))
  module = conditioning.Conditioner(kind="text", vocab_size=cfg.vocab_size, max_length=cfg.max_length, dim=cfg.dim,
                                    depth=cfg.depth, num_heads=cfg.num_heads, head_dim=cfg.head_dim, pad_id=None)
  tokens = jnp.zeros((1, cfg.max_length), jnp.int32)
  expected = jax.eval_shape(lambda: module.init(jax.random.key(0), {"tokens": tokens}, deterministic=True))["params"]
  naming.check_params(params, expected, what=f"text conditioner of {where}")
