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

Periodic evaluation (`eval.*`, off while `eval.metrics` is empty): every `train.eval_every`
steps `SampleEvaluator` draws `eval.num_samples` guided samples with the EMA weights and the
`sample.*` sampler — conditioned on the labels or captions of the first records of
`data.eval_split` — and compares them under `eval.extractor` with the reference statistics of the
first `eval.num_ref` images of that split (`ldm_jax.eval`, cached in `eval.cache_dir`). Scores go
to TensorBoard and metrics.jsonl as `eval/<metric>_<extractor>` (e.g. `eval/fd_vgg16_64px`);
with a `classifier:RUN` extractor a class-conditional model also logs `eval/class_accuracy`.

Fine-tuning (`init.pretrained`): a pretrained directory written by `python -m ldm_jax.convert
import` (or anything that command reads — a diffusers pipeline folder, a single-file checkpoint —
which is then imported into `workdir/pretrained` first). The run takes from it, overriding the
config (differences are logged): the U-Net architecture (`model.*`), the noise schedule and
prediction type (`diffusion.beta_schedule`, `num_timesteps`, `linear_start`, `linear_end`,
`zero_terminal_snr`, `parameterization`), `latent.scale_factor`, the frozen autoencoder
(`autoencoder.workdir` = its `autoencoder/` folder) and the conditioning: a pretrained text encoder
stays frozen (`cond.kind='text'`, `cond.text_encoder='pretrained'`, its tokenizer, `cond.dim` and
`cond.max_length`), an exported ldm_jax conditioner is fine-tuned with the U-Net (its `cond.*`),
none means unconditional. U-Net and conditioner start from the pretrained weights (EMA too); the
training keys (`data.*`, `optim.*`, `train.*`, `cond.dropout_prob`, `diffusion.loss_type`, …) stay
the config's. `data.image_size` may differ from the size the model was trained at.

Scale and resilience (shared with stage 1, see `ldm_jax.train.loop`): U-Net, conditioner, their
EMA and optimizer state, and the frozen autoencoder are placed by `mesh.rules`; `train.dtype`
sets the compute dtype of every module (parameters stay float32), `train.remat` recomputes U-Net
blocks in the backward pass, `train.grad_accum_steps` accumulates micro-batches; a step with a
non-finite loss or gradient is skipped; SIGTERM saves the current step and returns.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
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

from ldm_jax import config as checks
from ldm_jax import data as data_lib
from ldm_jax.data.tokenizer import build_tokenizer, load_tokenizer
from ldm_jax.diffusion import schedule as schedule_lib
from ldm_jax.diffusion.pipeline import LatentDiffusion, TextEncoderConditioner
from ldm_jax.eval import evaluate as eval_lib
from ldm_jax.eval import features as features_lib
from ldm_jax.eval import stats as stats_lib
from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.models import conditioning
from ldm_jax.models import unet as unet_lib
from ldm_jax.train import checkpoint as ckpt_lib
from ldm_jax.train import config as config_lib
from ldm_jax.train import loop
from ldm_jax.train import sharding
from ldm_jax.train.logging import MetricWriter, image_grid, to_uint8

SAMPLERS = ("ddim", "ddpm", "plms", "dpmpp_2m")
IS_SPLITS = 10  # Inception Score splits of the periodic evaluation (evaluate_samples' default)
# What the sample evaluation's conditions can come from: labels or captions of the eval split.
EVAL_COND_KINDS = ("none", "class", "text")
# diffusion.* keys a pretrained model decides (the rest are training choices).
PRETRAINED_DIFFUSION_KEYS = ("beta_schedule", "num_timesteps", "linear_start", "linear_end", "zero_terminal_snr",
                             "parameterization")


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
  config.eval = ml_collections.ConfigDict(dict(
      metrics=(),            # () = no periodic evaluation; some of 'fd', 'kid', 'pr', 'is', 'acc'
      extractor="vgg16:64",  # 'vgg16[:SIZE]' (offline), 'inception' (FID; needs weights), 'classifier:RUN'
      num_samples=1_000,     # generated per evaluation
      num_ref=10_000,        # reference: the first num_ref images of data.eval_split (fewer if smaller)
      batch_size=64,         # samples per compiled sampling call, and images per feature batch
      kid_subset_size=100, pr_k=3,
      cache_dir=""))         # reference statistics cache; '' = $LDM_JAX_EVAL_CACHE or ~/.cache/ldm_jax/eval
  config.init = ml_collections.ConfigDict(dict(pretrained=""))  # a pretrained model to fine-tune
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
  config.eval.update(extractor="vgg16:32", num_samples=16, num_ref=32, batch_size=8, kid_subset_size=8)
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
  try:
    ae_config = config_lib.load_config(workdir)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"autoencoder.workdir: {e}") from None
  kind = checks.run_kind(ae_config)
  if kind != "autoencoder":
    own = f" (its autoencoder.workdir is {ae_config.autoencoder.workdir})" if kind == "diffusion" else ""
    raise ValueError(f"autoencoder.workdir: {workdir} holds a {checks.RUN_KINDS.get(kind, 'run of no known kind')}"
                     f"{own}; name a stage-1 run (train_autoencoder.py --workdir) or a pretrained directory's "
                     "autoencoder/.")
  return ae_lib.make_autoencoder(ae_config.model), ae_config


def resolve_config(config: ml_collections.ConfigDict, ae_config: ml_collections.ConfigDict) -> None:
  """Fills the derived keys (U-Net channels, context dim, classes) and checks them against the
  autoencoder, the data and the conditioner, all before anything is compiled."""
  checks.check_finite(config)
  config_lib.validate_train_config(config.train)
  config_lib.validate_model_overrides(config.model, config.train)
  sharding.validate_mesh_config(config.mesh)
  data_lib.validate_data_config(config.data)
  conditioning.validate_cond_config(config.cond)
  if conditioning.uses_text(config.cond) and config.cond.text_encoder == "pretrained" and not config.init.pretrained:
    raise ValueError("cond.text_encoder: 'pretrained' is the frozen text encoder of init.pretrained, which is not "
                     "set; name a pretrained model there, or use 'scratch'.")
  # A pretrained autoencoder is convolutional: fine-tuning may use another image size than its own.
  for key in ("channels",) if config.init.pretrained else ("image_size", "channels"):
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
  o = config.optim
  checks.check_number("optim.learning_rate", o.learning_rate, gt=0)
  checks.check_number("optim.warmup_steps", o.warmup_steps, integer=True, ge=0)
  for key in ("weight_decay", "grad_clip"):
    checks.check_number(f"optim.{key}", o[key], ge=0)
  for key in ("b1", "b2", "ema_decay"):
    checks.check_number(f"optim.{key}", o[key], ge=0, lt=1)
  checks.check_number("latent.scale_factor", config.latent.scale_factor, ge=0)
  for key in ("min_snr_gamma", "offset_noise"):
    checks.check_number(f"diffusion.{key}", config.diffusion[key], ge=0)
  checks.check_number("sample.num_steps", config.sample.num_steps, integer=True, ge=1)
  checks.check_number("sample.num_images", config.sample.num_images, integer=True, ge=1)
  checks.check_number("sample.eta", config.sample.eta, ge=0)
  checks.check_number("sample.guidance_scale", config.sample.guidance_scale, ge=0)
  schedule_lib.schedule_from_config(config.diffusion)  # raises on bad schedule keys
  validate_eval_config(config)


def validate_eval_config(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Checks `eval.*` against the conditioning and the eval split, before anything is built or
  compiled; returns the metrics (empty: no periodic evaluation). ValueError names the key."""
  e = config.eval
  try:
    metrics = eval_lib.parse_metrics(e.metrics, eval_lib.SAMPLE_METRICS) if e.metrics else ()
  except ValueError as err:
    raise ValueError(f"eval.metrics: {err}.") from None
  if not metrics:
    return ()
  for key in ("num_samples", "num_ref", "batch_size", "kid_subset_size", "pr_k"):
    if not isinstance(e[key], int) or isinstance(e[key], bool) or e[key] < 1:
      raise ValueError(f"eval.{key}: expected a positive integer, got {e[key]!r}.")
  if not isinstance(e.extractor, str) or not e.extractor:
    raise ValueError(f"eval.extractor: expected 'vgg16[:SIZE]', 'inception' or 'classifier:RUN', got {e.extractor!r}.")
  if config.cond.kind not in EVAL_COND_KINDS:
    raise ValueError(f"eval.metrics: the samples are conditioned on the labels or captions of data.eval_split, "
                     f"which cond.kind={config.cond.kind!r} models do not take; set eval.metrics=() for them.")
  if "acc" in metrics and config.cond.kind != "class":
    raise ValueError(f"eval.metrics: 'acc' is the class accuracy of class-conditional samples; this model has "
                     f"cond.kind={config.cond.kind!r}.")
  split = config.data.eval_split
  num_real = min(e.num_ref, len(data_lib.make_source(config.data, split)))
  needs = {"fd": (2, ""), "kid": (e.kid_subset_size, " (eval.kid_subset_size)"),
           "pr": (e.pr_k + 1, " (eval.pr_k + 1)"), "is": (IS_SPLITS, f" ({IS_SPLITS} splits)"), "acc": (1, "")}
  for metric in metrics:
    need, why = needs[metric]
    if e.num_samples < need:
      raise ValueError(f"eval.num_samples: {e.num_samples} samples are too few for {metric!r}, which needs at "
                       f"least {need}{why}.")
    if metric in ("fd", "kid", "pr") and num_real < need:
      raise ValueError(f"eval.num_ref: the reference has {num_real} images (the first eval.num_ref={e.num_ref} of "
                       f"data.eval_split={split!r}), too few for {metric!r}, which needs at least {need}{why}.")
  return metrics


def make_eval_extractor(config: ml_collections.ConfigDict) -> tuple[features_lib.Extractor, tuple[str, ...]]:
  """(extractor, metrics) of a validated `eval` section: the feature network is loaded here, before
  anything is compiled, so that a bad `eval.extractor` fails early. A classifier extractor on a
  class-conditional model adds 'acc' (class accuracy) to the metrics."""
  metrics = validate_eval_config(config)
  spec = config.eval.extractor
  try:
    extractor = features_lib.make_extractor(spec)
  except (ValueError, OSError) as err:
    raise ValueError(f"eval.extractor: {err}") from None
  if "is" in metrics and not extractor.has_logits:
    raise ValueError(f"eval.metrics: 'is' needs class logits, which eval.extractor={spec!r} does not give; use "
                     "'inception' or 'classifier:RUN'.")
  if "acc" in metrics and extractor.kind != "classifier":
    raise ValueError(f"eval.extractor: 'acc' in eval.metrics needs 'classifier:RUN' (a classifier of the data's "
                     f"classes), not {spec!r}.")
  if extractor.kind == "classifier" and config.cond.kind == "class" and "acc" not in metrics:
    metrics += ("acc",)
  return extractor, metrics


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


def ema_decay(num_updates, decay: float):
  """LDM's LitEma warm-up: min(decay, (1 + n) / (10 + n)) for the n-th update, n = 1 the first
  (LitEma increments its counter before it computes the decay): 2/11, 3/12, 4/13, …"""
  n = num_updates.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


class Stage2:
  """Modules, optimizer, frozen autoencoder params and the jitted functions of one run."""

  def __init__(self, config, mesh, ldm: LatentDiffusion, ae_params):
    self.config = config
    self.mesh = mesh
    self.ldm = ldm
    self.ae_params = ae_params
    # A pretrained text encoder (init.pretrained) stays as it is: no gradients, no optimizer state.
    self.frozen_cond = isinstance(ldm.conditioner, TextEncoderConditioner)
    self.optimizer = make_optimizer(config)
    if self.frozen_cond:
      self.optimizer = optax.multi_transform({"train": self.optimizer, "frozen": optax.set_to_zero()},
                                             {"unet": "train", "cond": "frozen"})
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

  def _init(self, rng, scale_factor, params=None) -> DiffusionState:
    """A fresh state: parameters from `params` ({'unet', 'cond'}, e.g. pretrained) or initialised."""
    unet_rng, cond_rng, rng = jax.random.split(rng, 3)
    if params is None:
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
    if "latent_moments" in batch:  # cached KL: the posterior's mean and log-variance
      mean, logvar = jnp.split(batch["latent_moments"], 2, axis=-1)
      z = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng_enc, mean.shape)) * scale_factor
    elif "latent" in batch:  # cached VQ: the pre-quantization latent
      z = batch["latent"] * scale_factor
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
    if self.frozen_cond:
      cond = jax.lax.stop_gradient(cond)
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
    decay = ema_decay(state.step + 1, self.config.optim.ema_decay)
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
    if self.frozen_cond:
      ema = {**ema, "cond": params["cond"]}  # exactly the pretrained weights, not a rounded average
    ok = loop.all_finite(metrics["loss"], grads, updates)
    params, ema, opt_state = loop.keep_if(ok, (params, ema, opt_state),
                                          (state.params, state.ema_params, state.opt_state))
    metrics.update(grad_norm=optax.tree.norm(grads), ema_decay=decay,
                   **{loop.NONFINITE: 1.0 - ok.astype(jnp.float32)})
    return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                         rng=rng), metrics


# ---- data ---------------------------------------------------------------------------------------
# What a latent cache holds per image: the KL posterior's moments or VQ's pre-quantization latent.
CACHED_LATENT_KEYS = ("latent_moments", "latent")


class _ArraySource:
  """Random access over in-memory columns of equal length: record i is {name: column[i]}."""

  def __init__(self, columns: dict[str, np.ndarray]):
    self.columns = columns

  def __len__(self) -> int:
    return len(next(iter(self.columns.values())))

  def __getitem__(self, i):
    return {name: column[i] for name, column in self.columns.items()}


def _collate(records):
  return {key: np.stack([np.asarray(r[key]) for r in records]) for key in records[0]}


def _encode_for_cache(ldm: LatentDiffusion, ae_params, images) -> dict[str, jax.Array]:
  """What the cache keeps of a batch of images, unscaled, float32 (see `cache_latents`)."""
  out = ldm.autoencoder.apply({"params": ae_params}, images, method=ldm.autoencoder.encode)
  if isinstance(out, ae_lib.DiagonalGaussian):
    return {"latent_moments": jnp.concatenate([out.mean, out.logvar], axis=-1)}
  return {"latent": out.astype(jnp.float32)}


def cache_latents(config, ldm: LatentDiffusion, ae_params) -> _ArraySource:
  """Encodes this host's share of the training split once (the records `data.make_loader` gives
  this host), without augmentation, with each record's label and caption.

  A KL autoencoder's latents are kept as the posterior's moments ('latent_moments', mean ⊕ logvar),
  so that every step still draws a fresh posterior sample as uncached training does; a VQ
  autoencoder's as the pre-quantization latent ('latent'), which is what LDM trains on (the
  decoder quantizes).
  """
  loader = data_lib.make_loader(config.data, config.data.train_split, batch_size=config.train.batch_size,
                                seed=0, shuffle=False, num_epochs=1, drop_remainder=False)
  encode = jax.jit(functools.partial(_encode_for_cache, ldm))
  columns = []
  for batch in tqdm(loader, desc="caching latents", disable=jax.process_index() != 0):
    latents = jax.device_get(encode(ae_params, batch["image"]))
    columns.append({**latents, "label": batch["label"], "caption": batch["caption"]})
  return _ArraySource({name: np.concatenate([c[name] for c in columns]) for name in columns[0]})


def make_train_iterator(config, source=None):
  """Batches of images (or cached latents), per host, deterministic given train.seed.

  Each host reads its share of the training split: the images `data.make_loader` gives it, or a
  cache of those same images (`cache_latents`), which is not split again.
  """
  if source is None:
    return iter(data_lib.make_loader(config.data, config.data.train_split,
                                     batch_size=config.train.batch_size, seed=config.train.seed))
  ds = grain.MapDataset.source(source).seed(config.train.seed).shuffle().repeat(None)
  ds = ds.batch(data_lib.host_batch_size(config.train.batch_size), drop_remainder=True, batch_fn=_collate)
  return iter(ds.to_iter_dataset())


def prepare_batch(config, ldm: LatentDiffusion, batch: dict, step: int) -> dict:
  """Host side: the conditioner's inputs under 'cond/…' next to the image or cached latents."""
  rng = np.random.default_rng((config.train.seed, step))  # random inpainting masks, reproducible
  cond = ldm.prepare(batch, rng=rng)
  cached = [k for k in CACHED_LATENT_KEYS if k in batch]
  out = {k: batch[k] for k in cached or ["image"]}
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
      unet=unet_lib.make_unet(unet_cfg), conditioner=make_conditioner(config, tokenizer, dtype),
      autoencoder=model, schedule=schedule_lib.schedule_from_config(config.diffusion),
      scale_factor=float(scale_factor), parameterization=config.diffusion.parameterization,
      cond_cfg=config.cond, tokenizer=tokenizer, latent_shape=tuple(latent))


def make_conditioner(config, tokenizer, dtype=jnp.float32):
  """τ_θ of a stage-2 config: the trainable `Conditioner` of `cond.*`, or, with
  `cond.text_encoder='pretrained'`, the frozen text encoder of `init.pretrained`."""
  if conditioning.uses_text(config.cond) and config.cond.text_encoder == "pretrained":
    from ldm_jax.convert import components  # pylint: disable=g-import-not-at-top
    path = os.path.join(config.init.pretrained, "text_encoder", "config.json")
    with open(path) as f:
      return TextEncoderConditioner(components.build("text_encoder", json.load(f)["model"]))
  return conditioning.make_conditioner(config.cond, tokenizer, dtype)


def get_tokenizer(config, workdir):
  """The run's tokenizer: the one saved in the workdir (resume), else built and saved there
  (a `cond.tokenizer_dir` is copied as it is)."""
  if config.cond.kind not in ("text", "hybrid"):
    return None
  saved = os.path.join(workdir, "tokenizer")
  if os.path.isdir(saved):
    return load_tokenizer(saved, max_length=config.cond.max_length)
  tokenizer = build_tokenizer(config.cond, data_lib.captions(config.data, config.data.train_split))
  if jax.process_index() == 0:
    if config.cond.tokenizer_dir:
      shutil.copytree(config.cond.tokenizer_dir, saved)
    else:
      tokenizer.save(saved)
  return tokenizer


# ---- fine-tuning --------------------------------------------------------------------------------
def _pretrained_directory(src: str, workdir: str) -> str:
  """A pretrained directory whose autoencoder is a stage-1 workdir: `src` itself, or `src`
  imported into `workdir/pretrained` (once) as `python -m ldm_jax.convert import` would."""
  from ldm_jax.convert import pretrained as pretrained_lib  # pylint: disable=g-import-not-at-top
  src = os.path.abspath(src)
  if not os.path.exists(src):
    raise FileNotFoundError(f"init.pretrained: {src} does not exist.")
  if (os.path.isfile(os.path.join(src, pretrained_lib.FORMAT_FILE))
      and os.path.isdir(os.path.join(src, "autoencoder", "checkpoints"))):
    return src
  target = os.path.join(os.path.abspath(workdir), "pretrained")
  if not os.path.isfile(os.path.join(target, pretrained_lib.FORMAT_FILE)):
    logging.info("init.pretrained: importing %s into %s", src, target)
    if jax.process_index() == 0:
      try:
        pretrained_lib.save_pretrained(target, pretrained_lib.read_source(src), autoencoder_workdir=True)
      except (ValueError, FileNotFoundError) as err:
        raise type(err)(f"init.pretrained: {err}") from None
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("ldm_jax:import_pretrained")
  return target


def _replace_section(config, section: str, values: dict, source: str, base: dict | None = None) -> None:
  """Sets `section.*` keys to `values` (on top of `base`, default the section itself), logging the
  keys that change."""
  old = config[section].to_dict()
  new = {**(old if base is None else base), **values}
  changed = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
  if changed:
    logging.info("init.pretrained=%s sets %s", source,
                 ", ".join(f"{section}.{k}={v!r} (was {was!r})" for k, (was, v) in changed.items()))
  with config.unlocked():
    config[section] = ml_collections.ConfigDict(new)


def apply_pretrained(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """With `init.pretrained`, points the config at the pretrained model (see the module docstring)
  and returns its parameters {'unet', 'cond'} (host arrays, float32); else None."""
  if not config.init.pretrained:
    return None
  from ldm_jax.convert import load_pretrained  # pylint: disable=g-import-not-at-top
  directory = _pretrained_directory(config.init.pretrained, workdir)
  modules, params, configs = load_pretrained(directory)
  for component in ("unet", "autoencoder"):
    if component not in modules:
      raise ValueError(f"init.pretrained: {directory} has no {component}; fine-tuning needs a U-Net and an "
                       "autoencoder.")
  tokenizer_dir = os.path.join(directory, "tokenizer")
  if "conditioner" in params:  # an exported ldm_jax run: its trained τ_θ is fine-tuned too
    cond = {k: v for k, v in configs["cond"].to_dict().items() if k != "dropout_prob"}
    if conditioning.uses_text(configs["cond"]):
      cond["tokenizer_dir"] = tokenizer_dir
    cond_params = params["conditioner"]
  elif "text_encoder" in params:
    tokenizer = modules.get("tokenizer")
    if tokenizer is None:
      raise ValueError(f"init.pretrained: {directory} has a text encoder but no tokenizer/ folder.")
    cond = dict(kind="text", text_encoder="pretrained", tokenizer_dir=tokenizer_dir, max_length=tokenizer.max_length,
                vocab_size=tokenizer.vocab_size, dim=int(configs["text_encoder"].dim))
    cond_params = {"text_encoder": params["text_encoder"]}
  else:
    cond, cond_params = dict(kind="none"), {}
  diffusion_cfg = configs.get("diffusion", {})
  sections = {
      "init": dict(pretrained=directory),
      "autoencoder": dict(workdir=os.path.join(directory, "autoencoder")),
      "model": {k: v for k, v in configs["unet"].to_dict().items() if k not in ("dtype", "remat")},
      "diffusion": {k: diffusion_cfg[k] for k in PRETRAINED_DIFFUSION_KEYS if k in diffusion_cfg},
      "latent": ({"scale_factor": float(configs["latent"].scale_factor)}
                 if "scale_factor" in configs.get("latent", {}) else {}),
      "cond": cond,
  }
  for section, values in sections.items():
    # The U-Net is the pretrained one: keys its config leaves out take the U-Net defaults, not the config's.
    base = unet_lib.default_unet_config().to_dict() if section == "model" else None
    _replace_section(config, section, values, directory, base)
  return jax.tree.map(lambda x: np.asarray(x, np.float32), {"unet": params["unet"], "cond": cond_params})


# ---- periodic evaluation ------------------------------------------------------------------------
def eval_conditions(config, ldm: LatentDiffusion) -> tuple[dict, np.ndarray | None]:
  """(prepared conditions [N, …], labels [N] or None) of the evaluation samples: the labels or
  captions of the first `eval.num_samples` records of `data.eval_split` (cycled if fewer), so that
  the samples follow the reference's conditions."""
  n, kind = config.eval.num_samples, config.cond.kind
  if kind == "none":
    return {}, None
  source = data_lib.make_source(config.data, config.data.eval_split)
  rows = [i % len(source) for i in range(n)]
  if kind == "class":
    labels = np.array([source[i]["label"] for i in rows], np.int32)
    return ldm.prepare({"label": labels}), labels
  return ldm.prepare({"caption": np.array([source.caption(i) for i in rows])}), None


def _put(x, sharding_):
  """A host array (the same on every process) → a global array placed with `sharding_`."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding_, lambda index: x[index])


class SampleEvaluator:
  """`eval.num_samples` guided samples → `eval.metrics` against the eval split (module docstring).

  The noise of sample i is fixed (`train.seed`), so that successive evaluations differ only by
  the weights. Every process computes the same scores; process 0 writes them.
  """

  def __init__(self, config, ldm: LatentDiffusion, mesh, extractor: features_lib.Extractor,
               metrics: tuple[str, ...]):
    self.config, self.mesh, self.extractor, self.metrics = config, mesh, extractor, metrics
    e = config.eval
    self.ref = stats_lib.reference_stats(config.data, config.data.eval_split, e.num_ref, extractor,
                                         cache_dir=e.cache_dir or None, mesh=mesh, batch_size=e.batch_size,
                                         progress=jax.process_index() == 0)
    self.cond, self.labels = eval_conditions(config, ldm)
    s = config.sample

    def generate(params, ae_params, cond, index, key, batch_number):
      noise_key, sampler_key = jax.random.split(key)
      x_T = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(noise_key, i), ldm.latent_shape))(index)
      z = ldm.sample_latents(params, cond, jax.random.fold_in(sampler_key, batch_number), x_T=x_T,
                             batch_size=index.shape[0], sampler=s.sampler, num_steps=s.num_steps, eta=s.eta,
                             guidance_scale=s.guidance_scale, ae_params=ae_params)
      return ldm.decode(ae_params, z)

    self._generate = jax.jit(generate, out_shardings=sharding.replicated(mesh))

  def samples(self, params, ae_params) -> np.ndarray:
    """uint8 [N, H, W, C] samples of `params` ({'unet', 'cond'}), `eval.batch_size` at a time."""
    n, size = self.config.eval.num_samples, self.config.eval.batch_size
    batch_sh = sharding.batch_sharding(self.mesh)
    key = jax.random.PRNGKey(self.config.train.seed)
    images = []
    for b in range(math.ceil(n / size)):
      index = np.arange(b * size, (b + 1) * size, dtype=np.int32)
      rows = np.minimum(index, n - 1)  # the last batch is padded with the last condition
      cond = {k: _put(np.asarray(v)[rows], batch_sh) for k, v in self.cond.items()}
      out = self._generate(params, ae_params, cond, _put(index, batch_sh), key, np.int32(b))
      images.append(to_uint8(np.asarray(out.addressable_data(0)))[:n - b * size])
    return np.concatenate(images)

  def __call__(self, params, ae_params) -> dict[str, float]:
    e = self.config.eval
    scores = eval_lib.evaluate_samples(
        self.samples(params, ae_params), self.ref, self.extractor, self.metrics,
        labels=self.labels if "acc" in self.metrics else None, mesh=self.mesh, batch_size=e.batch_size,
        kid_subset_size=e.kid_subset_size, pr_k=e.pr_k, is_splits=IS_SPLITS, seed=self.config.train.seed,
        progress=False)
    return {f"eval/{name}": value for name, value in scores.items()}


def estimate_scale_factor(config, ldm, ae_params, batch, mesh) -> float:
  """1 / std of the first global batch's latents (LDM `scale_by_std`), unless the config fixes it.

  `batch` is this process's share; every process gets the same value.
  """
  if config.latent.scale_factor > 0:
    return float(config.latent.scale_factor)
  if "latent_moments" in batch:
    mean, logvar = np.split(np.asarray(batch["latent_moments"]), 2, axis=-1)
    z = mean + np.exp(0.5 * logvar) * np.random.default_rng(0).standard_normal(mean.shape)
  elif "latent" in batch:
    z = np.asarray(batch["latent"])
  else:
    images = sharding.shard_batch({"image": batch["image"]}, mesh)["image"]
    z = jax.jit(functools.partial(ldm.encode, scale_factor=1.0))(ae_params, images, jax.random.PRNGKey(0))
  z = multihost_utils.process_allgather(z, tiled=True) if jax.process_count() > 1 else jax.device_get(z)
  return float(1.0 / np.std(np.asarray(z, np.float32)))


# Keys a resumed run must share with its checkpoints (`config.check_resume`).
RESUME_KEYS = ("model.", "cond.kind", "cond.class_mode", "cond.concat_source", "cond.text_encoder", "cond.dim",
               "cond.depth", "cond.num_heads", "cond.head_dim", "cond.vocab_size", "cond.max_length",
               "cond.num_classes", "cond.concat_channels", "autoencoder.workdir", "init.pretrained", "latent.cache")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) a stage-2 run in `workdir`; returns the last logged training scalars
  (empty when a SIGTERM stopped the run early, after saving its current step).

  Every input is checked before anything is written to `workdir` (with `init.pretrained` naming a
  diffusers folder or file, its import into `workdir/pretrained` comes first); `config.json` is
  written once the first step under this config has run."""
  config_lib.check_resume(config, workdir, "diffusion", ())
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.train.batch_size, mesh, grad_accum_steps=config.train.grad_accum_steps)
  pretrained_params = apply_pretrained(config, workdir)
  resolve_config(config, _load_autoencoder(config)[1])
  if config.latent.cache and config.cond.kind in ("concat", "hybrid"):
    raise ValueError("latent.cache: concat conditioning needs the images at every step; set it to False.")
  extractor, eval_metrics = make_eval_extractor(config) if config.eval.metrics else (None, ())
  if eval_metrics:
    sharding.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
  config_lib.check_resume(config, workdir, "diffusion", RESUME_KEYS)
  model, ae_config, ae_params = load_frozen_autoencoder(config, mesh, rules=sharding.rules_of(config.mesh),
                                                        dtype=config.train.dtype)
  tokenizer = get_tokenizer(config, workdir)
  ldm = build_ldm(config, model, ae_config, tokenizer, for_training=True)
  source = cache_latents(config, ldm, ae_params) if config.latent.cache else None
  train_iter = make_train_iterator(config, source)

  stage = Stage2(config, mesh, ldm, ae_params)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       max_to_keep=config.train.max_checkpoints)
  first = prepare_batch(config, ldm, next(iter(make_train_iterator(config, source))), 0)
  stage.setup({k[len("cond/"):]: v for k, v in first.items() if k.startswith("cond/")})
  state = checkpointer.restore_or_close(stage.abstract_state, train_iter)
  if state is None:
    scale_factor = estimate_scale_factor(config, ldm, ae_params, first, mesh)
    state = stage.init(jax.random.PRNGKey(config.train.seed), jnp.float32(scale_factor), pretrained_params)
  ldm = dataclasses.replace(ldm, scale_factor=float(jax.device_get(state.scale_factor)))
  start_step = int(jax.device_get(state.step))
  num_steps = config.train.num_steps
  logging.info("Stage 2: steps %d → %d, scale_factor %.5f, U-Net %s params%s", start_step, num_steps,
               ldm.scale_factor, f"{sum(x.size for x in jax.tree.leaves(state.params['unet'])):,}",
               f", from {config.init.pretrained}" if config.init.pretrained else "")

  writer = MetricWriter(workdir)
  sample_cond = sample_conditions(config, ldm)
  generate = jax.jit(functools.partial(
      ldm.generate, sampler=config.sample.sampler, num_steps=config.sample.num_steps, eta=config.sample.eta,
      guidance_scale=config.sample.guidance_scale, batch_size=config.sample.num_images),
      out_shardings=sharding.replicated(mesh))  # every process can read the grid
  evaluator = SampleEvaluator(config, ldm, mesh, extractor, eval_metrics) if eval_metrics else None
  # One column per prompt or class, so that each column of the grid shows one condition.
  grid_cols = (len(config.sample.prompts) if config.cond.kind in ("text", "hybrid") and config.sample.prompts
               else config.cond.num_classes if config.cond.kind == "class" else None)
  pending, t0, scalars = [], time.perf_counter(), {}
  monitor = loop.NonFiniteMonitor(config.train.max_nonfinite_steps)
  progress = tqdm(total=num_steps, initial=start_step, desc="stage 2", disable=jax.process_index() != 0)
  with loop.running(progress, checkpointer, writer) as preemption:
    for step in range(start_step + 1, num_steps + 1):
      batch = sharding.shard_batch(prepare_batch(config, ldm, next(train_iter), step), mesh)
      state, metrics = stage.train_step(state, batch, ae_params)
      loop.save_config_once(config, workdir, step, start_step)
      pending.append(metrics)
      monitor.push(step, metrics)
      if loop.due(step, config.train.log_every, num_steps):
        scalars = loop.write_train_scalars(writer, progress, step, pending, config.train.batch_size,
                                           time.perf_counter() - t0)
        pending, t0 = [], time.perf_counter()
      if loop.due(step, config.train.image_every, num_steps):
        images = generate(state.ema_params, ae_params, sample_cond, jax.random.PRNGKey(config.train.seed))
        writer.write_image(step, "samples", image_grid(np.asarray(jax.device_get(images)), grid_cols))
        t0 = time.perf_counter()
      if evaluator is not None and loop.due(step, config.train.eval_every, num_steps):
        results = evaluator(state.ema_params, ae_params)
        loop.write_eval_scalars(writer, step, results)
        t0 = time.perf_counter()
      progress.update(1)
      if loop.checkpoint_or_stop(checkpointer, preemption, step, state, train_iter,
                                 config.train.checkpoint_every, num_steps):
        return {}
    monitor.flush()
  return scalars
