"""Conv3x3 (the C++ CPU kernel) against flax.linen.Conv: values, gradients, parameters, fallbacks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.nn import conv as conv_lib
from ldm_jax.nn import cpu_kernels

needs_kernel = pytest.mark.skipif(cpu_kernels.unavailable_reason() is not None,
                                  reason=f"CPU kernels unavailable: {cpu_kernels.unavailable_reason()}")


def _xla(x, kernel, bias):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias


def _reference(x, kernel, bias):
  with jax.enable_x64():
    f64 = lambda a: jnp.asarray(a, jnp.float64)
    return np.asarray(_xla(f64(x), f64(kernel), f64(bias)))


def _random_case(seed, shape, out):
  """x [shape], kernel [3, 3, C, out] (unit-variance outputs), bias, and an upstream gradient."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  kernel = (rng.standard_normal((3, 3, shape[-1], out)) / np.sqrt(9 * shape[-1])).astype(np.float32)
  bias = rng.standard_normal(out).astype(np.float32)
  upstream = rng.standard_normal(shape[:-1] + (out,)).astype(np.float32)
  return x, kernel, bias, upstream


def _assert_matches_float64(fn, x, kernel, bias, upstream, *, grad_tolerance):
  """fn(x, kernel, bias) equals the float64 convolution to 2e-5, and its gradients of
  sum(fn · upstream) with respect to x, kernel and bias equal float64's to `grad_tolerance` × their
  largest magnitude."""
  np.testing.assert_allclose(np.asarray(jax.jit(fn)(x, kernel, bias)), _reference(x, kernel, bias), atol=2e-5)
  loss = lambda fn, dtype: lambda x, k, b: jnp.sum(fn(x, k, b) * jnp.asarray(upstream, dtype))
  grads = jax.jit(jax.grad(loss(fn, jnp.float32), argnums=(0, 1, 2)))(x, kernel, bias)
  with jax.enable_x64():
    f64 = lambda a: jnp.asarray(a, jnp.float64)
    want = jax.grad(loss(_xla, jnp.float64), argnums=(0, 1, 2))(f64(x), f64(kernel), f64(bias))
  for g, w in zip(grads, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=grad_tolerance * float(jnp.abs(w).max()))


@needs_kernel
@pytest.mark.parametrize("shape, out", [((2, 5, 13, 16), 64), ((1, 7, 8, 48), 32), ((2, 3, 19, 32), 16),
                                        ((1, 4, 4, 32), 64), ((2, 1, 3, 16), 16), ((1, 5, 7, 288), 64),
                                        ((1, 6, 6, 3), 16)])
def test_kernel_matches_float64_convolution_and_its_gradients(shape, out):
  """Widths that the 6- and 12-pixel tiles do not divide, 4-pixel tiles, images of one row (every
  tile on the border), 1/2/4 vectors of output channels, 288 input channels (two passes of at
  most 256), and an input with 3 channels (its input gradient then comes from XLA)."""
  _assert_matches_float64(conv_lib.conv3x3, *_random_case(0, shape, out), grad_tolerance=1e-4)


@needs_kernel
def test_layer_has_flax_conv_parameters_and_output():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 6, 7, 32)), jnp.float32)
  ours, theirs = conv_lib.Conv3x3(48, implementation="fused", name="conv"), nn.Conv(48, (3, 3), padding=1, name="conv")
  params = ours.init(jax.random.key(3), x)
  flax_params = theirs.init(jax.random.key(3), x)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(flax_params)):  # same shapes and draws
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  params = jax.tree.map(lambda a: a + 0.1, params)  # a non-zero bias
  assert conv_lib.use_kernel("auto", in_channels=32, out_channels=48, dtype=jnp.float32)
  np.testing.assert_allclose(np.asarray(ours.apply(params, x)), np.asarray(theirs.apply(params, x)), atol=2e-5)


def test_choice_of_implementation(monkeypatch):
  """XLA for bfloat16, for channels that are not multiples of 16, for images under 16×16 and over
  640 input channels (where XLA is as fast), on request, and for the whole process with
  LDM_JAX_CONV=xla; 'fused' where the kernel cannot run is an error saying why."""
  f32 = jnp.float32
  assert not conv_lib.use_kernel("auto", in_channels=32, out_channels=32, dtype=jnp.bfloat16)
  assert not conv_lib.use_kernel("auto", in_channels=32, out_channels=8, dtype=f32)
  assert not conv_lib.use_kernel("xla", in_channels=32, out_channels=32, dtype=f32)
  assert not conv_lib.use_kernel("auto", in_channels=32, out_channels=32, dtype=f32, pixels=8 * 8)  # small images
  assert not conv_lib.use_kernel("auto", in_channels=1280, out_channels=1280, dtype=f32, pixels=32 * 32)
  with pytest.raises(ValueError, match=r"'fused' cannot run here: .*multiples of 16, got float32, 32 → 8"):
    conv_lib.use_kernel("fused", in_channels=32, out_channels=8, dtype=f32)
  with pytest.raises(ValueError, match=r"Conv3x3\.implementation: 'cudnn' is not one of auto, xla, fused"):
    conv_lib.use_kernel("cudnn", in_channels=32, out_channels=32, dtype=f32)
  monkeypatch.setenv("LDM_JAX_CONV", "xla")
  assert not conv_lib.use_kernel("auto", in_channels=32, out_channels=32, dtype=f32)


@needs_kernel
def test_weight_gradient_takes_the_kernel_where_it_is_faster():
  """The backward of `conv3x3` computes the weight gradient with the C++ kernel from 16×16 images
  with at most 256 channels, from 32×32 with at most 320, from 64×64 with any; else with XLA."""
  def uses_kernel(size, channels):
    x = jnp.zeros((2, size, size, channels), jnp.float32)
    kernel, bias = jnp.zeros((3, 3, channels, channels), jnp.float32), jnp.zeros((channels,), jnp.float32)
    grad = jax.grad(lambda k: jnp.sum(conv_lib.conv3x3(x, k, bias)))
    return "ldm_conv3x3_weight_grad" in jax.jit(grad).lower(kernel).compile().as_text()
  assert uses_kernel(16, 64) and uses_kernel(16, 256) and uses_kernel(32, 320) and uses_kernel(64, 640)
  assert not uses_kernel(16, 320) and not uses_kernel(32, 640)


@pytest.mark.parametrize("shape, out", [((3, 1, 1, 8), 16), ((2, 2, 2, 32), 24), ((2, 3, 3, 5), 7),
                                        ((1, 1, 3, 16), 16), ((2, 3, 2, 4), 4)])
def test_patches_convolution_matches_float64_and_its_gradients(shape, out):
  """1×1, 2×2, 3×3 and non-square tiny images (every pixel on the border), channels that are not
  multiples of 16: `patches_conv3x3` equals the float64 convolution, and so do its input and weight
  gradients."""
  patches = lambda x, k, b: conv_lib.patches_conv3x3(x, k) + b
  _assert_matches_float64(patches, *_random_case(5, shape, out), grad_tolerance=1e-5)


def test_layer_convolves_images_of_at_most_3x3_pixels_as_patches_on_cpu(monkeypatch):
  """Under 'auto' on CPU a `Conv3x3` of 1×1 to 3×3 images has no convolution in its program (the
  patches' matmul), from 4×4 pixels on (and with 'xla', or LDM_JAX_CONV=xla) XLA's convolution; all
  give flax's output, and bfloat16 stays bfloat16."""
  assert jax.default_backend() == "cpu"
  rng = np.random.default_rng(6)
  for size, patches in ((1, True), (2, True), (3, True), (4, False)):
    x = jnp.asarray(rng.standard_normal((2, size, size, 8)), jnp.float32)
    layer, flax_conv = conv_lib.Conv3x3(12), nn.Conv(12, (3, 3), padding=1)
    params = jax.tree.map(lambda a: a + 0.1, layer.init(jax.random.key(0), x))
    assert conv_lib.use_patches("auto", x.shape) == patches
    assert ("convolution" not in jax.jit(layer.apply).lower(params, x).as_text()) == patches
    np.testing.assert_allclose(np.asarray(layer.apply(params, x)), np.asarray(flax_conv.apply(params, x)), atol=2e-5)
  x = jnp.asarray(rng.standard_normal((2, 2, 3, 8)), jnp.float32)
  bf16 = conv_lib.Conv3x3(12, dtype=jnp.bfloat16)
  out = bf16.apply(params, x)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(flax_conv.apply(params, x)), atol=5e-2)
  assert not conv_lib.use_patches("xla", x.shape)
  monkeypatch.setenv("LDM_JAX_CONV", "xla")
  assert not conv_lib.use_patches("auto", x.shape)
  assert "convolution" in jax.jit(conv_lib.Conv3x3(12).apply).lower(params, x).as_text()


@pytest.mark.parametrize("shape, out", [((2, 8, 8, 16), 24), ((1, 7, 9, 8), 5), ((3, 2, 2, 4), 4), ((1, 1, 3, 6), 8),
                                        ((2, 8, 6, 32), 16)])
def test_winograd_convolution_matches_float64_and_its_gradients(shape, out):
  """Square and non-square images, odd heights and widths (a padded row or column of tiles whose
  outputs are dropped), images smaller than one tile: `winograd_conv3x3` equals the float64
  convolution, and so do its input and weight gradients."""
  winograd = lambda x, k, b: conv_lib.winograd_conv3x3(x, k) + b
  _assert_matches_float64(winograd, *_random_case(7, shape, out), grad_tolerance=1e-5)


@pytest.mark.parametrize("kernel_applies", [False, pytest.param(True, marks=needs_kernel)])
def test_layer_winograd_path_is_winograd_alone_and_the_direct_convolution_under_autodiff(kernel_applies):
  """`Conv3x3`'s Winograd path: called plainly, Winograd's output; under autodiff, the direct
  convolution's (the kernel's, or XLA's) output bit for bit and its gradients, equal to float64's."""
  x, kernel, bias, upstream = _random_case(9, (2, 8, 6, 32), 16)
  layer = lambda x, k, b: conv_lib._winograd_unless_differentiated(x, k, b, kernel_applies)  # pylint: disable=protected-access
  direct = conv_lib.conv3x3 if kernel_applies else lambda x, k, b: conv_lib._xla_conv(x, k) + b  # pylint: disable=protected-access
  winograd = jax.jit(lambda x, k, b: conv_lib.winograd_conv3x3(x, k) + b)(x, kernel, bias)
  np.testing.assert_array_equal(np.asarray(jax.jit(layer)(x, kernel, bias)), np.asarray(winograd))
  differentiated = jax.jit(lambda x, k, b: jax.vjp(layer, x, k, b)[0])(x, kernel, bias)
  np.testing.assert_array_equal(np.asarray(differentiated), np.asarray(jax.jit(direct)(x, kernel, bias)))
  assert np.abs(np.asarray(differentiated) - np.asarray(winograd)).max() > 0  # two computations, two roundings
  _assert_matches_float64(layer, x, kernel, bias, upstream, grad_tolerance=1e-5)


def test_layer_takes_winograd_where_use_winograd_says(monkeypatch):
  """Under 'auto' on CPU a float32 `Conv3x3` of 16 images of 8×8 pixels (256 tiles of 2×2 output
  pixels) has no convolution in its program (Winograd's matmuls) and gives flax's output; so do 16×16
  images with 64 channels and 32×32 images with 256; not 8 images of 8×8 (128 tiles), 4×4 images,
  32×32 images with 128 channels, bfloat16, 'xla', LDM_JAX_CONV=xla, or transforms above 1 GiB."""
  assert jax.default_backend() == "cpu"
  def case(batch, size, channels, dtype=jnp.float32, implementation="auto"):
    x = jnp.asarray(np.random.default_rng(8).standard_normal((batch, size, size, channels)), jnp.float32)
    layer = conv_lib.Conv3x3(16, dtype=dtype, implementation=implementation)
    params = jax.tree.map(lambda a: a + 0.01, layer.init(jax.random.key(0), x))
    taken = conv_lib.use_winograd(implementation, x.shape, 16, dtype)
    program = jax.jit(layer.apply).lower(params, x).as_text()
    if taken:
      assert "convolution" not in program and "ldm_conv3x3" not in program
      want = nn.Conv(16, (3, 3), padding=1).apply(params, x)
      np.testing.assert_allclose(np.asarray(jax.jit(layer.apply)(params, x)), np.asarray(want),
                                 atol=2e-5 * float(jnp.abs(want).max()))
    return taken
  assert case(16, 8, 128) and case(6, 14, 256) and case(4, 16, 64) and case(2, 32, 256)
  for args in ((8, 8, 256), (64, 4, 256), (2, 32, 128), (16, 8, 256, jnp.bfloat16), (16, 8, 256, jnp.float32, "xla")):
    assert not case(*args), args
  monkeypatch.setenv("LDM_JAX_CONV", "xla")
  assert not case(16, 8, 256)
  monkeypatch.delenv("LDM_JAX_CONV")
  # the transforms' bytes: 16 · 2×2 tiles · (C + O) floats; 8 × 64 × 64 × 1024 → 1024: 1 GiB
  assert conv_lib.use_winograd("auto", (8, 64, 64, 1024), 1024, jnp.float32)
  assert not conv_lib.use_winograd("auto", (8, 64, 64, 1024), 1040, jnp.float32)


@needs_kernel
@pytest.mark.parametrize("shape, out", [((2, 5, 13, 16), 64), ((1, 7, 8, 48), 32), ((3, 1, 3, 16), 16),
                                        ((1, 6, 1, 32), 48), ((1, 5, 7, 288), 64)])
def test_weight_gradient_kernel_matches_float64(shape, out):
  """The weight-gradient kernel (which `conv3x3`'s backward takes from 64×64 images, 32×32 with at
  most 320 channels or 16×16 with at most 256; called directly here, whatever the shape): one-row
  and one-column images (taps off the border dropped), 1, 2, 3 and 4 vectors of output channels,
  288 input channels."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal(shape).astype(np.float32)
  d_out = rng.standard_normal(shape[:-1] + (out,)).astype(np.float32)
  got = jax.jit(conv_lib._weight_grad_sharded)(x, d_out)  # pylint: disable=protected-access
  with jax.enable_x64():
    kernel = jnp.zeros((3, 3, shape[-1], out), jnp.float64)
    conv = lambda k: jax.lax.conv_general_dilated(jnp.asarray(x, jnp.float64), k, (1, 1), "SAME",
                                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))
    want = np.asarray(jax.vjp(conv, kernel)[1](jnp.asarray(d_out, jnp.float64))[0])
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5 * np.abs(want).max())


@needs_kernel
def test_kernel_on_a_mesh_runs_per_device_without_gathering():
  """Batch split over 4 devices: each device convolves its own examples (no all-gather in the
  forward or the backward program), the output keeps the batch sharding, values and gradients are
  the unsharded ones."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
  rng = np.random.default_rng(2)
  x = rng.standard_normal((4, 32, 32, 32)).astype(np.float32)  # 32×32: the weight gradient's kernel too
  kernel = (rng.standard_normal((3, 3, 32, 64)) / 17).astype(np.float32)
  bias = rng.standard_normal(64).astype(np.float32)
  xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"))))
  forward = jax.jit(conv_lib.conv3x3)
  assert "all-gather" not in forward.lower(xs, kernel, bias).compile().as_text()
  out = forward(xs, kernel, bias)
  assert out.sharding.spec == P(("data", "fsdp"))
  np.testing.assert_allclose(np.asarray(out), _reference(x, kernel, bias), atol=2e-5)
  loss = lambda fn: lambda x, k, b: jnp.sum(jnp.sin(fn(x, k, b)))
  grad = jax.jit(jax.grad(loss(conv_lib.conv3x3), argnums=(0, 1, 2)))
  backward = grad.lower(xs, kernel, bias).compile().as_text()
  assert "all-gather" not in backward and "ldm_conv3x3_weight_grad" in backward
  xla = lambda x, k, b: conv_lib._xla_conv(x, k) + b  # pylint: disable=protected-access
  for got, want in zip(grad(xs, kernel, bias), jax.grad(loss(xla), argnums=(0, 1, 2))(x, kernel, bias)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4 * float(jnp.abs(want).max()))


def _upsample_reference(x, kernel, bias):
  """Float64: repeat each pixel into a 2×2 block, then the 3×3 'SAME' convolution."""
  with jax.enable_x64():
    f64 = lambda a: jnp.asarray(a, jnp.float64)
    up = jnp.repeat(jnp.repeat(f64(x), 2, axis=1), 2, axis=2)
    return jax.lax.conv_general_dilated(up, f64(kernel), (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + f64(bias)


@pytest.mark.parametrize("shape, out", [((2, 3, 5, 8), 12), ((1, 1, 4, 3), 5), ((2, 8, 8, 32), 16)])
def test_upsample_conv3x3_matches_float64_repeat_then_convolve_and_its_gradients(shape, out):
  """The 2×2 phase convolution equals repeat-then-3×3-convolve (values and the written-out gradients
  of x, kernel and bias) on non-square images, a one-row image (every phase on the border) and
  channel counts that are not multiples of anything."""
  rng = np.random.default_rng(2)
  x = rng.standard_normal(shape).astype(np.float32)
  kernel = (rng.standard_normal((3, 3, shape[-1], out)) / np.sqrt(9 * shape[-1])).astype(np.float32)
  bias = rng.standard_normal(out).astype(np.float32)
  upstream = rng.standard_normal((shape[0], 2 * shape[1], 2 * shape[2], out)).astype(np.float32)
  got = jax.jit(conv_lib.upsample_conv3x3)(x, kernel, bias)
  assert got.shape == upstream.shape
  np.testing.assert_allclose(np.asarray(got), np.asarray(_upsample_reference(x, kernel, bias)), atol=2e-5)
  grads = jax.jit(jax.grad(lambda x, k, b: jnp.sum(conv_lib.upsample_conv3x3(x, k, b) * upstream),
                           argnums=(0, 1, 2)))(x, kernel, bias)
  with jax.enable_x64():
    want = jax.grad(lambda x, k, b: jnp.sum(_upsample_reference(x, k, b) * upstream),
                    argnums=(0, 1, 2))(*(jnp.asarray(a, jnp.float64) for a in (x, kernel, bias)))
  for g, w in zip(grads, want):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5 * float(jnp.abs(w).max()))


def test_upsample_layer_takes_the_phase_convolution_from_8x8_and_keeps_its_parameters():
  """`Upsample`'s parameters are still `conv/kernel`, `conv/bias` [3, 3, C, O]; from 8×8 inputs on
  CPU it runs `upsample_conv3x3` (no [B, 2H, 2W, C] repetition in the program), below that and with
  implementation 'xla' it repeats the pixels; all three agree with the float64 reference."""
  from ldm_jax.nn import Upsample
  rng = np.random.default_rng(3)
  for size, phases in ((8, True), (4, False)):
    x = jnp.asarray(rng.standard_normal((2, size, size, 16)), jnp.float32)
    params = Upsample(32).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, params) == {"params": {"conv": {"kernel": (3, 3, 16, 32), "bias": (32,)}}}
    params = jax.tree.map(lambda a: a + 0.1, params)
    assert conv_lib.upsample_as_phases("auto", x.shape) == phases
    hlo = jax.jit(Upsample(32).apply).lower(params, x).as_text()
    assert (f"2x{2 * size}x{2 * size}x16" not in hlo) == phases  # the repeated input is never built
    want = np.asarray(_upsample_reference(x, params["params"]["conv"]["kernel"], params["params"]["conv"]["bias"]))
    np.testing.assert_allclose(np.asarray(Upsample(32).apply(params, x)), want, atol=2e-5)
  xla = conv_lib.Conv3x3(32, implementation="xla", upsample=True)
  assert not conv_lib.upsample_as_phases("xla", x.shape)
  np.testing.assert_allclose(np.asarray(xla.apply({"params": params["params"]["conv"]}, x)), want, atol=2e-5)


@pytest.mark.parametrize("zero_init", [False, True])
def test_conv1x1_is_flax_conv_with_the_same_parameters_values_and_gradients(zero_init):
  """`Conv1x1` draws the same `kernel` [1, 1, C, O] and `bias` as `nn.Conv(O, (1, 1))` (so checkpoints,
  converters and seeds are unchanged) and computes the same values and gradients as a matmul."""
  x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, 7, 24)), jnp.float32)
  init = dict(kernel_init=nn.initializers.zeros) if zero_init else {}
  ours, theirs = conv_lib.Conv1x1(40, **init), nn.Conv(40, (1, 1), **init)
  params, flax_params = ours.init(jax.random.key(5), x), theirs.init(jax.random.key(5), x)
  assert jax.tree.map(jnp.shape, params) == {"params": {"kernel": (1, 1, 24, 40), "bias": (40,)}}
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(flax_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  rng = np.random.default_rng(6)
  params = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32), params)
  upstream = jnp.asarray(rng.standard_normal((2, 5, 7, 40)), jnp.float32)
  loss = lambda module: lambda p, x: jnp.sum(module.apply(p, x) * upstream)
  want_y, got_y = theirs.apply(params, x), ours.apply(params, x)
  assert got_y.shape == (2, 5, 7, 40)
  np.testing.assert_allclose(np.asarray(got_y), np.asarray(want_y), rtol=1e-5, atol=1e-4)
  want, got = jax.grad(loss(theirs), argnums=(0, 1))(params, x), jax.grad(loss(ours), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-3)
