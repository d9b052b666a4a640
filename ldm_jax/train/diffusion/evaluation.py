"""Periodic evaluation of a stage-2 run: `eval.*` checks, the feature extractor, and `SampleEvaluator`.

Every `train.eval_every` steps `SampleEvaluator` draws `eval.num_samples` guided samples with the
EMA weights and the `sample.*` sampler — conditioned on the labels or captions of the first
records of `data.eval_split` — and compares them under `eval.extractor` with the reference
statistics of the first `eval.num_ref` images of that split (`ldm_jax.eval`, cached in
`eval.cache_dir`). Scores are named `eval/<metric>_<extractor>` (e.g. `eval/fd_vgg16_64px`); with a
`classifier:RUN` extractor a class-conditional model also gets `eval/class_accuracy`.
"""

from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np

from ldm_jax import data as data_lib
from ldm_jax.config import diffusion as diffusion_config
from ldm_jax.diffusion.latent_diffusion import LatentDiffusion
from ldm_jax.eval import evaluate as eval_lib
from ldm_jax.eval import features as features_lib
from ldm_jax.eval import stats as stats_lib
from ldm_jax.runtime import sharding
from ldm_jax.runtime.images import to_uint8

IS_SPLITS = 10  # Inception Score splits of the periodic evaluation (evaluate_samples' default)
# What the sample evaluation's conditions can come from: labels or captions of the eval split.
EVAL_COND_KINDS = ("none", "class", "text")


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
                             guidance_scale=s.guidance_scale, guidance_interval=diffusion_config.guidance_interval(s),
                             ae_params=ae_params)
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
      cond = {k: sharding.put(np.asarray(v)[rows], batch_sh) for k, v in self.cond.items()}
      out = self._generate(params, ae_params, cond, sharding.put(index, batch_sh), key, np.int32(b))
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
