import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.config.sections import default_loss_config
from ldm_jax.losses.autoencoder import (
    adaptive_weight,
    discriminator_loss,
    generator_loss,
    hinge_d_loss,
    kl_nll_loss,
    validate_loss_config,
    vanilla_d_loss,
    vq_nll_loss,
)


def test_hinge_loss_is_zero_only_beyond_the_margins():
  real, fake = jnp.array([1.0, 3.0]), jnp.array([-1.0, -2.0])
  assert hinge_d_loss(real, fake) == 0.0
  # real 0.5 misses its margin by 0.5, fake 0 by 1: ½(mean(0.5, 0) + mean(1, 0)) = 0.375.
  np.testing.assert_allclose(hinge_d_loss(jnp.array([0.5, 3.0]), jnp.array([0.0, -2.0])), 0.375)


def test_vanilla_loss_is_log2_at_zero_logits():
  zeros = jnp.zeros((2, 4, 4, 1))
  np.testing.assert_allclose(vanilla_d_loss(zeros, zeros), math.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(discriminator_loss(zeros, zeros, "vanilla"), math.log(2.0), rtol=1e-6)


def test_generator_losses():
  logits = jnp.array([[0.5], [-1.5]])
  np.testing.assert_allclose(generator_loss(logits, "hinge"), 0.5)
  expected = np.mean(np.log1p(np.exp(-np.array([0.5, -1.5]))))
  np.testing.assert_allclose(generator_loss(logits, "vanilla"), expected, rtol=1e-6)


def test_unknown_gan_loss_names_the_config_key():
  with pytest.raises(ValueError, match="loss.disc_loss"):
    generator_loss(jnp.zeros(2), "wasserstein")


def test_hinge_loss_trains_a_linear_discriminator_to_separate_real_from_fake():
  rng = np.random.default_rng(0)
  real = jnp.asarray(rng.normal(1.0, 0.5, 64))
  fake = jnp.asarray(rng.normal(-0.5, 0.5, 64))

  def loss(w):
    return discriminator_loss(w[0] * real + w[1], w[0] * fake + w[1], "hinge")

  w = jnp.array([-0.5, 0.0])  # starts out ranking fake above real
  start = loss(w)
  grad = jax.jit(jax.grad(loss))
  for _ in range(50):
    w = w - 0.5 * grad(w)
  assert loss(w) < 0.5 * start
  assert jnp.mean(w[0] * real + w[1]) > jnp.mean(w[0] * fake + w[1])


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
  target = jnp.arange(12.0).reshape(3, 4)
  w = jnp.ones((3, 4))
  nll_grads = jax.grad(lambda w: 0.5 * jnp.sum((w - target) ** 2))(w)  # w - target
  g_grads = jax.grad(lambda w: 3.0 * jnp.sum(w))(w)  # 3 everywhere
  expected = np.linalg.norm(np.ones((3, 4)) - np.arange(12.0).reshape(3, 4)) / (
      3.0 * np.sqrt(12) + 1e-4
  )
  np.testing.assert_allclose(adaptive_weight(nll_grads, g_grads, 1.0), expected, rtol=1e-6)
  np.testing.assert_allclose(adaptive_weight(nll_grads, g_grads, 0.5), 0.5 * expected, rtol=1e-6)
  # A pytree of gradients uses the norm over all of its leaves.
  split = adaptive_weight({"a": nll_grads[:1], "b": nll_grads[1:]}, {"k": g_grads}, 1.0)
  np.testing.assert_allclose(split, expected, rtol=1e-6)


def test_adaptive_weight_is_clipped_and_carries_no_gradient():
  big, zero = jnp.full((4,), 10.0), jnp.zeros((4,))
  np.testing.assert_allclose(adaptive_weight(big, zero, 0.5), 0.5 * 1e4)
  assert adaptive_weight(zero, big, 0.5) == 0.0
  grad = jax.grad(lambda g: adaptive_weight(big, g, 1.0))(jnp.ones((4,)))
  assert np.all(grad == 0)


def _images(seed=0, shape=(2, 4, 5, 3)):
  rng = np.random.default_rng(seed)
  x = rng.uniform(-1, 1, shape).astype(np.float32)
  x_rec = (x + 0.2 * rng.normal(size=shape)).astype(np.float32)
  return x, x_rec, np.array([0.3, 0.1], np.float32)


def test_kl_nll_with_zero_logvar_is_the_summed_reconstruction_loss_per_image():
  x, x_rec, p = _images()
  rec = np.abs(x - x_rec) + 0.7 * p[:, None, None, None]
  nll, rec_mean = kl_nll_loss(x, x_rec, 0.0, p, perceptual_weight=0.7)
  np.testing.assert_allclose(nll, rec.sum() / 2, rtol=1e-6)
  np.testing.assert_allclose(rec_mean, rec.mean(), rtol=1e-6)
  # With logvar ℓ every pixel's term is rec·e^{-ℓ} + ℓ.
  np.testing.assert_allclose(
      kl_nll_loss(x, x_rec, 1.0, p, 0.7)[0], (rec / math.e + 1.0).sum() / 2, rtol=1e-6
  )


def test_kl_nll_is_stationary_at_the_optimal_logvar():
  x, x_rec, p = _images()
  d_nll = jax.grad(lambda logvar: kl_nll_loss(x, x_rec, logvar, p)[0])
  rec_mean = kl_nll_loss(x, x_rec, 0.0, p)[1]
  assert abs(d_nll(0.0)) > 1.0
  np.testing.assert_allclose(d_nll(jnp.log(rec_mean)), 0.0, atol=1e-3)


def test_l2_pixel_loss_squares_the_error_in_both_objectives():
  x, x_rec, p = _images()
  rec = np.square(x - x_rec) + 0.7 * p[:, None, None, None]
  nll, rec_mean = kl_nll_loss(x, x_rec, 0.0, p, perceptual_weight=0.7, pixel_loss="l2")
  np.testing.assert_allclose(nll, rec.sum() / 2, rtol=1e-6)
  np.testing.assert_allclose(rec_mean, rec.mean(), rtol=1e-6)
  np.testing.assert_allclose(vq_nll_loss(x, x_rec, p, perceptual_weight=0.7, pixel_loss="l2"), rec.mean(), rtol=1e-6)


def test_vq_nll_is_the_mean_reconstruction_loss():
  x, x_rec, p = _images()
  expected = np.mean(np.abs(x - x_rec)) + 0.5 * p.mean()
  np.testing.assert_allclose(vq_nll_loss(x, x_rec, p, perceptual_weight=0.5), expected, rtol=1e-6)


def test_default_config_holds_the_reference_kl_values():
  c = default_loss_config()
  assert (c.disc_start, c.disc_weight, c.kl_weight, c.disc_loss, c.pixel_loss) == (50001, 0.5, 1e-6, "hinge", "l1")
  assert (c.disc_factor, c.perceptual_weight, c.codebook_weight, c.logvar_init) == (
      1.0,
      1.0,
      1.0,
      0.0,
  )
  validate_loss_config(c)


@pytest.mark.parametrize(
    "key, value",
    [
        ("disc_loss", "wgan"),
        ("disc_norm", "layer"),
        ("disc_start", -1),
        ("disc_num_layers", 0),
        ("disc_ndf", 0),
        ("kl_weight", -1e-6),
        ("disc_weight", float("inf")),
        ("logvar_init", float("nan")),
        ("pixel_loss", "mse"),
    ],
)
def test_validate_names_the_bad_key(key, value):
  c = default_loss_config()
  c[key] = value
  with pytest.raises(ValueError, match=f"loss.{key}"):
    validate_loss_config(c)
