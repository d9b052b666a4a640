"""The FID Inception-v3 network in linen, and its weights from the standard PyTorch file.

FID, KID and IS are defined on one particular network: the TensorFlow Inception-v3 graph of
2015-12-05 (`inception-2015-12-05.tgz`) that the original FID code used. pytorch-fid ported
it as torchvision's Inception3 with patched blocks (`FIDInceptionA/C/E_1/E_2`): the branch
average pools ignore padding (TF's behaviour), the last block pools with max instead of
average, and the classifier has 1008 classes. This module is that network, NHWC:

    x [B, S, S, 3] pixels in [0, 255] → (x − 128) / 128 → stem → Mixed_5b … Mixed_7c
      → global average → pool3 [B, 2048] → fc → logits [B, 1008]

The input scaling is the TF graph's own (as torch-fidelity and clean-fid); pytorch-fid uses
2·x/255 − 1, which differs from it by up to one pixel step (2/255, at white).
FID uses pool3; the Inception Score uses the logits without the fc bias, as the original
IS code did (`logits_unbiased`). The network is fully convolutional up to pool3, so any
S ≥ 75 runs; the evaluation protocol (`ldm_jax.eval.features`) always feeds S = 299.
Batch norm is in inference form with the running statistics (eps 1e-3).

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (the same file as
torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`), read from a local path —
nothing is downloaded. `.pth` files are read with `torch.load(weights_only=True)` (no code
is unpickled; needs PyPI `torch`); a `.npz` with the same keys, e.g. written elsewhere with
`np.savez(out, **{k: v.numpy() for k, v in torch.load(pth).items()})`, needs no torch.
"""

from __future__ import annotations

import functools
import os

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.nn.conv import conv1x1

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
INPUT_SIZE = 299
MIN_INPUT_SIZE = 75
NUM_LOGITS = 1008
FEATURE_DIM = 2048
_BN_EPS = 1e-3


class _ConvBN(nn.Module):
  """Conv (no bias) → batch norm (running statistics) → ReLU: torchvision's BasicConv2d.

  Params: `kernel` [kh, kw, in, out], `scale`, `bias`, `mean`, `var` [out].
  `padding` 'same' pads (k − 1) / 2 on each side (stride 1 only); 'valid' pads nothing.
  """
  features: int
  kernel: tuple[int, int]
  stride: int = 1
  padding: str = "same"

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (kh, kw, x.shape[-1], self.features))
    scale = self.param("scale", nn.initializers.ones, (self.features,))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    mean = self.param("mean", nn.initializers.zeros, (self.features,))
    var = self.param("var", nn.initializers.ones, (self.features,))
    if (kh, kw, self.stride) == (1, 1, 1):
      y = conv1x1(x, kernel)  # a matmul, faster than XLA's CPU convolution of a 1×1 kernel
    else:
      pad = ((kh // 2, kh // 2), (kw // 2, kw // 2)) if self.padding == "same" else "VALID"
      y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), pad,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = (y - mean) * (scale * jax.lax.rsqrt(var + _BN_EPS)) + bias
    return nn.relu(y)


def _avg_pool_same(x):
  # TF's average pool divides by the number of real (unpadded) inputs under the window.
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class _InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = _ConvBN(64, (1, 1), name="branch1x1")(x)
    b5 = _ConvBN(48, (1, 1), name="branch5x5_1")(x)
    b5 = _ConvBN(64, (5, 5), name="branch5x5_2")(b5)
    b3 = _ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = _ConvBN(96, (3, 3), name="branch3x3dbl_2")(b3)
    b3 = _ConvBN(96, (3, 3), name="branch3x3dbl_3")(b3)
    bp = _ConvBN(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class _InceptionB(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = _ConvBN(384, (3, 3), stride=2, padding="valid", name="branch3x3")(x)
    bd = _ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = _ConvBN(96, (3, 3), name="branch3x3dbl_2")(bd)
    bd = _ConvBN(96, (3, 3), stride=2, padding="valid", name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_valid(x)], axis=-1)


class _InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = _ConvBN(192, (1, 1), name="branch1x1")(x)
    b7 = _ConvBN(c7, (1, 1), name="branch7x7_1")(x)
    b7 = _ConvBN(c7, (1, 7), name="branch7x7_2")(b7)
    b7 = _ConvBN(192, (7, 1), name="branch7x7_3")(b7)
    bd = _ConvBN(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = _ConvBN(c7, (7, 1), name="branch7x7dbl_2")(bd)
    bd = _ConvBN(c7, (1, 7), name="branch7x7dbl_3")(bd)
    bd = _ConvBN(c7, (7, 1), name="branch7x7dbl_4")(bd)
    bd = _ConvBN(192, (1, 7), name="branch7x7dbl_5")(bd)
    bp = _ConvBN(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class _InceptionD(nn.Module):
  @nn.compact
  def __call__(self, x):
    b3 = _ConvBN(192, (1, 1), name="branch3x3_1")(x)
    b3 = _ConvBN(320, (3, 3), stride=2, padding="valid", name="branch3x3_2")(b3)
    b7 = _ConvBN(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = _ConvBN(192, (1, 7), name="branch7x7x3_2")(b7)
    b7 = _ConvBN(192, (7, 1), name="branch7x7x3_3")(b7)
    b7 = _ConvBN(192, (3, 3), stride=2, padding="valid", name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_valid(x)], axis=-1)


class _InceptionE(nn.Module):
  """`max_pool`: the FID network's last block (Mixed_7c) pools with max, the one before with avg."""
  max_pool: bool

  @nn.compact
  def __call__(self, x):
    b1 = _ConvBN(320, (1, 1), name="branch1x1")(x)
    b3 = _ConvBN(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([_ConvBN(384, (1, 3), name="branch3x3_2a")(b3),
                          _ConvBN(384, (3, 1), name="branch3x3_2b")(b3)], axis=-1)
    bd = _ConvBN(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = _ConvBN(384, (3, 3), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([_ConvBN(384, (1, 3), name="branch3x3dbl_3a")(bd),
                          _ConvBN(384, (3, 1), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = (nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1))) if self.max_pool
              else _avg_pool_same(x))
    bp = _ConvBN(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """The FID Inception-v3; module names are the PyTorch ones (`Mixed_6b/branch7x7_2`, …)."""

  @nn.compact
  def __call__(self, x):
    """x: [B, S, S, 3] float pixels in [0, 255], S ≥ 75 (299 by the protocol).

    Returns:
      {'pool3': [B, 2048], 'logits': [B, 1008], 'logits_unbiased': [B, 1008]} float32.
    """
    if x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < MIN_INPUT_SIZE:
      raise ValueError(f"FIDInceptionV3: expected [B, S, S, 3] with S >= {MIN_INPUT_SIZE}, got {x.shape}")
    h = (x.astype(jnp.float32) - 128.0) / 128.0  # the TF graph's own input scaling
    h = _ConvBN(32, (3, 3), stride=2, padding="valid", name="Conv2d_1a_3x3")(h)
    h = _ConvBN(32, (3, 3), padding="valid", name="Conv2d_2a_3x3")(h)
    h = _ConvBN(64, (3, 3), name="Conv2d_2b_3x3")(h)
    h = _max_pool_valid(h)
    h = _ConvBN(80, (1, 1), name="Conv2d_3b_1x1")(h)
    h = _ConvBN(192, (3, 3), padding="valid", name="Conv2d_4a_3x3")(h)
    h = _max_pool_valid(h)
    h = _InceptionA(32, name="Mixed_5b")(h)
    h = _InceptionA(64, name="Mixed_5c")(h)
    h = _InceptionA(64, name="Mixed_5d")(h)
    h = _InceptionB(name="Mixed_6a")(h)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      h = _InceptionC(c7, name=name)(h)
    h = _InceptionD(name="Mixed_7a")(h)
    h = _InceptionE(max_pool=False, name="Mixed_7b")(h)
    h = _InceptionE(max_pool=True, name="Mixed_7c")(h)
    pool3 = jnp.mean(h, axis=(1, 2))
    fc = nn.Dense(NUM_LOGITS, name="fc")
    logits = fc(pool3)
    return {"pool3": pool3, "logits": logits, "logits_unbiased": logits - fc.variables["params"]["bias"]}


def _abstract_params():
  image = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), image)["params"]


_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def convert_state_dict(state_dict) -> dict:
  """pytorch-fid / torch-fidelity FID Inception state dict → params of `FIDInceptionV3`.

  `Mixed_6b.branch7x7_2.conv.weight` [O, I, kh, kw] → `Mixed_6b/branch7x7_2/kernel`
  [kh, kw, I, O]; `….bn.{weight, bias, running_mean, running_var}` → `scale, bias, mean, var`;
  `fc.weight` [1008, 2048] → `fc/kernel` transposed. `num_batches_tracked` is ignored.

  Args:
    state_dict: name → array (numpy or torch tensors).
  Raises:
    ValueError naming the missing, unexpected or mis-shaped keys.
  """
  arrays = {k: np.asarray(v.numpy() if hasattr(v, "numpy") else v, np.float32)
            for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  params, used = {}, set()

  def put(path, key, transform=lambda a: a):
    if key not in arrays:
      raise ValueError(f"FID Inception weights: missing key {key!r}")
    node = params
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = transform(arrays[key])
    used.add(key)

  def visit(tree, path):
    for name, value in tree.items():
      if isinstance(value, dict):
        visit(value, path + (name,))
        continue
      module = ".".join(path)
      if path == ("fc",):
        put(path + (name,), f"fc.{'weight' if name == 'kernel' else 'bias'}",
            (lambda a: a.T) if name == "kernel" else (lambda a: a))
      elif name == "kernel":
        put(path + (name,), f"{module}.conv.weight", lambda a: a.transpose(2, 3, 1, 0))
      else:
        torch_name = {v: k for k, v in _BN_NAMES.items()}[name]
        put(path + (name,), f"{module}.bn.{torch_name}")

  abstract = _abstract_params()
  visit(abstract, ())
  unexpected = sorted(set(arrays) - used)
  if unexpected:
    raise ValueError(f"FID Inception weights: unexpected keys {unexpected[:5]}"
                     f"{' …' if len(unexpected) > 5 else ''}; is this the FID Inception "
                     f"({WEIGHTS_FILE}) and not torchvision's Inception-v3?")
  got = jax.tree.map(lambda a: a.shape, params)
  want = jax.tree.map(lambda a: a.shape, abstract)
  if got != want:
    bad = [f"{jax.tree_util.keystr(p)}: {a} vs {b}" for (p, a), b in
           zip(jax.tree_util.tree_leaves_with_path(got, is_leaf=lambda x: isinstance(x, tuple)),
               jax.tree.leaves(want, is_leaf=lambda x: isinstance(x, tuple))) if a != b]
    raise ValueError(f"FID Inception weights: wrong shapes (got vs expected): {bad[:5]}")
  return params


def missing_weights_message(what: str) -> str:
  return (f"{what}: the FID Inception-v3 needs its weight file {WEIGHTS_FILE} (pytorch-fid's "
          f"release; torch-fidelity's weights-inception-2015-12-05-6726825d.pth is the same), "
          f"given by local path, e.g. --inception_weights /path/to/{WEIGHTS_FILE} or the "
          f"environment variable LDM_JAX_INCEPTION_WEIGHTS. Nothing is downloaded. Without it, "
          f"use --extractor vgg16 (reported as FD-VGG16, not FID).")


@functools.cache
def load_inception_params(path: str | None):
  """Reads and converts the FID Inception weights at `path` (`.pth` or `.npz`); cached.

  Raises:
    FileNotFoundError: `path` is None or not a file — the message names the expected file.
    ImportError: a `.pth` file without PyPI `torch` installed.
  """
  if not path or not os.path.isfile(path):
    where = f"{path} is not a file" if path else "no weight file was given"
    raise FileNotFoundError(missing_weights_message(f"Inception weights: {where}"))
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      state_dict = {k: f[k] for k in f.files}
  else:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"{path}: reading a .pth file needs PyPI `torch` (CPU is enough); or "
                        f"convert it to .npz where torch is installed (see "
                        f"ldm_jax.eval.inception's docstring)") from e
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
  params = convert_state_dict(state_dict)
  return flax.core.freeze(jax.tree.map(jnp.asarray, params))
