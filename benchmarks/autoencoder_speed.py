"""Stage-1 speed: training steps/s and images/s of an autoencoder config, and encode/decode images/s.

  .venv/bin/python benchmarks/autoencoder_speed.py                       # kl_f8, 256 px, batch 4
  .venv/bin/python benchmarks/autoencoder_speed.py --config configs/autoencoder/vq_f4.py --batch_size 2

The train step is the real one (L1 + LPIPS + KL, and the PatchGAN branch with the adaptive weight
unless --no_gan), on random images; compile time is reported apart from the timed steps.
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ldm_jax.config import common as config_lib  # noqa: E402
from ldm_jax.runtime import sharding  # noqa: E402
from ldm_jax.train import autoencoder  # noqa: E402

_CONFIG = flags.DEFINE_string("config", "configs/autoencoder/kl_f8.py", "Autoencoder config file.")
_BATCH = flags.DEFINE_integer("batch_size", 4, "Global batch size.")
_SIZE = flags.DEFINE_integer("image_size", 256, "Image size in pixels.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after one compile step).")
_NO_GAN = flags.DEFINE_bool("no_gan", False, "Time the step before disc_start (no discriminator).")


def timed(fn, *args, repeats):
  """(seconds of the first call incl. compile, mean seconds of the next `repeats` calls)."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = jax.block_until_ready(fn(*args))
  return first, (time.perf_counter() - t0) / repeats, out


def main(argv):
  del argv
  config = config_lib.from_file(_CONFIG.value)
  config.data.update(source="shapes", image_size=_SIZE.value)
  config.train.batch_size = _BATCH.value
  mesh = sharding.make_mesh(config.mesh)
  stage = autoencoder.Stage1(config, mesh)
  state = stage.init(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (_BATCH.value, _SIZE.value, _SIZE.value, config.data.channels)).astype(np.float32)
  batch = sharding.shard_batch({"image": images}, mesh)
  step = stage.train_step[not _NO_GAN.value]

  t0 = time.perf_counter()
  state, _ = jax.block_until_ready(step(state, batch))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(_STEPS.value):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  step_s = (time.perf_counter() - t0) / _STEPS.value

  params = state.params["autoencoder"]
  x = jnp.asarray(images)
  encode = jax.jit(lambda p, x: stage.model.apply({"params": p}, x, method=stage.model.encode))
  decode = jax.jit(lambda p, z: stage.model.apply({"params": p}, z, method=stage.model.decode))
  enc_first, enc_s, latent = timed(encode, params, x, repeats=_STEPS.value)
  z = latent.mode() if hasattr(latent, "mode") else latent
  dec_first, dec_s, _ = timed(decode, params, z, repeats=_STEPS.value)

  n = _BATCH.value
  print(f"config {_CONFIG.value} ({config.model.kind}, f={2 ** (len(config.model.ch_mult) - 1)}), "
        f"{_SIZE.value} px, batch {n}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
        f"GAN {'off' if _NO_GAN.value else 'on'}")
  print(f"train step: {1 / step_s:.3f} steps/s, {n / step_s:.2f} images/s (compile + first step {compile_s:.1f} s)")
  print(f"encode:     {n / enc_s:.2f} images/s (compile + first {enc_first:.1f} s)")
  print(f"decode:     {n / dec_s:.2f} images/s (compile + first {dec_first:.1f} s)")


if __name__ == "__main__":
  app.run(main)
