"""DreamBooth (Ruiz et al. 2023; a `dreambooth` section): a subject from a few images, with prior preservation.

Every training image (the subject's, `data.*`) is captioned `dreambooth.instance_prompt` (a rare
identifier and the class, "a photo of sks dog"). With `prior_loss_weight` λ > 0 every step also
trains on as many class images captioned `class_prompt` (and, spread over them, `prior_prompts`:
other prompts whose images must not drift, e.g. the other classes a small model knows), and the loss is
L = L_instance + λ·L_prior (per-example weights 2 and 2λ on a batch half instance, half class).
The class images are the base model's own: `WORKDIR/class_images/` holds `num_class_images`
PNGs (with their prompt in `.txt` files); missing ones are sampled from `init.pretrained` with
`sample.py`'s code before training, so a resumed run finds them there, and the position of their
iterator is in every checkpoint with the instance images' (`PriorBatches`), so a resumed run draws
the batches it would have drawn. What trains is the whole U-Net (and a trained conditioner), or
LoRA adapters with a `lora` section too.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil

import jax
import ml_collections
import numpy as np
from absl import logging

from ldm_jax import data as data_lib
from ldm_jax import sampling
from ldm_jax.config import dreambooth as dreambooth_config
from ldm_jax.data import folder
from ldm_jax.runtime import distributed
from ldm_jax.train.diffusion import data

CLASS_IMAGES = "class_images"
_STATE_KEY = "dreambooth_iterators"  # marks a checkpointed state of both iterators (`PriorBatches.get_state`)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The section's values, `init.pretrained` set, no latent cache; ValueError naming the key."""
  dreambooth_config.check_dreambooth_config(config.dreambooth)
  if not config.init.pretrained:
    raise ValueError("dreambooth: a subject is taught to a trained model; set init.pretrained.")
  if config.latent.cache and config.dreambooth.prior_loss_weight > 0:
    raise ValueError("latent.cache: the class images of dreambooth.prior_loss_weight > 0 are not cached; set it "
                     "to False.")
  if config.latent.cache_dir and config.dreambooth.prior_loss_weight > 0:
    raise ValueError("latent.cache_dir: the class images of dreambooth.prior_loss_weight > 0 are not in the "
                     "cache; unset it.")


def class_prompts(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The captions of the class images: `class_prompt`, then `prior_prompts`."""
  return (cfg.class_prompt, *cfg.prior_prompts)


def class_image_quota(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """How many of the `num_class_images` each prompt of `class_prompts` gets (evenly, the first ones the rest)."""
  prompts = class_prompts(cfg)
  n, k = cfg.num_class_images, len(prompts)
  return {p: n // k + (i < n % k) for i, p in enumerate(prompts)}


def class_images(config: ml_collections.ConfigDict, workdir: str, seed: int = 0) -> str:
  """`workdir/class_images` holding at least `class_image_quota` images of each class prompt, each
  with its prompt in a `.txt` beside it (an image without one counts as `class_prompt`'s); the
  missing ones are sampled from the base model (`init.pretrained`, a pretrained directory by now)
  at `data.image_size`. An image captioned with none of the prompts (the prompts changed since it
  was sampled) is a ValueError naming it. Returns the folder."""
  cfg = config.dreambooth
  target = os.path.join(workdir, CLASS_IMAGES)
  paths = list(folder.iter_images(target)) if os.path.isdir(target) else []
  quota = class_image_quota(cfg)
  have = dict.fromkeys(quota, 0)
  for path in paths:
    caption = folder.read_caption(path) or cfg.class_prompt  # none: a user's image, as PriorBatches reads it
    if caption not in have:
      raise ValueError(f"dreambooth: the class image {path} is captioned {caption!r}, none of class_prompt / "
                       f"prior_prompts {tuple(quota)!r}; delete {target} to sample the class images again.")
    have[caption] += 1
  todo = [p for p in quota for _ in range(max(0, quota[p] - have[p]))]
  if not todo:
    return target
  logging.info("dreambooth: sampling %d class images of %s from %s", len(todo),
               ", ".join(f"{quota[p] - have[p]} x {p!r}" for p in quota if quota[p] > have[p]), config.init.pretrained)
  staging = os.path.join(workdir, f".class_images_from_{len(paths)}")
  if jax.process_index() == 0 and os.path.isdir(staging):
    shutil.rmtree(staging)  # an interrupted earlier attempt
  size = config.data.image_size
  batch = jax.device_count() * max(1, 8 // jax.device_count())
  summary = sampling.sample_to_dir(sampling.SampleRequest(
      out=staging, pretrained=config.init.pretrained, prompts=tuple(todo), num_samples=len(todo),
      steps=cfg.class_sample_steps, guidance_scale=cfg.class_guidance_scale, seed=seed + len(paths),
      batch_size=batch, height=size, width=size))
  if jax.process_index() == 0:
    os.makedirs(target, exist_ok=True)
    taken = {os.path.splitext(os.path.basename(p))[0] for p in paths}
    names = (f"class_{i:05d}" for i in itertools.count(len(paths)) if f"class_{i:05d}" not in taken)
    for name, prompt, stem in zip(sorted(os.listdir(os.path.join(summary["out"], "images"))), todo, names,
                                  strict=False):
      shutil.move(os.path.join(summary["out"], "images", name), os.path.join(target, stem + ".png"))
      with open(os.path.join(target, stem + ".txt"), "w", encoding="utf-8") as f:
        f.write(prompt + "\n")
    shutil.rmtree(summary["out"])
  if jax.process_count() > 1:
    distributed.barrier("dreambooth_class_images")
  return target


class PriorBatches:
  """The step's batches of a DreamBooth run, an iterator over the run's instance batches
  (`instances`): each with the instance prompt, and with λ > 0 as many class images (from
  `class_images`, their own iterator) after them, with the per-example 'loss_weight'.

  Both positions are checkpointed: `get_state`/`set_state` (JSON bytes, as grain's checkpoint
  handler saves an iterator that is not a grain `DatasetIterator`) hold the instance iterator's
  state and the class iterator's, so that a resumed run draws the class images it would have
  drawn. A checkpoint written before the class iterator was saved (the instance state alone)
  restores the instances and restarts the class images, with a warning.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, instances):
    self.cfg = config.dreambooth
    self.instances = instances
    self.prior = None
    if self.cfg.prior_loss_weight > 0:
      class_config = ml_collections.ConfigDict(config.to_dict())
      class_config.data.update(source="folder", path=class_images(config, workdir, config.train.seed),
                               train_split="train", random_flip=False, random_crop=False)
      data_lib.validate_data_config(class_config.data)
      self.prior = data.make_train_iterator(class_config)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self.instances)
    n = len(next(iter(batch.values())))
    batch = {**batch, "caption": np.array([self.cfg.instance_prompt] * n)}
    if self.prior is None:
      return batch
    prior = next(self.prior)
    captions = [str(c) or self.cfg.class_prompt for c in prior["caption"]]
    prior = {**prior, "caption": np.array(captions)}
    weight = np.concatenate([np.full(n, 2.0), np.full(n, 2.0 * self.cfg.prior_loss_weight)]).astype(np.float32)
    keys = sorted(set(batch) & set(prior))
    return {**{k: np.concatenate([np.asarray(batch[k]), np.asarray(prior[k])]) for k in keys},
            "loss_weight": weight}

  def get_state(self) -> bytes:
    state = {"instances": self.instances.get_state()}
    if self.prior is not None:
      state["prior"] = self.prior.get_state()
    return json.dumps({_STATE_KEY: state}, indent=1).encode()

  def set_state(self, state: bytes) -> None:
    saved = json.loads(state)
    if _STATE_KEY not in saved:
      logging.warning("dreambooth: the checkpoint holds the instance iterator's position only (written before "
                      "the class images' was saved); the class images start from their first batch.")
      self.instances.set_state(saved)
      return
    self.instances.set_state(saved[_STATE_KEY]["instances"])
    if self.prior is not None and "prior" in saved[_STATE_KEY]:
      self.prior.set_state(saved[_STATE_KEY]["prior"])

  def start_prefetch(self) -> None:
    """Called by grain's checkpoint handler after `set_state`."""
    for iterator in (self.instances, self.prior):
      if iterator is not None and hasattr(iterator, "start_prefetch"):
        iterator.start_prefetch()

