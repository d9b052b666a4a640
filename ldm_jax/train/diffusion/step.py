"""The stage-2 train step: sample t and ε, noise the latents, drop conditions, update, EMA.

One jitted step: encodes the images (or draws from cached KL moments), scales them by the run's
`LatentDiffusion.scale_factor`, samples t and ε, noises the latents, drops conditions to the null
condition with probability `cond.dropout_prob` (for classifier-free guidance; cached outputs of
frozen text encoders to the conditioner's outputs for the null condition), and updates U-Net and
conditioner with AdamW (micro-batches accumulated, non-finite steps skipped), followed by the EMA.
A LoRA run (`ldm_jax.train.diffusion.lora`) updates adapters instead: the step gets the frozen base
as a fourth argument and differentiates the loss of the composed weights with respect to the
adapters alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from ldm_jax.data.latent_cache import CACHED_TEXT_KEYS
from ldm_jax.diffusion import schedule as schedule_lib
from ldm_jax.diffusion.latent_diffusion import LatentDiffusion, TextEncoderConditioner
from ldm_jax.models import conditioning
from ldm_jax.runtime import sharding
from ldm_jax.train import loop
from ldm_jax.train.diffusion.state import DiffusionState, ema_decay


def is_frozen(conditioner) -> bool:
  """A pretrained text encoder (init.pretrained) stays as it is: no gradients, no optimizer state."""
  return isinstance(conditioner, TextEncoderConditioner)


def loss_fn(config, ldm: LatentDiffusion, params, batch, rng, ae_params, *, frozen_cond: bool | None = None):
  """Mean diffusion loss of a prepared batch ('image' or cached latents, 'cond/…'); no gradient flows
  into the conditioner when `frozen_cond` (default: it is a pretrained text encoder)."""
  d = config.diffusion
  rng_enc, rng_drop, rng_t, rng_noise, rng_dropout = jax.random.split(rng, 5)
  if "latent_moments" in batch:  # cached KL: the posterior's mean and log-variance
    mean, logvar = jnp.split(batch["latent_moments"], 2, axis=-1)
    z = (mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng_enc, mean.shape)) * ldm.scale_factor
  elif "latent" in batch:  # cached VQ: the pre-quantization latent
    z = batch["latent"] * ldm.scale_factor
  else:
    z = ldm.encode(ae_params, batch["image"], rng_enc)
  batch_cond = {k[len("cond/"):]: v for k, v in batch.items() if k.startswith("cond/")}
  if "context" in batch_cond:  # cached outputs of the frozen text encoders; dropped, the null condition's
    cached = {k: batch_cond[k] for k in CACHED_TEXT_KEYS if k in batch_cond}
    null = ldm.conditioner.apply({"params": params["cond"]}, ldm.null(1), deterministic=True)
    cond = conditioning.drop_condition(rng_drop, cached, {k: null[k] for k in cached}, config.cond.dropout_prob)
    cond.update(y=None, concat=None)
    if "time_ids" in batch_cond:  # SDXL's sizes and crop offsets, never dropped
      cond["time_ids"] = jnp.asarray(batch_cond["time_ids"], jnp.float32)
  else:
    batch_cond = conditioning.drop_condition(rng_drop, batch_cond, ldm.null(1), config.cond.dropout_prob)
    if "masked_image" in batch_cond:
      batch_cond = conditioning.inpaint_concat(batch_cond, functools.partial(ldm.encode, ae_params))
    cond = ldm.conditioner.apply({"params": params["cond"]}, batch_cond, deterministic=False,
                                 rngs={"dropout": rng_dropout})
  if is_frozen(ldm.conditioner) if frozen_cond is None else frozen_cond:
    cond = jax.lax.stop_gradient(cond)
  t = schedule_lib.sample_timesteps(rng_t, z.shape[0], ldm.schedule.num_timesteps, d.timestep_sampling,
                                   d.timestep_logit_mean, d.timestep_logit_std)
  eps = schedule_lib.offset_noise(rng_noise, z.shape, d.offset_noise) if d.offset_noise else \
      jax.random.normal(rng_noise, z.shape)
  z_t = schedule_lib.q_sample(ldm.schedule, z, t, eps)
  out = ldm.denoise(params["unet"], z_t, t, cond, deterministic=False, rngs={"dropout": rng_dropout})
  loss = schedule_lib.diffusion_loss(out, z, eps, t, ldm.schedule, d.parameterization, d.loss_type,
                                     d.min_snr_gamma or None)
  if "loss_weight" in batch:  # DreamBooth: instance and prior examples weighted (ldm_jax.train.diffusion.dreambooth)
    loss = loss * batch["loss_weight"]
  return jnp.mean(loss)


def train_step(config, mesh, ldm: LatentDiffusion, optimizer, state_sharding, tuning, state: DiffusionState, batch,
               ae_params, base=None):
  """One update of `state` on a prepared, sharded global batch; (new state, metrics).

  With a LoRA `tuning`, `state.params` are its adapters and `base` the frozen weights they adapt.
  """
  rng, step_rng = jax.random.split(state.rng)
  # What trains is what has an EMA: without a frozen text encoder's 'cond', which gets no gradients.
  trained = lambda tree: {k: tree[k] for k in state.ema_params}
  if tuning is None:
    compose, frozen_cond = (lambda params: {**state.params, **params}), None
  else:
    compose, frozen_cond = functools.partial(tuning.compose, base=base), not tuning.trains_text_encoder

  def grads_fn(params, micro_batch, micro_rng):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(config, ldm, compose(p), micro_batch, micro_rng, ae_params,
                                                       frozen_cond=frozen_cond))(params)
    return grads, {"loss": loss}

  grads, metrics = loop.accumulate_gradients(grads_fn, trained(state.params), batch, step_rng,
                                             config.train.grad_accum_steps, mesh=mesh,
                                             grad_sharding=trained(state_sharding.params))
  # The optimizer's frozen partition (`make_optimizer(frozen_cond=True)`) takes zeros and returns zeros.
  updates, opt_state = optimizer.update({**jax.tree.map(jnp.zeros_like, state.params), **grads}, state.opt_state,
                                        state.params)
  params = optax.apply_updates(state.params, updates)
  decay = ema_decay(state.step + 1, config.optim.ema_decay)
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, trained(params))
  ok = loop.all_finite(metrics["loss"], grads, updates)
  params, ema, opt_state = loop.keep_if(ok, (params, ema, opt_state),
                                        (state.params, state.ema_params, state.opt_state))
  metrics.update(grad_norm=optax.tree.norm(grads), ema_decay=decay,
                 **{loop.NONFINITE: 1.0 - ok.astype(jnp.float32)})
  return state.replace(step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
                       rng=rng), metrics


def make_train_step(config, mesh, ldm: LatentDiffusion, optimizer, state_sharding, ae_params, tuning=None):
  """`step(state, batch, ae_params) -> (state, metrics)` — with a LoRA `tuning`,
  `step(state, batch, ae_params, tuning.base)` —, jitted with the mesh's shardings; the state is donated."""
  placed = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  frozen = (placed(ae_params),) if tuning is None else (placed(ae_params), placed(tuning.base))
  return jax.jit(functools.partial(train_step, config, mesh, ldm, optimizer, state_sharding, tuning),
                 in_shardings=(state_sharding, sharding.batch_sharding(mesh), *frozen),
                 out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)
