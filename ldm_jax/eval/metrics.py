"""Full-reference image metrics for reconstructions: PSNR and SSIM, one value per image.

Conventions: images are [B, H, W, C] floats in [-1, 1] (data_range 2.0; pass 255.0 for uint8
values, 1.0 for [0, 1]); any float dtype, computed in float32; pure and jit-able. A batch
mean of these values is what papers report as "PSNR" and "SSIM". LPIPS lives in
`ldm_jax.losses.lpips`.
"""

import jax
import jax.numpy as jnp
import numpy as np

_SSIM_SIGMA = 1.5
_SSIM_RADIUS = 5  # 11-tap window, as Wang et al. (and skimage: truncate 3.5 σ)
_SSIM_K1, _SSIM_K2 = 0.01, 0.03


def psnr(x, y, data_range=2.0):
  """Peak signal-to-noise ratio in dB: 10·log10(data_range² / MSE), MSE over H, W, C.

  Args:
    x, y: [B, H, W, C] images.
  Returns:
    [B] float32; +inf for identical images.
  """
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  mse = jnp.mean(jnp.square(x - y), axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range**2 / mse)


def _gaussian_taps():
  t = np.arange(-_SSIM_RADIUS, _SSIM_RADIUS + 1, dtype=np.float64)
  w = np.exp(-0.5 * (t / _SSIM_SIGMA) ** 2)
  return jnp.asarray(w / w.sum(), jnp.float32)


def _gaussian_filter_valid(maps):
  """Separable 11×11 Gaussian mean over every fully-inside window: [N, H, W] -> [N, H-10, W-10]."""
  taps = _gaussian_taps()
  k = taps.size
  h = maps[..., None]  # one input channel
  h = jax.lax.conv_general_dilated(
      h, taps.reshape(k, 1, 1, 1), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  h = jax.lax.conv_general_dilated(
      h, taps.reshape(1, k, 1, 1), (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return h[..., 0]


def ssim(x, y, data_range=2.0):
  """Structural similarity (Wang et al., 2004) with the standard Gaussian window.

  Window 11×11, σ = 1.5, K1 = 0.01, K2 = 0.03, population (not sample) covariances; SSIM is
  computed per channel and averaged over channels and over the positions where the window
  lies fully inside the image ('valid', as Wang et al.'s code). This equals skimage's
  `structural_similarity(x, y, channel_axis=-1, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=data_range)`, which pads by reflection but then
  averages only over these same interior positions.

  Args:
    x, y: [B, H, W, C] images, H, W >= 11.
  Returns:
    [B] float32 in [-1, 1]; 1 for identical images.
  """
  if x.shape != y.shape or x.ndim != 4 or min(x.shape[1:3]) < 2 * _SSIM_RADIUS + 1:
    raise ValueError(
        f"ssim: x, y must be equal [B, H, W, C] with H, W >= 11; got {x.shape}, {y.shape}"
    )
  b, h, w, c = x.shape
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  # Channels become separate images so one single-channel filter serves them all.
  x = jnp.moveaxis(x, -1, 1).reshape(b * c, h, w)
  y = jnp.moveaxis(y, -1, 1).reshape(b * c, h, w)
  mu_x, mu_y, e_xx, e_yy, e_xy = jnp.split(
      _gaussian_filter_valid(jnp.concatenate([x, y, x * x, y * y, x * y])), 5
  )
  var_x = e_xx - mu_x**2
  var_y = e_yy - mu_y**2
  cov = e_xy - mu_x * mu_y
  c1 = (_SSIM_K1 * data_range) ** 2
  c2 = (_SSIM_K2 * data_range) ** 2
  s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
  return jnp.mean(s.reshape(b, -1), axis=1)
