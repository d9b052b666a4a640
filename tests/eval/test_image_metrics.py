import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from ldm_jax.eval.metrics import psnr, ssim


def reference_ssim(x, y, data_range):
  """SSIM of one [H, W, C] pair the way skimage computes it with gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False: reflect-padded 11-tap Gaussian filtering
  (truncate 3.5 σ), then the mean over the positions at least 5 pixels from the border.
  (It agreed with skimage 0.26 to the last float64 digit when this test was written.)"""
  x, y = x.astype(np.float64), y.astype(np.float64)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  per_channel = []
  for c in range(x.shape[-1]):
    a, b = x[..., c], y[..., c]

    def blur(img):
      return scipy.ndimage.gaussian_filter(img, sigma=1.5, truncate=3.5, mode="reflect")

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    per_channel.append(s[5:-5, 5:-5].mean())
  return np.mean(per_channel)


def test_psnr_of_a_constant_error():
  x = jnp.zeros((2, 8, 8, 3))
  errors = jnp.array([0.1, 0.5])
  y = x + errors[:, None, None, None]
  expected = [10 * math.log10(4.0 / e**2) for e in (0.1, 0.5)]  # 26.02 dB, 12.04 dB
  np.testing.assert_allclose(jax.jit(psnr)(x, y), expected, rtol=1e-5)
  np.testing.assert_allclose(psnr(x * 0, y * 0 + 25.5, data_range=255.0), 20.0, rtol=1e-5)


def test_ssim_of_identical_images_is_one():
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.bfloat16)
  np.testing.assert_allclose(jax.jit(ssim)(x, x), 1.0, rtol=1e-6)


@pytest.mark.parametrize("data_range, offset, scale", [(2.0, 0.0, 1.0), (255.0, 1.0, 127.5)])
def test_ssim_matches_a_scipy_implementation(data_range, offset, scale):
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (2, 23, 19, 3))
  noise = rng.normal(size=x.shape) * np.array([0.1, 0.5])[:, None, None, None]
  y = np.clip(x + noise, -1, 1)
  x, y = (((a + offset) * scale).astype(np.float32) for a in (x, y))  # [-1, 1] or [0, 255]
  expected = [reference_ssim(x[i], y[i], data_range) for i in range(2)]
  got = jax.jit(ssim, static_argnums=2)(x, y, data_range)
  np.testing.assert_allclose(got, expected, atol=1e-4)
  assert expected[0] > expected[1]  # more noise, less similar


def test_ssim_rejects_images_smaller_than_the_window():
  x = jnp.zeros((1, 10, 32, 3))
  with pytest.raises(ValueError, match="11"):
    ssim(x, x)
