"""ResnetBlock, Downsample and Upsample against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.nn import Downsample, ResnetBlock, Upsample, check_group_norm


def conv2d(x, kernel, bias, stride=1, pads=((1, 1), (1, 1))):
  """NHWC × HWIO cross-correlation in float64 with explicit (before, after) padding per axis."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), *pads, (0, 0)))
  kernel = np.asarray(kernel, np.float64)
  kh, kw = kernel.shape[:2]
  oh = (x.shape[1] - kh) // stride + 1
  ow = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], oh, ow, kernel.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
      out += patch @ kernel[i, j]
  return out + np.asarray(bias, np.float64)


def group_norm(x, p, groups, eps):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  g = (g - g.mean(axis=(1, 2, 4), keepdims=True)) / np.sqrt(g.var(axis=(1, 2, 4), keepdims=True) + eps)
  return g.reshape(x.shape) * p["scale"] + p["bias"]


def silu(x):
  return x / (1 + np.exp(-x))


def random_params(module, *args, seed=0, scale=0.3):
  """Random parameters for `module` (norm scales around 1, no zero term), drawn in numpy from the
  abstract tree so that no `init` is compiled."""
  abstract = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    value = scale * rng.normal(size=leaf.shape)
    return jnp.asarray(1 + value if path[-1].key == "scale" else value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, abstract)


def as_numpy(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def resnet_reference(p, x, temb=None, mode="default", groups=8, eps=1e-6):
  h = conv2d(silu(group_norm(x, p["norm1"], groups, eps)), p["conv1"]["kernel"], p["conv1"]["bias"])
  if temb is not None:
    emb = (silu(temb) @ p["time_emb_proj"]["kernel"] + p["time_emb_proj"]["bias"])[:, None, None]
    if mode == "scale_shift":
      scale, shift = np.split(emb, 2, axis=-1)
      h = group_norm(h, p["norm2"], groups, eps) * (1 + scale) + shift
    else:
      h = group_norm(h + emb, p["norm2"], groups, eps)
  else:
    h = group_norm(h, p["norm2"], groups, eps)
  h = conv2d(silu(h), p["conv2"]["kernel"], p["conv2"]["bias"])
  if "conv_shortcut" in p:
    x = conv2d(x, p["conv_shortcut"]["kernel"], p["conv_shortcut"]["bias"], pads=((0, 0), (0, 0)))
  return x + h


@pytest.mark.parametrize("in_ch,out_ch", [(16, 16), (16, 24)])
def test_resnet_block_matches_numpy_and_shortcut_only_when_channels_change(in_ch, out_ch):
  x = jax.random.normal(jax.random.key(0), (2, 5, 6, in_ch))
  block = ResnetBlock(out_ch, num_groups=8, epsilon=1e-6)
  params = random_params(block, x, seed=1)
  assert ("conv_shortcut" in params) == (in_ch != out_ch)
  if in_ch != out_ch:
    assert params["conv_shortcut"]["kernel"].shape == (1, 1, in_ch, out_ch)
  out = jax.jit(block.apply)({"params": params}, x)
  np.testing.assert_allclose(out, resnet_reference(as_numpy(params), np.asarray(x, np.float64)),
                             atol=1e-4, rtol=1e-4)


def test_resnet_block_residual_is_the_shortcut_when_the_branch_is_zero():
  x = jax.random.normal(jax.random.key(3), (1, 4, 4, 16))
  for out_ch in (16, 32):
    block = ResnetBlock(out_ch, num_groups=8)
    params = random_params(block, x, seed=4)
    params = {**params, "conv2": jax.tree.map(jnp.zeros_like, params["conv2"])}
    out = jax.jit(block.apply)({"params": params}, x)
    if out_ch == 16:
      np.testing.assert_array_equal(out, x)  # identity skip, no projection
    else:
      sc = params["conv_shortcut"]
      np.testing.assert_allclose(out, np.asarray(x) @ np.asarray(sc["kernel"][0, 0]) + sc["bias"],
                                 atol=1e-5)


@pytest.mark.parametrize("mode", ["default", "scale_shift"])
def test_resnet_block_time_embedding_matches_numpy(mode):
  x = jax.random.normal(jax.random.key(5), (2, 4, 4, 16))
  temb = jax.random.normal(jax.random.key(6), (2, 12))
  block = ResnetBlock(16, num_groups=8, epsilon=1e-5, time_embedding_norm=mode)
  params = random_params(block, x, temb, seed=7)
  out = jax.jit(block.apply)({"params": params}, x, temb)
  expected = resnet_reference(as_numpy(params), np.asarray(x, np.float64), np.asarray(temb, np.float64),
                              mode, eps=1e-5)
  np.testing.assert_allclose(out, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("height,width", [(8, 6), (5, 7)])
def test_downsample_padding_asymmetric_vs_symmetric(height, width):
  x = jax.random.normal(jax.random.key(9), (2, height, width, 4))
  outputs = {}
  for padding, pads in (("asymmetric", ((0, 1), (0, 1))), ("symmetric", ((1, 1), (1, 1)))):
    module = Downsample(6, padding=padding)
    params = random_params(module, x, seed=10)  # same seed: same weights for both
    outputs[padding] = out = jax.jit(module.apply)({"params": params}, x)
    expected = conv2d(x, params["conv"]["kernel"], params["conv"]["bias"], stride=2, pads=pads)
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=1e-5)
  # asymmetric (autoencoder, torch F.pad(0, 1, 0, 1)): ⌊s/2⌋; symmetric (U-Net): ⌈s/2⌉.
  assert outputs["asymmetric"].shape == (2, height // 2, width // 2, 6)
  assert outputs["symmetric"].shape == (2, -(-height // 2), -(-width // 2), 6)
  if height % 2 == 0:
    assert not np.allclose(outputs["asymmetric"], outputs["symmetric"], atol=1e-3)


def test_upsample_is_nearest_then_conv():
  x = jax.random.normal(jax.random.key(11), (1, 3, 4, 4))
  module = Upsample(5)
  params = random_params(module, x, seed=12)
  out = jax.jit(module.apply)({"params": params}, x)
  nearest = np.repeat(np.repeat(np.asarray(x), 2, axis=1), 2, axis=2)
  np.testing.assert_allclose(out, conv2d(nearest, params["conv"]["kernel"], params["conv"]["bias"]),
                             atol=1e-5, rtol=1e-5)
  assert out.shape == (1, 6, 8, 5)


def test_check_group_norm_names_the_key():
  check_group_norm(64, 32, "model.ch")
  with pytest.raises(ValueError, match=r"^model\.ch: 48 channels"):
    check_group_norm(48, 32, "model.ch")


def _group_norm_f64(x, scale, bias, groups, eps):
  """The formula in float64 jnp (differentiable): statistics over all but the batch and channels."""
  g = x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
  axes = tuple(range(1, g.ndim - 2)) + (g.ndim - 1,)
  mean = g.mean(axis=axes, keepdims=True)
  var = jnp.square(g - mean).mean(axis=axes, keepdims=True)
  return ((g - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale + bias


@pytest.mark.parametrize("shape, groups", [((2, 6, 5, 64), 32), ((3, 7, 16), 4), ((2, 3, 4, 2, 24), 8)])
def test_group_norm_matches_float64_formula_and_its_gradient(shape, groups):
  """Values and all three gradients (custom VJP) equal float64 autodiff of the formula, for 4-D
  (NHWC), 3-D and 5-D inputs; the mean (~5) dwarfs the std (~0.5), where a one-pass variance
  E[x²] − E[x]² in float32 loses digits."""
  from ldm_jax.nn import GroupNorm
  rng = np.random.default_rng(0)
  x = (5 + 0.5 * rng.standard_normal(shape)).astype(np.float32)
  upstream = rng.standard_normal(shape).astype(np.float32)
  c = shape[-1]
  params = {"scale": (1 + 0.3 * rng.standard_normal(c)).astype(np.float32),
            "bias": (0.3 * rng.standard_normal(c)).astype(np.float32)}
  module = GroupNorm(groups, epsilon=1e-5)

  def loss(p, x):
    return jnp.sum(module.apply({"params": p}, x) * upstream)

  def loss_f64(p, x):
    return jnp.sum(_group_norm_f64(x, p["scale"], p["bias"], groups, 1e-5) * upstream)

  out = module.apply({"params": params}, jnp.asarray(x))
  with jax.enable_x64():
    f64 = lambda a: jnp.asarray(a, jnp.float64)
    want = np.asarray(_group_norm_f64(f64(x), f64(params["scale"]), f64(params["bias"]), groups, 1e-5))
    want_grads = jax.grad(loss_f64, argnums=(0, 1))(jax.tree.map(f64, params), f64(x))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), want, atol=2e-5)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jnp.asarray(x))
  for got, expected in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    expected = np.asarray(expected)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4 * np.abs(expected).max())


def test_group_norm_keeps_flax_parameters_and_casts_to_dtype():
  """Same parameter tree as flax.linen.GroupNorm (checkpoints and converters keep working), the same
  result on ordinary inputs, and bfloat16 output when dtype asks for it (statistics in float32)."""
  import flax.linen as nn

  from ldm_jax.nn import GroupNorm
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 4, 4, 64)), jnp.float32)
  ours, theirs = GroupNorm(32, epsilon=1e-6), nn.GroupNorm(32, epsilon=1e-6)
  params = theirs.init(jax.random.key(0), x)
  params = jax.tree.map(lambda a: a + jnp.linspace(-0.5, 0.5, a.size).reshape(a.shape), params)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(jnp.shape, params)
  np.testing.assert_allclose(np.asarray(ours.apply(params, x)), np.asarray(theirs.apply(params, x)),
                             atol=2e-5)
  low = GroupNorm(32, epsilon=1e-6, dtype=jnp.bfloat16).apply(params, x.astype(jnp.bfloat16))
  assert low.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(low, np.float32), np.asarray(theirs.apply(params, x)), atol=5e-2)
