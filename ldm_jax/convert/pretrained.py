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
    DIR/conditioner/config.json      {"cond": {cond.* keys}}  + params.safetensors (a trained τ_θ)
    DIR/tokenizer/                   a tokenizer folder (`ldm_jax.data.tokenizer.load_tokenizer`)

`load_pretrained(dir)` reads such a directory — and, directly, a diffusers pipeline folder, a
single diffusers/transformers component folder, or a CompVis/Stability single-file checkpoint —
and returns `(modules, params, configs)`; see its docstring.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from ldm_jax import config as checks
from ldm_jax.convert import components
from ldm_jax.convert import diffusers as dconv
from ldm_jax.convert import naming
from ldm_jax.convert import transformers_text as tconv
from ldm_jax.convert.safetensors_io import flatten_params, read_safetensors, unflatten_params, write_safetensors
from ldm_jax.runtime import outputs

FORMAT_FILE = "ldm_jax_pretrained.json"
PARAMS_FILE = "params.safetensors"
FORMAT_VERSION = 1
# diffusers pipeline subfolder → ldm_jax component.
PIPELINE_FOLDERS = {"unet": "unet", "vae": "autoencoder", "vqvae": "autoencoder", "text_encoder": "text_encoder"}


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
  """
  configs: dict[str, dict]
  params: dict[str, Any]
  tokenizer_dir: str | None = None
  source: str = ""

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
    if found != component:
      raise ValueError(f"{path}: holds a {found}, expected the pipeline's {component}.")
    configs[component], params[component] = model, component_params
    configs.update(extra)
  if not params:
    raise ValueError(f"{directory}: no diffusers components (none of {', '.join(PIPELINE_FOLDERS)} with a "
                     "config.json).")
  scheduler = os.path.join(directory, "scheduler", "scheduler_config.json")
  if os.path.isfile(scheduler):
    configs["diffusion"] = dconv.diffusion_config_from_scheduler(dconv.read_json(scheduler), where=scheduler)
  tokenizer = os.path.join(directory, "tokenizer")
  return Pretrained(configs, params, tokenizer if os.path.isdir(tokenizer) else None, source=directory)


def read_source(src: str, **single_file_options) -> Pretrained:
  """Any supported source: a pretrained directory, a diffusers pipeline or component folder, or a
  single-file checkpoint (`ldm_jax.convert.compvis.read_single_file`, with `single_file_options`)."""
  if os.path.isfile(src):
    from ldm_jax.convert import compvis  # pylint: disable=g-import-not-at-top
    return compvis.read_single_file(src, **single_file_options)
  if not os.path.isdir(src):
    raise FileNotFoundError(f"{src}: no such file or directory.")
  if os.path.isfile(os.path.join(src, FORMAT_FILE)):
    return read_pretrained(src)
  kind = checks.run_kind(dconv.read_json(os.path.join(src, "config.json"))) if os.path.isfile(
      os.path.join(src, "config.json")) else None
  if kind is not None:
    raise ValueError(f"{src}: holds a {checks.RUN_KINDS[kind]}, not a pretrained model; use it as a workdir, "
                     f"or export it first (python -m ldm_jax.convert export --workdir {src} …).")
  if os.path.isfile(os.path.join(src, "config.json")) and not os.path.isfile(os.path.join(src, "model_index.json")):
    component, model, params, extra = read_diffusers_component(src)
    return Pretrained({component: model, **extra}, {component: params}, None, source=src)
  return read_diffusers_pipeline(src)


# ---------------------------------------------------------------------------------------------
# The ldm_jax pretrained format

def _restore_autoencoder_workdir(directory: str) -> dict:
  from ldm_jax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  checkpointer = Checkpointer(os.path.join(directory, "checkpoints"))
  try:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = checkpointer.restore_subtree(("params", "autoencoder"), sharding)
  finally:
    checkpointer.close()
  return jax.tree.map(np.asarray, params)


def read_pretrained(directory: str) -> Pretrained:
  """Reads a pretrained directory (the layout in the module docstring), checking every tensor."""
  meta = dconv.read_json(os.path.join(directory, FORMAT_FILE))
  if meta.get("format") != FORMAT_VERSION:
    raise ValueError(f"{directory}/{FORMAT_FILE}: format {meta.get('format')!r}; this ldm_jax reads "
                     f"format {FORMAT_VERSION}.")
  configs = {key: dict(meta[key]) for key in ("diffusion", "latent", "cond") if meta.get(key)}
  params = {}
  for component in meta["components"]:
    path = os.path.join(directory, component)
    cfg = dconv.read_json(os.path.join(path, "config.json"))
    if component == "conditioner":
      configs["cond"] = cfg["cond"]
      params[component] = unflatten_params(read_safetensors(os.path.join(path, PARAMS_FILE)))
      continue
    configs[component] = _tuples(cfg["model"])
    expected = components.abstract_params(component, configs[component])
    if os.path.isfile(os.path.join(path, PARAMS_FILE)):
      flat = read_safetensors(os.path.join(path, PARAMS_FILE))
    elif component == "autoencoder" and os.path.isdir(os.path.join(path, "checkpoints")):
      flat = flatten_params(_restore_autoencoder_workdir(path))
    else:
      raise FileNotFoundError(f"{path}: neither {PARAMS_FILE} nor (for an autoencoder) checkpoints/.")
    params[component] = naming.check_params(unflatten_params(flat), expected, what=path)
  tokenizer = os.path.join(directory, "tokenizer")
  return Pretrained(configs, params, tokenizer if os.path.isdir(tokenizer) else None,
                    source=meta.get("source", directory))


def _tuples(value):
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


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
  target_tokenizer = os.path.join(directory, "tokenizer")
  copy_tokenizer = bool(pretrained.tokenizer_dir) and (
      os.path.abspath(pretrained.tokenizer_dir) != os.path.abspath(target_tokenizer))
  names = pretrained.components + (["tokenizer"] if copy_tokenizer else []) + [FORMAT_FILE]
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
  if copy_tokenizer:
    shutil.copytree(pretrained.tokenizer_dir, target_tokenizer)
  meta = {"format": FORMAT_VERSION, "source": pretrained.source, "components": pretrained.components}
  meta.update({key: pretrained.configs[key] for key in ("diffusion", "latent", "cond") if key in pretrained.configs})
  dconv.write_json(os.path.join(directory, FORMAT_FILE), meta)
  outputs.record(directory, names)


def _save_autoencoder_workdir(directory: str, params) -> None:
  """An orbax checkpoint laid out as a stage-1 run's (state.params.autoencoder), step 0."""
  from ldm_jax.train.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  checkpointer = Checkpointer(os.path.join(directory, "checkpoints"), async_save=False)
  state = {"step": np.zeros((), np.int32), "params": {"autoencoder": jax.tree.map(np.asarray, params)}}
  checkpointer.save(0, state, force=True)
  checkpointer.close()


# ---------------------------------------------------------------------------------------------
# Building modules

def load_pretrained(directory: str, **single_file_options):
  """Loads a pretrained model for sampling or fine-tuning: `(modules, params, configs)`.

  Args:
    directory: a pretrained directory (see the module docstring), a diffusers pipeline folder
      (SD 1.x / 2.x: unet/, vae/, text_encoder/, tokenizer/, scheduler/), one diffusers or
      transformers component folder, or a single-file checkpoint (CompVis/Stability
      `.safetensors`, or `.ckpt` through torch with weights_only).
    single_file_options: passed to `ldm_jax.convert.compvis.read_single_file` for single files.

  Returns:
    modules: component → linen module: 'unet' (`UNet`), 'autoencoder' (`AutoencoderKL` |
      `VQModel`), 'text_encoder' (`CLIPTextEncoder` | `BertTextEncoder`), 'conditioner' (a trained
      `Conditioner`, from ldm_jax exports), and 'tokenizer' (`ldm_jax.data.tokenizer.Tokenizer`,
      not a module) — each only when present.
    params: component → parameter tree (numpy; `jax.device_put` them onto a mesh as needed), for
      `modules[c].apply({'params': params[c]}, …)`.
    configs: component → `ml_collections.ConfigDict` of its config, plus 'diffusion' (diffusion.*:
      beta_schedule, num_timesteps, linear_start, linear_end, zero_terminal_snr, parameterization),
      'latent' (scale_factor) and 'cond' when known.
  """
  pretrained = read_source(directory, **single_file_options)
  modules: dict[str, Any] = {}
  for component in pretrained.components:
    if component != "conditioner":
      modules[component] = components.build(component, pretrained.configs[component])
  tokenizer = None
  if pretrained.tokenizer_dir:
    from ldm_jax.data.tokenizer import load_tokenizer  # pylint: disable=g-import-not-at-top
    max_length = pretrained.configs.get("cond", {}).get("max_length")
    tokenizer = load_tokenizer(pretrained.tokenizer_dir, max_length=max_length)
    modules["tokenizer"] = tokenizer
  if "conditioner" in pretrained.params:
    from ldm_jax.models import conditioning  # pylint: disable=g-import-not-at-top
    modules["conditioner"] = conditioning.make_conditioner(ml_collections.ConfigDict(pretrained.configs["cond"]),
                                                           tokenizer)
  configs = {key: ml_collections.ConfigDict(value) for key, value in pretrained.configs.items()}
  return modules, dict(pretrained.params), configs
