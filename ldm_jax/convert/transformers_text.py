"""transformers text-encoder configs ↔ ldm_jax text-encoder configs (CLIP, BERT).

    CLIPTextModel (SD 1.x, and SD 2.x as diffusers stores OpenCLIP) → `ldm_jax.models.clip`
      hidden_size → dim, num_hidden_layers → depth, num_attention_heads → num_heads,
      intermediate_size → mlp_dim, max_position_embeddings → max_length, hidden_act → activation,
      eos_token_id (the pooled output's token)
    CLIPTextModelWithProjection (SDXL's text_encoder_2) → the same + projection_dim
      (`text_projection`, the pooled output)
    BertModel → `ldm_jax.models.bert`
      the same names, plus type_vocab_size; the pooler is not loaded (transformers initialises
      it afresh when it reads an export; the hidden states do not depend on it)

Weights: transformers saves `CLIPTextModel` with or without the `text_model.` prefix (4.x / 5.x)
and BERT task models with a `bert.` prefix; both are stripped on import, and exports carry
`text_model.` (which every transformers version reads).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ldm_jax.convert import naming
from ldm_jax.convert.diffusers_format import read_component

WEIGHTS_NAME = "model.safetensors"
_CLIP_ARCHS = ("CLIPTextModel", "CLIPTextModelWithProjection")
_BERT_ARCHS = ("BertModel",)


def text_kind(cfg: Mapping[str, Any]) -> str:
  """'clip' or 'bert' from a transformers config.json; ValueError otherwise."""
  model_type = cfg.get("model_type")
  if model_type in ("clip_text_model", "clip"):
    return "clip"
  if model_type == "bert":
    return "bert"
  raise ValueError(f"text encoder: config.json model_type={model_type!r} (architectures "
                   f"{cfg.get('architectures')}); ldm_jax reads CLIP text models and BERT.")


def clip_config_from_transformers(cfg: Mapping[str, Any], where: str = "text_encoder") -> dict:
  if cfg.get("model_type") == "clip":  # a full CLIPModel config: the text half
    cfg = cfg.get("text_config") or {}
  act = cfg.get("hidden_act", "quick_gelu")
  if act not in ("quick_gelu", "gelu"):
    raise ValueError(f"{where}: config.json hidden_act={act!r}; ldm_jax's CLIP supports quick_gelu and gelu.")
  projected = "CLIPTextModelWithProjection" in (cfg.get("architectures") or ())
  return dict(kind="clip", vocab_size=int(cfg.get("vocab_size", 49408)),
              max_length=int(cfg.get("max_position_embeddings", 77)), dim=int(cfg.get("hidden_size", 512)),
              depth=int(cfg.get("num_hidden_layers", 12)), num_heads=int(cfg.get("num_attention_heads", 8)),
              mlp_dim=int(cfg.get("intermediate_size", 2048)), activation=act,
              layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)), skip_last_layers=0, norm_output=True,
              projection_dim=int(cfg.get("projection_dim", 512)) if projected else None,
              eos_token_id=int(cfg.get("eos_token_id", 49407)))


def clip_config_to_transformers(cfg: Mapping[str, Any], *, penultimate: bool = False) -> dict:
  """transformers config.json of a CLIP text encoder. `penultimate`: the pipeline takes the penultimate
  hidden state without the final norm itself (SDXL), so the encoder may be configured that way."""
  used = (cfg.get("skip_last_layers", 0), cfg.get("norm_output", True))
  if used != (0, True) and not (penultimate and used == (1, False)):
    raise ValueError(f"text_encoder.skip_last_layers / norm_output: {used} is not what a transformers "
                     "CLIPTextModel outputs; export the used layers only (depth − skip_last_layers) or use the "
                     "hidden states yourself.")
  projected = cfg.get("projection_dim") is not None
  return {
      "architectures": ["CLIPTextModelWithProjection" if projected else "CLIPTextModel"],
      "model_type": "clip_text_model", "vocab_size": cfg["vocab_size"],
      "hidden_size": cfg["dim"], "intermediate_size": cfg["mlp_dim"], "num_hidden_layers": cfg["depth"],
      "num_attention_heads": cfg["num_heads"], "max_position_embeddings": cfg["max_length"],
      "hidden_act": cfg["activation"], "layer_norm_eps": cfg["layer_norm_eps"],
      "projection_dim": cfg["projection_dim"] if projected else cfg["dim"],
      "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
      "bos_token_id": 49406, "eos_token_id": int(cfg.get("eos_token_id", 49407)), "pad_token_id": 1,
      "torch_dtype": "float32",
  }


def bert_config_from_transformers(cfg: Mapping[str, Any], where: str = "text_encoder") -> dict:
  act = cfg.get("hidden_act", "gelu")
  if act != "gelu":
    raise ValueError(f"{where}: config.json hidden_act={act!r}; ldm_jax's BERT supports gelu.")
  if cfg.get("position_embedding_type", "absolute") != "absolute":
    raise ValueError(f"{where}: position_embedding_type={cfg.get('position_embedding_type')!r}; only "
                     "'absolute' is supported.")
  return dict(kind="bert", vocab_size=int(cfg.get("vocab_size", 30522)),
              max_length=int(cfg.get("max_position_embeddings", 512)),
              type_vocab_size=int(cfg.get("type_vocab_size", 2)), dim=int(cfg.get("hidden_size", 768)),
              depth=int(cfg.get("num_hidden_layers", 12)), num_heads=int(cfg.get("num_attention_heads", 12)),
              mlp_dim=int(cfg.get("intermediate_size", 3072)),
              layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)), pad_id=None)


def bert_config_to_transformers(cfg: Mapping[str, Any]) -> dict:
  return {
      "architectures": ["BertModel"], "model_type": "bert", "vocab_size": cfg["vocab_size"],
      "hidden_size": cfg["dim"], "num_hidden_layers": cfg["depth"], "num_attention_heads": cfg["num_heads"],
      "intermediate_size": cfg["mlp_dim"], "hidden_act": "gelu", "max_position_embeddings": cfg["max_length"],
      "type_vocab_size": cfg["type_vocab_size"], "layer_norm_eps": cfg["layer_norm_eps"],
      "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "position_embedding_type": "absolute",
      "pad_token_id": 0, "initializer_range": 0.02, "torch_dtype": "float32",
  }


def text_config_from_transformers(cfg: Mapping[str, Any], where: str = "text_encoder") -> dict:
  kind = text_kind(cfg)
  return clip_config_from_transformers(cfg, where) if kind == "clip" else bert_config_from_transformers(cfg, where)


def text_config_to_transformers(cfg: Mapping[str, Any], *, penultimate: bool = False) -> dict:
  if cfg["kind"] == "clip":
    return clip_config_to_transformers(cfg, penultimate=penultimate)
  return bert_config_to_transformers(cfg)


def _rename(key: str, projected: bool = False) -> str | None:
  if key.endswith(("position_ids", "token_type_ids")):  # buffers, not weights
    return None
  if key.startswith("text_projection.") and projected:
    return key
  if key.startswith(("text_projection.", "cls.", "vision_model.", "visual_projection.", "logit_scale",
                     "pooler.", "bert.pooler.")):
    return None  # heads a conditioner does not use
  for prefix in ("text_model.", "bert."):
    if key.startswith(prefix):
      return key[len(prefix):]
  return key


def load_text_encoder(directory: str, expected) -> dict:
  """Params of the transformers CLIP text model or BERT in `directory`."""
  cfg, state = read_component(directory)
  projected = "text_projection" in expected
  return naming.torch_to_flax(state, expected, what=f"transformers {text_kind(cfg)} text encoder in {directory}",
                              rename=lambda key: _rename(key, projected))


def text_encoder_state(cfg: Mapping[str, Any], params) -> dict:
  """The transformers state dict of ldm_jax text-encoder params."""
  if cfg["kind"] != "clip":
    return naming.flax_to_torch(params)
  params = dict(params)
  projection = params.pop("text_projection", None)
  state = naming.flax_to_torch(params, prefix="text_model.")
  if projection is not None:
    state.update(naming.flax_to_torch({"text_projection": projection}))
  return state
