"""Export: a `Pretrained` bundle → a diffusers-format folder (a pretrained directory: `save_pretrained`).

    pretrained = ldm_jax.load.read_workdir('runs/ldm')   # EMA weights of the newest checkpoint
    write_diffusers('exported/', pretrained)           # unet/, vae/, scheduler/, …
    save_pretrained('exported_st/', pretrained)        # ldm_jax naming, plain safetensors

diffusers layout: one component → the folder itself (`AutoencoderKL.from_pretrained(out)`); several
→ diffusers' pipeline subfolders (`unet/`, `vae/` or `vqvae/` for VQ, `text_encoder/`, `tokenizer/`,
`scheduler/` with a DDIMScheduler config; SDXL adds `text_encoder_2/` and `tokenizer_2/`), plus
`model_index.json` when the set is a complete StableDiffusionPipeline, StableDiffusionXLPipeline
(two text encoders) or StableDiffusionXLImg2ImgPipeline (the refiner: text_encoder_2 only). A conditioner trained from scratch (the paper's BERT-like transformer, a
class-embedding table) has no diffusers class: it is written to `conditioner/` in ldm_jax's format.
"""

from __future__ import annotations

import os
import shutil

from ldm_jax.convert import diffusers_format as dconv
from ldm_jax.convert import transformers_text as tconv
from ldm_jax.convert.pretrained import PARAMS_FILE, Pretrained
from ldm_jax.convert.safetensors_io import flatten_params, write_safetensors
from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.runtime import outputs

def _diffusers_entries(pretrained: Pretrained, single: bool) -> list[str]:
  """The entries `write_diffusers` puts directly into its directory."""
  if single:
    component = next(c for c in pretrained.components if c != "conditioner")
    return ["config.json", tconv.WEIGHTS_NAME if component.startswith("text_encoder") else dconv.WEIGHTS_NAME]
  ae = pretrained.configs.get("autoencoder")
  names = [folder for folder, present in (
      ("vae" if ae is not None and ae["kind"] == "kl" else "vqvae", ae is not None),
      ("unet", "unet" in pretrained.configs), ("text_encoder", "text_encoder" in pretrained.configs),
      ("text_encoder_2", "text_encoder_2" in pretrained.configs),
      ("conditioner", "conditioner" in pretrained.params), ("tokenizer", bool(pretrained.tokenizer_dir)),
      ("tokenizer_2", bool(pretrained.tokenizer_2_dir)),
      ("scheduler", "diffusion" in pretrained.configs)) if present]
  return names + ["model_index.json"]


def write_diffusers(directory: str, pretrained: Pretrained, *, overwrite: bool = False) -> list[str]:
  """Writes `pretrained` in diffusers/transformers format; returns the folders written.

  An entry of `directory` that it would write and that exists is an error (FileExistsError
  naming it) unless `overwrite` is given and an earlier export wrote it (`ldm_jax.runtime.outputs`).
  """
  parts = [c for c in pretrained.components if c != "conditioner"]
  single = len(parts) == 1 and "conditioner" not in pretrained.params
  entries = _diffusers_entries(pretrained, single)
  os.makedirs(directory, exist_ok=True)
  outputs.claim(directory, entries, overwrite)
  written = []
  latent = pretrained.configs.get("latent", {})

  def folder(name):
    path = directory if single else os.path.join(directory, name)
    written.append(path)
    return path

  ae = pretrained.configs.get("autoencoder")
  if ae is not None:
    cfg = dconv.autoencoder_config_to_diffusers(ae, latent.get("scale_factor", 1.0))
    dconv.write_component(folder("vae" if ae["kind"] == "kl" else "vqvae"), cfg,
                          dconv.autoencoder_state(ae, pretrained.params["autoencoder"]), dconv.WEIGHTS_NAME)
  if "unet" in pretrained.configs:
    sample_size = None
    if ae is not None:
      sample_size = ae["resolution"] // ae_lib.downsampling_factor(ae)
    cfg = dconv.unet_config_to_diffusers(pretrained.configs["unet"], sample_size)
    dconv.write_component(folder("unet"), cfg, dconv.unet_state(pretrained.params["unet"]), dconv.WEIGHTS_NAME)
  sdxl = "text_encoder_2" in pretrained.configs
  for name in ("text_encoder", "text_encoder_2"):
    text = pretrained.configs.get(name)
    if text is not None:
      dconv.write_component(folder(name), tconv.text_config_to_transformers(text, penultimate=sdxl),
                            tconv.text_encoder_state(text, pretrained.params[name]), tconv.WEIGHTS_NAME)
  text = pretrained.configs.get("text_encoder")
  if "conditioner" in pretrained.params:
    path = os.path.join(directory, "conditioner")
    dconv.write_json(os.path.join(path, "config.json"), {"cond": pretrained.configs["cond"]})
    write_safetensors(os.path.join(path, PARAMS_FILE), flatten_params(pretrained.params["conditioner"]))
    written.append(path)
  for name, source in (("tokenizer", pretrained.tokenizer_dir), ("tokenizer_2", pretrained.tokenizer_2_dir)):
    if source and not single:
      target = os.path.join(directory, name)
      shutil.copytree(source, target)
      written.append(target)
  if "diffusion" in pretrained.configs and not single:
    path = os.path.join(directory, "scheduler")
    dconv.write_json(os.path.join(path, "scheduler_config.json"),
                     dconv.scheduler_config_from_diffusion(pretrained.configs["diffusion"]))
    written.append(path)
  pipeline = not single and ae is not None and ae["kind"] == "kl" and "unet" in pretrained.params
  if sdxl and pipeline and pretrained.tokenizer_2_dir and (text is None) == (pretrained.tokenizer_dir is None):
    dconv.write_json(os.path.join(directory, "model_index.json"), _sdxl_model_index(pretrained))
  elif (pipeline and not sdxl and text is not None and text["kind"] == "clip" and pretrained.tokenizer_dir):
    dconv.write_json(os.path.join(directory, "model_index.json"), _model_index(pretrained.tokenizer_dir))
  outputs.record(directory, [name for name in entries if os.path.lexists(os.path.join(directory, name))])
  return written


def _tokenizer_class(tokenizer_dir: str) -> str:
  config_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
  if os.path.isfile(config_path):
    return dconv.read_json(config_path).get("tokenizer_class") or "CLIPTokenizer"
  return "CLIPTokenizer"


def _sdxl_model_index(pretrained: Pretrained) -> dict:
  """StableDiffusionXLPipeline (base), or StableDiffusionXLImg2ImgPipeline (refiner: no text_encoder)."""
  cond = pretrained.configs.get("cond", {})
  refiner = "text_encoder" not in pretrained.configs
  index = {
      "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
      "_diffusers_version": dconv.diffusers_version(), "feature_extractor": [None, None],
      "image_encoder": [None, None], "force_zeros_for_empty_prompt": cond.get("null_text") == "zeros",
      "scheduler": ["diffusers", "DDIMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"],
      "vae": ["diffusers", "AutoencoderKL"],
      "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
      "tokenizer": [None, None] if refiner else ["transformers", _tokenizer_class(pretrained.tokenizer_dir)],
      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
      "tokenizer_2": ["transformers", _tokenizer_class(pretrained.tokenizer_2_dir)],
  }
  if refiner:
    index["requires_aesthetics_score"] = cond.get("micro_conditioning") == "aesthetic_score"
  return index


def _model_index(tokenizer_dir: str) -> dict:
  tokenizer_class = _tokenizer_class(tokenizer_dir)
  return {
      "_class_name": "StableDiffusionPipeline", "_diffusers_version": dconv.diffusers_version(),
      "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
      "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
      "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", tokenizer_class],
      "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
  }
