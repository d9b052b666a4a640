"""A stage-2 train state and step assembled as `train_and_evaluate` does, for tests that drive steps by hand."""

import jax.numpy as jnp

from ldm_jax import load
from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.train.diffusion import data, state as state_lib, step as step_lib


def cond_inputs(batch):
  return {k[len("cond/"):]: v for k, v in batch.items() if k.startswith("cond/")}


class Stage2:
  """`init(rng, scale_factor)` and `train_step(state, batch, ae_params)` of a resolved config; the
  LatentDiffusion (the owner of `scale_factor`, here `scale_factor`) is `ldm`."""

  def __init__(self, config, mesh, ae_model, ae_config, ae_params, example_batch, *, scale_factor=0.5,
               optimizer=None, tokenizer=None):
    self.config, self.mesh, self.ae_params = config, mesh, ae_params
    latent_shape = ae_lib.latent_shape(ae_config.model, config.data.image_size)
    unet = load.make_unet(config, for_training=True)
    conditioner = load.make_conditioner(config, tokenizer, jnp.dtype(config.train.dtype))
    frozen_cond = step_lib.is_frozen(conditioner)
    optimizer = optimizer or state_lib.make_optimizer(config, frozen_cond=frozen_cond)
    builder = state_lib.StateBuilder(config, mesh, unet, conditioner, latent_shape, cond_inputs(example_batch),
                                     optimizer, frozen_cond=frozen_cond)
    self.state_sharding, self.init = builder.state_sharding, builder.init
    self.ldm = load.build_ldm(config, ae_model, ae_config, tokenizer, scale_factor, for_training=True, unet=unet,
                              conditioner=conditioner)
    self.train_step = step_lib.make_train_step(config, mesh, self.ldm, optimizer, builder.state_sharding, ae_params)


def prepare(config, ae_config, raw, step=1):
  return data.prepare_batch(config, None, ae_lib.latent_shape(ae_config.model, config.data.image_size), raw, step)
