"""`train_and_evaluate(config, workdir)` of stage 2, top to bottom: check → build → restore → loop."""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from tqdm import tqdm

from ldm_jax import load
from ldm_jax.config import common as config_lib
from ldm_jax.config import diffusion as diffusion_config
from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.runtime import checkpoint as ckpt_lib
from ldm_jax.runtime import sharding
from ldm_jax.runtime.images import image_grid
from ldm_jax.runtime.logging import MetricWriter
from ldm_jax.train import loop
from ldm_jax.train.diffusion import data, evaluation, finetune, setup, state as state_lib, step as step_lib


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) a stage-2 run in `workdir`; returns the last logged training scalars
  (empty when a SIGTERM stopped the run early, after saving its current step).

  Every input is checked before anything is written to `workdir` (with `init.pretrained` naming a
  diffusers folder or file, its import into `workdir/pretrained` comes first); `config.json` is
  written once the first step under this config has run."""
  # Check: the config against the workdir, the mesh, the pretrained model and the autoencoder.
  config_lib.check_resume(config, workdir, "diffusion", ())
  finetune.check_method(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.train.batch_size, mesh, grad_accum_steps=config.train.grad_accum_steps)
  pretrained_params = finetune.apply_pretrained(config, workdir)
  ae_config = load.autoencoder_run(config.autoencoder.workdir)[1]
  setup.resolve_config(config, ae_config)
  data.check_disk_cache(config, ae_config)
  if config.latent.cache and config.cond.kind in ("concat", "hybrid"):
    raise ValueError("latent.cache: concat conditioning needs the images at every step; set it to False.")
  extractor, eval_metrics = evaluation.make_eval_extractor(config) if config.eval.metrics else (None, ())
  if eval_metrics:
    sharding.check_batch_size(config.eval.batch_size, mesh, "eval.batch_size")
  config_lib.check_resume(config, workdir, "diffusion", setup.RESUME_KEYS)

  # Build: the frozen autoencoder, the tokenizer, U-Net and conditioner, the data.
  rules = sharding.rules_of(config.mesh)
  ae_model, ae_config, ae_params = load.load_autoencoder(
      config.autoencoder.workdir, lambda tree: sharding.tree_sharding(mesh, tree, prefix="autoencoder", **rules),
      dtype=config.train.dtype)
  tokenizer, tokenizer_2 = setup.get_tokenizer(config, workdir), setup.get_tokenizer_2(config, workdir)
  conditioner = load.make_conditioner(config, tokenizer, jnp.dtype(config.train.dtype))
  # LoRA adapters or new token embeddings train instead of the pretrained weights, which stay outside the state.
  tuning = finetune.make_tuning(config, pretrained_params, tokenizer, conditioner, mesh)
  if "textual_inversion" in config:
    tokenizer, conditioner = tuning.tokenizer, tuning.conditioner
  latent_shape = ae_lib.latent_shape(ae_config.model, config.data.image_size)
  prepare = functools.partial(data.prepare_batch, config, tokenizer, latent_shape,
                              transform=finetune.batch_transform(config, tuning), tokenizer_2=tokenizer_2,
                              cached_context=data.uses_cached_context(config, tuning))
  source = data.cache_latents(config, ae_model, ae_params) if config.latent.cache else None
  train_iter = finetune.train_iterator(config, workdir, data.make_train_iterator(config, source))
  first = prepare(next(data.make_train_iterator(config, source)), 0)
  unet = load.make_unet(config, for_training=True)
  frozen_cond = tuning is None and step_lib.is_frozen(conditioner)  # no gradients, no optimizer state, no EMA
  optimizer = state_lib.make_optimizer(config, frozen_cond=frozen_cond)
  builder = state_lib.StateBuilder(config, mesh, unet, conditioner, latent_shape,
                                   {k[len("cond/"):]: v for k, v in first.items() if k.startswith("cond/")}, optimizer,
                                   init_params=tuning.init if tuning else None, frozen_cond=frozen_cond)

  # Restore, or estimate the scale_factor on the first batch; the model and its train step, which
  # compiles in a thread while a new state initialises.
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.train.max_checkpoints)
  # Checkpoints written before the EMA left the frozen text encoders out hold a copy of them there.
  state = checkpointer.restore_or_close(builder.abstract_state, train_iter,
                                        unread=(("ema_params", "cond"),) if frozen_cond else ())
  start_step, num_steps = (0 if state is None else int(jax.device_get(state.step))), config.train.num_steps
  scale_factor = (jax.device_get(state.scale_factor) if state is not None else
                  np.float32(data.estimate_scale_factor(config, ae_model, ae_params, first, mesh)))
  ldm = load.build_ldm(config, ae_model, ae_config, tokenizer, float(scale_factor),
                       for_training=True, unet=unet, conditioner=conditioner, tokenizer_2=tokenizer_2)
  train_step = step_lib.make_train_step(config, mesh, ldm, optimizer, builder.state_sharding, ae_params, tuning)
  frozen = (ae_params,) if tuning is None else (ae_params, tuning.base)
  # (Not for a finished run, and not for DreamBooth, whose batches add the class images to `first`'s:
  # its step compiles at the first step.)
  compiled = (loop.compile_ahead(train_step, builder.abstract_state, sharding.shard_batch(first, mesh), *frozen)
              if start_step < num_steps and "dreambooth" not in config else None)
  if state is None:
    state = builder.init(jax.random.PRNGKey(config.train.seed), jnp.float32(scale_factor),
                         None if tuning else pretrained_params)
  if compiled is not None:
    compiled.result()
  # The weights of the sample grids and evaluations: the EMA weights (with the frozen text encoders),
  # or the base with the EMA adapters.
  compose = jax.jit(tuning.compose) if tuning else None
  sample_params = state_lib.ema_weights if tuning is None else (lambda s: compose(s.ema_params, tuning.base))
  logging.info("Stage 2: steps %d → %d, scale_factor %.5f, %s %s params%s", start_step, num_steps,
               ldm.scale_factor, "trained (adapters or embeddings):" if tuning else "U-Net",
               f"{sum(x.size for x in jax.tree.leaves(state.params if tuning else state.params['unet'])):,}",
               f", from {config.init.pretrained}" if config.init.pretrained else "")

  # Sample grids and periodic evaluation with the EMA weights.
  writer = MetricWriter(workdir)
  sample_cond = data.sample_conditions(config, ldm)
  generate = jax.jit(functools.partial(
      ldm.generate, sampler=config.sample.sampler, num_steps=config.sample.num_steps, eta=config.sample.eta,
      guidance_scale=config.sample.guidance_scale, guidance_interval=diffusion_config.guidance_interval(config.sample),
      batch_size=config.sample.num_images),
      out_shardings=sharding.replicated(mesh))  # every process can read the grid
  evaluator = evaluation.SampleEvaluator(config, ldm, mesh, extractor, eval_metrics) if eval_metrics else None
  # One column per prompt or class, so that each column of the grid shows one condition.
  grid_cols = (len(config.sample.prompts) if config.cond.kind in ("text", "hybrid") and config.sample.prompts
               else config.cond.num_classes if config.cond.kind == "class" else None)

  # The loop: step, log, sample, evaluate, checkpoint.
  pending, t0, scalars, inputs = [], time.perf_counter(), {}, loop.InputMonitor(buckets=bool(config.data.buckets))
  monitor = loop.NonFiniteMonitor(config.train.max_nonfinite_steps)
  progress = tqdm(total=num_steps, initial=start_step, desc="stage 2", disable=jax.process_index() != 0)
  with loop.running(progress, checkpointer, writer) as preemption:
    for step in range(start_step + 1, num_steps + 1):
      batch = sharding.shard_batch(prepare(inputs.next(train_iter), step), mesh)
      state, metrics = train_step(state, batch, *frozen)
      loop.save_config_once(config, workdir, step, start_step)
      pending.append(metrics)
      monitor.push(step, metrics)
      if loop.due(step, config.train.log_every, num_steps):
        scalars = loop.write_train_scalars(writer, progress, step, pending, config.train.batch_size,
                                           time.perf_counter() - t0, inputs)
        pending, t0 = [], time.perf_counter()
      if loop.due(step, config.train.image_every, num_steps):
        images = generate(sample_params(state), ae_params, sample_cond, jax.random.PRNGKey(config.train.seed))
        writer.write_image(step, "samples", image_grid(np.asarray(jax.device_get(images)), grid_cols))
        t0 = time.perf_counter()
        inputs.restart()
      if evaluator is not None and loop.due(step, config.train.eval_every, num_steps):
        loop.write_eval_scalars(writer, step, evaluator(sample_params(state), ae_params))
        t0 = time.perf_counter()
        inputs.restart()
      progress.update(1)
      if tuning is not None and loop.due(step, config.train.checkpoint_every, num_steps):
        finetune.save_trainable(tuning, workdir, state.ema_params, mesh)
      if loop.checkpoint_or_stop(checkpointer, preemption, step, state, train_iter,
                                 config.train.checkpoint_every, num_steps):
        return {}
    monitor.flush()
  return scalars
