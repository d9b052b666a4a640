"""The state of a stage-2 run: parameters of U-Net and conditioner, their EMA, AdamW, and its init.

    builder = StateBuilder(config, mesh, unet, conditioner, latent_shape, example_cond, optimizer, frozen_cond=…)
    state = checkpointer.restore_or_close(builder.abstract_state, …) or builder.init(rng, scale_factor)
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ldm_jax.runtime import checkpoint as ckpt_lib
from ldm_jax.runtime import sharding


@flax.struct.dataclass
class DiffusionState:
  """params: {'unet': …, 'cond': …}; ema_params: the EMA of the parameters that train — the same keys,
  or {'unet': …} alone when the conditioner is a frozen pretrained text encoder (`init.pretrained`:
  its weights, 3 GiB for SDXL's two, are kept once, in `params`). `ema_weights(state)` is both.

  scale_factor (f32 scalar) is the run's latent scale as checkpointed (sampling and export read it
  there): estimated once, before the first step. The trainer builds its `LatentDiffusion` from it
  after the state is restored or initialised, and only that object scales latents; the step never
  reads this field.
  """
  step: jax.Array
  params: dict
  ema_params: dict
  opt_state: optax.OptState
  rng: jax.Array
  scale_factor: jax.Array


def make_optimizer(config: ml_collections.ConfigDict, *, frozen_cond: bool = False) -> optax.GradientTransformation:
  """AdamW with linear warm-up to `optim.learning_rate`, then constant or cosine to 0; clipping.

  With `frozen_cond` (a pretrained text encoder, `init.pretrained`) the conditioner gets no
  updates and no optimizer state.
  """
  o = config.optim
  if o.schedule == "cosine":
    lr = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1),
                                            max(config.train.num_steps, o.warmup_steps + 1))
  else:
    lr = optax.linear_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1))
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  optimizer = optax.chain(*chain, optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
  if frozen_cond:
    optimizer = optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()},
                                      {"unet": "train", "cond": "frozen"})
  return optimizer


def ema_weights(state: DiffusionState) -> dict:
  """The weights that sample grids, evaluation and export use: the EMA of what trains, and the frozen
  text encoders (which have no EMA) from the parameters."""
  return {**state.params, **state.ema_params}


def ema_decay(num_updates, decay: float):
  """LDM's LitEma warm-up: min(decay, (1 + n) / (10 + n)) for the n-th update, n = 1 the first
  (LitEma increments its counter before it computes the decay): 2/11, 3/12, 4/13, …"""
  n = num_updates.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


class StateBuilder:
  """The sharded init of a stage-2 state and its abstract shape (for restoring), from the modules.

  `example_cond`: one prepared batch's conditioner inputs (shapes only); `in_channels`: the
  U-Net's input channels (latent + concat channels). `init_params(rng)`, when given, makes the
  trained parameters instead of U-Net and conditioner (a LoRA run's adapters). With `frozen_cond`
  (a pretrained text encoder, as for `make_optimizer`) the EMA leaves the conditioner out.
  """

  def __init__(self, config, mesh, unet, conditioner, latent_shape, example_cond: dict,
               optimizer: optax.GradientTransformation, init_params=None, *, frozen_cond: bool = False):
    self.unet, self.conditioner, self.optimizer = unet, conditioner, optimizer
    self._init_params, self._frozen_cond = init_params, frozen_cond
    self.latent_shape, self.in_channels = tuple(latent_shape), config.model.in_channels
    self._example = jax.tree.map(lambda x: np.asarray(x)[:1], example_cond)
    abstract = jax.eval_shape(self._init, jax.random.PRNGKey(0), jnp.float32(1.0))
    self.state_sharding = sharding.state_sharding(mesh, abstract, **sharding.rules_of(config.mesh))
    self.abstract_state = ckpt_lib.abstract_like(abstract, self.state_sharding)
    self.init = jax.jit(self._init, out_shardings=self.state_sharding)

  def _init(self, rng, scale_factor, params=None) -> DiffusionState:
    """A fresh state: parameters from `params` ({'unet', 'cond'}, e.g. pretrained) or initialised."""
    unet_rng, cond_rng, rng = jax.random.split(rng, 3)
    if params is None and self._init_params is not None:
      params = self._init_params(unet_rng)
    elif params is None:
      cond_params = self.conditioner.init(cond_rng, self._example, deterministic=True)
      cond_params = cond_params.get("params", {})
      cond = self.conditioner.apply({"params": cond_params}, self._example, deterministic=True) \
          if "masked_image" not in self._example else None
      h, w, _ = self.latent_shape
      x = jnp.zeros((1, h, w, self.in_channels))
      unet_params = self.unet.init(unet_rng, x, jnp.zeros((1,), jnp.int32), context=cond["context"],
                                   y=cond["y"], text_embeds=cond.get("text_embeds"),
                                   time_ids=cond.get("time_ids"))["params"]
      params = {"unet": unet_params, "cond": cond_params}
    ema_params = {k: v for k, v in params.items() if k != "cond"} if self._frozen_cond else params
    return DiffusionState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_params,
                          opt_state=self.optimizer.init(params), rng=rng,
                          scale_factor=jnp.asarray(scale_factor, jnp.float32))
