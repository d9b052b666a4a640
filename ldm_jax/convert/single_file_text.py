"""Text encoders of CompVis / Stability single files → transformers CLIPTextModel names + ldm_jax configs.

    cond_stage_model.transformer.*          SD 1.x FrozenCLIPEmbedder: a transformers CLIPTextModel
    cond_stage_model.model.*                SD 2.x FrozenOpenCLIPEmbedder: an open_clip text tower
    conditioner.embedders.0.transformer.*   SDXL base (Stability's `sgm`): CLIP ViT-L, transformers
                                            names                                    → 'text_encoder'
    conditioner.embedders.1.model.*         SDXL base: OpenCLIP ViT-bigG, open_clip names → 'text_encoder_2'
    conditioner.embedders.0.model.*         SDXL refiner: bigG alone                  → 'text_encoder_2'

open_clip → transformers: `transformer.resblocks.N.{ln_1, ln_2, mlp.c_fc, mlp.c_proj, attn.out_proj}` →
`encoder.layers.N.{layer_norm1, layer_norm2, mlp.fc1, mlp.fc2, self_attn.out_proj}`; the fused
`attn.in_proj_weight` [3D, D] (and bias) splits into q, k, v rows; `token_embedding`,
`positional_embedding` (a bare tensor) and `ln_final` → `embeddings.*` and `final_layer_norm`.
SDXL pools bigG's output: open_clip's `text_projection` is a matrix P [D, proj] applied as
`pooled @ P`, so transformers' Linear weight is Pᵀ; open_clip pools at the largest token id (its
end-of-text token), which ldm_jax's CLIP does for transformers' legacy eos_token_id 2. Any other
key of a tower is passed on unrenamed, so the load reports it as unexpected; `logit_scale` (the
contrastive loss's temperature) is dropped.

Not in the weights: the attention heads, 64 channels each in every CLIP and OpenCLIP text tower.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

SGM_PREFIX = "conditioner.embedders."
# open_clip's per-layer names → transformers'.
_OPENCLIP = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
_OPENCLIP_UNUSED = ("logit_scale", "attn_mask")


def _depth(keys, pattern: str) -> int:
  regex = re.compile(pattern)
  return len({m.group(1) for k in keys if (m := regex.match(k))})


def clip_from_transformers_state(state: Mapping[str, np.ndarray]) -> tuple[dict, dict]:
  """(config, state in CLIPTextModel names) of a transformers CLIP text model's state (SD 1.x's
  `cond_stage_model.transformer.*`, SDXL's `conditioner.embedders.0.transformer.*`)."""
  state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
  for key in ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
              "encoder.layers.0.mlp.fc1.weight"):
    if key not in state:
      raise KeyError(f"text_model.{key}")
  dim = int(state["embeddings.token_embedding.weight"].shape[1])
  cfg = dict(kind="clip", vocab_size=int(state["embeddings.token_embedding.weight"].shape[0]),
             max_length=int(state["embeddings.position_embedding.weight"].shape[0]), dim=dim,
             depth=_depth(state, r"encoder\.layers\.(\d+)\."), num_heads=max(1, dim // 64),
             mlp_dim=int(state["encoder.layers.0.mlp.fc1.weight"].shape[0]), activation="quick_gelu",
             layer_norm_eps=1e-5, skip_last_layers=0)
  return cfg, state


def clip_from_openclip_state(state: Mapping[str, np.ndarray], skip_last_layers: int = 1, *,
                             projection: bool = False) -> tuple[dict, dict]:
  """(config, state in CLIPTextModel names) of an open_clip text tower (SD 2.x's
  `cond_stage_model.model.*`; with `projection`, SDXL's bigG and its pooled-output projection)."""
  for key in ("token_embedding.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight") + \
      (("text_projection",) if projection else ()):
    if key not in state:
      raise KeyError(key)
  fixed = {"token_embedding.weight": "embeddings.token_embedding.weight",
           "positional_embedding": "embeddings.position_embedding.weight",
           "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
  out = {}
  for key, value in state.items():
    layer = re.match(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key)
    if key in fixed:
      out[fixed[key]] = value
    elif key == "text_projection":
      if projection:
        out["text_projection.weight"] = np.asarray(value).T
    elif key in _OPENCLIP_UNUSED:
      continue
    elif layer and layer.group(2) in _OPENCLIP:
      out[f"encoder.layers.{layer.group(1)}.{_OPENCLIP[layer.group(2)]}.{layer.group(3)}"] = value
    elif fused := re.match(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key):
      for proj, part in zip(("q_proj", "k_proj", "v_proj"), np.split(np.asarray(value), 3, axis=0)):
        out[f"encoder.layers.{fused.group(1)}.self_attn.{proj}.{fused.group(2)}"] = part
    else:
      out[key] = value  # reported as unexpected by the load
  dim = int(state["token_embedding.weight"].shape[1])
  cfg = dict(kind="clip", vocab_size=int(state["token_embedding.weight"].shape[0]),
             max_length=int(state["positional_embedding"].shape[0]), dim=dim,
             depth=_depth(state, r"transformer\.resblocks\.(\d+)\."), num_heads=max(1, dim // 64),
             mlp_dim=int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]), activation="gelu",
             layer_norm_eps=1e-5, skip_last_layers=skip_last_layers)
  if projection:
    cfg.update(projection_dim=int(state["text_projection"].shape[1]), eos_token_id=2)
  return cfg, out


def sgm_text_encoders(state: Mapping[str, np.ndarray]) -> dict[str, tuple[str, dict, dict]]:
  """SDXL's text encoders in an sgm single file: component → (key prefix, config, CLIPTextModel state).

  Each `conditioner.embedders.N.` holding weights is a CLIP ViT-L in transformers names
  (`N.transformer.*` → 'text_encoder') or an OpenCLIP tower with its projection (`N.model.*` →
  'text_encoder_2'); the size, crop and aesthetic-score embedders have no weights. Raises
  KeyError naming a missing tensor the architecture is read from, ValueError for any other layout.
  """
  found: dict[str, tuple[str, dict, dict]] = {}
  indices = sorted({int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(SGM_PREFIX)}(\d+)\.", k))})
  for index in indices:
    base = f"{SGM_PREFIX}{index}."
    towers = sorted({k[len(base):].split(".")[0] for k in state if k.startswith(base)})
    if towers not in (["transformer"], ["model"]):
      raise ValueError(f"{base}*: holds {', '.join(t + '.*' for t in towers)}; an SDXL (sgm) embedder with "
                       "weights is `transformer.*` (CLIP ViT-L, transformers names) or `model.*` (OpenCLIP).")
    prefix = f"{base}{towers[0]}."
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    component = "text_encoder" if towers[0] == "transformer" else "text_encoder_2"
    if component in found:
      raise ValueError(f"{prefix}*: a second {'CLIP ViT-L' if towers[0] == 'transformer' else 'OpenCLIP'} "
                       f"text encoder (the first is {found[component][0]}*); SDXL has one of each.")
    try:
      cfg, text_state = (clip_from_transformers_state(sub) if component == "text_encoder"
                         else clip_from_openclip_state(sub, projection=True))
    except KeyError as e:
      raise KeyError(prefix + e.args[0]) from None
    found[component] = (prefix, cfg, text_state)
  return found
