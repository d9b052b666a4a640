"""PatchGAN discriminator: patch grid size, taming's initialisation, forward values per norm."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models.discriminator import NLayerDiscriminator


def patch_grid(size, n_layers):
  """Side of the logit map: 4×4 convs with padding 1, n_layers of stride 2 then two of stride 1."""
  for _ in range(n_layers):
    size = (size + 2 - 4) // 2 + 1
  for _ in range(2):
    size = size + 2 - 4 + 1
  return size


def conv4(x, p, stride):
  """Reference 4×4 conv, padding 1, NHWC × HWIO, float64."""
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  kernel = np.asarray(p["kernel"], np.float64)
  oh, ow = (x.shape[1] - 4) // stride + 1, (x.shape[2] - 4) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, kernel.shape[-1]))
  for i in range(4):
    for j in range(4):
      out += x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride] @ kernel[i, j]
  return out + (np.asarray(p["bias"], np.float64) if "bias" in p else 0)


def norm_reference(h, p, norm):
  if norm == "none":
    return h
  if norm == "batch":
    mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
    return (h - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]
  b, hh, w, c = h.shape
  g = h.reshape(b, hh, w, 32, c // 32)
  g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + 1e-5)
  return g.reshape(h.shape) * p["scale"] + p["bias"]


def leaky(x):
  return np.where(x > 0, x, 0.2 * x)


@pytest.mark.parametrize("size,n_layers,expected", [(256, 3, 30), (32, 3, 2), (64, 2, 14), (256, 1, 126)])
def test_patch_grid_matches_patchgan_formula(size, n_layers, expected):
  assert patch_grid(size, n_layers) == expected
  disc = NLayerDiscriminator(ndf=8, n_layers=n_layers)
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  variables = jax.eval_shape(disc.init, jax.random.key(0), x)
  assert jax.eval_shape(disc.apply, variables, x).shape == (2, expected, expected, 1)


def test_init_follows_taming_weights_init_and_param_names():
  disc = NLayerDiscriminator(ndf=32, n_layers=3, norm="batch")
  params = jax.jit(disc.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  assert set(flax.traverse_util.flatten_dict(params, sep="/")) == {
      "conv_0/kernel", "conv_0/bias", "conv_1/kernel", "conv_2/kernel", "conv_3/kernel",
      "conv_4/kernel", "conv_4/bias", *(f"norm_{n}/{p}" for n in (1, 2, 3) for p in ("scale", "bias"))}
  channels = [params[f"conv_{k}"]["kernel"].shape[-1] for k in range(5)]
  assert channels == [32, 64, 128, 256, 1]
  assert [params[f"conv_{k}"]["kernel"].shape[2] for k in range(5)] == [3, 32, 64, 128, 256]
  kernels = np.concatenate([np.ravel(params[f"conv_{k}"]["kernel"]) for k in range(5)])
  assert abs(kernels.mean()) < 1e-3
  np.testing.assert_allclose(kernels.std(), 0.02, rtol=0.02)
  scales = np.concatenate([params[f"norm_{n}"]["scale"] for n in (1, 2, 3)])
  np.testing.assert_allclose(scales.mean(), 1.0, atol=0.01)
  np.testing.assert_allclose(scales.std(), 0.02, rtol=0.2)
  for leaf in (params["norm_1"]["bias"], params["conv_0"]["bias"], params["conv_4"]["bias"]):
    np.testing.assert_array_equal(leaf, 0.0)


@pytest.mark.parametrize("norm", ["batch", "group", "none"])
def test_forward_matches_numpy_reference(norm):
  x = jax.random.uniform(jax.random.key(1), (3, 16, 16, 3), minval=-1, maxval=1)
  disc = NLayerDiscriminator(ndf=32, n_layers=2, norm=norm)
  variables = jax.jit(disc.init)(jax.random.key(2), x)
  assert set(variables) == {"params"}  # stateless: no batch_stats collection, whatever the norm
  # Norm affine parameters away from identity so that scale/bias mix-ups show.
  params = {k: ({"scale": v["scale"] + 0.3, "bias": v["bias"] + 0.1} if k.startswith("norm") else v)
            for k, v in variables["params"].items()}
  apply = jax.jit(disc.apply)
  logits = apply({"params": params}, x)
  assert logits.shape == (3, 2, 2, 1)
  # 'batch' normalises with the statistics of the whole batch (taming's BatchNorm in train mode);
  # the other norms are per example.
  others = apply({"params": params}, x.at[1:].set(-x[1:]))
  if norm == "batch":
    assert not np.allclose(logits[0], others[0], atol=1e-4)
  else:
    np.testing.assert_allclose(logits[0], others[0], atol=1e-5)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = leaky(conv4(np.asarray(x, np.float64), p["conv_0"], 2))
  h = leaky(norm_reference(conv4(h, p["conv_1"], 2), p.get("norm_1"), norm))
  h = leaky(norm_reference(conv4(h, p["conv_2"], 1), p.get("norm_2"), norm))
  np.testing.assert_allclose(logits, conv4(h, p["conv_3"], 1), atol=1e-4, rtol=1e-4)


def test_bad_settings_name_the_field():
  x = jnp.zeros((1, 16, 16, 3))
  with pytest.raises(ValueError, match=r"NLayerDiscriminator\.norm: 'instance'"):
    jax.eval_shape(NLayerDiscriminator(norm="instance").init, jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"NLayerDiscriminator\.n_layers"):
    jax.eval_shape(NLayerDiscriminator(n_layers=0).init, jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"NLayerDiscriminator\.ndf=8"):
    jax.eval_shape(NLayerDiscriminator(ndf=8, norm="group").init, jax.random.key(0), x)
