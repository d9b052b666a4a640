"""The one place that reads weights: a run directory or a pretrained directory → modules and params.

    model, ae_config, params = load_autoencoder('runs/ae', sharding)      # a stage-1 run
    ldm, params, ae_params = load_diffusion_run('runs/ldm', mesh)          # a stage-2 run (EMA weights)
    modules, params, configs = load_pretrained('stable-diffusion-v1-5/')   # any pretrained source
    bundle = read_workdir('runs/ldm')                                      # a run as a `Pretrained` bundle

Runs are read from their orbax checkpoints (`restore`, the only caller of
`Checkpointer.restore_subtree`); pretrained sources through the format readers of
`ldm_jax.convert` (diffusers folders, CompVis/Stability single files) or, for ldm_jax's own
pretrained directories, here (`read_pretrained`: safetensors, or an orbax stage-1 workdir for the
autoencoder). Trainers, sampling, evaluation and export call these functions; none of them opens
a checkpoint or a weight file itself. A trainer's resume (`Checkpointer.restore` of its whole
state) is not weight loading and stays in `ldm_jax.runtime.checkpoint`.

`build_ldm` assembles the `LatentDiffusion` of a stage-2 config once its `scale_factor` is known;
`pretrained_conditioning` says what conditions a pretrained model (a trained conditioner, a
frozen text encoder, or none), for both sampling and fine-tuning; `pretrained_config` what else
of a stage-2 config a pretrained model decides, for the fine-tuning trainer and the cache it
trains from (`ldm_jax.precompute`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from ldm_jax import config as checks
from ldm_jax.config import common as config_lib
from ldm_jax.config import sections
from ldm_jax.convert import components, naming, single_file
from ldm_jax.convert import diffusers_format as dconv
from ldm_jax.convert import pretrained as pretrained_lib
from ldm_jax.convert.pretrained import FORMAT_FILE, FORMAT_VERSION, PARAMS_FILE, Pretrained
from ldm_jax.convert.safetensors_io import flatten_params, read_safetensors, unflatten_params
from ldm_jax.data.tokenizer import load_tokenizer
from ldm_jax.diffusion import schedule as schedule_lib
from ldm_jax.diffusion.latent_diffusion import LatentDiffusion, TextEncoderConditioner
from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.models import conditioning
from ldm_jax.models import unet as unet_lib
from ldm_jax.runtime import sharding
from ldm_jax.runtime.checkpoint import Checkpointer

# diffusion.* keys a pretrained model decides when it is fine-tuned (the rest are training choices).
PRETRAINED_DIFFUSION_KEYS = ("beta_schedule", "num_timesteps", "linear_start", "linear_end", "zero_terminal_snr",
                             "parameterization")
# diffusion.* keys that describe a trained model (the rest are training choices).
MODEL_DIFFUSION_KEYS = ("beta_schedule", "num_timesteps", "linear_start", "linear_end", "cosine_s",
                        "zero_terminal_snr", "parameterization")


def _host_sharding():
  return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


# ---------------------------------------------------------------------------------------------
# Checkpoints of runs

def checkpoint_steps(checkpoint_dir: str) -> list[int]:
  """Steps of the finished checkpoints in `checkpoint_dir` (orbax's in-progress ones are skipped)."""
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(int(name) for name in os.listdir(checkpoint_dir)
                if name.isdigit() and os.path.isdir(os.path.join(checkpoint_dir, name, "state")))


def restore(workdir: str, keys: tuple[str, ...], placement=None, *, step: int | None = None,
            optional: bool = False):
  """The subtree `state.<keys>` of the run in `workdir` (newest checkpoint unless `step`).

  `placement`: a sharding, or a function of the abstract subtree giving its shardings (default:
  numpy arrays on the host). With `optional`, a missing subtree gives {} instead of ValueError.
  """
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{workdir}: no checkpoints/; is it a ldm_jax workdir?")
  checkpointer = Checkpointer(directory)
  try:
    if checkpointer.latest_step() is None:
      raise FileNotFoundError(f"{directory}: no checkpoint.")
    try:
      tree = checkpointer.restore_subtree(keys, _host_sharding() if placement is None else placement, step=step)
    except KeyError:
      if optional:
        return {}
      raise ValueError(f"{workdir}: the checkpoint has no state.{'.'.join(keys)}.") from None
  finally:
    checkpointer.close()
  return jax.tree.map(np.asarray, tree) if placement is None else tree


# ---------------------------------------------------------------------------------------------
# Stage-1 runs

def autoencoder_run(workdir: str, flag: str = "autoencoder.workdir"):
  """(module, config) of the stage-1 run in `workdir`, no weights read; errors name `flag`."""
  if not workdir:
    raise ValueError(f"{flag}: not set; name the stage-1 run to train on (python train_autoencoder.py … "
                     "--workdir DIR).")
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"{flag}: {workdir} has no checkpoints/; train the autoencoder there first.")
  try:
    ae_config = config_lib.load_config(workdir)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{flag}: {e}") from None
  kind = checks.run_kind(ae_config)
  if kind != "autoencoder":
    own = f" (its autoencoder.workdir is {ae_config.autoencoder.workdir})" if kind == "diffusion" else ""
    raise ValueError(f"{flag}: {workdir} holds a {checks.RUN_KINDS.get(kind, 'run of no known kind')}{own}; name a "
                     "stage-1 run (train_autoencoder.py --workdir) or a pretrained directory's autoencoder/.")
  return ae_lib.make_autoencoder(ae_config.model), ae_config


def load_autoencoder(workdir: str, placement=None, *, flag: str = "autoencoder.workdir", dtype: str | None = None):
  """(module, config, params) of the stage-1 run in `workdir` (newest checkpoint).

  `placement` as `restore` (e.g. replicated on a mesh, or `sharding.tree_sharding` by the
  partition rules, matched as `autoencoder/…`); `dtype` overrides the module's compute dtype.
  """
  model, ae_config = autoencoder_run(workdir, flag)
  if dtype is not None:
    model = model.clone(dtype=jnp.dtype(dtype))
  return model, ae_config, restore(workdir, ("params", "autoencoder"), placement)


# ---------------------------------------------------------------------------------------------
# Stage-2 runs

def read_diffusion_run(workdir: str):
  """(config, ae_config, newest step, tokenizer) of a stage-2 run, no weights read; errors name the
  missing path (workdir, config.json, checkpoints, the autoencoder run, the tokenizer folder)."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir: {workdir} does not exist.")
  config = config_lib.load_config(workdir)
  if "diffusion" not in config or "autoencoder" not in config:
    raise ValueError(f"--workdir: {os.path.join(workdir, 'config.json')} is not a stage-2 run's config "
                     "(no diffusion/autoencoder sections); sample from a train_diffusion.py workdir.")
  _check_not_lora(config, workdir)
  checkpoint_dir = os.path.join(workdir, "checkpoints")
  steps = checkpoint_steps(checkpoint_dir)
  if not steps:
    raise FileNotFoundError(f"--workdir: {checkpoint_dir} holds no checkpoint; train the model there first "
                            f"(python train_diffusion.py --config … --workdir {workdir}).")
  ae_workdir = config.autoencoder.workdir
  if not checkpoint_steps(os.path.join(ae_workdir, "checkpoints")):
    raise FileNotFoundError(f"autoencoder.workdir: the run's autoencoder {ae_workdir} (named in "
                            f"{os.path.join(workdir, 'config.json')}) has no checkpoint.")
  ae_config = config_lib.load_config(ae_workdir)
  tokenizer = None
  if conditioning.uses_text(config.cond):
    tokenizer_dir = os.path.join(workdir, "tokenizer")
    if not os.path.isdir(tokenizer_dir):
      raise FileNotFoundError(f"--workdir: {tokenizer_dir} is missing; a text-conditional run saves its "
                              "tokenizer there and sampling must use the same token ids.")
    tokenizer = load_tokenizer(tokenizer_dir, max_length=config.cond.max_length)
  return config, ae_config, steps[-1], tokenizer


def _check_not_lora(config, workdir: str) -> None:
  """A LoRA run's checkpoints hold adapters, not a model: point at its base and its adapter file."""
  if "lora" in config:
    raise ValueError(f"--workdir: {workdir} is a LoRA run; its checkpoints hold adapters of "
                     f"{config.init.pretrained}: use --pretrained {config.init.pretrained} --lora "
                     f"{os.path.join(workdir, 'pytorch_lora_weights.safetensors')}.")


# The frozen text encoders a pretrained directory may hold: SD's one, SDXL's second (bigG).
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def pretrained_text_encoders(directory: str) -> tuple[str, ...]:
  """Which of `TEXT_ENCODERS` the pretrained `directory` holds (SD: the first; SDXL base: both;
  SDXL refiner: the second)."""
  return tuple(e for e in TEXT_ENCODERS if os.path.isfile(os.path.join(directory, e, "config.json")))


def make_conditioner(config, tokenizer, dtype=jnp.float32):
  """τ_θ of a stage-2 config: the trainable `Conditioner` of `cond.*`, or, with
  `cond.text_encoder='pretrained'`, the frozen text encoders of `init.pretrained` (SDXL: both)."""
  if conditioning.uses_text(config.cond) and config.cond.text_encoder == "pretrained":
    encoders = {}
    for encoder in pretrained_text_encoders(config.init.pretrained):
      with open(os.path.join(config.init.pretrained, encoder, "config.json")) as f:
        encoders[encoder] = components.build(encoder, json.load(f)["model"])
    if not encoders:
      raise FileNotFoundError(f"init.pretrained: {config.init.pretrained} has no text_encoder/ (cond.text_encoder="
                              "'pretrained' conditions on its frozen text encoder).")
    return TextEncoderConditioner(encoders.get("text_encoder"), encoders.get("text_encoder_2"))
  return conditioning.make_conditioner(config.cond, tokenizer, dtype)


def run_tokenizer_2(workdir: str, config):
  """The second tokenizer a run saved (`workdir/tokenizer_2`: an SDXL fine-tuning run), else None."""
  directory = os.path.join(workdir, "tokenizer_2")
  return load_tokenizer(directory, max_length=config.cond.max_length) if os.path.isdir(directory) else None


def make_unet(config, *, for_training=False):
  """ε_θ of a stage-2 config; `for_training` builds it with `train.dtype` and `train.remat`."""
  return unet_lib.make_unet(config_lib.with_train_overrides(config.model, config.train) if for_training
                            else config.model)


def build_ldm(config, model, ae_config, tokenizer, scale_factor: float, *, for_training=False, unet=None,
              conditioner=None, tokenizer_2=None) -> LatentDiffusion:
  """The LatentDiffusion of a (resolved) stage-2 config on the autoencoder `model`; `for_training`
  builds U-Net and conditioner with `train.dtype` and `train.remat` (unless given built).
  `tokenizer_2`: SDXL's second tokenizer (`run_tokenizer_2`), else None."""
  latent = ae_lib.latent_shape(ae_config.model, config.data.image_size)
  dtype = jnp.dtype(config.train.dtype) if for_training else jnp.float32
  return LatentDiffusion(
      unet=make_unet(config, for_training=for_training) if unet is None else unet,
      conditioner=make_conditioner(config, tokenizer, dtype) if conditioner is None else conditioner,
      autoencoder=model, schedule=schedule_lib.schedule_from_config(config.diffusion),
      scale_factor=float(scale_factor), parameterization=config.diffusion.parameterization,
      cond_cfg=config.cond, tokenizer=tokenizer, latent_shape=tuple(latent), tokenizer_2=tokenizer_2)


def load_diffusion_run(workdir: str, mesh: jax.sharding.Mesh, *, use_ema: bool = True):
  """(ldm, params {'unet', 'cond'}, ae_params) of a stage-2 run's newest checkpoint, replicated on `mesh`.

  `use_ema` picks the EMA weights (what the trainer's sample grids show) or the raw ones; the
  latent `scale_factor` is the one the run estimated. Frozen text encoders have no EMA: their
  weights come from the parameters.
  """
  config, _, step, tokenizer = read_diffusion_run(workdir)
  rep = sharding.replicated(mesh)
  model, ae_config, ae_params = load_autoencoder(config.autoencoder.workdir, rep)
  params = restore(workdir, ("ema_params" if use_ema else "params",), rep, step=step)
  if "cond" not in params:
    params["cond"] = restore(workdir, ("params", "cond"), rep, step=step, optional=True)
  scale_factor = restore(workdir, ("scale_factor",), rep, step=step)
  ldm = build_ldm(config, model, ae_config, tokenizer, float(jax.device_get(scale_factor)),
                  tokenizer_2=run_tokenizer_2(workdir, config))
  return ldm, params, ae_params


def read_workdir(workdir: str, *, ema: bool = True, step: int | None = None) -> Pretrained:
  """The exportable model of a stage-1 or stage-2 workdir (newest checkpoint unless `step`), in host memory.

  A stage-1 run gives its autoencoder (stage 1 keeps no EMA: its trained params). A stage-2 run
  gives the U-Net (`ema_params` by default), the conditioner τ_θ it trained — or the frozen text
  encoders of `init.pretrained` it was conditioned on (`text_encoder`, SDXL's `text_encoder_2`) —,
  the frozen autoencoder of its stage-1 run, the noise schedule, `scale_factor` and the
  tokenizer(s).
  """
  config = config_lib.load_config(workdir)
  if "autoencoder" not in config or "workdir" not in config.autoencoder:
    if "kind" not in config.get("model", {}):
      raise ValueError(f"{workdir}/config.json: neither a stage-1 run (model.kind) nor a stage-2 run "
                       "(autoencoder.workdir).")
    params = restore(workdir, ("params", "autoencoder"), step=step)
    return Pretrained({"autoencoder": config.model.to_dict()}, {"autoencoder": params}, source=workdir)

  _check_not_lora(config, workdir)
  tree = "ema_params" if ema else "params"
  ae_workdir = config.autoencoder.workdir
  if not os.path.isdir(ae_workdir):
    raise FileNotFoundError(f"{workdir}/config.json: autoencoder.workdir={ae_workdir} does not exist (relative "
                            "paths are read from the current directory).")
  stage1 = read_workdir(ae_workdir)
  configs: dict[str, Any] = {
      "unet": config.model.to_dict(), "autoencoder": stage1.configs["autoencoder"],
      "diffusion": {k: config.diffusion[k] for k in MODEL_DIFFUSION_KEYS if k in config.diffusion},
      "latent": {"scale_factor": float(restore(workdir, ("scale_factor",), step=step))},
      "cond": config.cond.to_dict(),
  }
  params = {"unet": restore(workdir, (tree, "unet"), step=step), "autoencoder": stage1.params["autoencoder"]}
  if conditioning.uses_text(config.cond) and config.cond.text_encoder == "pretrained":
    # Frozen text encoders (fine-tuning SD / SDXL) export as the components they came from; they
    # have no EMA (checkpoints written before it was left out hold an exact copy of `params` there).
    cond_params = restore(workdir, ("params", "cond"), step=step)
    for encoder in pretrained_text_encoders(config.init.pretrained):
      configs[encoder] = config_lib.lists_to_tuples(
          dconv.read_json(os.path.join(config.init.pretrained, encoder, "config.json"))["model"])
      params[encoder] = cond_params[encoder]
    configs["cond"] = {k: config.cond[k] for k in ("null_text", "micro_conditioning")}
  elif config.cond.kind != "none":
    params["conditioner"] = restore(workdir, (tree, "cond"), step=step, optional=True)
  tokenizer, tokenizer_2 = (os.path.join(workdir, name) for name in ("tokenizer", "tokenizer_2"))
  return Pretrained(configs, params, tokenizer if os.path.isdir(tokenizer) else None, source=workdir,
                    tokenizer_2_dir=tokenizer_2 if os.path.isdir(tokenizer_2) else None)


# ---------------------------------------------------------------------------------------------
# Pretrained models

def read_pretrained(directory: str) -> Pretrained:
  """Reads an ldm_jax pretrained directory (`ldm_jax.convert.pretrained`'s layout), checking every tensor."""
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
    configs[component] = config_lib.lists_to_tuples(cfg["model"])
    expected = components.abstract_params(component, configs[component])
    if os.path.isfile(os.path.join(path, PARAMS_FILE)):
      flat = read_safetensors(os.path.join(path, PARAMS_FILE))
    elif component == "autoencoder" and os.path.isdir(os.path.join(path, "checkpoints")):
      flat = flatten_params(restore(path, ("params", "autoencoder")))
    else:
      raise FileNotFoundError(f"{path}: neither {PARAMS_FILE} nor (for an autoencoder) checkpoints/.")
    params[component] = naming.check_params(unflatten_params(flat), expected, what=path)
  tokenizer, tokenizer_2 = (os.path.join(directory, name) for name in ("tokenizer", "tokenizer_2"))
  return Pretrained(configs, params, tokenizer if os.path.isdir(tokenizer) else None,
                    source=meta.get("source", directory),
                    tokenizer_2_dir=tokenizer_2 if os.path.isdir(tokenizer_2) else None)


def read_source(src: str, **single_file_options) -> Pretrained:
  """Any supported source: a pretrained directory, a diffusers pipeline or component folder, or a
  single-file checkpoint (`ldm_jax.convert.single_file.read_single_file`, with `single_file_options`)."""
  if os.path.isfile(src):
    return single_file.read_single_file(src, **single_file_options)
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
    component, model, params, extra = pretrained_lib.read_diffusers_component(src)
    return Pretrained({component: model, **extra}, {component: params}, None, source=src)
  return pretrained_lib.read_diffusers_pipeline(src)


def load_pretrained(directory: str, **single_file_options):
  """Loads a pretrained model for sampling or fine-tuning: `(modules, params, configs)`.

  Args:
    directory: a pretrained directory (`ldm_jax.convert.pretrained`), a diffusers pipeline folder
      (SD 1.x / 2.x: unet/, vae/, text_encoder/, tokenizer/, scheduler/; SDXL adds text_encoder_2/
      and tokenizer_2/), one diffusers or
      transformers component folder, or a single-file checkpoint (CompVis/Stability
      `.safetensors`, or `.ckpt` through torch with weights_only).
    single_file_options: passed to `ldm_jax.convert.single_file.read_single_file` for single files.

  Returns:
    modules: component → linen module: 'unet' (`UNet`), 'autoencoder' (`AutoencoderKL` |
      `VQModel`), 'text_encoder' (`CLIPTextEncoder` | `BertTextEncoder`), 'text_encoder_2' (SDXL's
      `CLIPTextEncoder` with projection), 'conditioner' (a trained `Conditioner`, from ldm_jax
      exports), and 'tokenizer', 'tokenizer_2' (`ldm_jax.data.tokenizer.Tokenizer`, not modules)
      — each only when present.
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
  max_length = pretrained.configs.get("cond", {}).get("max_length")
  if pretrained.tokenizer_dir:
    tokenizer = load_tokenizer(pretrained.tokenizer_dir, max_length=max_length)
    modules["tokenizer"] = tokenizer
  if pretrained.tokenizer_2_dir:
    modules["tokenizer_2"] = load_tokenizer(pretrained.tokenizer_2_dir, max_length=max_length)
  if "conditioner" in pretrained.params:
    modules["conditioner"] = conditioning.make_conditioner(ml_collections.ConfigDict(pretrained.configs["cond"]),
                                                           tokenizer)
  configs = {key: ml_collections.ConfigDict(value) for key, value in pretrained.configs.items()}
  return modules, dict(pretrained.params), configs


def pretrained_conditioning(directory: str, modules: dict, params: dict, configs: dict, flag: str):
  """What conditions the pretrained model of `load_pretrained(directory)`: `(cond, conditioner, cond_params)`.

  cond: the `cond.*` keys that differ from `default_cond_config()`; conditioner: τ_θ (a module);
  cond_params: its parameters. From what the source holds: a trained `conditioner` (ldm_jax
  exports, with its `cond` config; its text tokenizer is the directory's tokenizer/), else a
  pretrained `text_encoder` + tokenizer (Stable Diffusion: the encoder's last hidden states are
  the context, frozen; SDXL: also `text_encoder_2` + tokenizer_2, with the null condition and
  micro-conditioning the import recorded in configs['cond']), else none (an unconditional U-Net).
  Errors name `flag`.
  """
  tokenizer_dir = os.path.join(directory, "tokenizer")
  if "text_encoder_2" in params:
    return _sdxl_conditioning(directory, modules, params, configs, flag)
  if "conditioner" in params:
    cond = {k: v for k, v in configs["cond"].to_dict().items() if k != "dropout_prob"}
    if conditioning.uses_text(configs["cond"]):
      cond["tokenizer_dir"] = tokenizer_dir
    return cond, modules["conditioner"], params["conditioner"]
  if "text_encoder" in params:
    tokenizer = modules.get("tokenizer")
    if tokenizer is None:
      raise ValueError(f"{flag}: {directory} has a text encoder but no tokenizer/ folder.")
    cond = dict(kind="text", text_encoder="pretrained", tokenizer_dir=tokenizer_dir, max_length=tokenizer.max_length,
                vocab_size=tokenizer.vocab_size, dim=int(configs["text_encoder"].dim))
    return cond, TextEncoderConditioner(modules["text_encoder"]), {"text_encoder": params["text_encoder"]}
  unet_cfg = configs["unet"]
  if unet_cfg.get("context_dim") is not None or unet_cfg.get("num_classes") is not None:
    raise ValueError(f"{flag}: the U-Net in {directory} is conditional (context_dim / num_classes) but the "
                     "directory has neither a text encoder nor a conditioner.")
  cond = dict(kind="none")
  return cond, conditioning.make_conditioner(_cond_config(cond)), {}


def _sdxl_conditioning(directory: str, modules: dict, params: dict, configs: dict, flag: str):
  """`pretrained_conditioning` of an SDXL base (two encoders) or refiner (text_encoder_2 only)."""
  encoders = [c for c in ("text_encoder", "text_encoder_2") if c in params]
  for encoder in encoders:
    tokenizer = "tokenizer" if encoder == "text_encoder" else "tokenizer_2"
    if tokenizer not in modules:
      raise ValueError(f"{flag}: {directory} has a {encoder} but no {tokenizer}/ folder.")
  hints = configs.get("cond", ml_collections.ConfigDict()).to_dict()
  first = modules.get("tokenizer") or modules["tokenizer_2"]
  cond = dict(kind="text", text_encoder="pretrained",
              tokenizer_dir=os.path.join(directory, "tokenizer" if "tokenizer" in modules else "tokenizer_2"),
              max_length=first.max_length, vocab_size=first.vocab_size,
              dim=sum(int(configs[e].dim) for e in encoders),
              null_text=hints.get("null_text", "empty_prompt"), micro_conditioning=hints.get("micro_conditioning", "none"))
  conditioner = TextEncoderConditioner(modules.get("text_encoder"), modules["text_encoder_2"])
  return cond, conditioner, {e: params[e] for e in encoders}


def _cond_config(cond: dict) -> ml_collections.ConfigDict:
  cfg = sections.default_cond_config()
  cfg.update(cond)
  return cfg


def load_pretrained_ldm(directory: str, flag: str = "--pretrained"):
  """A pretrained model as `(ldm, host params {'unet', 'cond'}, host ae_params, configs)`; weights in
  host memory (the readers give configs and weights together), for `jax.device_put` onto a mesh."""
  if not os.path.exists(directory):
    raise FileNotFoundError(f"{flag}: {directory} does not exist.")
  modules, params, configs = load_pretrained(directory)
  for component in ("unet", "autoencoder"):
    if component not in modules:
      raise ValueError(f"{flag}: {directory} has no {component}; sampling needs a U-Net and an autoencoder.")
  cond, conditioner, cond_params = pretrained_conditioning(directory, modules, params, configs, flag)
  ae_cfg = configs["autoencoder"]
  diffusion_cfg = configs.get("diffusion", ml_collections.ConfigDict())
  ldm = LatentDiffusion(
      unet=modules["unet"], conditioner=conditioner, autoencoder=modules["autoencoder"],
      schedule=schedule_lib.schedule_from_config(diffusion_cfg),
      scale_factor=float(configs.get("latent", {}).get("scale_factor", 1.0)),
      parameterization=diffusion_cfg.get("parameterization", "eps"), cond_cfg=_cond_config(cond),
      tokenizer=modules.get("tokenizer"), latent_shape=ae_lib.latent_shape(ae_cfg, int(ae_cfg.resolution)),
      tokenizer_2=modules.get("tokenizer_2"))
  return ldm, {"unet": params["unet"], "cond": cond_params}, params["autoencoder"], configs


def is_pretrained_directory(path: str) -> bool:
  """A pretrained directory (`python -m ldm_jax.convert import`) whose autoencoder is a stage-1 workdir."""
  return (os.path.isfile(os.path.join(path, FORMAT_FILE))
          and os.path.isdir(os.path.join(path, "autoencoder", "checkpoints")))


def pretrained_config(directory: str, flag: str = "init.pretrained") -> tuple[dict, dict]:
  """What the pretrained model of `is_pretrained_directory(directory)` decides of a stage-2 config
  that fine-tunes it, and its weights: `(sections, params)`.

  sections: {section: {key: value}} — the U-Net architecture (`model`, over the U-Net defaults), the
  schedule (`PRETRAINED_DIFFUSION_KEYS`), `latent.scale_factor`, the frozen autoencoder
  (`autoencoder.workdir`), the conditioning (`pretrained_conditioning`) and `init.pretrained` itself;
  params: {'unet', 'cond'} as float32 host arrays. Errors name `flag`.
  """
  modules, params, configs = load_pretrained(directory)
  for component in ("unet", "autoencoder"):
    if component not in modules:
      raise ValueError(f"{flag}: {directory} has no {component}; fine-tuning needs a U-Net and an autoencoder.")
  cond, _, cond_params = pretrained_conditioning(directory, modules, params, configs, flag)
  diffusion_cfg = configs.get("diffusion", {})
  unet = {k: v for k, v in configs["unet"].to_dict().items() if k not in ("dtype", "remat")}
  found = {
      "init": dict(pretrained=directory),
      "autoencoder": dict(workdir=os.path.join(directory, "autoencoder")),
      # The U-Net is the pretrained one: keys its config leaves out take the U-Net defaults, not the config's.
      "model": {**sections.default_unet_config().to_dict(), **unet},
      "diffusion": {k: diffusion_cfg[k] for k in PRETRAINED_DIFFUSION_KEYS if k in diffusion_cfg},
      "latent": ({"scale_factor": float(configs["latent"].scale_factor)}
                 if "scale_factor" in configs.get("latent", {}) else {}),
      "cond": cond,
  }
  return found, jax.tree.map(lambda x: np.asarray(x, np.float32), {"unet": params["unet"], "cond": cond_params})


# What an SDXL model holds besides its U-Net and autoencoder, by its micro-conditioning.
SDXL_COMPONENTS = {"target_size": ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"),
                   "aesthetic_score": ("text_encoder_2", "tokenizer_2")}


def check_micro_conditioning(config, directory: str, cond: dict) -> None:
  """A stage-2 config resolved against `directory` (its `pretrained_config` conditioning `cond`), for
  the trainer and the precompute job: a config that asks for SDXL's micro-conditioning
  (`configs/ldm/sdxl_base.py`) needs a pretrained SDXL model with the same kind of it; ValueError
  naming the keys and what the directory lacks. An SDXL refiner is refused whatever the config asks."""
  wanted, found = config.cond.micro_conditioning, cond.get("micro_conditioning", "none")
  if found == "aesthetic_score":  # before the run's first batch, which would lack the score
    raise ValueError(f"init.pretrained: {config.init.pretrained} is an SDXL refiner (micro-conditioning on an "
                     "aesthetic score per image); fine-tuning it is not supported: no data source gives the score.")
  if wanted == "none" or wanted == found:
    return
  kind = {"target_size": "an SDXL base", "aesthetic_score": "an SDXL refiner"}[wanted]
  missing = [c for c in SDXL_COMPONENTS[wanted] if not os.path.isdir(os.path.join(directory, c))]
  has = f"lacks {', '.join(f'{c}/' for c in missing)}" if missing else f"has micro_conditioning {found!r}"
  raise ValueError(f"init.pretrained: cond.micro_conditioning={wanted!r} fine-tunes {kind} model (a U-Net with "
                   f"addition_embed_type='text_time', {', '.join(SDXL_COMPONENTS[wanted])}), but {config.init.pretrained} "
                   f"{has}.")


def set_sections(config: ml_collections.ConfigDict, found: dict, source: str) -> None:
  """Sets the sections `pretrained_config` found in `source` (the whole `model` section, the given
  keys of the others), logging the keys that change."""
  for section, values in found.items():
    old = config[section].to_dict()
    new = dict(values) if section == "model" else {**old, **values}
    changed = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    if changed:
      logging.info("init.pretrained=%s sets %s", source,
                   ", ".join(f"{section}.{k}={v!r} (was {was!r})" for k, (was, v) in changed.items()))
    with config.unlocked():
      config[section] = ml_collections.ConfigDict(new)
