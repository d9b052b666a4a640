"""Convolutions alone, per shape: XLA's 3×3 against the C++ CPU kernel (`ldm_jax.nn.conv`); XLA's 1×1
against `Conv1x1`'s matmul; XLA's 3×3 on tiny images against `patches_conv3x3`'s matmul.

  .venv/bin/python benchmarks/conv.py                      # the f = 8 VAE decoder's and the U-Net's shapes
  .venv/bin/python benchmarks/conv.py --shapes 64x256,256x64 --batch 8 --grad
  .venv/bin/python benchmarks/conv.py --shapes 32x192x64,16x320 --weight_grad
  .venv/bin/python benchmarks/conv.py --shapes 32x256,64x256,128x128,4x256,8x256,16x128 --upsample --grad
  .venv/bin/python benchmarks/conv.py --shapes 32x64,32x128x64,32x192x64,16x128,16x384x128,8x256 --pointwise --grad
  .venv/bin/python benchmarks/conv.py --shapes 1x512,2x512,3x512,4x512,4x256,8x256 --batch 64 --small --grad
  .venv/bin/python benchmarks/conv.py --shapes 8x256,8x512x256,8x384x256,8x128x256,4x256,14x512 --batch 16 --winograd

For each `SIZExCHANNELS` (square images, channels in = out) or `SIZExINxOUT` it prints the forward
time (with --grad: forward + backward of a sum of the output times a fixed array, input and weight
gradients; with --weight_grad: the weight gradient alone, XLA's against the kernel's whatever
`conv3x3`'s backward would choose) of each implementation, min / median over --repeats after a
warm-up (the two implementations' calls alternating), and the kernel's speed-up. With --upsample,
SIZE is the input of an `Upsample` layer (×2 nearest-neighbour, then the 3×3 conv): repeating the pixels and convolving at 2·SIZE (with the
kernel where 'auto' takes it there) against `upsample_conv3x3`'s 2×2 convolution at SIZE. With
--pointwise, a 1×1 convolution: XLA's against `Conv1x1`'s [B·H·W, C] × [C, O] matmul. With --small,
the 3×3 convolution of (tiny) images: XLA's against `patches_conv3x3`'s [B·H·W, 9·C] × [9·C, O]
matmul, which 'auto' takes on CPU for images of at most `conv.SMALL_IMAGE_PIXELS` pixels. With
--winograd, the direct 3×3 convolution 'auto' would otherwise run (the kernel where it applies, else
XLA's) against `winograd_conv3x3` (F(2×2, 3×3)), which 'auto' takes where `conv.use_winograd` says.
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ldm_jax.nn import conv  # noqa: E402

_SHAPES = flags.DEFINE_list("shapes", ["256x64", "128x128", "64x256", "32x256", "32x64", "16x128", "8x256", "4x256"],
                            "SIZExCHANNELS per measurement.")
_BATCH = flags.DEFINE_integer("batch", 8, "Images per call.")
_GRAD = flags.DEFINE_bool("grad", False, "Time forward + backward instead of the forward.")
_WEIGHT_GRAD = flags.DEFINE_bool("weight_grad", False, "Time the weight gradient alone.")
_UPSAMPLE = flags.DEFINE_bool("upsample", False, "Time the Upsample layer's two ways instead.")
_POINTWISE = flags.DEFINE_bool("pointwise", False, "Time 1×1 convolutions, XLA's and Conv1x1's, instead.")
_SMALL = flags.DEFINE_bool("small", False, "Time 3×3 convolutions, XLA's and the patches' matmul, instead.")
_WINOGRAD = flags.DEFINE_bool("winograd", False, "Time 3×3 convolutions, the direct one 'auto' would run otherwise "
                                "(the kernel or XLA's) and Winograd's F(2×2, 3×3), instead.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions.")


def _repeat_then_convolve(x, kernel, bias):
  """`Conv3x3` ('auto': the kernel or XLA's, as it picks at 2·SIZE) on the repeated pixels."""
  layer = conv.Conv3x3(kernel.shape[-1])
  return layer.apply({"params": {"kernel": kernel, "bias": bias}}, conv.nearest_upsample(x))


def _pointwise_xla(x, kernel, bias):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias


def _pointwise_matmul(x, kernel, bias):
  return conv.Conv1x1(kernel.shape[-1]).apply({"params": {"kernel": kernel, "bias": bias}}, x)


def _timed(fns, *args):
  """{name: (min, median)} seconds of each function over --repeats rounds, the functions alternating
  within a round (the machine's speed drifts; each gets the same share of it)."""
  for fn in fns.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in fns}
  for _ in range(_REPEATS.value):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t0)
  return {name: (min(t), float(np.median(t))) for name, t in times.items()}


def main(argv):
  del argv
  if conv.cpu_kernels.unavailable_reason() and not (_POINTWISE.value or _SMALL.value or _WINOGRAD.value):
    raise SystemExit(f"the CPU kernel is unavailable: {conv.cpu_kernels.unavailable_reason()}")
  if (_UPSAMPLE.value or _POINTWISE.value or _SMALL.value or _WINOGRAD.value) and _WEIGHT_GRAD.value:
    raise SystemExit("--upsample, --pointwise, --small and --winograd time the forward (with --grad forward + "
                     "backward), not --weight_grad")
  if _UPSAMPLE.value + _POINTWISE.value + _SMALL.value + _WINOGRAD.value > 1:
    raise SystemExit("--upsample, --pointwise, --small and --winograd are separate measurements: pass one")
  part = "weight gradient" if _WEIGHT_GRAD.value else "forward+backward" if _GRAD.value else "forward"
  part += (", Upsample layers" if _UPSAMPLE.value else ", 1x1 convolutions" if _POINTWISE.value else
           ", 3x3 convolutions as patches" if _SMALL.value else ", 3x3 convolutions by Winograd" if _WINOGRAD.value
           else "")
  print(f"batch {_BATCH.value}, {part}, float32, {os.cpu_count()} cores")
  old, new = (("repeat", "phases") if _UPSAMPLE.value else ("xla", "matmul") if _POINTWISE.value or _SMALL.value
              else ("direct", "winograd") if _WINOGRAD.value else ("xla", "kernel"))
  print(f"{'shape':>12s}{old + ' ms (min/med)':>20s}{new + ' ms (min/med)':>22s}{'speed-up':>10s}{'max |diff|':>12s}")
  rng = np.random.default_rng(0)
  for shape in _SHAPES.value:
    size, c_in, *rest = (int(n) for n in shape.split("x"))
    c_out = rest[0] if rest else c_in
    x = jnp.asarray(rng.standard_normal((_BATCH.value, size, size, c_in)), jnp.float32)
    taps = 1 if _POINTWISE.value else 3
    kernel = jnp.asarray(rng.standard_normal((taps, taps, c_in, c_out)) / np.sqrt(taps * taps * c_in), jnp.float32)
    bias = jnp.zeros((c_out,), jnp.float32)
    scale = 2 if _UPSAMPLE.value else 1
    upstream = jnp.asarray(rng.standard_normal((_BATCH.value, scale * size, scale * size, c_out)), jnp.float32)
    xla = lambda x, k, b: conv._xla_conv(x, k) + b  # pylint: disable=protected-access
    fns = {"xla": xla, "kernel": conv.conv3x3}
    if _UPSAMPLE.value:
      fns = {"xla": _repeat_then_convolve, "kernel": conv.upsample_conv3x3}
    if _POINTWISE.value:
      fns = {"xla": _pointwise_xla, "kernel": _pointwise_matmul}
    if _SMALL.value:
      fns["kernel"] = lambda x, k, b: conv.patches_conv3x3(x, k) + b
    if _WINOGRAD.value:  # against the direct convolution 'auto' would run otherwise: the kernel or XLA's
      if conv.use_kernel("auto", in_channels=c_in, out_channels=c_out, dtype=jnp.float32, pixels=size * size):
        fns["xla"] = conv.conv3x3
      fns["kernel"] = lambda x, k, b: conv.winograd_conv3x3(x, k) + b
    if _WEIGHT_GRAD.value:
      fns = {"xla": lambda x, k, b: jax.vjp(lambda k: conv._xla_conv(x, k), k)[1](upstream)[0],  # pylint: disable=protected-access
             "kernel": lambda x, k, b: conv._weight_grad_sharded(x, upstream)}  # pylint: disable=protected-access
    elif _GRAD.value:
      fns = {name: jax.grad(lambda x, k, b, f=f: jnp.sum(f(x, k, b) * upstream), argnums=(0, 1)) for name, f in fns.items()}
    fns = {name: jax.jit(f) for name, f in fns.items()}
    outs = {name: jax.tree.leaves(f(x, kernel, bias))[0] for name, f in fns.items()}
    times = _timed(fns, x, kernel, bias)
    diff = float(jnp.abs(outs["xla"] - outs["kernel"]).max())
    print(f"{shape:>12s}{times['xla'][0] * 1e3:>11.1f} /{times['xla'][1] * 1e3:>7.1f}"
          f"{times['kernel'][0] * 1e3:>13.1f} /{times['kernel'][1] * 1e3:>7.1f}"
          f"{times['xla'][0] / times['kernel'][0]:>9.2f}x{diff:>12.1e}", flush=True)


if __name__ == "__main__":
  app.run(main)
