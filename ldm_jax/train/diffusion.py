"""Stage 2 trainer: a conditional U-Net trained in the latent space of a frozen stage-1 model.

`train_and_evaluate(config, workdir)`: loads the autoencoder named by `autoencoder.workdir`,
estimates `scale_factor` = 1/std of the first batch's latents unless the config fixes it
(`latent.scale_factor > 0`), optionally encodes the whole training split once (`latent.cache`),
builds the tokenizer (trained on the training captions, or read from `cond.tokenizer_dir`) and
saves it in the workdir, then runs the loop: one jitted step samples t and ε, noises the
latents, drops conditions to the null condition with probability `cond.dropout_prob` (for
classifier-free guidance) and updates U-Net and conditioner with AdamW, followed by the EMA.
Every `train.image_every` steps it draws a guided sample grid with the EMA weights through
`LatentDiffusion` — the same sampler code as `sample.py`.

Scale and resilience (shared with stage 1, see `ldm_jax.train.loop`): U-Net, conditioner, their
EMA and optimizer state, and the frozen autoencoder are placed by `mesh.rules`; `train.dtype`
sets the compute dtype of every module (parameters stay float32), `train.remat` recomputes U-Net
blocks in the backward pass, `train.grad_accum_steps` accumulates micro-batches; a step with a
non-finite loss or gradient is skipped; SIGTERM saves the current step and returns.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import flax
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from ldm_jax import data as data_lib
from ldm_jax.data.tokenizer import build_tokenizer, load_tokenizer
from ldm_jax.diffusion import schedule as schedule_lib
from ldm_jax.diffusion.pipeline import LatentDiffusion
from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.models import conditioning
from ldm_jax.models import unet as unet_lib
from ldm_jax.train import checkpoint as ckpt_lib
from ldm_jax.train import config as config_lib
from ldm_jax.train import loop
from ldm_jax.train import sharding
from ldm_jax.train.logging import MetricWriter, image_grid
from ldm_jax.train.preemption import PreemptionGuard

SAMPLERS = ("ddim", "ddpm", "plms", "dpmpp_2m")


@flax.struct.dataclass
class DiffusionState:
  """params / ema_params: {'unet': …, 'cond': …}; scale_factor: the latent scale (f32 scalar)."""
  step: jax.Array
  params: dict
  ema_params: dict
  opt_state: optax.OptState
  rng: jax.Array
  scale_factor: jax.Array


def default_config() -> ml_collections.ConfigDict:
  """All stage-2 keys with defaults (an SD 1.x-shaped U-Net; config files override)."""
  config = ml_collections.ConfigDict()
  config.autoencoder = ml_collections.ConfigDict(dict(workdir=""))
  config.data = data_lib.default_data_config()
  config.model = unet_lib.default_unet_config()
  config.model.in_channels = -1   # -1: the autoencoder's latent channels (+ concat channels)
  config.model.out_channels = -1  # -1: the autoencoder's latent channels
  config.cond = conditioning.default_cond_config()
  config.diffusion = ml_collections.ConfigDict(dict(
      beta_schedule="scaled_linear", num_timesteps=1000, linear_start=0.0015, linear_end=0.0195,
      cosine_s=8e-3, zero_terminal_snr=False, parameterization="eps", loss_type="l2",
      min_snr_gamma=0.0, offset_noise=0.0))  # min_snr_gamma 0 = no weighting
  config.latent = ml_collections.ConfigDict(dict(scale_factor=0.0, cache=False))  # 0: 1/std
  config.optim = ml_collections.ConfigDict(dict(
      learning_rate=1e-4, warmup_steps=1_000, schedule="constant", weight_decay=0.0, b1=0.9, b2=0.999,
      grad_clip=1.0, ema_decay=0.9999))
  config.sample = ml_collections.ConfigDict(dict(
      sampler="ddim", num_steps=50, eta=0.0, guidance_scale=3.0, num_images=16, prompts=()))
  config.train = config_lib.train_config()
  config.mesh = config_lib.mesh_config()
  return config


def apply_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a stage-2 config to a < 1 minute CPU run (the U-Net and text encoder become tiny).

  The data shrink as the stage-1 `:smoke` configs do (16 px), so that a smoke autoencoder fits.
  """
  config.data.update(image_size=16, num_examples=min(config.data.get("num_examples", 256) or 256, 256))
  config.model.update(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,),
                      num_heads=2, num_head_channels=-1, transformer_depth=1)
  if config.model.context_dim is not None:
    config.model.context_dim = 32
  config.cond.update(dim=32, depth=1, num_heads=2, head_dim=-1, max_length=min(config.cond.max_length, 16),
                     vocab_size=min(config.cond.vocab_size, 512))
  config.optim.update(learning_rate=1e-3, warmup_steps=2)
  config.sample.update(num_steps=4, num_images=4)
  config.train.update(num_steps=10, batch_size=8, log_every=5, checkpoint_every=5, eval_every=10,
                      image_every=10)
  return config


def _load_autoencoder(config: ml_collections.ConfigDict):
  """(module, its config) of the stage-1 run named by `autoencoder.workdir`; errors name the key."""
  workdir = config.autoencoder.workdir
  if not workdir:
    raise ValueError("autoencoder.workdir: not set; name the stage-1 run to train on "
                     "(python train_autoencoder.py … --workdir DIR).")
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise FileNotFoundError(f"autoencoder.workdir: {workdir} has no checkpoints/; train the autoencoder "
                            "there first.")
  ae_config = config_lib.load_config(workdir)
  return ae_lib.make_autoencoder(ae_config.model), ae_config


def resolve_config(config: ml_collections.ConfigDict, ae_config: ml_collections.ConfigDict) -> None:
  """Fills the derived keys (U-Net channels, context dim, classes) and checks them against the
  autoencoder, the data and the conditioner, all before anything is compiled."""
  config_lib.validate_train_config(config.train)
  config_lib.validate_model_overrides(config.model, config.train)
  sharding.validate_mesh_config(config.mesh)
  data_lib.validate_data_config(config.data)
  conditioning.validate_cond_config(config.cond)
  for key in ("image_size", "channels"):
    if config.data[key] != ae_config.data[key]:
      raise ValueError(f"data.{key}: {config.data[key]}, but the autoencoder in {config.autoencoder.workdir} "
                       f"was trained with data.{key}={ae_config.data[key]}.")
  latent = ae_lib.latent_shape(ae_config.model, config.data.image_size)
  concat = conditioning.concat_channels(config.cond, latent[-1])
  for key, derived in (("in_channels", latent[-1] + concat), ("out_channels", latent[-1])):
    if config.model[key] == -1:
      config.model[key] = derived
    elif config.model[key] != derived:
      raise ValueError(f"model.{key}: {config.model[key]}, but the autoencoder's {latent[-1]}-channel latents"
                       f"{f' and {concat} concat channels' if key == 'in_channels' and concat else ''} "
                       f"need {derived} (or -1 to derive it).")
  if config.cond.kind == "class" and config.cond.num_classes == 0:
    config.cond.num_classes = data_lib.num_classes(config.data)
  config.model.num_classes = conditioning.num_class_embeddings(config.cond)
  unet_lib.validate_unet_config(config.model, latent, conditioning.context_dim(config.cond),
                                concat_channels=concat)
  if config.diffusion.parameterization not in schedule_lib.PARAMETERIZATIONS:
    raise ValueError(f"diffusion.parameterization: {config.diffusion.parameterization!r} is not one of "
                     f"{schedule_lib.PARAMETERIZATIONS}.")
  if config.diffusion.loss_type not in schedule_lib.LOSS_TYPES:
    raise ValueError(f"diffusion.loss_type: {config.diffusion.loss_type!r} is not one of {schedule_lib.LOSS_TYPES}.")
  if config.sample.sampler not in SAMPLERS:
    raise ValueError(f"sample.sampler: {config.sample.sampler!r} is not one of {SAMPLERS}.")
  if config.optim.schedule not in ("constant", "cosine"):
    raise ValueError(f"optim.schedule: {config.optim.schedule!r} is not 'constant' or 'cosine'.")
  if not 0.0 <= config.optim.ema_decay < 1.0:
    raise ValueError(f"optim.ema_decay: {config.optim.ema_decay} is not in [0, 1).")
  schedule_lib.schedule_from_config(config.diffusion)  # raises on bad schedule keys


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with linear warm-up to `optim.learning_rate`, then constant or cosine to 0; clipping."""
  o = config.optim
  if o.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1),
                                            max(config.train.num_steps, o.warmup_steps + 1))
  else:
    lr = optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1))
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  return optax.chain(*chain, optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))


def ema_decay(step, decay: float):
  """LDM's LitEma warm-up: min(decay, (1 + n) / (10 + n)) after n updates."""
  n = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


class Stage2:
  """Modules, optimizer, frozen autoencoder params and the jitted functions of one run."""

  def __init__(self, config, mesh, ldm: LatentDiffusion, ae_params):
    self.config = config
    self.mesh = mesh
    self.ldm = ldm
    self.ae_params = ae_params
    self.optimizer = make_optimizer(config)
    self.schedule = ldm.schedule
    self.null_inputs = ldm.null(1)
    self._example = None

  def setup(self, example_cond: dict):
    """Shapes come from one prepared batch; builds the sharded init and the jitted step."""
    self._example = jax.tree.map(lambda x: np.asarray(x)[:1], example_cond)
    abstract = jax.eval_shape(self._init, jax.random.PRNGKey(0), jnp.float32(1.0))
    self.state_sharding = sharding.state_sharding(self.mesh, abstract, **sharding.rules_of(self.config.mesh))
    self.abstract_state = ckpt_lib.abstract_like(abstract, self.state_sharding)
    self.init = jax.jit(self._init, out_shardings=self.state_sharding)
    batch_sh = sharding.batch_sharding(self.mesh)
    rep = sharding.replicated(self.mesh)
    ae_sharding = jax.tree.map(lambda x: x.sharding, self.ae_params)
    self.train_step = jax.jit(self._train_step, in_shardings=(self.state_sharding, batch_sh, ae_sharding),
                              out_shardings=(self.state_sharding, rep), donate_argnums=0)

  def _init(self, rng, scale_factor) -> DiffusionState:
    unet_rng, cond_rng, rng = jax.random.split(rng, 3)
    cond_params = self.ldm.conditioner.init(cond_rng, self._example, deterministic=True)
    cond_params = cond_params.get("params", {})
    cond = self.ldm.conditioner.apply({"params": cond_params}, self._example, deterministic=True) \
        if "masked_image" not in self._example else None
    h, w, c = self.ldm.latent_shape
    x = jnp.zeros((1, h, w, self.config.model.in_channels))
    unet_params = self.ldm.unet.init(unet_rng, x, jnp.zeros((1,), jnp.int32), context=cond["context"],
                                     y=cond["y"])["params"]
    params = {"unet": unet_params, "cond": cond_params}
    return DiffusionState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                          opt_state=self.optimizer.init(params), rng=rng,
                          scale_factor=jnp.asarray(scale_factor, jnp.float32))

  def _loss(self, params, batch, rng, scale_factor, ae_params):
    d = self.config.diffusion
    rng_enc, rng_drop, rng_t, rng_noise, rng_dropout = jax.random.split(rng, 5)
    if "latent_moments" in batch:  # cached: the posterior's mean and log-variance
      mean, logvar = jnp.split(batch["latent_moments"], 2, axis=-1)
      z = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng_enc, mean.shape)) * scale_factor
    else:
      z = self.ldm.encode(ae_params, batch["image"], rng_enc, scale_factor=scale_factor)
    batch_cond = {k: batch[k] for k in batch if k.startswith("cond/")}
    batch_cond = {k[len("cond/"):]: v for k, v in batch_cond.items()}
    batch_cond = conditioning.drop_condition(rng_drop, batch_cond, self.null_inputs, self.config.cond.dropout_prob)
    if "masked_image" in batch_cond:
      batch_cond = conditioning.inpaint_concat(
          batch_cond, functools.partial(self.ldm.encode, ae_params, scale_factor=scale_factor))
    cond = self.ldm.conditioner.apply({"params": params["cond"]}, batch_cond, deterministic=False,
                                      rngs={"dropout": rng_dropout})
    t = schedule_lib.sample_timesteps(rng_t, z.shape[0], self.schedule.num_timesteps)
    eps = schedule_lib.offset_noise(rng_noise, z.shape, d.offset_noise) if d.offset_noise else \
        jax.random.normal(rng_noise, z.shape)
    z_t = schedule_lib.q_sample(self.schedule, z, t, eps)
    out = self.ldm.denoise(params["unet"], z_t, t, cond, deterministic=False, rngs={"dropout": rng_dropout})
    loss = schedule_lib.diffusion_loss(out, z, eps, t, self.schedule, d.parameterization, d.loss_type,
                                       d.min_snr_gamma or None)
    return jnp.mean(loss)

  def _train_step(self, state: DiffusionState, batch, ae_params):
    rng, step_rng = jax.random.split(state.rng)

    def grads_fn(params, micro_batch, micro_rng):
      loss, grads = jax.value_and_grad(self._loss)(params, micro_batch, micro_rng, state.scale_factor, ae_params)
      return grads, {"loss": loss}

    grads, metrics = loop.accumulate_gradients(grads_fn, state.params, batch, step_rng,
                                               self.config.train.grad_accum_steps, mesh=self.mesh,
                                               grad_sharding=self.state_sharding.params)
    updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    decay = ema_decay(state.step, self.config.optim.ema_decay)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    ok = loop.all_finite(metrics["loss"], grads, updates)
    params, ema, opt_state = loop.keep_if(ok, (params, ema, opt_state),
                                          (state.params, state.ema_params, state.opt_state))
    metrics.update(grad_norm=optax.tree.norm(grads), ema_decay=decay,
                   **{loop.NONFINITE: 1.0 - ok.astype(jnp.float32)})
    return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                         rng=rng), metrics


# ---- data ---------------------------------------------------------------------------------------
class _ArraySource:
  """Random access over in-memory cached latents: records {'latent_moments', 'label', 'caption'}."""

  def __init__(self, moments: np.ndarray, labels: np.ndarray, captions: np.ndarray):
    self.moments, self.labels, self.captions = moments, labels, captions

  def __len__(self) -> int:
    return len(self.moments)

  def __getitem__(self, i):
    return {"latent_moments": self.moments[i], "label": self.labels[i], "caption": self.captions[i]}


def _collate(records):
  return {key: np.stack([np.asarray(r[key]) for r in records]) for key in records[0]}


def cache_latents(config, ldm: LatentDiffusion, ae_params, mesh) -> _ArraySource:
  """Encodes the training split once: the KL posterior's (mean, logvar) per image, so that the
  step still draws a fresh posterior sample as uncached training does. No augmentation."""
  loader = data_lib.make_loader(config.data, config.data.train_split, batch_size=config.train.batch_size,
                                seed=0, shuffle=False, num_epochs=1, drop_remainder=False)
  encode = jax.jit(lambda p, x: ldm.autoencoder.apply({"params": p}, x, method=ldm.autoencoder.encode))
  moments, labels, captions = [], [], []
  for batch in tqdm(loader, desc="caching latents", disable=jax.process_index() != 0):
    posterior = jax.device_get(encode(ae_params, batch["image"]))
    moments.append(np.concatenate([posterior.mean, posterior.logvar], axis=-1))
    labels.append(batch["label"])
    captions.append(batch["caption"])
  return _ArraySource(np.concatenate(moments), np.concatenate(labels), np.concatenate(captions))


def make_train_iterator(config, source=None):
  """Batches of images (or cached latent moments), per host, deterministic given train.seed."""
  if source is None:
    return iter(data_lib.make_loader(config.data, config.data.train_split,
                                     batch_size=config.train.batch_size, seed=config.train.seed))
  ds = grain.MapDataset.source(source).seed(config.train.seed)
  ds = ds[jax.process_index()::jax.process_count()].shuffle().repeat(None)
  ds = ds.batch(data_lib.host_batch_size(config.train.batch_size), drop_remainder=True, batch_fn=_collate)
  return iter(ds.to_iter_dataset())


def prepare_batch(config, ldm: LatentDiffusion, batch: dict, step: int) -> dict:
  """Host side: the conditioner's inputs under 'cond/…' next to the image or cached latents."""
  rng = np.random.default_rng((config.train.seed, step))  # random inpainting masks, reproducible
  cond = ldm.prepare(batch, rng=rng)
  out = {k: batch[k] for k in ("image", "latent_moments") if k in batch}
  if "latent_moments" in out:
    out.pop("image", None)
  out.update({f"cond/{k}": v for k, v in cond.items()})
  return out


def sample_conditions(config, ldm: LatentDiffusion) -> dict:
  """The fixed conditions of the periodic sample grids: prompts, class labels or held-out images."""
  n = config.sample.num_images
  kind = config.cond.kind
  batch = next(iter(data_lib.make_loader(config.data, config.data.eval_split, batch_size=n, seed=0,
                                         shuffle=False, num_epochs=1))) if kind != "none" else {}
  if kind in ("text", "hybrid") and config.sample.prompts:
    prompts = list(config.sample.prompts)
    batch["caption"] = np.array((prompts * n)[:n])
  if kind == "class":
    batch["label"] = np.arange(n, dtype=np.int32) % config.cond.num_classes
  return ldm.prepare(batch, rng=np.random.default_rng(0)) if kind != "none" else {}


def load_frozen_autoencoder(config, mesh, *, rules: dict | None = None, dtype: str | None = None):
  """(module, ae_config, params) of `autoencoder.workdir`.

  The params are replicated on the mesh, or placed by the partition `rules` (`sharding.rules_of`;
  matched as `autoencoder/…`, as in the stage-1 run). `dtype` overrides the compute dtype.
  """
  model, ae_config = _load_autoencoder(config)
  if dtype is not None:
    model = model.clone(dtype=jnp.dtype(dtype))
  placement = sharding.replicated(mesh) if rules is None else (
      lambda tree: sharding.tree_sharding(mesh, tree, prefix="autoencoder", **rules))
  checkpointer = ckpt_lib.Checkpointer(os.path.join(config.autoencoder.workdir, "checkpoints"))
  params = checkpointer.restore_subtree(("params", "autoencoder"), placement)
  checkpointer.close()
  return model, ae_config, params


def build_ldm(config, model, ae_config, tokenizer, scale_factor=1.0, *, for_training=False) -> LatentDiffusion:
  """The LatentDiffusion of a stage-2 config; `for_training` builds U-Net and conditioner with
  `train.dtype` and `train.remat`."""
  latent = ae_lib.latent_shape(ae_config.model, config.data.image_size)
  unet_cfg = config_lib.with_train_overrides(config.model, config.train) if for_training else config.model
  dtype = jnp.dtype(config.train.dtype) if for_training else jnp.float32
  return LatentDiffusion(
      unet=unet_lib.make_unet(unet_cfg), conditioner=conditioning.make_conditioner(config.cond, tokenizer, dtype),
      autoencoder=model, schedule=schedule_lib.schedule_from_config(config.diffusion),
      scale_factor=float(scale_factor), parameterization=config.diffusion.parameterization,
      cond_cfg=config.cond, tokenizer=tokenizer, latent_shape=tuple(latent))


def get_tokenizer(config, workdir):
  """The run's tokenizer: the one saved in the workdir (resume), else built and saved there."""
  if config.cond.kind not in ("text", "hybrid"):
    return None
  saved = os.path.join(workdir, "tokenizer")
  if os.path.isdir(saved):
    return load_tokenizer(saved, max_length=config.cond.max_length)
  tokenizer = build_tokenizer(config.cond, data_lib.captions(config.data, config.data.train_split))
  if jax.process_index() == 0:
    tokenizer.save(saved)
  return tokenizer


def estimate_scale_factor(config, ldm, ae_params, batch, mesh) -> float:
  """1 / std of the first global batch's latents (LDM `scale_by_std`), unless the config fixes it.

  `batch` is this process's share; every process gets the same value.
  """
  if config.latent.scale_factor > 0:
    return float(config.latent.scale_factor)
  if "latent_moments" in batch:
    mean, logvar = np.split(np.asarray(batch["latent_moments"]), 2, axis=-1)
    z = mean + np.exp(0.5 * logvar) * np.random.default_rng(0).standard_normal(mean.shape)
  else:
    images = sharding.shard_batch({"image": batch["image"]}, mesh)["image"]
    z = jax.jit(functools.partial(ldm.encode, scale_factor=1.0))(ae_params, images, jax.random.PRNGKey(0))
  z = multihost_utils.process_allgather(z, tiled=True) if jax.process_count() > 1 else jax.device_get(z)
  return float(1.0 / np.std(np.asarray(z, np.float32)))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) a stage-2 run in `workdir`; returns the last logged training scalars
  (empty when a SIGTERM stopped the run early, after saving its current step)."""
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.train.batch_size, mesh, grad_accum_steps=config.train.grad_accum_steps)
  model, ae_config, ae_params = load_frozen_autoencoder(config, mesh, rules=sharding.rules_of(config.mesh),
                                                        dtype=config.train.dtype)
  resolve_config(config, ae_config)
  if config.latent.cache and config.cond.kind in ("concat", "hybrid"):
    raise ValueError("latent.cache: concat conditioning needs the images at every step; set it to False.")
  if jax.process_index() == 0:
    config_lib.save_config(config, workdir)
  tokenizer = get_tokenizer(config, workdir)
  ldm = build_ldm(config, model, ae_config, tokenizer, for_training=True)
  source = cache_latents(config, ldm, ae_params, mesh) if config.latent.cache else None
  train_iter = make_train_iterator(config, source)

  stage = Stage2(config, mesh, ldm, ae_params)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       max_to_keep=config.train.max_checkpoints)
  first = prepare_batch(config, ldm, next(iter(make_train_iterator(config, source))), 0)
  stage.setup({k[len("cond/"):]: v for k, v in first.items() if k.startswith("cond/")})
  state = checkpointer.restore(stage.abstract_state, train_iter)
  if state is None:
    scale_factor = estimate_scale_factor(config, ldm, ae_params, first, mesh)
    state = stage.init(jax.random.PRNGKey(config.train.seed), jnp.float32(scale_factor))
  ldm = dataclasses.replace(ldm, scale_factor=float(jax.device_get(state.scale_factor)))
  start_step = int(jax.device_get(state.step))
  logging.info("Stage 2: steps %d → %d, scale_factor %.5f, U-Net %s params", start_step, config.train.num_steps,
               ldm.scale_factor, f"{sum(x.size for x in jax.tree.leaves(state.params['unet'])):,}")

  writer = MetricWriter(workdir)
  sample_cond = sample_conditions(config, ldm)
  generate = jax.jit(functools.partial(
      ldm.generate, sampler=config.sample.sampler, num_steps=config.sample.num_steps, eta=config.sample.eta,
      guidance_scale=config.sample.guidance_scale, batch_size=config.sample.num_images),
      out_shardings=sharding.replicated(mesh))  # every process can read the grid
  # One column per prompt or class, so that each column of the grid shows one condition.
  grid_cols = (len(config.sample.prompts) if config.cond.kind in ("text", "hybrid") and config.sample.prompts
               else config.cond.num_classes if config.cond.kind == "class" else None)
  pending, t0, scalars = [], time.perf_counter(), {}
  monitor = loop.NonFiniteMonitor(config.train.max_nonfinite_steps)
  progress = tqdm(total=config.train.num_steps, initial=start_step, desc="stage 2",
                  disable=jax.process_index() != 0)
  try:
    with PreemptionGuard() as preemption:
      for step in range(start_step + 1, config.train.num_steps + 1):
        batch = sharding.shard_batch(prepare_batch(config, ldm, next(train_iter), step), mesh)
        state, metrics = stage.train_step(state, batch, ae_params)
        pending.append(metrics)
        monitor.push(step, metrics)
        if step % config.train.log_every == 0 or step == config.train.num_steps:
          scalars = loop.summarize(jax.device_get(pending))
          scalars["train/images_per_sec"] = len(pending) * config.train.batch_size / (time.perf_counter() - t0)
          writer.write_scalars(step, scalars)
          progress.set_postfix(loss=f"{scalars['train/loss']:.4f}", img_s=f"{scalars['train/images_per_sec']:.1f}")
          pending, t0 = [], time.perf_counter()
        if step % config.train.image_every == 0 or step == config.train.num_steps:
          images = generate(state.ema_params, ae_params, sample_cond, jax.random.PRNGKey(config.train.seed))
          writer.write_image(step, "samples", image_grid(np.asarray(jax.device_get(images)), grid_cols))
          t0 = time.perf_counter()
        saved = step % config.train.checkpoint_every == 0 or step == config.train.num_steps
        if saved:
          checkpointer.save(step, state, train_iter)
        progress.update(1)
        if preemption.reached(step):
          if not saved:
            checkpointer.save(step, state, train_iter, force=True)
          return {}
      monitor.flush()
  finally:
    progress.close()
    checkpointer.close()
    writer.close()
  return scalars
