"""Pretrained directories: ldm_jax's own format for converted and exported models, and `load_pretrained`.

A pretrained directory holds whole models in ldm_jax naming, one folder per component:

    DIR/ldm_jax_pretrained.json      {"format": 1, "source": …, "components": […],
                                      "diffusion": {diffusion.* keys}, "latent": {"scale_factor": …},
                                      "cond": {cond.* keys, when a trained conditioner is included}}
    DIR/autoencoder/config.json      {"model": {model.* of a stage-1 config}, "data": {"image_size", "channels"}}
    DIR/autoencoder/params.safetensors     flat '/'-joined flax paths ('encoder/conv_in/kernel')
        or DIR/autoencoder/checkpoints/     orbax, as a stage-1 run writes it: the folder is then a
                                            stage-1 workdir that `train_diffusion.py` accepts as
                                            `autoencoder.workdir` (what `import` writes)
    DIR/unet/config.json             {"model": {model.* of a stage-2 config}}    + params.safetensors
    DIR/text_encoder/config.json     {"model": {"kind": "clip" | "bert", …}}     + params.safetensors
    DIR/text_encoder_2/              SDXL's second text encoder, as text_encoder/
    DIR/conditioner/config.json      {"cond": {cond.* keys}}  + params.safetensors (a trained τ_θ)
    DIR/tokenizer/                   a tokenizer folder (`ldm_jax.data.tokenizer.load_tokenizer`)
    DIR/tokenizer_2/                 SDXL's second tokenizer

`save_pretrained` writes one; `read_diffusers_pipeline` / `read_diffusers_component` read diffusers
folders into a `Pretrained` bundle. Reading a pretrained directory (and any other source) into
modules and params is `ldm_jax.load.load_pretrained`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from ldm_jax.convert import components
from ldm_jax.convert import diffusers_format as dconv
from ldm_jax.convert import transformers_text as tconv
from ldm_jax.convert.safetensors_io import flatten_params, write_safetensors
from ldm_jax.runtime import outputs
from ldm_jax.runtime.checkpoint import Checkpointer

FORMAT_FILE = "ldm_jax_pretrained.json"
PARAMS_FILE = "params.safetensors"
FORMAT_VERSION = 1
# diffusers pipeline subfolder → ldm_jax component.
PIPELINE_FOLDERS = {"unet": "unet", "vae": "autoencoder", "vqvae": "autoencoder", "text_encoder": "text_encoder",
                    "text_encoder_2": "text_encoder_2"}
# diffusers' default of `force_zeros_for_empty_prompt` per pipeline class (when model_index.json lacks it).
_FORCE_ZEROS_DEFAULT = {"StableDiffusionXLPipeline": True}


@dataclasses.dataclass
class Pretrained:
  """Configs and host parameters of the components of one model, before building modules.

  Attributes:
    configs: component → its `model.*` config ('autoencoder', 'unet', 'text_encoder'), plus
      'diffusion' (diffusion.* keys), 'latent' ({'scale_factor'}) and 'cond' (cond.* keys, the
      config of a 'conditioner').
    params: component → nested dict of numpy arrays.
    tokenizer_dir: a tokenizer folder to copy and load, or None.
    source: where the weights came from (recorded in ldm_jax_pretrained.json).
    tokenizer_2_dir: SDXL's second tokenizer folder, or None.
  """
  configs: dict[str, dict]
  params: dict[str, Any]
  tokenizer_dir: str | None = None
  source: str = ""
  tokenizer_2_dir: str | None = None

  @property
  def components(self) -> list[str]:
    return [c for c in components.COMPONENTS + ("conditioner",) if c in self.params]


# ---------------------------------------------------------------------------------------------
# Reading any supported source

def _component_params(component: str, cfg: Mapping[str, Any], directory: str) -> dict:
  expected = components.abstract_params(component, cfg)
  if component == "autoencoder":
    return dconv.load_autoencoder(directory, expected)
  if component == "unet":
    return dconv.load_unet(directory, expected)
  return tconv.load_text_encoder(directory, expected)


def sdxl_conditioning(configs: dict[str, dict], model_index: Mapping[str, Any]) -> None:
  """For a pipeline with `text_encoder_2` (SDXL): both encoders give their penultimate hidden states
  without the final norm (diffusers' `hidden_states[-2]`), and configs['cond'] records the null
  condition (model_index.json's `force_zeros_for_empty_prompt`) and the micro-conditioning the
  U-Net's `add_embedding` width implies (6 time ids: base, 5: refiner with aesthetic score)."""
  for component in components.TEXT_ENCODERS:
    if component in configs:
      configs[component] = dict(configs[component], skip_last_layers=1, norm_output=False)
  force_zeros = model_index.get("force_zeros_for_empty_prompt",
                                _FORCE_ZEROS_DEFAULT.get(model_index.get("_class_name"), False))
  cond = {"null_text": "zeros" if force_zeros else "empty_prompt", "micro_conditioning": "none"}
  unet = configs.get("unet", {})
  if unet.get("addition_embed_type") == "text_time":
    pooled = configs["text_encoder_2"].get("projection_dim") or 0
    ids, rest = divmod(unet["addition_embed_dim"] - pooled, unet["addition_time_embed_dim"])
    if rest or ids not in (5, 6):
      raise ValueError(f"unet: add_embedding takes {unet['addition_embed_dim']} features, which is not the "
                       f"{pooled} of text_encoder_2's projection + 6 (base) or 5 (refiner) time ids × "
                       f"{unet['addition_time_embed_dim']}.")
    cond["micro_conditioning"] = "target_size" if ids == 6 else "aesthetic_score"
  configs["cond"] = cond


def read_diffusers_component(directory: str) -> tuple[str, dict, dict, dict]:
  """(component, model config, params, extra configs) of one diffusers/transformers component folder."""
  cfg = dconv.read_json(os.path.join(directory, "config.json"))
  cls = cfg.get("_class_name")
  extra: dict[str, dict] = {}
  if cls in ("AutoencoderKL", "VQModel"):
    component = "autoencoder"
    model, scale_factor = dconv.autoencoder_config_from_diffusers(cfg, where=directory)
    extra["latent"] = {"scale_factor": scale_factor}
  elif cls == "UNet2DConditionModel":
    component, model = "unet", dconv.unet_config_from_diffusers(cfg, where=directory)
  elif cls is None and "model_type" in cfg:
    component, model = "text_encoder", tconv.text_config_from_transformers(cfg, where=directory)
  else:
    raise ValueError(f"{directory}: config.json describes {cls or cfg.get('architectures')}; ldm_jax imports "
                     "AutoencoderKL, VQModel, UNet2DConditionModel, CLIPTextModel and BertModel.")
  return component, model, _component_params(component, model, directory), extra


def read_diffusers_pipeline(directory: str) -> Pretrained:
  """A diffusers pipeline folder (unet/, vae/ or vqvae/, text_encoder/, tokenizer/, scheduler/)."""
  configs: dict[str, dict] = {}
  params: dict[str, Any] = {}
  for folder, component in PIPELINE_FOLDERS.items():
    path = os.path.join(directory, folder)
    if not os.path.isfile(os.path.join(path, "config.json")):
      continue
    found, model, component_params, extra = read_diffusers_component(path)
    if found != component and not (component == "text_encoder_2" and found == "text_encoder"):
      raise ValueError(f"{path}: holds a {found}, expected the pipeline's {component}.")
    configs[component], params[component] = model, component_params
    configs.update(extra)
  if not params:
    raise ValueError(f"{directory}: no diffusers components (none of {', '.join(PIPELINE_FOLDERS)} with a "
                     "config.json).")
  scheduler = os.path.join(directory, "scheduler", "scheduler_config.json")
  if os.path.isfile(scheduler):
    configs["diffusion"] = dconv.diffusion_config_from_scheduler(dconv.read_json(scheduler), where=scheduler)
  if "text_encoder_2" in configs:
    index = os.path.join(directory, "model_index.json")
    sdxl_conditioning(configs, dconv.read_json(index) if os.path.isfile(index) else {})
  tokenizer, tokenizer_2 = (os.path.join(directory, name) for name in ("tokenizer", "tokenizer_2"))
  return Pretrained(configs, params, tokenizer if os.path.isdir(tokenizer) else None, source=directory,
                    tokenizer_2_dir=tokenizer_2 if os.path.isdir(tokenizer_2) else None)


# ---------------------------------------------------------------------------------------------
# The ldm_jax pretrained format

def save_pretrained(directory: str, pretrained: Pretrained, *, autoencoder_workdir: bool = False,
                    image_size: int | None = None, overwrite: bool = False) -> None:
  """Writes `pretrained` as a pretrained directory.

  Args:
    directory: created if needed; a component folder, tokenizer/ or the format file that exists
      there is an error (FileExistsError naming it), see `overwrite`.
    pretrained: what to write.
    autoencoder_workdir: store the autoencoder as an orbax stage-1 checkpoint (the folder becomes
      a stage-1 workdir for `autoencoder.workdir`) instead of params.safetensors.
    image_size: `data.image_size` recorded for the autoencoder (stage 2 checks its data against
      it); default: the autoencoder's `resolution`.
    overwrite: replace those entries when an earlier export or import wrote them
      (`ldm_jax.runtime.outputs`); entries of any other origin are never replaced.
  """
  tokenizers = {}  # folder name → source folder to copy
  for name, source in (("tokenizer", pretrained.tokenizer_dir), ("tokenizer_2", pretrained.tokenizer_2_dir)):
    if source and os.path.abspath(source) != os.path.abspath(os.path.join(directory, name)):
      tokenizers[name] = source
  names = pretrained.components + list(tokenizers) + [FORMAT_FILE]
  os.makedirs(directory, exist_ok=True)
  outputs.claim(directory, names, overwrite)
  for component in pretrained.components:
    path = os.path.join(directory, component)
    os.makedirs(path)
    params = pretrained.params[component]
    if component == "conditioner":
      dconv.write_json(os.path.join(path, "config.json"), {"cond": pretrained.configs["cond"]})
      write_safetensors(os.path.join(path, PARAMS_FILE), flatten_params(params))
      continue
    model = pretrained.configs[component]
    cfg: dict[str, Any] = {"model": model}
    if component == "autoencoder":
      cfg["data"] = {"image_size": int(image_size or model["resolution"]), "channels": int(model["in_channels"])}
      cfg["latent"] = dict(pretrained.configs.get("latent", {}))
    dconv.write_json(os.path.join(path, "config.json"), cfg)
    if component == "autoencoder" and autoencoder_workdir:
      _save_autoencoder_workdir(path, params)
    else:
      write_safetensors(os.path.join(path, PARAMS_FILE), flatten_params(params))
  for name, source in tokenizers.items():
    shutil.copytree(source, os.path.join(directory, name))
  meta = {"format": FORMAT_VERSION, "source": pretrained.source, "components": pretrained.components}
  meta.update({key: pretrained.configs[key] for key in ("diffusion", "latent", "cond") if key in pretrained.configs})
  dconv.write_json(os.path.join(directory, FORMAT_FILE), meta)
  outputs.record(directory, names)


def _save_autoencoder_workdir(directory: str, params) -> None:
  """An orbax checkpoint laid out as a stage-1 run's (state.params.autoencoder), step 0."""
  checkpointer = Checkpointer(os.path.join(directory, "checkpoints"), async_save=False, this_process_only=True)
  state = {"step": np.zeros((), np.int32), "params": {"autoencoder": jax.tree.map(np.asarray, params)}}
  checkpointer.save(0, state, force=True)
  checkpointer.close()
