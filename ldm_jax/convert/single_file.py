"""CompVis / Stability single-file checkpoints, whole: which parts a file holds, and what the shapes do not tell.

One file holds a whole latent diffusion model under prefixes (an LDM first-stage checkpoint has
no prefix):

    model.diffusion_model.*              openaimodel UNetModel          → 'unet'
    first_stage_model.*                  AutoencoderKL / VQModel        → 'autoencoder'
    cond_stage_model.transformer.*       FrozenCLIPEmbedder (SD 1.x)    → 'text_encoder' (CLIP, last layer),
                                         or the paper's BERTEmbedder (x-transformers, trained with the
                                         U-Net: `token_emb`, `attn_layers`) → 'conditioner' (cond.kind 'text')
    cond_stage_model.model.*             FrozenOpenCLIPEmbedder (SD 2.x) → 'text_encoder' (CLIP, penultimate)
    conditioner.embedders.N.*            SDXL (Stability's `sgm`): CLIP ViT-L → 'text_encoder' and OpenCLIP
                                         bigG → 'text_encoder_2' (the refiner: bigG only); the U-Net's
                                         `label_emb.0.{0,2}` → diffusers' `add_embedding.linear_{1,2}`
    betas, alphas_cumprod, …, scale_factor   the schedule and latent scale, when saved
    model_ema.*, loss.*, posterior_* …   ignored (EMA copies, losses, derived buffers)

Each part is renamed to diffusers/transformers names (`ldm_jax.convert.compvis` for the U-Net,
the first stage and the paper's BERTEmbedder, `ldm_jax.convert.single_file_text` for CLIP and
OpenCLIP) and loaded by the generic rule of `ldm_jax.convert.naming`, which reports every missing,
unexpected or mis-shaped tensor at once, naming the file and the part; a tensor the architecture
is read from that is missing is reported the same way.

The architecture is read from the tensor shapes. Not in the weights: the U-Net's attention head
counts (SD 1.x: 8 heads; SD 2.x and SDXL: 64 channels per head — guessed from the projection type unless
given), the text encoder's (64 channels per head, as in every CLIP and OpenCLIP text tower), and
the prediction type of the U-Net (eps unless given; SD 2.x 768-v models are 'v'). Pass them, or
the checkpoint's CompVis YAML config, to `read_single_file`. SDXL files store no schedule or latent
scale: SD's schedule and 0.13025; the base's two encoders mean 6 time ids (sizes, crop, target
size), the refiner's one 5 (aesthetic score), so `label_emb.0.0`'s width gives the Fourier width
of each; both take the penultimate layers without the final norm, as diffusers' SDXL pipelines.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging

from ldm_jax.convert import components, naming
from ldm_jax.convert.compvis import (AE_PREFIX, CLIP_PREFIX, OPENCLIP_PREFIX, UNET_PREFIX,
                                     autoencoder_config_from_state, bert_embedder_from_state, check_conditioner,
                                     diffusion_config_from_betas, load_autoencoder_state, load_unet_state,
                                     strip_prefix, unet_config_from_state)
from ldm_jax.convert.pretrained import Pretrained, sdxl_conditioning
from ldm_jax.convert.safetensors_io import read_weights
from ldm_jax.convert.single_file_text import (SGM_PREFIX, clip_from_openclip_state, clip_from_transformers_state,
                                              sgm_text_encoders)

SD_SCALE_FACTOR = 0.18215
SDXL_SCALE_FACTOR = 0.13025


def options_from_yaml(path: str) -> dict[str, Any]:
  """The settings a CompVis YAML config adds to what the shapes tell."""
  import yaml  # pylint: disable=g-import-not-at-top  (a transformers dependency)
  with open(path) as f:
    cfg = yaml.safe_load(f)
  params = cfg.get("model", {}).get("params", {})
  unet = params.get("unet_config", {}).get("params", {})
  ddconfig = params.get("first_stage_config", {}).get("params", {}).get("ddconfig", {}) or \
      params.get("ddconfig", {})
  out: dict[str, Any] = {}
  if "num_heads" in unet or "num_head_channels" in unet:
    out["num_heads"] = unet.get("num_heads", -1 if unet.get("num_head_channels", -1) != -1 else 8)
    out["num_head_channels"] = unet.get("num_head_channels", -1)
  if "resolution" in ddconfig:
    out["resolution"] = int(ddconfig["resolution"])
  if "parameterization" in params:
    out["parameterization"] = params["parameterization"]
  if "scale_factor" in params:
    out["scale_factor"] = float(params["scale_factor"])
  if "linear_start" in params:
    out["diffusion"] = dict(beta_schedule="scaled_linear" if params.get("beta_schedule", "linear") == "linear"
                            else params["beta_schedule"], num_timesteps=int(params.get("timesteps", 1000)),
                            linear_start=float(params["linear_start"]), linear_end=float(params["linear_end"]))
  return out


def read_single_file(path: str, *, config: str | None = None, num_heads: int | None = None,
                     num_head_channels: int | None = None, parameterization: str | None = None,
                     scale_factor: float | None = None, resolution: int | None = None,
                     tokenizer: str | None = None, tokenizer_2: str | None = None) -> Pretrained:
  """A CompVis/Stability checkpoint (`.safetensors`, or `.ckpt` via torch weights_only) → `Pretrained`.

  Args:
    path: the file: a whole LDM / Stable Diffusion / SDXL model or a first-stage autoencoder.
    config: the model's CompVis YAML (e.g. v1-inference.yaml); fills what the shapes cannot tell.
    num_heads, num_head_channels: U-Net attention heads (override the YAML and the SD guess).
    parameterization: 'eps' | 'v' | 'x0' (default: the YAML's, else 'eps').
    scale_factor: latent scale (default: the saved buffer, the YAML's, for a 4-channel KL
      autoencoder with a U-Net 0.18215 (SD) or 0.13025 (SDXL), else 1.0).
    resolution: image side the first stage's attention levels are counted from, and the default
      sample size (default 256; SDXL 1024).
    tokenizer: a tokenizer folder to include (single files hold none; SD 1.x and SDXL's first
      encoder: CLIP's BPE, the paper's txt2img model: bert-base-uncased).
    tokenizer_2: SDXL's second tokenizer folder (bigG's: CLIP's BPE padded with '!'), base or refiner.
  """
  for flag, folder in (("--tokenizer", tokenizer), ("--tokenizer_2", tokenizer_2)):
    if folder is not None and not os.path.isdir(folder):
      raise FileNotFoundError(f"{flag}: {folder} is not a folder (a tokenizer folder, as diffusers' tokenizer/).")
  options = options_from_yaml(config) if config else {}
  for key, value in dict(num_heads=num_heads, num_head_channels=num_head_channels, parameterization=parameterization,
                         scale_factor=scale_factor, resolution=resolution).items():
    if value is not None:
      options[key] = value
  if "num_heads" in options and "num_head_channels" not in options:
    options["num_head_channels"] = -1
  if "num_head_channels" in options and "num_heads" not in options:
    options["num_heads"] = 8
  state = read_weights(path)
  sdxl = any(k.startswith(SGM_PREFIX) for k in state)
  configs: dict[str, dict] = {}
  params: dict[str, Any] = {}

  if f"{CLIP_PREFIX}token_emb.weight" in state:
    configs["cond"], params["conditioner"] = bert_embedder_from_state(strip_prefix(state, CLIP_PREFIX))
  for component, (prefix, cfg, text_state) in _text_encoders(state, path).items():
    params[component] = naming.torch_to_flax(text_state, components.abstract_params(component, cfg),
                                             what=f"{component} ({prefix}*) of {path}")
    configs[component] = cfg

  unet_state = strip_prefix(state, UNET_PREFIX)
  ae_state = strip_prefix(state, AE_PREFIX) if any(k.startswith(AE_PREFIX) for k in state) else \
      {k: v for k, v in state.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv.",
                                                        "quantize.", "loss."))}
  if unet_state:
    what = f"U-Net ({UNET_PREFIX}*) of {path}"
    text_time = None
    if sdxl and "text_encoder_2" in configs:  # base: 6 time ids (sizes, crop, target); refiner: 5 (aesthetic score)
      text_time = (configs["text_encoder_2"]["projection_dim"], 6 if "text_encoder" in configs else 5)
    with _architecture_of(what, UNET_PREFIX):
      cfg = unet_config_from_state(unet_state, num_heads=options.get("num_heads"),
                                   num_head_channels=options.get("num_head_channels"), text_time=text_time)
    params["unet"] = load_unet_state(unet_state, cfg, what)
    configs["unet"] = cfg
  if ae_state:
    what = f"autoencoder ({AE_PREFIX}*) of {path}" if any(k.startswith(AE_PREFIX) for k in state) else \
        f"autoencoder of {path}"
    with _architecture_of(what, AE_PREFIX if AE_PREFIX in what else ""):
      cfg = autoencoder_config_from_state(ae_state, options.get("resolution", 1024 if sdxl else 256))
    params["autoencoder"] = load_autoencoder_state(ae_state, cfg, what)
    configs["autoencoder"] = cfg
  if not params:
    raise ValueError(f"{path}: no U-Net ({UNET_PREFIX}*), autoencoder ({AE_PREFIX}* or encoder.*) or text "
                     "encoder found; is it a CompVis/Stability checkpoint?")
  _check_tokenizers(path, configs, params, tokenizer, tokenizer_2)

  if unet_state:
    diffusion = options.get("diffusion") or (diffusion_config_from_betas(state["betas"]) if "betas" in state else None)
    if diffusion is None:
      diffusion = dict(beta_schedule="scaled_linear", num_timesteps=1000, linear_start=0.00085, linear_end=0.012)
      if not sdxl:  # sgm files never store it; SDXL was trained on this one
        logging.warning("%s: no schedule saved or given; assuming Stable Diffusion's (scaled_linear "
                        "0.00085–0.012, 1000 steps).", path)
    diffusion["parameterization"] = options.get("parameterization", "eps")
    configs["diffusion"] = diffusion
  if "scale_factor" in options:
    sf = float(options["scale_factor"])
  elif "scale_factor" in state:
    sf = float(np.asarray(state["scale_factor"]))
  elif unet_state and ae_state and configs["autoencoder"]["kind"] == "kl" and configs["autoencoder"]["embed_dim"] == 4:
    sf = SDXL_SCALE_FACTOR if sdxl else SD_SCALE_FACTOR
  else:
    sf = 1.0
  configs["latent"] = {"scale_factor": sf}
  if "conditioner" in params:
    check_conditioner(configs["cond"], params["conditioner"], path)
  if "text_encoder_2" in configs:
    # diffusers' pipelines: the base zeroes the empty negative prompt, the refiner encodes it.
    sdxl_conditioning(configs, {"_class_name": "StableDiffusionXLPipeline"} if "text_encoder" in configs else {})
  return Pretrained(configs, params, tokenizer, source=path, tokenizer_2_dir=tokenizer_2)


def _text_encoders(state: Mapping[str, np.ndarray], path: str) -> dict[str, tuple[str, dict, dict]]:
  """component → (key prefix, config, CLIPTextModel state) of the file's pretrained text encoders."""
  try:
    if any(k.startswith(SGM_PREFIX) for k in state):
      return sgm_text_encoders(state)
    if any(k.startswith(CLIP_PREFIX) for k in state) and f"{CLIP_PREFIX}token_emb.weight" not in state:
      return {"text_encoder": (CLIP_PREFIX, *clip_from_transformers_state(strip_prefix(state, CLIP_PREFIX)))}
    if any(k.startswith(OPENCLIP_PREFIX) for k in state):
      return {"text_encoder": (OPENCLIP_PREFIX, *clip_from_openclip_state(strip_prefix(state, OPENCLIP_PREFIX)))}
  except KeyError as e:
    key = e.args[0]
    prefix = "" if key.startswith(SGM_PREFIX) else (CLIP_PREFIX if any(k.startswith(CLIP_PREFIX) for k in state)
                                                   else OPENCLIP_PREFIX)
    raise naming.WeightMismatchError(f"text encoder of {path}",
                                     missing=[f"{prefix}{key} (the architecture is read from it)"]) from None
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  return {}


@contextlib.contextmanager
def _architecture_of(what: str, prefix: str):
  """Errors of reading an architecture from the shapes, naming the part of the file and the tensor."""
  try:
    yield
  except KeyError as e:
    raise naming.WeightMismatchError(what, missing=[f"{prefix}{e.args[0]} (the architecture is read from it)"]) \
        from None
  except naming.WeightMismatchError:
    raise
  except ValueError as e:
    raise ValueError(f"{what}: {e}") from None


def _check_tokenizers(path: str, configs: Mapping[str, Any], params: Mapping[str, Any], tokenizer: str | None,
                      tokenizer_2: str | None) -> None:
  if tokenizer is not None and "text_encoder" not in configs and "conditioner" not in params:
    refiner = " (an SDXL refiner: its one encoder, bigG, takes --tokenizer_2)" if "text_encoder_2" in configs else ""
    raise ValueError(f"--tokenizer: {path} has no text encoder for it{refiner}.")
  if tokenizer_2 is not None and "text_encoder_2" not in configs:
    raise ValueError(f"--tokenizer_2: {path} has no second text encoder (SDXL's OpenCLIP bigG, "
                     f"{SGM_PREFIX}N.model.*); it is for SDXL files.")


