"""3×3 convolutions (stride 1, one pixel of zero padding): Winograd's F(2×2, 3×3) or the C++ CPU
kernel where they apply; 1×1 convolutions as matmuls.

Nearly all of the autoencoder's and most of the U-Net's time on a CPU is in 3×3 convolutions.
XLA's CPU convolution (Eigen) runs at ~140 GFLOP/s on a 2-core AVX-512 machine; the direct
convolution of `kernels/conv_cpu.cc` at ~170–190 (`benchmarks/conv.py`, batch 8, 64–256
channels); on a 2-core AVX2 machine (Zen 3) the kernel is 1.1–1.4× XLA's from 64×64 on.
`Conv3x3` is the layer (parameters `kernel` [3, 3, C, O] and `bias` [O], initialised as `flax.linen.Conv`'s, so
checkpoints and converters are unchanged); `conv3x3` the function, with a backward whose input
gradient is the same kernel on the flipped, transposed weights and whose weight gradient is a second
kernel (sums over pixels per thread, then over devices) where it is faster than XLA's.

`implementation`: 'auto' (the kernel on CPU for float32 with O and C multiples of 16 when it
builds and the shape is one where it is faster: `MIN_PIXELS`, `MAX_IN_CHANNELS`; else XLA), 'xla',
'fused' (the kernel; an error where it cannot run). The environment
variable `LDM_JAX_CONV=xla` turns the kernel off for a whole process (an A/B switch).
On a device mesh each device convolves its own examples (`custom_partitioning`).

`Conv3x3(upsample=True)` (the `Upsample` layers: nearest ×2, then the convolution) runs under 'auto'
on CPU as one 2×2 convolution at the input's size (`upsample_conv3x3`): 16 instead of 36
multiply-adds per output pixel and input channel.

On images of at most 3×3 pixels (`SMALL_IMAGE_PIXELS`: VGG16's last block on 32-pixel images, a
U-Net's lowest level on small latents) XLA's CPU convolution is pathologically slow — 2×2 images,
512 channels: 1.5 GFLOP/s — so 'auto' convolves them on CPU as one matmul of the 3×3 patches
(`patches_conv3x3`): at 2×2 2–4× (64 channels) to 80–90× (512–1280 channels) faster, at 1×1 6–9×, at
3×3 1.5–4.5×. From 8×8 on, with enough images and channels (`use_winograd`: 256 tiles of 2×2
output pixels; 256 input channels, or any from 16×16 down), 'auto' on CPU runs Winograd's
F(2×2, 3×3) (`winograd_conv3x3`) where nothing differentiates the layer (sampling, decoding,
features; under autodiff, the direct convolution): 16 instead of 36 multiply-adds per 2×2 output
pixels and input channel, 1.2–1.9× the kernel's or XLA's convolution there.

`Conv1x1` (`proj_in`/`proj_out`, `conv_shortcut`, `quant_conv`) is `flax.linen.Conv(features, (1, 1))`
computed as one matmul over the pixels: XLA's CPU convolution does not lower a 1×1 kernel to a matmul,
and was 1.3–2.3× slower in the forward and 2–9× in forward + backward (`benchmarks/conv.py --pointwise`,
batch 8, 8×8 to 64×64, 64–384 channels).
"""

from __future__ import annotations

import functools
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ldm_jax.nn import cpu_kernels

IMPLEMENTATIONS = ("auto", "xla", "fused")
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMENSIONS)


@functools.cache
def _warn_unavailable_once(reason: str) -> None:
  logging.warning("CPU convolution kernel unavailable, using XLA's: %s", reason)


# Where 'auto' takes the kernel: images of at least 16×16 and at most 640 input channels. Below
# that XLA's convolution is as fast or faster (batch 4–8, `benchmarks/conv.py`: 8×8×256 0.87×,
# 14×14×512 0.96×, 16×16×1280 0.89×; 16×16×128 1.03×, 28×28×512 1.03×, 32×32×640 1.05×,
# 64×64×320 1.24×).
MIN_PIXELS, MAX_IN_CHANNELS = 256, 640


# Images of at most this many pixels are convolved as a matmul of their patches under 'auto' on CPU.
# XLA's convolution / the patches' matmul (`benchmarks/conv.py --small --batch 64`, QUIET, min of 5):
# forward 2×2×512 780 / 9.3 ms, 1×1×512 20.9 / 2.5 ms, 3×3×512 32.6 / 21.3 ms; forward + backward
# 767 / 29.7, 32.7 / 5.2, 74.3 / 36.2 ms. From 4×4 on XLA's is as fast or faster (forward 4×4×512
# 46.0 / 54.6 ms, 8×8×256 48.8 / 77.5 ms).
SMALL_IMAGE_PIXELS = 9


def _xla_requested(implementation: str) -> bool:
  """'xla', or 'auto' in a process with LDM_JAX_CONV=xla (the A/B switch)."""
  return implementation == "xla" or (implementation == "auto" and os.environ.get("LDM_JAX_CONV") == "xla")


def use_patches(implementation: str, image_shape: tuple[int, ...]) -> bool:
  """Whether a 3×3 convolution of [B, H, W, C] images that the kernel does not take runs
  `patches_conv3x3` ('auto' on CPU, H·W ≤ `SMALL_IMAGE_PIXELS`, unless LDM_JAX_CONV=xla)."""
  return (implementation == "auto" and not _xla_requested(implementation) and jax.default_backend() == "cpu"
          and image_shape[1] * image_shape[2] <= SMALL_IMAGE_PIXELS)


def patches_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [B, H, W, C] ⊛ kernel [3, 3, C, O] (stride 1, zero padding of one pixel, no bias) as one
  [B·H·W, 9·C] × [9·C, O] matmul of each pixel's 3×3 neighbourhood, accumulated in float32."""
  b, h, w, c = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = jnp.concatenate([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=-1)
  out = jnp.dot(patches.reshape(b * h * w, 9 * c), kernel.reshape(9 * c, -1), preferred_element_type=jnp.float32)
  return out.astype(x.dtype).reshape(b, h, w, -1)


# Where 'auto' on CPU convolves float32 images by `winograd_conv3x3` (`use_winograd`): 16 instead of
# 36 multiply-adds per 2×2 output pixels and input channel, in matmuls, against the transforms of the
# input (∝ tiles·C), the output (∝ tiles·O) and the weights (∝ C·O, every call), which are memory-bound.
# Direct (the C++ kernel from 16×16, else XLA's) / Winograd ms, forward (`benchmarks/conv.py --winograd`,
# QUIET, min of 5–10 alternating): batch 16: 8×8×256 7.9 / 5.1, 8×8 512→256 16.9 / 8.9, 4×4 512→256
# 4.6 / 3.1, 16×16×128 8.3 / 4.9, 16×16 256→128 18.3 / 10.0, 16×16 64→128 4.0 / 2.6; batch 8: 32×32×256
# 71.5 / 59.7, 64×64×256 296 / 251; batch 2–4: 16×16×1280 255 / 169, 32×32×640 118 / 75, 128×128×640
# 1733 / 1070. Slower: with fewer than 256 tiles (batch 2 8×8×1280 72.8 / 91.6, 4×4×256 at batch 16
# 2.5 / 2.6), and from 32×32 on with fewer than 256 channels, where the kernel is fast and the
# transforms are not (batch 8 32×32×128 17.2 / 21.2, 128×128×128 288 / 352, 256×256×64 310 / 592).
# Under autodiff the layer runs the direct convolution (`_winograd_unless_differentiated`). The
# transformed input and output (4× the input and the output, for even sizes) are capped at
# `WINOGRAD_MAX_BYTES`: above, the direct convolution (which needs neither).
WINOGRAD_PIXELS, WINOGRAD_MIN_TILES, WINOGRAD_MIN_CHANNELS, WINOGRAD_MAX_BYTES = 64, 256, 256, 2**30


def use_winograd(implementation: str, image_shape: tuple[int, ...], out_channels: int, dtype) -> bool:
  """Whether 'auto' convolves [B, H, W, C] images to `out_channels` by `winograd_conv3x3` (CPU,
  float32, H·W ≥ `WINOGRAD_PIXELS`, at least `WINOGRAD_MIN_TILES` tiles of 2×2 output pixels in the
  batch, C ≥ `WINOGRAD_MIN_CHANNELS` or H·W ≤ `MIN_PIXELS`, transforms within `WINOGRAD_MAX_BYTES`;
  not with LDM_JAX_CONV=xla)."""
  b, h, w, c = image_shape
  tiles = b * ((h + 1) // 2) * ((w + 1) // 2)
  return (implementation == "auto" and not _xla_requested(implementation) and jax.default_backend() == "cpu"
          and jnp.dtype(dtype) == jnp.float32 and h * w >= WINOGRAD_PIXELS and tiles >= WINOGRAD_MIN_TILES
          and (c >= WINOGRAD_MIN_CHANNELS or h * w <= MIN_PIXELS)
          and 16 * tiles * (c + out_channels) * 4 <= WINOGRAD_MAX_BYTES)


# Winograd's F(2×2, 3×3) (Lavin & Gray 2016): each 2×2 block of output pixels is Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A
# for the 4×4 window d of the zero-padded input that covers it and the 3×3 kernel g, per pair of
# channels; the elementwise products summed over the input channels are 16 matmuls (one per position
# of the 4×4 transformed window) of [tiles, C] × [C, O]. The transforms' coefficients are 0, ±1 and ±½:
# the result differs from the direct sum by float32 rounding only (~2e-6 of the largest output).
def _input_transform(d):  # Bᵀ d along a list of four rows (or columns)
  return [d[0] - d[2], d[1] + d[2], d[2] - d[1], d[1] - d[3]]


def _kernel_transform(g, axis):  # G g along an axis of size 3 → 4
  g0, g1, g2 = (jnp.take(g, i, axis) for i in range(3))
  return jnp.stack([g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2], axis)


def _output_transform(m):  # Aᵀ m along a leading axis of four → a list of two
  return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def winograd_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [B, H, W, C] ⊛ kernel [3, 3, C, O] (stride 1, zero padding of one pixel, no bias) by Winograd's
  F(2×2, 3×3), the matmuls accumulated in float32. Odd H or W are padded by one more row or column
  of zeros, whose outputs are dropped."""
  b, h, w, c = x.shape
  th, tw = (h + 1) // 2, (w + 1) // 2  # 2×2 output tiles per column and row
  padded = jnp.pad(x, ((0, 0), (1, 2 * th - h + 1), (1, 2 * tw - w + 1), (0, 0)))
  rows = jnp.stack(_input_transform([padded[:, i:i + 2 * th:2] for i in range(4)]))  # [4, B, th, W + 2, C]
  v = jnp.stack(_input_transform([rows[:, :, :, j:j + 2 * tw:2] for j in range(4)]), axis=1)
  v = v.reshape(16, b * th * tw, c)
  u = _kernel_transform(_kernel_transform(kernel, 0), 1).reshape(16, c, -1)
  m = jnp.einsum("pnc,pco->pno", v, u, preferred_element_type=jnp.float32).reshape(4, 4, b, th, tw, -1)
  rows = jnp.stack(_output_transform(m))  # [2 (output row in the tile), 4, B, th, tw, O]
  y = jnp.stack(_output_transform(jnp.swapaxes(rows, 0, 1)))  # [2 (column), 2 (row), B, th, tw, O]
  y = y.transpose(2, 3, 1, 4, 0, 5).reshape(b, 2 * th, 2 * tw, -1)
  return y[:, :h, :w].astype(x.dtype)


def use_kernel(implementation: str, *, in_channels: int, out_channels: int, dtype, pixels: int = MIN_PIXELS) -> bool:
  """Whether `conv3x3` runs the C++ kernel for this layer (`pixels` = H·W); 'fused' that cannot run
  is an error."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"Conv3x3.implementation: {implementation!r} is not one of {', '.join(IMPLEMENTATIONS)}.")
  applies = (jnp.dtype(dtype) == jnp.float32 and in_channels % 16 == 0 and out_channels % 16 == 0)
  if _xla_requested(implementation):
    return False
  if implementation == "fused":
    if jax.default_backend() != "cpu" or not applies or (reason := cpu_kernels.unavailable_reason()):
      why = (f"JAX runs on {jax.default_backend()}" if jax.default_backend() != "cpu" else
             f"needs float32 and channels in multiples of 16, got {jnp.dtype(dtype).name}, "
             f"{in_channels} → {out_channels}" if not applies else reason)
      raise ValueError(f"Conv3x3.implementation 'fused' cannot run here: {why}")
    return True
  if jax.default_backend() != "cpu" or not applies or pixels < MIN_PIXELS or in_channels > MAX_IN_CHANNELS:
    return False
  if (reason := cpu_kernels.unavailable_reason()) is not None:
    _warn_unavailable_once(reason)
    return False
  return True


def _packed(kernel: jax.Array) -> jax.Array:
  """[3, 3, C, O] → [O / K, 3, 3, C, K], K = 64, 32 or 16 (the kernel's block of output channels):
  each block's weights contiguous, read as one stream instead of K-wide pieces O apart."""
  c, o = kernel.shape[2:]
  k = next(k for k in (64, 32, 16) if o % k == 0)
  return kernel.reshape(3, 3, c, o // k, k).transpose(3, 0, 1, 2, 4)


def _kernel_call(x, packed, bias):
  out = jax.ShapeDtypeStruct(x.shape[:-1] + bias.shape, jnp.float32)
  return jax.ffi.ffi_call("ldm_conv3x3", out, vmap_method="sequential")(x, packed, bias, threads=np.int64(0))


def _batch_axes(mesh, image):
  """(the mesh axes of an [B, H, W, C] operand's batch dimension or None, that sharding of the
  batch with H, W, C whole)."""
  spec = tuple(getattr(image.sharding, "spec", ()))
  batch = spec[0] if spec else None
  return batch, NamedSharding(mesh, P(batch, None, None, None))


# Each device convolves its own examples; the image and channel axes and the weights stay whole
# (XLA gathers sharded weights first, as it does for its own convolution).
def _partition(mesh, arg_shapes, result_shape):
  del result_shape
  _, rows = _batch_axes(mesh, arg_shapes[0])
  whole = NamedSharding(mesh, P())
  return mesh, _kernel_call, rows, (rows, whole, whole)


def _infer(mesh, arg_shapes, result_shape):
  return _partition(mesh, arg_shapes, result_shape)[2]


_kernel_sharded = custom_partitioning(_kernel_call)
_kernel_sharded.def_partition(partition=_partition, infer_sharding_from_operands=_infer,
                              sharding_rule="b h w c, n k l c e, o -> b h w o",
                              need_replication_factors=("h", "w", "c", "n", "k", "l", "e", "o"))  # in the order of first use


# The weight gradient: each device sums over its own examples, then the devices add their sums.
def _weight_grad_call(x, d_out):
  out = jax.ShapeDtypeStruct((3, 3, x.shape[-1], d_out.shape[-1]), jnp.float32)
  return jax.ffi.ffi_call("ldm_conv3x3_weight_grad", out, vmap_method="sequential")(x, d_out, threads=np.int64(0))


def _weight_grad_partition(mesh, arg_shapes, result_shape):
  del result_shape
  batch, rows = _batch_axes(mesh, arg_shapes[0])
  lower = _weight_grad_call if batch is None else lambda x, g: jax.lax.psum(_weight_grad_call(x, g), batch)
  return mesh, lower, NamedSharding(mesh, P()), (rows, rows)


_weight_grad_sharded = custom_partitioning(_weight_grad_call)
_weight_grad_sharded.def_partition(
    partition=_weight_grad_partition, infer_sharding_from_operands=lambda mesh, *_: NamedSharding(mesh, P()),
    sharding_rule="b h w c, b h w o -> i j c o", need_replication_factors=("h", "w", "c", "o", "i", "j"))


# Where the weight gradient takes the kernel: XLA's is 2.5–8× slower from 64×64 pixels on; at 32×32 the
# kernel is as fast up to 320 channels and slower (0.85×) with 640 (`benchmarks/conv.py --weight_grad`,
# batch 8, AVX-512 machine); at 16×16 it is faster up to 256 channels (AVX2 machine, QUIET, XLA / kernel
# ms: batch 32, 16×16×64 26.0 / 9.0, 16×16×128 60.0 / 43.6, 16×16×256 282 / 158; batch 8 3.3 / 2.3,
# 13.3 / 10.5, 50.6 / 49.3; the Fashion-MNIST autoencoder's train step 599 / 646 → 463 / 564 ms, min /
# median of 10 alternating rounds in one process).
def _weight_grad_kernel_applies(pixels: int, in_channels: int, out_channels: int) -> bool:
  widest = max(in_channels, out_channels)
  return in_channels % 16 == 0 and (pixels >= 64 * 64 or (pixels >= 32 * 32 and widest <= 320)
                                    or (pixels >= 16 * 16 and widest <= 256))


def _fused(x, kernel, bias):
  if not cpu_kernels.available():
    raise RuntimeError(f"Conv3x3 'fused': {cpu_kernels.unavailable_reason()}")
  return _kernel_sharded(x, _packed(kernel), bias)


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """x [B, H, W, C] float32 ⊛ kernel [3, 3, C, O] + bias [O] → [B, H, W, O] by the C++ kernel
  (O a multiple of 16; stride 1, zero padding of one pixel: 'SAME')."""
  return _fused(x, kernel, bias)


def _conv3x3_fwd(x, kernel, bias):
  return _fused(x, kernel, bias), (x, kernel)


def _conv3x3_bwd(residuals, d_out):
  x, kernel = residuals
  # dx[u, v, c] = Σ_{i, j, o} d_out[u+1-i, v+1-j, o] · kernel[i, j, c, o]: the same convolution of
  # d_out with the kernel flipped in space and its channel axes swapped.
  flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))
  if x.shape[-1] % 16 == 0:
    dx = _fused(d_out, flipped, jnp.zeros((x.shape[-1],), jnp.float32))
  else:
    dx = _xla_conv(d_out, flipped)
  if _weight_grad_kernel_applies(x.shape[1] * x.shape[2], x.shape[-1], d_out.shape[-1]):
    dw = _weight_grad_sharded(x, d_out)
  else:
    _, kernel_vjp = jax.vjp(lambda k: _xla_conv(x, k), kernel)
    dw = kernel_vjp(d_out)[0]
  return dx, dw, d_out.sum((0, 1, 2))


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


# Winograd where nothing differentiates the layer (sampling, decoding, evaluation features); under
# autodiff the direct convolution — the kernel where it applies, else XLA's —, forward and backward, as
# without Winograd: training's numerics stay what they were. Autodiff through the transforms would
# keep the transformed input (4× x) for the backward or recompute it, compiled 2–5 s longer (the
# vs_diffusers train step: 24 → 26–29 s) and gave that step 1.5 % (recomputing; QUIET A/B); Winograd's
# forward with the direct backward gave it nothing (paired ratio 1.011), and the demo's training
# rounded differently enough to move its held-out shape accuracy (89.1 → 71.9 %, one run each).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _winograd_unless_differentiated(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                                    kernel_applies: bool) -> jax.Array:
  return winograd_conv3x3(x, kernel) + bias


def _direct_fwd(x, kernel, bias, kernel_applies):
  direct = conv3x3 if kernel_applies else lambda x, kernel, bias: _xla_conv(x, kernel) + bias
  return jax.vjp(direct, x, kernel, bias)  # the output, and its vjp (a pytree of the residuals)


def _direct_bwd(kernel_applies, direct_vjp, d_out):
  del kernel_applies
  return direct_vjp(d_out)


_winograd_unless_differentiated.defvjp(_direct_fwd, _direct_bwd)


# Nearest ×2 upsampling followed by a 3×3 convolution (the `Upsample` layers) is a 2×2 convolution
# at the input's resolution. Along each axis, output pixel 2r + 1 sums the 3×3 kernel's taps 0 and 1
# over input pixel r and tap 2 over r + 1; output pixel 2r + 2 sums tap 0 over r and taps 1 and 2 over
# r + 1. So the 2×2 window at (r, r') of the zero-padded input, times four combined kernels (one per
# phase: a VALID 2×2 convolution with 4·O output channels), gives the 2×2 block of output pixels
# starting at (2r + 1, 2r' + 1): 16 multiply-adds per output pixel and input channel instead of 36,
# and the upsampled input (4× the input) is never written. `_PHASE_TAPS[phase, tap of the 2×2 window,
# tap of the 3×3 kernel]`, phase 0 for odd output pixels, 1 for even ones.
_PHASE_TAPS = np.array([[[1, 1, 0], [0, 0, 1]], [[1, 0, 0], [0, 1, 1]]], np.float32)

# Where 'auto' upsamples that way: from 8×8 inputs on; on 4×4 repeating is faster (batch 8, 256
# channels: 5.8–7.7 against 7.0–10.9 ms). From 8×8 the 2×2 form is 1.4–2.2× faster forward and
# 1.6–2.1× forward + backward, except 0.96–1.02× for 128×128×128 (`benchmarks/conv.py --upsample`, 8×8
# to 128×128 inputs, 128–256 channels). CPU only: not measured on GPU or TPU.
UPSAMPLE_MIN_PIXELS = 64


def _pad1(x: jax.Array) -> jax.Array:
  return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _phase_kernel(kernel: jax.Array) -> jax.Array:
  """[3, 3, C, O] → [2, 2, C, 4·O] (output channels ordered row phase, column phase, O), float32."""
  channels, out = kernel.shape[2:]
  return jnp.einsum("suy,tvx,yxco->uvcsto", _PHASE_TAPS, _PHASE_TAPS, kernel.astype(jnp.float32),
                    precision="highest").reshape(2, 2, channels, 4 * out)


def _interleave(phases: jax.Array, out: int) -> jax.Array:
  """[B, H + 1, W + 1, 4·O] → [B, 2H, 2W, O]: each pixel's four phases to their 2×2 block, the border cropped."""
  batch, rows, cols, _ = phases.shape
  blocks = phases.reshape(batch, rows, cols, 2, 2, out).transpose(0, 1, 3, 2, 4, 5)
  return blocks.reshape(batch, 2 * rows, 2 * cols, out)[:, 1:-1, 1:-1]


def _deinterleave(d_out: jax.Array) -> jax.Array:
  """The adjoint of `_interleave`: [B, 2H, 2W, O] → [B, H + 1, W + 1, 4·O]."""
  batch, height, width, out = d_out.shape
  blocks = _pad1(d_out).reshape(batch, height // 2 + 1, 2, width // 2 + 1, 2, out)
  return blocks.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height // 2 + 1, width // 2 + 1, 4 * out)


@jax.custom_vjp
def upsample_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """The 3×3 'SAME' convolution of x upsampled ×2 by nearest-neighbour repetition, plus bias:
  x [B, H, W, C], kernel [3, 3, C, O] → [B, 2H, 2W, O], as one 2×2 convolution at H×W (above).

  The backward is written out too: the input gradient is the transposed 2×2 convolution (again a
  VALID 2×2 convolution, of the gradient's phases), the weight gradient four matmuls. With autodiff's
  backward instead, forward + backward was 1.4–2.6× slower than repeating and convolving at 32×32 to
  128×128 inputs on XLA's CPU backend.
  """
  phases = jax.lax.conv_general_dilated(_pad1(x), _phase_kernel(kernel).astype(x.dtype), (1, 1), "VALID",
                                        dimension_numbers=_DIMENSIONS)
  return _interleave(phases, kernel.shape[-1]) + bias


def _upsample_conv3x3_fwd(x, kernel, bias):
  return upsample_conv3x3(x, kernel, bias), (x, kernel)


def _upsample_conv3x3_bwd(residuals, d_out):
  x, kernel = residuals
  height, width = x.shape[1:3]
  d_phases = _deinterleave(d_out)
  phase_kernel, phase_kernel_vjp = jax.vjp(_phase_kernel, kernel)  # its transpose maps d K back to the 3×3 taps
  # phases[r] = Σ_u padded[r + u] · K[u], so d padded[p] = Σ_u d_phases[p − u] · K[u]ᵀ and
  # dx[i] = d padded[i + 1] = d_phases[i] · K[1]ᵀ + d_phases[i + 1] · K[0]ᵀ: a VALID 2×2 convolution
  # with the phase kernel flipped in space and its channel axes swapped.
  flipped = jnp.transpose(phase_kernel[::-1, ::-1], (0, 1, 3, 2)).astype(d_out.dtype)
  dx = jax.lax.conv_general_dilated(d_phases, flipped, (1, 1), "VALID", dimension_numbers=_DIMENSIONS)
  padded = _pad1(x)
  d_phase_kernel = jnp.stack([
      jnp.stack([jnp.einsum("bhwc,bhwo->co", padded[:, u:u + height + 1, v:v + width + 1], d_phases)
                 for v in (0, 1)])
      for u in (0, 1)])
  d_kernel, = phase_kernel_vjp(d_phase_kernel.astype(jnp.float32))
  return dx, d_kernel, d_out.sum((0, 1, 2)).astype(x.dtype)


upsample_conv3x3.defvjp(_upsample_conv3x3_fwd, _upsample_conv3x3_bwd)


def nearest_upsample(x: jax.Array) -> jax.Array:
  """[B, H, W, C] → [B, 2H, 2W, C], each pixel repeated in a 2×2 block."""
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def upsample_as_phases(implementation: str, x_shape: tuple[int, ...]) -> bool:
  """Whether `Conv3x3(upsample=True)` runs `upsample_conv3x3` ('auto' on CPU, inputs of at least
  `UPSAMPLE_MIN_PIXELS`) rather than repeating the pixels and convolving at 2H×2W."""
  return (implementation == "auto" and jax.default_backend() == "cpu"
          and x_shape[1] * x_shape[2] >= UPSAMPLE_MIN_PIXELS)


class Conv3x3(nn.Module):
  """`flax.linen.Conv(features, (3, 3), padding=1)` (same parameters and initialisation) that runs
  `winograd_conv3x3` where `use_winograd` says so, else `conv3x3`'s C++ kernel where `use_kernel`
  says it applies, `patches_conv3x3` on the tiny images of `use_patches`, else XLA's convolution.

  `upsample=True` convolves x upsampled ×2 by nearest-neighbour repetition (the `Upsample` layers):
  by `upsample_conv3x3` where `upsample_as_phases` says so, else by repeating the pixels first.
  """
  features: int
  dtype: jnp.dtype = jnp.float32
  implementation: str = "auto"
  upsample: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, C] → [B, H, W, features] ([B, 2H, 2W, features] with `upsample`)."""
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    if self.upsample:
      if upsample_as_phases(self.implementation, x.shape):
        return upsample_conv3x3(*(jnp.asarray(a, self.dtype) for a in (x, kernel, bias)))
      x = nearest_upsample(x)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    kernel_applies = use_kernel(self.implementation, in_channels=x.shape[-1], out_channels=self.features,
                                dtype=self.dtype, pixels=x.shape[1] * x.shape[2])
    if use_winograd(self.implementation, x.shape, self.features, self.dtype):
      return _winograd_unless_differentiated(f32(x), f32(kernel), f32(bias), kernel_applies)
    if kernel_applies:
      return conv3x3(f32(x), f32(kernel), f32(bias))
    x, kernel, bias = (jnp.asarray(a, self.dtype) for a in (x, kernel, bias))
    if use_patches(self.implementation, x.shape):
      return patches_conv3x3(x, kernel) + bias
    return _xla_conv(x, kernel) + bias


def conv1x1(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x [..., C] ⊛ kernel [1, 1, C, O] → [..., O] (a 1×1 convolution, no bias) as one [N, C] × [C, O] matmul."""
  return (x.reshape(-1, x.shape[-1]) @ kernel[0, 0]).reshape(*x.shape[:-1], kernel.shape[-1])


class Conv1x1(nn.Module):
  """`flax.linen.Conv(features, (1, 1))` (same parameters `kernel` [1, 1, C, O] and `bias` [O], same
  initialisation) computed as one [B·H·W, C] × [C, O] matmul, on every backend."""
  features: int
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., C] → [..., features]."""
    kernel = self.param("kernel", self.kernel_init, (1, 1, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    x, kernel, bias = (jnp.asarray(a, self.dtype) for a in (x, kernel, bias))
    return conv1x1(x, kernel) + bias
