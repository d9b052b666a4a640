"""ldm_jax vs diffusers (PyTorch), side by side on the same weights and the same CPU: the user's path.

  .venv/bin/python benchmarks/vs_diffusers.py --channels 64,128,256,256 --context_dim 256 --batch 8 --repeats 5
  .venv/bin/python benchmarks/vs_diffusers.py --parts forward,train --attention xla   # the old attention

A random diffusers `UNet2DConditionModel` with Stable Diffusion's block layout (three
cross-attention levels and a plain one, two ResnetBlocks per level, a 77-token context, 8 heads)
and a random f = 8 `AutoencoderKL` (blocks `--vae_channels`) are saved as diffusers folders and
imported with `ldm_jax.load.load_pretrained`; then, per part:

  forward      one U-Net call on `batch` latents (32×32×4 by default) with their contexts
  ddim         `steps` DDIM steps with classifier-free guidance (2×batch per network call), as
               StableDiffusionPipeline's denoising loop: diffusers' DDIMScheduler loop vs ldm_jax's
               one jit-compiled `lax.scan` (`samplers.ddim` + `cfg_model_fn`)
  vae          decoding `batch` latents to images (32×32 → 256 px)
  end_to_end   ddim, then decoding with the VAE: noise to pixels, what `sample.py` does
  train        ε-prediction MSE + AdamW on `batch` latents (forward, backward, update)

Each side of each part runs in its own process (so that its peak memory, VmHWM, is its own) on
all cores, after a warm-up; JAX compile time is reported apart. Outputs are checked to agree.
Times are min and median over `--repeats` runs (DDIM and end to end: `--long_repeats`). Run it on
an idle machine (`../shared/bin/quiet-run -- …`): both frameworks use every core.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PARTS = ("forward", "ddim", "vae", "end_to_end", "train")
_CHANNELS = flags.DEFINE_list("channels", ["64", "128", "256", "256"], "block_out_channels of the U-Net.")
_VAE_CHANNELS = flags.DEFINE_list("vae_channels", ["64", "128", "256", "256"], "block_out_channels of the VAE.")
_CONTEXT = flags.DEFINE_integer("context_dim", 256, "Width of the cross-attention context (77 tokens).")
_BATCH = flags.DEFINE_integer("batch", 8, "Images (latents) per batch.")
_LATENT = flags.DEFINE_integer("latent_size", 32, "Latent side (32 = 256 px images with an f=8 autoencoder).")
_STEPS = flags.DEFINE_integer("steps", 50, "DDIM steps.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 7.5, "Classifier-free guidance scale.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions of forward / vae / train (after a warm-up).")
_LONG_REPEATS = flags.DEFINE_integer("long_repeats", 1, "Timed repetitions of ddim / end_to_end.")
_PARTS = flags.DEFINE_list("parts", list(PARTS), "Measurements to run.")
_ATTENTION = flags.DEFINE_string("attention", "auto", "ldm_jax's attention implementation (model.attention).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "ldm_jax's computation dtype.")
# Internal: one side of one part, run by the parent in a fresh process.
_SIDE = flags.DEFINE_enum("side", None, ["torch", "jax"], "Internal: run one side.")
_FOLDER = flags.DEFINE_string("folder", None, "Internal: the saved models and inputs.")
_PART = flags.DEFINE_enum("part", None, PARTS, "Internal: the part to run.")


def main(argv):
  del argv
  if _SIDE.value:
    _run_side()
    return
  unknown = set(_PARTS.value) - set(PARTS)
  if unknown:
    raise app.UsageError(f"--parts: unknown {sorted(unknown)}; choose from {', '.join(PARTS)}.")
  folder = tempfile.mkdtemp(prefix="vs_diffusers_")
  info = _save_models(folder)
  print(info, flush=True)
  print(_HEADER, flush=True)
  rows = []
  for part in _PARTS.value:
    results = {side: _child(side, part, folder) for side in ("torch", "jax")}
    diff = float(np.abs(np.load(results["torch"]["output"]) - np.load(results["jax"]["output"])).max())
    rows.append((part, results, diff))
    _report(*rows[-1])
  print(f"\n{_HEADER}")
  for row in rows:
    _report(*row)
  for part, results, _ in rows:
    print(f"{part}: ldm_jax {_speedup(results):.2f}x diffusers")


def _save_models(folder: str) -> str:
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  channels = tuple(int(c) for c in _CHANNELS.value)
  n = len(channels)
  unet = diffusers.UNet2DConditionModel(
      sample_size=_LATENT.value, in_channels=4, out_channels=4, block_out_channels=channels, layers_per_block=2,
      down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
      cross_attention_dim=_CONTEXT.value, attention_head_dim=8)
  unet.save_pretrained(os.path.join(folder, "unet"))
  vae_channels = tuple(int(c) for c in _VAE_CHANNELS.value)
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, block_out_channels=vae_channels, layers_per_block=2,
      down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
      up_block_types=("UpDecoderBlock2D",) * len(vae_channels), sample_size=_LATENT.value * 8)
  vae.save_pretrained(os.path.join(folder, "vae"))
  rng = np.random.default_rng(0)
  b, size = _BATCH.value, _LATENT.value
  np.savez(os.path.join(folder, "inputs.npz"),
           x=rng.normal(size=(b, size, size, 4)).astype(np.float32),
           context=rng.normal(size=(b, 77, _CONTEXT.value)).astype(np.float32),
           uncond=rng.normal(size=(1, 77, _CONTEXT.value)).astype(np.float32),
           noise=rng.normal(size=(b, size, size, 4)).astype(np.float32),
           t_train=rng.integers(0, 1000, b).astype(np.int32))
  unet_m = sum(p.numel() for p in unet.parameters()) / 1e6
  vae_m = sum(p.numel() for p in vae.parameters()) / 1e6
  import jax  # pylint: disable=g-import-not-at-top
  return (f"U-Net {channels} ({unet_m:.1f} M params), VAE {vae_channels} ({vae_m:.1f} M); batch {b} × "
          f"{size}×{size}×4 latents, {_STEPS.value} DDIM steps, guidance {_GUIDANCE.value}; torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads), jax {jax.__version__} "
          f"({jax.devices()[0].platform}, attention={_ATTENTION.value}, dtype={_DTYPE.value}); {os.cpu_count()} cores")


def _child(side: str, part: str, folder: str) -> dict:
  flags_ = [f"--{name}={flags.FLAGS[name].serialize().split('=', 1)[1]}" for name in
            ("channels", "context_dim", "batch", "latent_size", "steps", "guidance_scale", "repeats",
             "long_repeats", "attention", "dtype")]
  cmd = [sys.executable, os.path.abspath(__file__), f"--side={side}", f"--part={part}", f"--folder={folder}", *flags_]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _peak_rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return float("nan")


def _timed(fn, repeats: int) -> list[float]:
  fn()  # warm-up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return times


def _run_side():
  inputs = dict(np.load(os.path.join(_FOLDER.value, "inputs.npz")))
  repeats = _LONG_REPEATS.value if _PART.value in ("ddim", "end_to_end") else _REPEATS.value
  run = _torch_part if _SIDE.value == "torch" else _jax_part
  fn, compile_s = run(_PART.value, inputs)
  output = np.asarray(fn())
  times = _timed(fn, repeats)
  path = os.path.join(_FOLDER.value, f"{_PART.value}_{_SIDE.value}.npy")
  np.save(path, output)
  print(json.dumps(dict(min=min(times), median=float(np.median(times)), compile=compile_s,
                        peak_mb=_peak_rss_mb(), output=path)))


def _torch_part(part, inputs):
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))
  nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)
  x, noise = nchw(inputs["x"]), nchw(inputs["noise"])
  context, uncond = torch.from_numpy(inputs["context"]), torch.from_numpy(inputs["uncond"])
  unet = diffusers.UNet2DConditionModel.from_pretrained(os.path.join(_FOLDER.value, "unet")).eval()
  vae = diffusers.AutoencoderKL.from_pretrained(os.path.join(_FOLDER.value, "vae")).eval()
  t = torch.full((x.shape[0],), 500)

  def ddim():
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(_STEPS.value)
    both_context = torch.cat([context, uncond.expand_as(context)])
    latents = x
    for step_t in scheduler.timesteps:
      out = unet(torch.cat([latents, latents]), step_t, encoder_hidden_states=both_context).sample
      cond, null = out.chunk(2)
      latents = scheduler.step(null + _GUIDANCE.value * (cond - null), step_t, latents).prev_sample
    return latents

  if part == "train":
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    alphas = torch.from_numpy(np.array(_schedule().alphas_cumprod))
    t_train = torch.from_numpy(inputs["t_train"]).long()
    a = alphas[t_train].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x + (1 - a).sqrt() * noise

    def train():
      optimizer.zero_grad(set_to_none=True)
      loss = torch.nn.functional.mse_loss(unet(x_t, t_train, encoder_hidden_states=context).sample, noise)
      loss.backward()
      optimizer.step()
      return np.asarray(loss.item())
    return train, float("nan")

  steps = {
      "forward": lambda: nhwc(unet(x, t, encoder_hidden_states=context).sample),
      "ddim": lambda: nhwc(ddim()),
      "vae": lambda: nhwc(vae.decode(x).sample),
      "end_to_end": lambda: nhwc(vae.decode(ddim()).sample),
  }

  def inference():
    with torch.inference_mode():
      return steps[part]()
  return inference, float("nan")


def _schedule():
  from ldm_jax.diffusion.schedule import make_schedule  # pylint: disable=g-import-not-at-top
  return make_schedule("scaled_linear")


def _jax_part(part, inputs):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from ldm_jax.load import load_pretrained  # pylint: disable=g-import-not-at-top
  from ldm_jax.diffusion import samplers  # pylint: disable=g-import-not-at-top
  from ldm_jax.diffusion.schedule import q_sample  # pylint: disable=g-import-not-at-top
  from ldm_jax.runtime import host_memory  # pylint: disable=g-import-not-at-top

  host_memory.keep_freed_memory()  # as every ldm_jax entry point does (the torch side keeps glibc's default)
  dtype = jnp.dtype(_DTYPE.value)
  load = lambda name: load_pretrained(os.path.join(_FOLDER.value, name))[:2]
  modules, params = load("unet")
  unet = modules["unet"].clone(attention=_ATTENTION.value, dtype=dtype)
  unet_params = jax.device_put(params["unet"])
  vae_modules, vae_params = load("vae")
  vae = vae_modules["autoencoder"].clone(attention=_ATTENTION.value, dtype=dtype)
  vae_params = jax.device_put(vae_params["autoencoder"])
  schedule = _schedule()
  x, context, uncond = inputs["x"], inputs["context"], inputs["uncond"]
  t = np.full((x.shape[0],), 500, np.int32)
  unet_fn = lambda p: (lambda x, t, c: unet.apply({"params": p}, x, t, c))
  decode = lambda p, z: vae.apply({"params": p}, z, method="decode")

  def ddim(p, x):
    model_fn = samplers.cfg_model_fn(unet_fn(p), context, uncond, _GUIDANCE.value, share_input=True)
    return samplers.ddim(model_fn, schedule, x, num_steps=_STEPS.value)

  if part == "train":
    optimizer = optax.adamw(1e-4)
    noise, t_train = inputs["noise"], inputs["t_train"]

    def loss_fn(p):
      x_t = q_sample(schedule, jnp.asarray(x), t_train, jnp.asarray(noise))
      out = unet.apply({"params": p}, x_t, t_train, context).astype(jnp.float32)
      return jnp.mean(jnp.square(out - noise))

    @jax.jit
    def train_step(p, opt_state):
      loss, grads = jax.value_and_grad(loss_fn)(p)
      updates, opt_state = optimizer.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state, loss

    state = [unet_params, optimizer.init(unet_params)]
    t0 = time.perf_counter()
    compiled = train_step.lower(*state).compile()
    compile_s = time.perf_counter() - t0

    def train():
      state[0], state[1], loss = compiled(*state)
      return np.asarray(loss)
    return train, compile_s

  functions = {
      "forward": (lambda p, vp, x: unet_fn(p)(x, t, context)),
      "ddim": (lambda p, vp, x: ddim(p, x)),
      "vae": (lambda p, vp, x: decode(vp, x)),
      "end_to_end": (lambda p, vp, x: decode(vp, ddim(p, x))),
  }
  t0 = time.perf_counter()
  compiled = jax.jit(functions[part]).lower(unet_params, vae_params, x).compile()
  compile_s = time.perf_counter() - t0
  return (lambda: np.asarray(compiled(unet_params, vae_params, x), np.float32)), compile_s


_HEADER = (f"{'':12s}{'diffusers s (min/med)':>24s}{'ldm_jax s (min/med)':>22s}{'speed-up':>10s}"
           f"{'jax compile s':>15s}{'peak MB torch/jax':>20s}{'max |diff|':>12s}")


def _speedup(results: dict) -> float:
  return results["torch"]["min"] / results["jax"]["min"]


def _report(part: str, results: dict, diff: float) -> None:
  torch_r, jax_r = results["torch"], results["jax"]
  print(f"{part:12s}{torch_r['min']:14.3f} / {torch_r['median']:7.3f}{jax_r['min']:12.3f} / {jax_r['median']:7.3f}"
        f"{_speedup(results):9.2f}x{jax_r['compile']:15.1f}{torch_r['peak_mb']:11.0f} / {jax_r['peak_mb']:6.0f}"
        f"{diff:12.2e}", flush=True)


if __name__ == "__main__":
  app.run(main)
