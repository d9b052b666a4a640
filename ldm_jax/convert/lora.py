"""LoRA files ↔ ldm_jax adapter sets (`ldm_jax.models.lora`): diffusers/PEFT and kohya/A1111 layouts.

    adapters = read_lora('pytorch_lora_weights.safetensors', {'unet': params['unet']})
    unet_params = apply_lora(params['unet'], [adapters['unet']], [0.8])
    save_lora(out_dir, {'unet': lora}, scale=alpha / rank)      # → out_dir/pytorch_lora_weights.safetensors

Layouts (torch layout: A [r, in] or [r, in, kh, kw], B [out, r] or [out, r, 1, 1]; ΔW = scale·B·A):

    diffusers / PEFT   unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   A
                       unet.….to_q.lora_B.weight                                                          B
                       text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_{A,B}.weight
                       (`text_model.` optional); scale = lora_alpha / r from the file's
                       `lora_adapter_metadata` (rank_pattern, alpha_pattern, use_rslora), else 1
    kohya / A1111      lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight  A
                       lora_unet_….lora_up.weight  B,   lora_unet_….alpha  α (scale α/r; none: 1)
                       lora_te_text_model_encoder_layers_0_self_attn_q_proj.… (the text encoder)

Module names are the torch names of `ldm_jax.convert.naming` (a flax module path with `_N` → `.N`):
the reader lists the model's modules with a kernel and looks every file key up in that list, so a
kohya name (dots turned into underscores) is resolved without guessing where the dots were. The
scale of a file is multiplied into B, so the adapter sets read here mean ΔW = A·B. `save_lora`
writes the diffusers/PEFT layout with the scale multiplied into B and no α, which every reader
(diffusers with or without metadata, kohya-style loaders, ComfyUI) takes as scale 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping

import flax.traverse_util
import jax
import numpy as np

from ldm_jax.convert import naming
from ldm_jax.convert.pretrained import Pretrained
from ldm_jax.convert.safetensors_io import read_safetensors, read_safetensors_metadata, write_safetensors
from ldm_jax.models.lora import adapted_modules, merge_lora

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
COMPONENTS = ("unet", "text_encoder")
_KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
_PEFT_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up"}
_KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
_TEXT_MODEL = "text_model"


def parse_lora_spec(value: str) -> tuple[str, float]:
  """'FILE[:SCALE]' (the `--lora` flags) → (file, scale); the scale defaults to 1. A path that
  itself contains ':' is taken whole when what follows its last ':' is not a number."""
  path, sep, tail = value.rpartition(":")
  if sep and path:
    try:
      return path, float(tail)
    except ValueError:
      pass
  return value, 1.0


def merge_into(pretrained: Pretrained, specs) -> Pretrained:
  """`pretrained` with the LoRA files `specs` ((path, scale) pairs) merged into its U-Net and text
  encoder: W + Σᵢ sᵢ·ΔWᵢ (`ldm_jax.models.lora.merge_lora`); every other component as it is.
  Errors (`read_lora`'s) name the file."""
  models = {c: pretrained.params[c] for c in COMPONENTS if c in pretrained.params}
  adapters, scales = [], []
  for path, scale in specs:
    adapters.append(read_lora(path, models))
    scales.append(float(scale))
  params = dict(pretrained.params)
  for component in models:
    used = [(a[component], s) for a, s in zip(adapters, scales) if component in a]
    if used:
      merged = merge_lora(models[component], [a for a, _ in used], [s for _, s in used])
      params[component] = jax.tree.map(np.asarray, merged)
  return dataclasses.replace(pretrained, params=params)


def lora_file(path: str) -> str:
  """`path` itself, or `path/pytorch_lora_weights.safetensors` when `path` is a directory."""
  return os.path.join(path, WEIGHTS_NAME) if os.path.isdir(path) else path


def _kernels(params) -> dict[str, tuple[int, ...]]:
  """flax module path → kernel shape, for every module with a 2-D or 4-D kernel."""
  return {path[:-len("/kernel")]: tuple(np.shape(leaf))
          for path, leaf in flax.traverse_util.flatten_dict(params, sep="/").items()
          if path.endswith("/kernel") and np.ndim(leaf) in (2, 4)}


def _torch_names(params) -> dict[str, str]:
  """torch module name → flax module path of every adaptable module of `params`."""
  return {naming.flax_module_to_torch(path): path for path in _kernels(params)}


def _layout(keys, path: str) -> str:
  peft = [k for k in keys if k.endswith(tuple(_PEFT_SUFFIXES))]
  kohya = [k for k in keys if k.endswith(tuple(_KOHYA_SUFFIXES)) and k.startswith(tuple(_KOHYA_PREFIX))]
  if peft and not kohya:
    return "peft"
  if kohya and not peft:
    return "kohya"
  example = next(iter(keys), "(no tensors)")
  raise ValueError(f"{path}: not a LoRA file ldm_jax reads (e.g. {example}); expected the diffusers/PEFT layout "
                   "(unet.….lora_A.weight / lora_B.weight) or kohya's (lora_unet_….lora_down.weight / lora_up.weight "
                   "/ alpha), not both.")


def _split_peft(key: str) -> tuple[str, str, str]:
  """'unet.x.y.lora_A.weight' → ('unet', 'x.y', 'down')."""
  for suffix, piece in _PEFT_SUFFIXES.items():
    if key.endswith(suffix):
      component, _, module = key[:-len(suffix)].partition(".")
      if component == "text_encoder" and module.startswith(_TEXT_MODEL + "."):
        module = module[len(_TEXT_MODEL) + 1:]
      return component, module, piece
  return "", key, ""


def _split_kohya(key: str) -> tuple[str, str, str]:
  """'lora_unet_x_y.lora_down.weight' → ('unet', 'x_y', 'down')."""
  for suffix, piece in _KOHYA_SUFFIXES.items():
    if key.endswith(suffix):
      name = key[:-len(suffix)]
      for prefix, component in _KOHYA_PREFIX.items():
        if name.startswith(prefix):
          module = name[len(prefix):]
          if component == "text_encoder" and module.startswith(_TEXT_MODEL + "_"):
            module = module[len(_TEXT_MODEL) + 1:]
          return component, module, piece
  return "", key, ""


def _pattern_value(patterns: Mapping, module: str, default):
  """PEFT's rank_pattern / alpha_pattern lookup: the first key that matches the end of the module name."""
  for pattern, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({pattern})$", module):
      return value
  return default


def _peft_scales(metadata: Mapping[str, str], component: str, path: str):
  """module name → scale of the component's modules, from diffusers' `lora_adapter_metadata` (None: 1)."""
  raw = metadata.get("lora_adapter_metadata")
  if not raw:
    return None
  try:
    config = {k[len(component) + 1:]: v for k, v in json.loads(raw).items() if k.startswith(component + ".")}
  except ValueError as e:
    raise ValueError(f"{path}: the metadata lora_adapter_metadata is not JSON ({e}).") from e
  if not config:
    return None
  if config.get("use_dora"):
    raise ValueError(f"{path}: metadata {component}.use_dora is true; DoRA adapters are not LoRA and ldm_jax does not "
                     "read them.")
  if config.get("lora_bias"):
    raise ValueError(f"{path}: metadata {component}.lora_bias is true; ldm_jax's adapters have no bias.")
  r, alpha = config.get("r", 8), config.get("lora_alpha", config.get("r", 8))
  rslora = bool(config.get("use_rslora"))

  def scale(module: str) -> float:
    rank = _pattern_value(config.get("rank_pattern"), module, r)
    a = _pattern_value(config.get("alpha_pattern"), module, alpha)
    return a / math.sqrt(rank) if rslora else a / rank

  return scale


def _to_flax(tensor: np.ndarray, piece: str, kernel_shape: tuple[int, ...]) -> np.ndarray:
  """A torch-layout A or B → flax-layout down [.., in, r] or up [r, out] for a kernel of `kernel_shape`."""
  if piece == "down":
    if tensor.ndim == 4 and len(kernel_shape) == 2 and tensor.shape[2:] == (1, 1):
      tensor = tensor[:, :, 0, 0]  # a 1×1-conv adapter on a Dense layer
    if tensor.ndim == 2 and len(kernel_shape) == 4:
      tensor = tensor[:, :, None, None]  # a Linear adapter on a 1×1 conv
    return tensor.T if tensor.ndim == 2 else tensor.transpose(2, 3, 1, 0)
  if tensor.ndim == 4:
    if tensor.shape[2:] != (1, 1):
      return tensor  # reported as mis-shaped by the caller
    tensor = tensor[:, :, 0, 0]
  return tensor.T


def read_lora(path: str, expected: Mapping[str, object]) -> dict[str, dict]:
  """The adapter sets of a LoRA file (either layout), checked against the models they adapt.

  Args:
    path: a `.safetensors` file, or a directory holding `pytorch_lora_weights.safetensors`.
    expected: component ('unet', 'text_encoder') → that model's parameter tree (arrays or
      ShapeDtypeStructs); only components the file adapts are needed.

  Returns:
    component → adapter set (float32 numpy, `{…: {module: {'down', 'up'}}}`), ΔW = A·B with the
    file's scale (α/r) multiplied into B.

  Raises:
    ValueError naming the file for an unknown layout or DoRA/bias adapters, and a
    `naming.WeightMismatchError` naming the file and listing every key that names no module
    of the model, has no partner (A without B) or does not fit the kernel's shape.
  """
  path = lora_file(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such LoRA file.")
  state = read_safetensors(path)
  layout = _layout(state, path)
  split = _split_peft if layout == "peft" else _split_kohya
  metadata = read_safetensors_metadata(path) if layout == "peft" else {}
  names = {c: _torch_names(expected[c]) for c in COMPONENTS if c in expected}
  kernels = {c: _kernels(expected[c]) for c in COMPONENTS if c in expected}
  scales = {c: _peft_scales(metadata, c, path) for c in COMPONENTS}

  found: dict[tuple[str, str], dict[str, tuple[str, np.ndarray]]] = {}
  unexpected, misshaped = [], []
  for key, tensor in state.items():
    component, module, piece = split(key)
    if not piece:
      unexpected.append(f"{key} {list(np.shape(tensor))} (not a LoRA {layout} key: DoRA, LoHa, LoKr and biases "
                        "are not read)")
      continue
    if component not in names:
      unexpected.append(f"{key} {list(np.shape(tensor))} (adapts the {component or 'unknown component'}, which "
                        "was not given)")
      continue
    lookup = names[component] if layout == "peft" else {n.replace(".", "_"): p for n, p in names[component].items()}
    flax_path = lookup.get(module)
    if flax_path is None:
      unexpected.append(f"{key} {list(np.shape(tensor))} (the {component} has no module {module} with a kernel)")
      continue
    found.setdefault((component, flax_path), {})[piece] = (key, np.asarray(tensor, np.float32))

  adapters: dict[str, dict] = {}
  for (component, flax_path), pieces in sorted(found.items()):
    if "down" not in pieces or "up" not in pieces:
      have = next(iter(pieces.values()))[0]
      unexpected.append(f"{have} (its {'up/B' if 'down' in pieces else 'down/A'} partner is missing)")
      continue
    kernel = kernels[component][flax_path]
    (down_key, down), (up_key, up) = pieces["down"], pieces["up"]
    down_flax, up_flax = _to_flax(down, "down", kernel), _to_flax(up, "up", kernel)
    rank = down.shape[0]
    if (down_flax.shape != (*kernel[:-1], rank)) or up_flax.shape != (rank, kernel[-1]):
      misshaped.append(f"{down_key} {list(down.shape)}, {up_key} {list(up.shape)} → {component} {flax_path}: the "
                       f"kernel {list(kernel)} needs A {_torch_down_shape(kernel, rank)}, B [{kernel[-1]}, {rank}]")
      continue
    if layout == "kohya":
      alpha_key, alpha = pieces.get("alpha", (None, np.ones(1, np.float32) * rank))
      if np.size(alpha) != 1:
        misshaped.append(f"{alpha_key} {list(np.shape(alpha))}: α is one number")
        continue
      scale = float(np.ravel(alpha)[0]) / rank
    else:
      rule = scales[component]
      scale = rule(naming.flax_module_to_torch(flax_path)) if rule else 1.0
    node = adapters.setdefault(component, {})
    for part in flax_path.split("/"):
      node = node.setdefault(part, {})
    node["down"], node["up"] = down_flax, (up_flax * np.float32(scale)).astype(np.float32)
  if unexpected or misshaped:
    raise naming.WeightMismatchError(f"LoRA file {path}", unexpected=unexpected, misshaped=misshaped)
  return adapters


def _torch_down_shape(kernel: tuple[int, ...], rank: int) -> list[int]:
  return [rank, kernel[0]] if len(kernel) == 2 else [rank, kernel[2], kernel[0], kernel[1]]


def _torch_pieces(down: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """flax down [.., in, r], up [r, out] → torch A [r, in] or [r, in, kh, kw], B [out, r] or [out, r, 1, 1]."""
  if down.ndim == 2:
    return np.ascontiguousarray(down.T), np.ascontiguousarray(up.T)
  return np.ascontiguousarray(down.transpose(3, 2, 0, 1)), np.ascontiguousarray(up.T[:, :, None, None])


def _is_clip(adapter) -> bool:
  """CLIP text encoders are stored by transformers under `text_model.` (their paths: encoder/layers_N/…)."""
  return any(m.startswith("encoder/layers_") for m in adapted_modules(adapter))


def lora_state(adapters: Mapping[str, dict], *, scale: float = 1.0, layout: str = "peft") -> dict[str, np.ndarray]:
  """The tensors of a LoRA file: component → adapter set, with `scale` multiplied into B.

  Args:
    adapters: {'unet': …, 'text_encoder': …} adapter sets (ΔW = A·B).
    scale: multiplied into every B (a training run's α/r).
    layout: 'peft' (diffusers' `pytorch_lora_weights.safetensors`) or 'kohya' (with α = r).
  """
  if layout not in ("peft", "kohya"):
    raise ValueError(f"save_lora: layout {layout!r} is not 'peft' or 'kohya'.")
  unknown = sorted(set(adapters) - set(COMPONENTS))
  if unknown:
    raise ValueError(f"save_lora: component {unknown[0]!r} is not one of {', '.join(COMPONENTS)}.")
  out = {}
  for component, adapter in adapters.items():
    flat = flax.traverse_util.flatten_dict(adapter, sep="/")
    text_model = component == "text_encoder" and _is_clip(adapter)
    for module in adapted_modules(adapter):
      down = np.asarray(flat[f"{module}/down"], np.float32)
      up = np.asarray(flat[f"{module}/up"], np.float32) * np.float32(scale)
      a, b = _torch_pieces(down, up)
      name = naming.flax_module_to_torch(module)
      if layout == "peft":
        prefix = f"{component}.{_TEXT_MODEL}." if text_model else f"{component}."
        out[f"{prefix}{name}.lora_A.weight"], out[f"{prefix}{name}.lora_B.weight"] = a, b
      else:
        head = "lora_unet_" if component == "unet" else "lora_te_" + (f"{_TEXT_MODEL}_" if text_model else "")
        stem = head + name.replace(".", "_")
        out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = a, b
        out[f"{stem}.alpha"] = np.asarray(a.shape[0], np.float32)
  return out


def save_lora(path: str, adapters: Mapping[str, dict], *, scale: float = 1.0, layout: str = "peft") -> str:
  """Writes a LoRA file (see `lora_state`); a directory `path` gets `pytorch_lora_weights.safetensors`.

  Returns the path of the file written.
  """
  target = os.path.join(path, WEIGHTS_NAME) if not path.endswith(".safetensors") else path
  write_safetensors(target, lora_state(adapters, scale=scale, layout=layout), metadata={"format": "pt"})
  return target
