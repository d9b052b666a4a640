"""Stage-2 training speed: one jitted U-Net step (loss, gradient, AdamW update, EMA) of a config.

  .venv/bin/python benchmarks/unet_train_step.py                    # SD 1.x U-Net, batch 1, 32×32×4 latents
  .venv/bin/python benchmarks/unet_train_step.py --config configs/ldm/fmnist_class_cond.py \
      --latent_size 8 --batch_size 64
  .venv/bin/python benchmarks/unet_train_step.py --config configs/ldm/cin256_ldm_vq4.py \
      --latent_size 64 --latent_channels 3 --batch_size 8 --dtype bfloat16 --remat

The step is the trainer's own (`ldm_jax.train.diffusion.step.make_train_step`) on cached latents — random posterior
moments of `--latent_size`² × `--latent_channels` (no autoencoder runs) — with the config's
conditioner, on all current devices (`mesh.*` of the config). A text conditioner trains with the
U-Net; `--text_depth` (default 1) shrinks it so that the U-Net dominates the step, as in
`memory_training.py`. Reported: compile time (lower + compile), then steps/s and images/s over
`--steps` steps after one warm-up step, and the step's FLOPs from XLA's `cost_analysis()` of
the compiled program divided by the measured step time. XLA counts a convolution's or matmul's
multiply-adds as 2 FLOPs and does not count what it fuses away; treat GFLOP/s as the
compiler's accounting, comparable between runs on one backend.
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ldm_jax import load  # noqa: E402
from ldm_jax.config import autoencoder as ae_defaults  # noqa: E402
from ldm_jax.config import common as config_lib  # noqa: E402
from ldm_jax.models import autoencoder as ae_lib  # noqa: E402
from ldm_jax.models import conditioning  # noqa: E402
from ldm_jax.runtime import sharding  # noqa: E402
from ldm_jax.train.diffusion import setup, state as state_lib, step as step_lib  # noqa: E402

_CONFIG = flags.DEFINE_string("config", "configs/ldm/sd_v1.py", "Stage-2 config file (path[:arg]).")
_BATCH = flags.DEFINE_integer("batch_size", 1, "Global batch size.")
_LATENT = flags.DEFINE_integer("latent_size", 32, "Latent side h = w (SD at 512 px and the f4 models: 64).")
_CHANNELS = flags.DEFINE_integer("latent_channels", 4, "Latent channels (KL-f8: 4, VQ-f4: 3).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "train.dtype (compute dtype).")
_REMAT = flags.DEFINE_bool("remat", False, "train.remat: recompute U-Net blocks in the backward pass.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps after the warm-up step.")
_WIDTH = flags.DEFINE_integer("model_channels", 0, "Override model.model_channels (0: the config's).")
_TEXT_DEPTH = flags.DEFINE_integer("text_depth", 1, "Blocks of a text conditioner (0: the config's).")
_CHUNK = flags.DEFINE_integer("query_chunk_size", 0, "model.query_chunk_size (0: the config's).")


class _Tokenizer:
  """Token ids of the right shape; the values do not change the cost of the step."""
  pad_id = 0

  def __init__(self, vocab_size, max_length):
    self.vocab_size, self.max_length = vocab_size, max_length

  def tokenize(self, texts):
    return np.ones((len(texts), self.max_length), np.int32)


def build(config):
  """(jitted train step, state, batch) for the config with the flags applied; nothing is read from disk."""
  # A stand-in stage-1 config whose latents have the requested shape (only shapes are used).
  ae_config = ae_defaults.default_config()
  ae_config.model.update(embed_dim=_CHANNELS.value, z_channels=_CHANNELS.value)
  image_size = _LATENT.value * ae_lib.downsampling_factor(ae_config.model)
  ae_config.data.image_size = image_size
  config.data.update(source="shapes", path="", image_size=image_size, channels=ae_config.data.channels)
  config.latent.update(cache=True, scale_factor=1.0)
  config.train.update(batch_size=_BATCH.value, dtype=_DTYPE.value, remat=_REMAT.value, grad_accum_steps=1)
  if config.cond.kind in ("concat", "hybrid"):
    raise app.UsageError(f"--config: cond.kind={config.cond.kind!r} needs images at every step; "
                         "this benchmark times steps on cached latents.")
  if config.cond.kind == "text":
    config.cond.tokenizer_dir = ""
    if _TEXT_DEPTH.value:
      config.cond.depth = _TEXT_DEPTH.value
  if _WIDTH.value:
    config.model.model_channels = _WIDTH.value
  if _CHUNK.value:
    config.model.query_chunk_size = _CHUNK.value
  setup.resolve_config(config, ae_config)

  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.train.batch_size, mesh)
  tokenizer = _Tokenizer(config.cond.vocab_size, config.cond.max_length) \
      if config.cond.kind == "text" else None
  ldm = load.build_ldm(config, ae_lib.make_autoencoder(ae_config.model), ae_config, tokenizer, 1.0,
                       for_training=True)
  b = config.train.batch_size
  cond = conditioning.prepare_condition(config.cond, {"label": np.arange(b) % max(config.cond.num_classes, 1),
                                                      "caption": np.array(["a photograph"] * b)}, tokenizer)
  optimizer = state_lib.make_optimizer(config)
  builder = state_lib.StateBuilder(config, mesh, ldm.unet, ldm.conditioner, ldm.latent_shape,
                                   {k: v[:1] for k, v in cond.items()}, optimizer)
  state = builder.init(jax.random.PRNGKey(0), jnp.float32(1.0))
  train_step = step_lib.make_train_step(config, mesh, ldm, optimizer, builder.state_sharding, {})
  rng = np.random.default_rng(0)
  h = _LATENT.value
  moments = np.concatenate([rng.standard_normal((b, h, h, _CHANNELS.value)),
                            np.full((b, h, h, _CHANNELS.value), -4.0)], axis=-1).astype(np.float32)
  batch = sharding.shard_batch({"latent_moments": moments, **{f"cond/{k}": v for k, v in cond.items()}}, mesh)
  return train_step, state, batch


def main(argv):
  del argv
  config = config_lib.from_file(_CONFIG.value)
  train_step, state, batch = build(config)
  n_unet = sum(x.size for x in jax.tree.leaves(state.params["unet"]))
  n_cond = sum(x.size for x in jax.tree.leaves(state.params["cond"]))

  t0 = time.perf_counter()
  compiled = train_step.lower(state, batch, {}).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # older jax: one dict per program
  flops = float(cost.get("flops", 0.0)) if cost else 0.0

  state, metrics = compiled(state, batch, {})  # warm-up
  jax.block_until_ready(metrics)
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    state, metrics = compiled(state, batch, {})
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - t0) / _STEPS.value
  if not np.isfinite(float(metrics["loss"])):
    raise RuntimeError(f"non-finite loss {float(metrics['loss'])}: the timed step is not a valid one.")

  m = config.model
  print(f"{_CONFIG.value}: U-Net {n_unet / 1e6:.1f} M params ({m.model_channels} × {tuple(m.channel_mult)}), "
        f"conditioner {n_cond / 1e6:.1f} M ({config.cond.kind}); {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s), load average {os.getloadavg()[0]:.1f}")
  print("| batch | latent | dtype | remat | compile s | s/step | steps/s | images/s | GFLOP/step | GFLOP/s |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  print(f"| {_BATCH.value} | {_LATENT.value}×{_LATENT.value}×{_CHANNELS.value} | {_DTYPE.value} | "
        f"{'yes' if _REMAT.value else 'no'} | {compile_s:.1f} | {step_s:.3f} | {1 / step_s:.3f} | "
        f"{_BATCH.value / step_s:.2f} | {flops / 1e9:.1f} | {flops / 1e9 / step_s:.1f} |")


if __name__ == "__main__":
  app.run(main)
