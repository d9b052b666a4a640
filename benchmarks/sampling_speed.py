"""Sampling speed: DDIM with classifier-free guidance, an SD-shaped small U-Net and the KL-f8 decoder.

  .venv/bin/python benchmarks/sampling_speed.py                     # DDIM-50, 8 images of 256 px
  .venv/bin/python benchmarks/sampling_speed.py --steps 20 --loop_steps 5 --num_images 4

The U-Net has Stable Diffusion's layout at a smaller width (model_channels 128, channel_mult
(1, 2, 4, 4), attention at ds 4/2/1, cross-attention on a 77×768 context); the decoder is
`configs/autoencoder/kl_f8.py`'s. Weights and context are random: speed does not depend on them.
Guidance runs the conditional and unconditional passes as one batch of 2N.

Reported, for the same trajectory:
  scan: `samplers.ddim` (one `lax.scan`) + decoding as one jitted function — compile time apart,
        then images/s of the compiled function (the path of sample.py);
  loop: a Python loop over one jitted step (the same guided model call + the DDIM update), then
        the jitted decoder; per-step time and the ratio loop / scan. `--loop_steps` < `--steps`
        times fewer loop steps and extrapolates (the steps cost the same).
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ldm_jax.diffusion import samplers, schedule as schedule_lib  # noqa: E402
from ldm_jax.models import autoencoder as ae_lib  # noqa: E402
from ldm_jax.models import unet as unet_lib  # noqa: E402
from ldm_jax.config import common as config_lib  # noqa: E402

_NUM = flags.DEFINE_integer("num_images", 8, "Images per call.")
_SIZE = flags.DEFINE_integer("image_size", 256, "Image side in pixels (latents are side/8).")
_STEPS = flags.DEFINE_integer("steps", 50, "DDIM steps.")
_LOOP_STEPS = flags.DEFINE_integer("loop_steps", None, "Steps timed in the Python loop (default: --steps).")
_SCALE = flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance scale.")
_CHANNELS = flags.DEFINE_integer("model_channels", 128, "U-Net width (SD: 320).")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed runs of the compiled scan function.")


def build(rng):
  """(unet, unet params, decode_fn, decoder params, cond context, uncond context)."""
  unet = unet_lib.UNet(in_channels=4, out_channels=4, model_channels=_CHANNELS.value, channel_mult=(1, 2, 4, 4),
                       num_res_blocks=2, attention_resolutions=(4, 2, 1), num_heads=8, context_dim=768)
  ae_config = config_lib.from_file(os.path.join(os.path.dirname(__file__), "..", "configs/autoencoder/kl_f8.py"))
  ae = ae_lib.make_autoencoder(ae_config.model)
  h = _SIZE.value // ae_lib.downsampling_factor(ae_config.model)
  k_unet, k_ae, k_ctx = jax.random.split(rng, 3)
  context = jax.random.normal(k_ctx, (2, 1, 77, 768))
  unet_params = jax.jit(unet.init)(k_unet, jnp.zeros((1, h, h, 4)), jnp.zeros((1,), jnp.int32),
                                   context=context[0])["params"]
  # Only the decoder half is initialized (and timed): sampling never encodes.
  ae_params = jax.jit(lambda k: ae.init(k, jnp.zeros((1, h, h, 4)), method=ae.decode))(k_ae)["params"]
  decode = lambda p, z: jnp.clip(ae.apply({"params": p}, z / 0.18215, method=ae.decode), -1, 1)
  n = _NUM.value
  cond, uncond = (jnp.broadcast_to(c, (n, 77, 768)) for c in context)
  return unet, unet_params, decode, ae_params, cond, uncond, h


def main(argv):
  del argv
  n, steps = _NUM.value, _STEPS.value
  loop_steps = _LOOP_STEPS.value or steps
  unet, unet_params, decode, ae_params, cond, uncond, h = build(jax.random.key(0))
  sched = schedule_lib.make_schedule("scaled_linear", 1000, 0.00085, 0.012)
  x_T = jax.random.normal(jax.random.key(1), (n, h, h, 4))
  print(f"{n} images of {_SIZE.value} px ({h}×{h}×4 latents), DDIM-{steps}, guidance {_SCALE.value} "
        f"(U-Net batch {2 * n}); U-Net {sum(x.size for x in jax.tree.leaves(unet_params)) / 1e6:.1f} M params, "
        f"decoder {sum(x.size for x in jax.tree.leaves(ae_params)) / 1e6:.1f} M; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s), load average {os.getloadavg()[0]:.1f}")

  def guided(params, c, u):
    apply_fn = lambda x, t, ctx: unet.apply({"params": params}, x, t, context=ctx)
    return samplers.cfg_model_fn(apply_fn, c, u, _SCALE.value, share_input=True)

  # --- scan: the whole trajectory and the decoder in one compiled function --------------------
  def generate(params, ae_params, c, u, x):
    z = samplers.ddim(guided(params, c, u), sched, x, num_steps=steps)
    return decode(ae_params, z)

  t0 = time.perf_counter()
  compiled = jax.jit(generate).lower(unet_params, ae_params, cond, uncond, x_T).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(unet_params, ae_params, cond, uncond, x_T))  # warm-up run
  t0 = time.perf_counter()
  for _ in range(_REPEATS.value):
    scan_images = jax.block_until_ready(compiled(unet_params, ae_params, cond, uncond, x_T))
  scan_s = (time.perf_counter() - t0) / _REPEATS.value

  # --- loop: one jitted step per Python iteration, then the jitted decoder ---------------------
  ts = samplers.make_timesteps(1000, steps)
  ab = np.asarray(sched.alphas_cumprod, np.float64)
  ab_prev = np.concatenate([ab[ts[1:]], ab[:1]])

  @jax.jit
  def step(params, c, u, x, t, ab_t, ab_p):
    eps = guided(params, c, u)(x, jnp.full((x.shape[0],), t, jnp.int32))
    x0 = (x - jnp.sqrt(1 - ab_t) * eps) / jnp.sqrt(ab_t)
    return jnp.sqrt(ab_p) * x0 + jnp.sqrt(1 - ab_p) * eps

  decode_jit = jax.jit(decode)
  args = lambda i: (np.int32(ts[i]), np.float32(ab[ts[i]]), np.float32(ab_prev[i]))
  t0 = time.perf_counter()
  jax.block_until_ready(step(unet_params, cond, uncond, x_T, *args(0)))
  jax.block_until_ready(decode_jit(ae_params, x_T))
  loop_compile_s = time.perf_counter() - t0
  x = x_T
  t0 = time.perf_counter()
  for i in range(loop_steps):
    x = step(unet_params, cond, uncond, x, *args(i))
  jax.block_until_ready(x)
  loop_step_s = (time.perf_counter() - t0) / loop_steps
  if loop_steps == steps:
    t0 = time.perf_counter()
    loop_images = jax.block_until_ready(decode_jit(ae_params, x))
    decode_s = time.perf_counter() - t0
    difference = float(jnp.abs(loop_images - scan_images).max())
  else:
    t0 = time.perf_counter()
    jax.block_until_ready(decode_jit(ae_params, x))
    decode_s = time.perf_counter() - t0
    difference = None
  loop_s = loop_step_s * steps + decode_s

  print(f"scan: compile {compile_s:.1f} s; run {scan_s:.2f} s → {n / scan_s:.3f} images/s "
        f"({(scan_s - decode_s) / steps * 1e3:.0f} ms per step excluding the decoder's {decode_s:.2f} s)")
  print(f"loop: compile {loop_compile_s:.1f} s (step + decoder, incl. one run); {loop_step_s * 1e3:.0f} ms per step "
        f"over {loop_steps} steps → {n / loop_s:.3f} images/s{'' if loop_steps == steps else ' (extrapolated)'}")
  print(f"ratio loop / scan: {loop_s / scan_s:.3f}× the time"
        + ("" if difference is None else f"; max |image difference| {difference:.2e}"))


if __name__ == "__main__":
  app.run(main)
