"""ldm_jax vs diffusers (PyTorch), side by side on the same weights and the same CPU.

  .venv/bin/python benchmarks/vs_diffusers.py                      # small SD-shaped U-Net, 8 images
  .venv/bin/python benchmarks/vs_diffusers.py --channels 64,128,256,256 --steps 20

A random diffusers `UNet2DConditionModel` with Stable Diffusion's block layout (three
cross-attention levels and a plain one, two ResnetBlocks per level, a 77-token context) is saved
and imported with `ldm_jax.convert.load_pretrained`, then both run:

  unet forward   one call on `batch` latents (32×32×4 by default) with their contexts
  ddim+cfg       `steps` DDIM steps with classifier-free guidance (2×batch per network call), as
                 StableDiffusionPipeline's denoising loop: diffusers' DDIMScheduler loop vs
                 ldm_jax's one jit-compiled `lax.scan` (`samplers.ddim` + `cfg_model_fn`)
  train step     ε-prediction MSE + AdamW on `batch` latents (forward, backward, update)

JAX times exclude compilation, which is reported apart; every figure is the mean of `--repeats`
runs after a warm-up (DDIM: one run). The outputs are checked to agree before anything is timed.
Both frameworks use every core: run it on an idle machine. The defaults peak at about 8 GB of
memory (two frameworks' activations for the training step); `--parts` runs a subset.
"""

import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ldm_jax.convert import load_pretrained  # noqa: E402
from ldm_jax.diffusion import samplers  # noqa: E402
from ldm_jax.diffusion.schedule import make_schedule, q_sample  # noqa: E402

_CHANNELS = flags.DEFINE_list("channels", ["32", "64", "128", "128"], "block_out_channels of the U-Net.")
_CONTEXT = flags.DEFINE_integer("context_dim", 128, "Width of the cross-attention context (77 tokens).")
_BATCH = flags.DEFINE_integer("batch", 8, "Images (latents) per batch.")
_LATENT = flags.DEFINE_integer("latent_size", 32, "Latent side (32 = 256 px images with an f=8 autoencoder).")
_STEPS = flags.DEFINE_integer("steps", 50, "DDIM steps.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance scale.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions of each measurement (after a warm-up).")
_PARTS = flags.DEFINE_list("parts", ["forward", "ddim", "train"], "Measurements to run (one at a time needs less memory).")


def _timed(fn, repeats):
  fn()  # warm-up (and compilation, for jitted functions)
  t0 = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - t0) / repeats


def _compile_time(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def main(argv):
  del argv
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  channels = tuple(int(c) for c in _CHANNELS.value)
  n = len(channels)
  unet = diffusers.UNet2DConditionModel(
      sample_size=_LATENT.value, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=2,
      down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
      cross_attention_dim=_CONTEXT.value, attention_head_dim=8).eval()
  folder = tempfile.mkdtemp(prefix="vs_diffusers_")
  unet.save_pretrained(folder)
  modules, params, _ = load_pretrained(folder)
  model, unet_params = modules["unet"], jax.device_put(params["unet"])
  schedule = make_schedule("scaled_linear")

  b, size = _BATCH.value, _LATENT.value
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, size, size, 4)).astype(np.float32)
  context = rng.normal(size=(b, 77, _CONTEXT.value)).astype(np.float32)
  uncond = rng.normal(size=(1, 77, _CONTEXT.value)).astype(np.float32)
  t = np.full((b,), 500, np.int32)
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  context_torch, uncond_torch = torch.from_numpy(context), torch.from_numpy(uncond)
  print(f"U-Net {channels}, {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M params; batch {b} × "
        f"{size}×{size}×4 latents; torch {torch.__version__} ({torch.get_num_threads()} threads), jax "
        f"{jax.__version__} ({jax.devices()[0].platform})")
  print(_HEADER, flush=True)
  results = []

  if "forward" in _PARTS.value:
    results.append(_forward(model, unet_params, unet, x, x_torch, t, context, context_torch))
  if "ddim" in _PARTS.value:
    results.append(_ddim(model, unet_params, unet, schedule, x, x_torch, context, uncond, context_torch, uncond_torch))
  if "train" in _PARTS.value:
    results.append(_train(model, unet_params, unet, schedule, x, x_torch, context, context_torch, rng))
  print(f"\n{_HEADER}")
  for row in results:
    _report(row)


def _forward(model, unet_params, unet, x, x_torch, t, context, context_torch):
  import torch  # pylint: disable=g-import-not-at-top
  forward = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
  jax_forward = lambda: jax.block_until_ready(forward(unet_params, x, t, context))
  compile_forward = _compile_time(jax_forward)
  with torch.inference_mode():
    torch_forward = lambda: unet(x_torch, torch.from_numpy(t), encoder_hidden_states=context_torch).sample
    diff = np.abs(np.asarray(forward(unet_params, x, t, context)) - torch_forward().numpy().transpose(0, 2, 3, 1)).max()
    row = ("unet forward", _timed(torch_forward, _REPEATS.value), _timed(jax_forward, _REPEATS.value),
           compile_forward, diff)
  _report(row)
  return row


def _ddim(model, unet_params, unet, schedule, x, x_torch, context, uncond, context_torch, uncond_torch):
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  scale = _GUIDANCE.value
  apply_fn = lambda p: (lambda x, t, c: model.apply({"params": p}, x, t, c))
  sample = jax.jit(lambda p, x: samplers.ddim(samplers.cfg_model_fn(apply_fn(p), context, uncond, scale), schedule,
                                              x, num_steps=_STEPS.value))
  jax_sample = lambda: jax.block_until_ready(sample(unet_params, x))
  compile_sample = _compile_time(jax_sample)
  scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                      clip_sample=False, set_alpha_to_one=False, steps_offset=1)
  both_context = torch.cat([context_torch, uncond_torch.expand_as(context_torch)])

  def torch_sample():
    scheduler.set_timesteps(_STEPS.value)
    latents = x_torch
    with torch.inference_mode():
      for step_t in scheduler.timesteps:
        out = unet(torch.cat([latents, latents]), step_t, encoder_hidden_states=both_context).sample
        cond, null = out.chunk(2)
        latents = scheduler.step(null + scale * (cond - null), step_t, latents).prev_sample
    return latents

  diff = np.abs(np.asarray(sample(unet_params, x)) - torch_sample().numpy().transpose(0, 2, 3, 1)).max()
  row = (f"ddim-{_STEPS.value} + cfg", _timed(torch_sample, 1), _timed(jax_sample, 1), compile_sample, diff)
  _report(row)
  return row


def _train(model, unet_params, unet, schedule, x, x_torch, context, context_torch, rng):
  import torch  # pylint: disable=g-import-not-at-top
  b = x.shape[0]
  optimizer = optax.adamw(1e-4)
  noise = rng.normal(size=x.shape).astype(np.float32)
  t_train = rng.integers(0, 1000, b).astype(np.int32)

  def loss_fn(p):
    x_t = q_sample(schedule, jnp.asarray(x), t_train, jnp.asarray(noise))
    return jnp.mean(jnp.square(model.apply({"params": p}, x_t, t_train, context) - noise))

  @jax.jit
  def train_step(p, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  state = [jax.tree.map(jnp.copy, unet_params), optimizer.init(unet_params)]

  def jax_train():
    state[0], state[1], loss = train_step(*state)
    jax.block_until_ready(loss)

  compile_train = _compile_time(jax_train)
  unet.train()
  torch_optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
  alphas = torch.from_numpy(np.array(schedule.alphas_cumprod))
  a = alphas[torch.from_numpy(t_train).long()].view(-1, 1, 1, 1)
  noise_torch = torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())
  x_t_torch = a.sqrt() * x_torch + (1 - a).sqrt() * noise_torch

  def torch_train():
    torch_optimizer.zero_grad(set_to_none=True)
    out = unet(x_t_torch, torch.from_numpy(t_train), encoder_hidden_states=context_torch).sample
    loss = torch.nn.functional.mse_loss(out, noise_torch)
    loss.backward()
    torch_optimizer.step()
    return loss

  torch_s = _timed(torch_train, _REPEATS.value)
  del torch_optimizer
  unet.eval()
  row = ("train step (adamw)", torch_s, _timed(jax_train, _REPEATS.value), compile_train, float("nan"))
  _report(row)
  return row


_HEADER = f"{'':22s}{'diffusers s':>12s}{'ldm_jax s':>12s}{'speed-up':>10s}{'jax compile s':>15s}{'max |diff|':>12s}"


def _report(row):
  name, torch_s, jax_s, compile_s, diff = row
  print(f"{name:22s}{torch_s:12.3f}{jax_s:12.3f}{torch_s / jax_s:9.2f}x{compile_s:15.1f}{diff:12.2e}", flush=True)


if __name__ == "__main__":
  app.run(main)
