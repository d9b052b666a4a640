"""Fine-tuning (`init.pretrained`): the config pointed at a pretrained model, and its weights.

`init.pretrained` names a pretrained directory written by `python -m ldm_jax.convert import` (or
anything that command reads — a diffusers pipeline folder, a single-file checkpoint — or a stage-2
workdir of ldm_jax, its EMA weights, which is then imported into `workdir/pretrained` first). The
run takes from it, overriding the config (differences are logged): the U-Net architecture
(`model.*`), the noise schedule and prediction type (`diffusion.beta_schedule`, `num_timesteps`,
`linear_start`, `linear_end`, `zero_terminal_snr`, `parameterization`), `latent.scale_factor`, the
frozen autoencoder (`autoencoder.workdir` = its `autoencoder/` folder) and the conditioning: a
pretrained text encoder stays frozen (`cond.kind='text'`, `cond.text_encoder='pretrained'`, its
tokenizer, `cond.dim` and `cond.max_length`; SDXL: both encoders and tokenizers, `cond.null_text` and
`cond.micro_conditioning` — a config that asks for micro-conditioning must name an SDXL model), an
exported ldm_jax conditioner is fine-tuned with the U-Net (its `cond.*`), none means unconditional. U-Net and conditioner start from the pretrained
weights (the EMA of what trains too; a frozen text encoder has no EMA); the training keys (`data.*`, `optim.*`, `train.*`, `cond.dropout_prob`,
`diffusion.loss_type`, …) stay the config's. `data.image_size` may differ from the size the model
was trained at.

With a `lora` or a `textual_inversion` section the pretrained weights stay frozen and something
smaller trains instead (`make_tuning`): LoRA adapters (`ldm_jax.train.diffusion.lora`) or the
embeddings of new tokens (`ldm_jax.train.diffusion.textual_inversion`). A `dreambooth` section
changes the batches (`train_iterator`, `ldm_jax.train.diffusion.dreambooth`).
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from ldm_jax import config as checks
from ldm_jax import load
from ldm_jax.config import common as config_lib
from ldm_jax.convert import pretrained as pretrained_lib
from ldm_jax.runtime import distributed, sharding
from ldm_jax.train.diffusion import dreambooth, lora
from ldm_jax.train.diffusion import textual_inversion as ti_lib

# Config sections of the fine-tuning methods, with their checks: what trains instead of the whole
# model (lora, textual_inversion), and what the data are (dreambooth; alone or with lora).
METHODS = {"lora": lora.check_config, "textual_inversion": ti_lib.check_config,
           "dreambooth": dreambooth.check_config}


def _pretrained_directory(src: str, workdir: str) -> str:
  """A pretrained directory whose autoencoder is a stage-1 workdir: `src` itself, or `src`
  imported into `workdir/pretrained` (once) as `python -m ldm_jax.convert import` would."""
  src = os.path.abspath(src)
  if not os.path.exists(src):
    raise FileNotFoundError(f"init.pretrained: {src} does not exist.")
  if load.is_pretrained_directory(src):
    return src
  target = os.path.join(os.path.abspath(workdir), "pretrained")
  needed = not os.path.isfile(os.path.join(target, pretrained_lib.FORMAT_FILE))
  if jax.process_count() > 1:  # process 0's answer: the others could look after it has written the target
    needed = bool(multihost_utils.broadcast_one_to_all(np.int32(needed)))
  if needed:
    logging.info("init.pretrained: importing %s into %s", src, target)
    if jax.process_index() == 0:
      try:
        stage2 = checks.run_kind(config_lib.load_config(src)) == "diffusion" if os.path.isfile(
            os.path.join(src, "config.json")) else False
        bundle = load.read_workdir(src) if stage2 else load.read_source(src)
        pretrained_lib.save_pretrained(target, bundle, autoencoder_workdir=True)
      except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"init.pretrained: {err}") from None
    if jax.process_count() > 1:
      distributed.barrier("import_pretrained")
  return target


def apply_pretrained(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """With `init.pretrained`, points the config at the pretrained model (see the module docstring,
  `load.pretrained_config`) and returns its parameters {'unet', 'cond'} (host arrays, float32); else None."""
  if not config.init.pretrained:
    return None
  directory = _pretrained_directory(config.init.pretrained, workdir)
  found, params = load.pretrained_config(directory)
  load.check_micro_conditioning(config, directory, found["cond"])
  load.set_sections(config, found, directory)
  return params


def check_method(config: ml_collections.ConfigDict) -> None:
  """At most one of the `METHODS` sections, its values good (ValueError naming the key)."""
  methods = [m for m in METHODS if m in config]
  if len(methods) > 1 and set(methods) != {"dreambooth", "lora"}:
    raise ValueError(f"{methods[1]}: a run trains one of {', '.join(METHODS)} (or dreambooth with lora); this "
                     f"config has {methods}.")
  for method in methods:
    METHODS[method](config)


def make_tuning(config, pretrained: dict | None, tokenizer, conditioner, mesh):
  """None (U-Net and conditioner train), or what trains instead of them: a `LoraTuning` or an
  `EmbeddingTuning`, whose frozen base (the host `pretrained` params) is placed on `mesh` by
  `mesh.rules`."""
  rules = sharding.rules_of(config.mesh)
  place = lambda tree: jax.tree.map(sharding.put, tree, sharding.tree_sharding(mesh, tree, **rules))
  if "lora" in config:
    return lora.make_tuning(config, pretrained, place)
  if "textual_inversion" in config:
    return ti_lib.make_tuning(config, pretrained, tokenizer, conditioner, place)
  return None


def batch_transform(config, tuning):
  """What the method does to each host batch before `data.prepare_batch` (`transform(batch, step)`):
  textual inversion's template captions; or None."""
  if "textual_inversion" in config:
    return tuning.captions
  return None


def train_iterator(config, workdir: str, iterator):
  """The run's iterator of host batches: `iterator`, or with DreamBooth its `PriorBatches` (the
  instance prompt and the class images, both positions checkpointed); DreamBooth's missing class
  images are sampled here."""
  if "dreambooth" in config:
    return dreambooth.PriorBatches(config, workdir, iterator)
  return iterator


def save_trainable(tuning, workdir: str, trainable: dict, mesh) -> None:
  """`tuning.save` (the adapter or embedding file in `workdir`) of the sharded trained parameters:
  gathered on every process (a collective), written by process 0."""
  trainable = jax.device_get(jax.jit(lambda x: x, out_shardings=sharding.replicated(mesh))(trainable))
  if jax.process_index() == 0:
    tuning.save(workdir, trainable)
