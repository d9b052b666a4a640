"""Stage 1 trainer: a KL- or VQ-regularised autoencoder with L1 + LPIPS + PatchGAN losses.

`train_and_evaluate(config, workdir)` builds the mesh, creates the sharded train state, resumes
from the newest checkpoint of `workdir` if there is one, and runs the loop: one jitted step
updates the autoencoder (and the learned log-variance of the KL objective) and the
discriminator together; scalars go to TensorBoard and `metrics.jsonl`; every
`train.eval_every` steps the first `train.eval_batches` batches of the held-out split are
reconstructed and `eval.metrics` are reported as `eval/<metric>` — PSNR, SSIM and LPIPS by
default, and optionally rFD, the Fréchet distance between `eval.extractor` features of the
reconstructions and of their originals (`eval/rfd_vgg16_64px`; the originals' statistics are
computed once per run) — together with codebook usage for VQ and a grid of inputs above their
reconstructions.

The adversarial weight is the reference's adaptive one: λ = ‖∇_L L_nll‖ / (‖∇_L L_G‖ + 1e-4)
on the decoder's last layer L. One forward pass gives both objectives; two pullbacks of the
same `jax.vjp` give their gradients, and the update uses ∇(L_nll + w·L_reg) + λ·∇L_G.
Before `loss.disc_start` a second compiled step without the discriminator is used, so the
adversarial branch costs nothing until it is switched on.

Scale and resilience (shared with stage 2, see `ldm_jax.train.loop`): parameters and optimizer
state are placed by `mesh.rules`; `train.dtype`, `train.remat` and `train.grad_accum_steps`
(each micro-batch gets its own adaptive weight, as with the reference's gradient accumulation)
trade precision, compute and steps for memory; a step with a non-finite loss or gradient is
skipped; SIGTERM saves the current step and returns.
"""

from __future__ import annotations

import functools
import os
import time

import flax
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
from ldm_jax.config import common as config_lib
from ldm_jax.config import mesh as mesh_config
from ldm_jax.eval import distribution
from ldm_jax.eval import evaluate as eval_lib
from ldm_jax.eval import features as features_lib
from ldm_jax.eval import metrics as metrics_lib
from ldm_jax.losses import autoencoder as losses
from ldm_jax.losses import lpips as lpips_lib
from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.runtime import checkpoint as ckpt_lib
from ldm_jax.runtime import sharding
from ldm_jax.runtime.images import image_grid, to_uint8
from ldm_jax.runtime.logging import MetricWriter
from ldm_jax.train import loop

# Where the adaptive GAN weight looks: the decoder's output convolution.
LAST_LAYER = ("autoencoder", "decoder", "conv_out", "kernel")


@flax.struct.dataclass
class AutoencoderState:
  """Everything a stage-1 run needs to continue exactly where it stopped.

  params: {'autoencoder': …, 'logvar': [] (KL objective's log-variance), 'discriminator': …}.
  rng: a raw uint32 PRNG key, split once per step.
  """
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Every check that can fail before compiling; errors name the offending key."""
  checks.check_finite(config)
  config_lib.validate_train_config(config.train)
  config_lib.validate_model_overrides(config.model, config.train)
  mesh_config.validate_mesh_config(config.mesh)
  data_lib.validate_data_config(config.data)
  ae_lib.validate_autoencoder_config(config.model, config.data.image_size)
  losses.validate_loss_config(config.loss)
  if config.optim.schedule not in ("constant", "cosine"):
    raise ValueError(f"optim.schedule: {config.optim.schedule!r} is not 'constant' or 'cosine'.")
  checks.check_number("optim.base_learning_rate", config.optim.base_learning_rate, gt=0)
  for key in ("b1", "b2"):
    checks.check_number(f"optim.{key}", config.optim[key], ge=0, lt=1)
  eval_metrics(config)


def eval_metrics(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The validated `eval.metrics`; ValueError names the key."""
  try:
    metrics = eval_lib.parse_metrics(config.eval.metrics, eval_lib.RECONSTRUCTION_METRICS)
  except ValueError as err:
    raise ValueError(f"eval.metrics: {err}.") from None
  if "rfd" in metrics and config.train.eval_batches * config.train.batch_size < 2:
    raise ValueError("train.eval_batches: rfd needs at least 2 reconstructions; evaluate more batches.")
  return metrics


def make_eval_extractor(config: ml_collections.ConfigDict) -> features_lib.Extractor | None:
  """The feature network of rFD (loaded before anything is compiled), or None without 'rfd'."""
  if "rfd" not in eval_metrics(config):
    return None
  try:
    return features_lib.make_extractor(config.eval.extractor)
  except (ValueError, OSError) as err:
    raise ValueError(f"eval.extractor: {err}") from None


def learning_rate(config: ml_collections.ConfigDict) -> float:
  scale = config.train.batch_size if config.optim.scale_lr else 1
  return config.optim.base_learning_rate * scale


def make_optimizer(config: ml_collections.ConfigDict, *, with_gan: bool = True) -> optax.GradientTransformation:
  """Adam(β=(0.5, 0.9)) for the autoencoder and, separately, for the discriminator.

  The KL objective's log-variance is trained with the autoencoder only when `loss.learn_logvar`;
  the reference's optimizers never held it, so by default it stays at `loss.logvar_init`.
  `with_gan=False`: the optimizer of the steps before `loss.disc_start`, whose discriminator
  gradients are zero — the same state, with the discriminator's Adam only counting the step
  (`counts_only`).
  """
  lr = learning_rate(config)
  if config.optim.schedule == "cosine":
    lr = optax.cosine_decay_schedule(lr, config.train.num_steps)
  adam = lambda: optax.adam(lr, b1=config.optim.b1, b2=config.optim.b2)
  logvar = "autoencoder" if config.loss.learn_logvar else "frozen"
  labels = {"autoencoder": "autoencoder", "logvar": logvar, "discriminator": "discriminator"}
  return optax.multi_transform(
      {"autoencoder": adam(), "discriminator": adam() if with_gan else counts_only(adam()),
       "frozen": optax.set_to_zero()}, labels)


def counts_only(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` (same state) for gradients known to be zero: its step counts advance, the updates are
  the zero gradients, nothing else is computed. For Adam whose moments are zero — a discriminator
  before `loss.disc_start` — that is what Adam itself returns: the reference steps its
  discriminator's optimizer on a zero loss, so its step count runs from the start of training.
  Adam over the unused discriminator took ~40 % of the demo autoencoder's step (0.09 s)."""
  def update(updates, state, params=None):
    del params
    is_count = lambda path: bool(path) and getattr(path[-1], "name", None) == "count"
    return updates, jax.tree_util.tree_map_with_path(
        lambda path, x: optax.safe_increment(x) if is_count(path) else x, state)
  return optax.GradientTransformation(inner.init, update)


def make_discriminator(config: ml_collections.ConfigDict) -> NLayerDiscriminator:
  return NLayerDiscriminator(ndf=config.loss.disc_ndf, n_layers=config.loss.disc_num_layers,
                             norm=config.loss.disc_norm)


class Stage1:
  """The modules, optimizer and frozen LPIPS weights of one run, and the jitted functions over them."""

  def __init__(self, config: ml_collections.ConfigDict, mesh, extractor: features_lib.Extractor | None = None):
    self.config = config
    self.mesh = mesh
    self.scores = tuple(m for m in eval_metrics(config) if m != "rfd")  # per-image, in the eval step
    self.extractor = extractor  # rFD's, when asked for
    self._rfd_reference = None  # (μ, Σ) of the originals' features: the same images at every evaluation
    self.model = ae_lib.make_autoencoder(config_lib.with_train_overrides(config.model, config.train))
    self.disc = make_discriminator(config)
    self.optimizer = make_optimizer(config)
    self._optimizer_before_gan = make_optimizer(config, with_gan=False)
    # VGG16's weights only when a loss or score uses them (1.5 s to read).
    uses_lpips = config.loss.perceptual_weight > 0 or "lpips" in self.scores
    self.lpips_params = lpips_lib.load_lpips_params() if uses_lpips else None
    self.is_kl = config.model.kind == "kl"
    image_shape = (config.data.image_size, config.data.image_size, config.data.channels)
    self.dummy = jnp.zeros((1, *image_shape), jnp.float32)
    abstract = jax.eval_shape(self._init, jax.random.PRNGKey(0))
    self.state_sharding = sharding.state_sharding(mesh, abstract, **sharding.rules_of(config.mesh))
    self.abstract_state = ckpt_lib.abstract_like(abstract, self.state_sharding)
    batch_sh, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    jit_step = lambda with_gan: jax.jit(
        functools.partial(self._train_step, with_gan=with_gan),
        in_shardings=(self.state_sharding, batch_sh), out_shardings=(self.state_sharding, rep),
        donate_argnums=0)
    self.train_step = {False: jit_step(False), True: jit_step(True)}
    self.init = jax.jit(self._init, out_shardings=self.state_sharding)
    # Scores and code counts replicated, so that every process can read them.
    self.eval_step = jax.jit(self._eval_step, in_shardings=(self.state_sharding.params, batch_sh),
                             out_shardings=(rep, batch_sh, rep))

  # ---- state ----------------------------------------------------------------------------------
  def _init(self, rng) -> AutoencoderState:
    ae_rng, disc_rng, rng = jax.random.split(rng, 3)
    ae_params = self.model.init(ae_rng, self.dummy, method=self.model.init_all)["params"]
    params = {"autoencoder": ae_params,
              "logvar": jnp.asarray(self.config.loss.logvar_init, jnp.float32),
              "discriminator": self.disc.init(disc_rng, self.dummy)["params"]}
    return AutoencoderState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=self.optimizer.init(params), rng=rng)

  # ---- losses ---------------------------------------------------------------------------------
  def _discriminate(self, disc_params, images):
    """Patch logits [B, h, w, 1]. Real and fake batches go in separate calls, as in taming:
    with batch normalisation each is normalised by its own statistics."""
    return self.disc.apply({"params": disc_params}, images)

  def _reconstruct(self, ae_params, x, rng):
    """(x_rec, regulariser, extras): KL of the sampled posterior, or the VQ codebook loss.

    The training pass, the only one with dropout (`model.dropout`): `reconstruct` and stage 2's
    encode and decode are deterministic.
    """
    mode = dict(deterministic=True)
    if self.config.model.dropout > 0:  # split only then: runs without dropout keep their posterior samples
      rng, dropout_rng = jax.random.split(rng)
      mode = dict(deterministic=False, rngs={"dropout": dropout_rng})
    apply = functools.partial(self.model.apply, {"params": ae_params}, **mode)
    if self.is_kl:
      posterior = apply(x, method=self.model.encode)
      x_rec = apply(posterior.sample(rng), method=self.model.decode)
      return x_rec, jnp.mean(posterior.kl()), {}
    x_rec, qloss, info = apply(x)
    return x_rec, qloss, {"perplexity": info["perplexity"], "codebook_usage": info["usage"]}

  def _generator_objectives(self, gen_params, disc_params, x, rng, with_gan):
    """(nll, regulariser, generator loss) and auxiliaries, as functions of the generator params."""
    cfg = self.config.loss
    x_rec, reg, extras = self._reconstruct(gen_params["autoencoder"], x, rng)
    p_loss = (lpips_lib.lpips(self.lpips_params, x, x_rec) if cfg.perceptual_weight > 0
              else jnp.zeros(x.shape[:1]))
    if self.is_kl:
      nll, rec = losses.kl_nll_loss(x, x_rec, gen_params["logvar"], p_loss, cfg.perceptual_weight,
                                    cfg.pixel_loss)
    else:
      nll = rec = losses.vq_nll_loss(x, x_rec, p_loss, cfg.perceptual_weight, cfg.pixel_loss)  # the mean rec loss
    g_loss = jnp.zeros(())
    if with_gan:
      g_loss = losses.generator_loss(self._discriminate(disc_params, x_rec), cfg.disc_loss)
    aux = dict(x_rec=x_rec, rec_loss=rec, p_loss=jnp.mean(p_loss), **extras)
    return (nll, reg, g_loss), aux

  def _grads(self, params, batch, rng, *, with_gan: bool):
    """(gradients of every parameter, metrics) on one (micro-)batch."""
    cfg = self.config.loss
    x = batch["image"]
    gen_params = {"autoencoder": params["autoencoder"], "logvar": params["logvar"]}
    objectives = functools.partial(self._generator_objectives, disc_params=params["discriminator"],
                                   x=x, rng=rng, with_gan=with_gan)
    (nll, reg, g_loss), pullback, aux = jax.vjp(objectives, gen_params, has_aux=True)
    reg_weight = cfg.kl_weight if self.is_kl else cfg.codebook_weight
    one = jnp.ones((), nll.dtype)
    (grads,) = pullback((one, reg_weight * one, 0 * one))
    metrics = dict(nll_loss=nll, rec_loss=aux["rec_loss"], p_loss=aux["p_loss"],
                   **{("kl_loss" if self.is_kl else "codebook_loss"): reg},
                   **{k: aux[k] for k in ("perplexity", "codebook_usage") if k in aux})
    loss = nll + reg_weight * reg
    disc_grads = jax.tree.map(jnp.zeros_like, params["discriminator"])
    if with_gan:
      (g_grads,) = pullback((0 * one, 0 * one, one))
      last = lambda tree: tree[LAST_LAYER[0]][LAST_LAYER[1]][LAST_LAYER[2]][LAST_LAYER[3]]
      d_weight = losses.adaptive_weight(last(grads), last(g_grads), cfg.disc_weight) * cfg.disc_factor
      grads = jax.tree.map(lambda a, b: a + d_weight * b, grads, g_grads)
      loss = loss + d_weight * g_loss

      def disc_objective(disc_params):
        real = self._discriminate(disc_params, x)
        fake = self._discriminate(disc_params, jax.lax.stop_gradient(aux["x_rec"]))
        d_loss = cfg.disc_factor * losses.discriminator_loss(real, fake, cfg.disc_loss)
        return d_loss, (jnp.mean(real), jnp.mean(fake))

      (d_loss, (real, fake)), disc_grads = jax.value_and_grad(
          disc_objective, has_aux=True)(params["discriminator"])
      metrics.update(g_loss=g_loss, d_weight=d_weight, d_loss=d_loss, logits_real=real, logits_fake=fake)
    metrics.update(loss=loss)
    return {**grads, "discriminator": disc_grads}, metrics

  def _train_step(self, state: AutoencoderState, batch, *, with_gan: bool):
    rng, step_rng = jax.random.split(state.rng)
    params = state.params
    grads, metrics = loop.accumulate_gradients(
        functools.partial(self._grads, with_gan=with_gan), params, batch, step_rng,
        self.config.train.grad_accum_steps, mesh=self.mesh, grad_sharding=self.state_sharding.params)
    optimizer = self.optimizer if with_gan else self._optimizer_before_gan
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    ok = loop.all_finite(metrics["loss"], grads, updates)
    new_params, opt_state = loop.keep_if(ok, (optax.apply_updates(params, updates), opt_state),
                                         (params, state.opt_state))
    new_state = state.replace(step=state.step + 1, params=new_params, opt_state=opt_state, rng=rng)
    metrics.update(logvar=params["logvar"], **{loop.NONFINITE: 1.0 - ok.astype(jnp.float32)})
    return new_state, metrics

  # ---- evaluation -----------------------------------------------------------------------------
  def reconstruct(self, ae_params, x):
    """Deterministic reconstruction: the posterior mode (KL) or the quantized code (VQ)."""
    if self.is_kl:
      posterior = self.model.apply({"params": ae_params}, x, method=self.model.encode)
      return self.model.apply({"params": ae_params}, posterior.mode(), method=self.model.decode), None
    x_rec, _, info = self.model.apply({"params": ae_params}, x)
    return x_rec, info["indices"]

  def _eval_step(self, params, batch):
    """Per-image scores [B] of `eval.metrics` (PSNR/SSIM/LPIPS), the reconstructions, and a
    codebook histogram for VQ."""
    x = batch["image"]
    x_rec, indices = self.reconstruct(params["autoencoder"], x)
    x_rec = jnp.clip(x_rec, -1.0, 1.0)
    score_fns = dict(psnr=lambda: metrics_lib.psnr(x, x_rec), ssim=lambda: metrics_lib.ssim(x, x_rec),
                     lpips=lambda: lpips_lib.lpips(self.lpips_params, x, x_rec))
    scores = {key: score_fns[key]() for key in self.scores}
    counts = (jnp.bincount(indices.reshape(-1), length=self.config.model.n_embed)
              if indices is not None else jnp.zeros((1,), jnp.int32))
    return scores, x_rec, counts

  def evaluate(self, params, *, num_batches: int):
    """Means of the `eval.metrics` over the first `num_batches` held-out batches, and a grid."""
    cfg = self.config
    loader = data_lib.make_loader(cfg.data, cfg.data.eval_split, batch_size=cfg.train.batch_size,
                                  seed=0, shuffle=False, num_epochs=1)
    totals, count, grid, codes = {key: 0.0 for key in self.scores}, 0, None, 0
    originals, reconstructions = [], []
    for i, batch in zip(range(num_batches), loader):
      scores, x_rec, counts = self.eval_step(params, sharding.shard_batch(batch, self.mesh))
      for key, value in jax.device_get(scores).items():
        totals[key] += float(np.sum(value))
      count += x_rec.shape[0]
      codes = codes + np.asarray(jax.device_get(counts))
      if self.extractor is not None:
        originals.append(to_uint8(multihost_utils.process_allgather(batch["image"], tiled=True)))
        reconstructions.append(to_uint8(multihost_utils.process_allgather(x_rec, tiled=True)))
      if i == 0:
        n = min(8, len(batch["image"]))
        x_rec = np.asarray(jax.device_get(x_rec))[:n] if jax.process_count() == 1 else None
        if x_rec is not None:
          grid = image_grid(np.concatenate([batch["image"][:n], x_rec]), num_cols=n)
    if count == 0:
      raise ValueError(f"data.eval_split: '{cfg.data.eval_split}' gave no full batch of "
                       f"train.batch_size={cfg.train.batch_size} images to evaluate on.")
    results = {f"eval/{key}": value / count for key, value in totals.items()}
    if self.extractor is not None:
      results[f"eval/{self.extractor.metric_name('rfd')}"] = self._rfd(np.concatenate(originals),
                                                                      np.concatenate(reconstructions))
    if not self.is_kl:
      results["eval/codebook_usage"] = float(np.mean(codes > 0))
    return results, grid

  def _rfd(self, originals: np.ndarray, reconstructions: np.ndarray) -> float:
    """Fréchet distance between the features of uint8 reconstructions and of their originals."""
    def stats(images):
      features = features_lib.extract(self.extractor, images, mesh=self.mesh, batch_size=self.config.train.batch_size,
                                      progress=False)["features"]
      return distribution.gaussian_stats(features)
    if self._rfd_reference is None:
      self._rfd_reference = stats(originals)
    return distribution.frechet_distance(*stats(reconstructions), *self._rfd_reference)


# Keys a resumed run must share with its checkpoints (`config.check_resume`).
RESUME_KEYS = ("model.", "loss.disc_num_layers", "loss.disc_ndf", "loss.disc_norm", "loss.learn_logvar")


def _write_identity_run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """model.kind='identity' has nothing to train: the run is its config and an empty step-0
  checkpoint, which stage 2 (`autoencoder.workdir`) reads like any other stage-1 run."""
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
  if checkpointer.latest_step() is None:
    checkpointer.save(0, {"step": np.zeros((), np.int32), "params": {"autoencoder": {}}}, force=True)
  checkpointer.close()
  if jax.process_index() == 0:
    config_lib.save_config(config, workdir)
  logging.info("Stage 1 (identity): nothing to train; %s is a pixel-space first stage (f = 1, %d channels).",
               workdir, config.model.in_channels)
  return {}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) a stage-1 run in `workdir`; returns the final held-out metrics (empty
  when a SIGTERM stopped the run early, after saving its current step).

  Every input is checked before anything is written to `workdir`; `config.json` is written once
  the first step under this config has run."""
  validate_config(config)
  config_lib.check_resume(config, workdir, "autoencoder", RESUME_KEYS)
  if config.model.kind == "identity":
    return _write_identity_run(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.train.batch_size, mesh, grad_accum_steps=config.train.grad_accum_steps)
  train_iter = iter(data_lib.make_loader(config.data, config.data.train_split,
                                         batch_size=config.train.batch_size, seed=config.train.seed))
  extractor = make_eval_extractor(config)
  stage = Stage1(config, mesh, extractor)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                       max_to_keep=config.train.max_checkpoints)
  state = checkpointer.restore_or_close(stage.abstract_state, train_iter)
  if state is None:
    state = stage.init(jax.random.PRNGKey(config.train.seed))
  start_step = int(jax.device_get(state.step))
  writer = MetricWriter(workdir)
  num_steps = config.train.num_steps
  logging.info("Stage 1 (%s): steps %d → %d, %s params", config.model.kind, start_step, num_steps,
               f"{sum(x.size for x in jax.tree.leaves(state.params['autoencoder'])):,}")

  pending, t0, results, inputs = [], time.perf_counter(), {}, loop.InputMonitor()
  monitor = loop.NonFiniteMonitor(config.train.max_nonfinite_steps)
  progress = tqdm(total=num_steps, initial=start_step, desc="stage 1", disable=jax.process_index() != 0)
  with loop.running(progress, checkpointer, writer) as preemption:
    for step in range(start_step + 1, num_steps + 1):
      batch = sharding.shard_batch(inputs.next(train_iter), mesh)
      with_gan = config.loss.disc_weight > 0 and step > config.loss.disc_start
      state, metrics = stage.train_step[with_gan](state, batch)
      loop.save_config_once(config, workdir, step, start_step)
      pending.append(metrics)
      monitor.push(step, metrics)
      if loop.due(step, config.train.log_every, num_steps):
        loop.write_train_scalars(writer, progress, step, pending, config.train.batch_size, time.perf_counter() - t0,
                                 inputs)
        pending, t0 = [], time.perf_counter()
      if loop.due(step, config.train.eval_every, num_steps):
        results, grid = stage.evaluate(state.params, num_batches=config.train.eval_batches)
        loop.write_eval_scalars(writer, step, results)
        if grid is not None and loop.due(step, config.train.image_every, num_steps):
          writer.write_image(step, "reconstructions", grid)
        t0 = time.perf_counter()
        inputs.restart()
      progress.update(1)
      if loop.checkpoint_or_stop(checkpointer, preemption, step, state, train_iter,
                                 config.train.checkpoint_every, num_steps):
        return {}
    monitor.flush()
  return results
