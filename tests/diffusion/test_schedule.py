"""Diffusion math: beta schedules, q_sample, eps/x0/v conversions, losses and min-SNR weights."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldm_jax.diffusion import schedule as sch

PARAMS = ("eps", "x0", "v")


@pytest.fixture(scope="module")
def sd():
  return sch.make_schedule("scaled_linear", 1000, 0.00085, 0.012)


def test_linear_is_plain_linspace():
  betas = sch.beta_schedule("linear", 11, 0.001, 0.021)
  np.testing.assert_allclose(betas, 0.001 + 0.002 * np.arange(11), rtol=1e-12)


def test_scaled_linear_endpoints_and_sqrt_spacing(sd):
  betas = sch.beta_schedule("scaled_linear", 1000, 0.00085, 0.012)
  assert betas[0] == pytest.approx(0.00085, rel=1e-12) and betas[-1] == pytest.approx(0.012, rel=1e-12)
  np.testing.assert_allclose(np.diff(np.sqrt(betas)), (0.012**0.5 - 0.00085**0.5) / 999, rtol=1e-9)
  assert np.all(np.diff(betas) > 0)
  ab = np.asarray(sd.alphas_cumprod)
  assert np.all(np.diff(ab) < 0)
  # Stable Diffusion's well-known terminal value: √ᾱ_999 ≈ 0.068 (far from pure noise).
  assert 0.0046 < ab[-1] < 0.0047


def test_cosine_matches_nichol_dhariwal_alpha_bar():
  T, s = 1000, 0.008
  betas = sch.beta_schedule("cosine", T, cosine_s=s)
  f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
  expected = np.array([f(t + 1) / f(0) for t in range(T)])
  ab = sch.alphas_cumprod(betas)
  np.testing.assert_allclose(ab[:-1], expected[:-1], rtol=1e-9, atol=1e-12)  # the last β is clipped
  assert betas.max() == pytest.approx(0.999) and np.all(betas <= 0.999)
  assert np.all(np.diff(ab) < 0)


def test_alphas_cumprod_is_the_product_of_one_minus_beta():
  betas = np.array([0.1, 0.2, 0.5])
  np.testing.assert_allclose(sch.alphas_cumprod(betas), [0.9, 0.72, 0.36])


def test_schedule_holds_float32_and_its_length(sd):
  assert sd.num_timesteps == 1000
  assert sd.betas.dtype == jnp.float32 and sd.alphas_cumprod.dtype == jnp.float32


def test_schedule_from_config_and_named_errors():
  cfg = ml_collections.ConfigDict(dict(beta_schedule="linear", linear_start=0.0015,
                                       linear_end=0.0195, num_timesteps=50))
  s = sch.schedule_from_config(cfg)
  assert s.num_timesteps == 50
  assert float(s.betas[-1]) == pytest.approx(0.0195)
  with pytest.raises(ValueError, match="diffusion.beta_schedule: 'quadratic'"):
    sch.make_schedule("quadratic")
  with pytest.raises(ValueError, match="diffusion.num_timesteps"):
    sch.make_schedule("linear", 1)
  with pytest.raises(ValueError, match="diffusion.parameterization: 'score'"):
    sch.target(s, jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros((1,), jnp.int32), "score")
  with pytest.raises(ValueError, match="diffusion.loss_type"):
    sch.diffusion_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros((1, 2)),
                       jnp.zeros((1,), jnp.int32), s, "eps", loss_type="huber")


def test_zero_terminal_snr_rescaling():
  plain = sch.make_schedule("scaled_linear")
  zero = sch.make_schedule("scaled_linear", zero_terminal_snr=True)
  assert float(zero.alphas_cumprod[-1]) == 0.0
  assert float(zero.alphas_cumprod[0]) == pytest.approx(float(plain.alphas_cumprod[0]), rel=1e-6)
  assert np.all(np.diff(np.asarray(zero.alphas_cumprod)) < 0)


@pytest.mark.parametrize("t", [0, 250, 999])
def test_q_sample_moments(sd, t):
  n = 20000
  x0 = jnp.broadcast_to(jnp.array([-1.0, -0.3, 0.4, 1.0]).reshape(1, 2, 2, 1), (n, 2, 2, 1))
  noise = jax.random.normal(jax.random.key(t), x0.shape)
  xt = sch.q_sample(sd, x0, jnp.full((n,), t), noise)
  ab = float(sd.alphas_cumprod[t])
  np.testing.assert_allclose(xt.mean(0), math.sqrt(ab) * x0[0], atol=0.03)
  np.testing.assert_allclose(xt.var(0), np.full((2, 2, 1), 1 - ab), atol=0.04)


@pytest.mark.parametrize("parameterization", PARAMS)
def test_conversions_invert_each_other(sd, parameterization):
  k0, k1 = jax.random.split(jax.random.key(0))
  x0 = jax.random.normal(k0, (5, 3, 3, 2))
  eps = jax.random.normal(k1, x0.shape)
  t = jnp.array([0, 1, 500, 998, 999])
  xt = sch.q_sample(sd, x0, t, eps)
  out = sch.target(sd, x0, eps, t, parameterization)
  v = sch.v_target(sd, x0, eps, t)
  a = jnp.sqrt(sd.alphas_cumprod[t])[:, None, None, None]
  np.testing.assert_allclose(v, a * eps - jnp.sqrt(1 - a**2) * x0, atol=1e-6)
  np.testing.assert_allclose(sch.predict_x0(sd, xt, t, out, parameterization), x0, atol=2e-4)
  np.testing.assert_allclose(sch.predict_eps(sd, xt, t, out, parameterization), eps, atol=2e-4)
  np.testing.assert_allclose(sch.predict_v(sd, xt, t, out, parameterization), v, atol=2e-4)
  # Round trip through every other parameterization.
  for other in PARAMS:
    converted = {"eps": sch.predict_eps, "x0": sch.predict_x0, "v": sch.predict_v}[other](
        sd, xt, t, out, parameterization)
    back = {"eps": sch.predict_eps, "x0": sch.predict_x0, "v": sch.predict_v}[parameterization](
        sd, xt, t, converted, other)
    np.testing.assert_allclose(back, out, atol=3e-4)


def test_snr(sd):
  t = jnp.array([0, 999])
  ab = np.asarray(sd.alphas_cumprod)[[0, 999]]
  np.testing.assert_allclose(sch.snr(sd, t), ab / (1 - ab), rtol=1e-6)


def test_min_snr_weights_at_known_snr():
  snr = jnp.array([0.0, 0.5, 5.0, 20.0])
  np.testing.assert_allclose(sch.min_snr_weight(snr, 5.0, "x0"), [0, 0.5, 5, 5])
  np.testing.assert_allclose(sch.min_snr_weight(snr, 5.0, "eps"), [1, 1, 1, 0.25])
  np.testing.assert_allclose(sch.min_snr_weight(snr, 5.0, "v"), [0, 0.5 / 1.5, 5 / 6, 5 / 21], rtol=1e-6)


def test_loss_values_l2_l1(sd):
  x0 = jnp.zeros((2, 2, 2, 1))
  eps = jnp.ones((2, 2, 2, 1))
  out = jnp.stack([jnp.full((2, 2, 1), 3.0), jnp.array([0.0, 1, 1, 1]).reshape(2, 2, 1)])
  t = jnp.array([10, 20])
  np.testing.assert_allclose(sch.diffusion_loss(out, x0, eps, t, sd, "eps"), [4.0, 0.25])
  np.testing.assert_allclose(sch.diffusion_loss(out, x0, eps, t, sd, "eps", "l1"), [2.0, 0.25])
  np.testing.assert_allclose(sch.diffusion_loss(out, x0, eps, t, sd, "x0"), [9.0, 0.75])


def test_min_snr_loss_is_the_same_for_every_parameterization(sd):
  # Hang et al.: the weights make the eps, x0 and v losses of one x0 estimate identical,
  # namely min(SNR, γ) · ‖x0 − x̂0‖².
  keys = jax.random.split(jax.random.key(3), 3)
  x0, eps, x0_hat = (jax.random.normal(k, (4, 2, 2, 3)) for k in keys)
  t = jnp.array([5, 100, 400, 900])
  xt = sch.q_sample(sd, x0, t, eps)
  outs = {p: sch.target(sd, x0_hat, sch.predict_eps(sd, xt, t, x0_hat, "x0"), t, p) for p in PARAMS}
  expected = jnp.minimum(sch.snr(sd, t), 5.0) * jnp.mean((x0 - x0_hat) ** 2, axis=(1, 2, 3))
  for p in PARAMS:
    got = sch.diffusion_loss(outs[p], x0, eps, t, sd, p, min_snr_gamma=5.0)
    np.testing.assert_allclose(got, expected, rtol=2e-3, err_msg=p)


def test_offset_noise_adds_a_per_channel_constant():
  rng = jax.random.key(7)
  shape = (256, 4, 4, 3)
  plain = sch.offset_noise(rng, shape, 0.0)
  shifted = sch.offset_noise(rng, shape, 2.0)
  diff = np.asarray(shifted - plain)
  np.testing.assert_allclose(diff, np.broadcast_to(diff[:, :1, :1, :], shape), atol=1e-5)
  assert abs(diff[:, 0, 0, :].std() - 2.0) < 0.2
  assert abs(float(plain.std()) - 1.0) < 0.02


def test_sample_timesteps_uniform():
  t = sch.sample_timesteps(jax.random.key(0), 20000, 10)
  assert t.dtype == jnp.int32 and t.shape == (20000,)
  counts = np.bincount(np.asarray(t), minlength=10)
  assert counts.size == 10 and np.all(np.abs(counts / 20000 - 0.1) < 0.01)


def test_sample_timesteps_logit_normal_follows_its_density():
  n, T, m, s = 40000, 1000, -0.5, 1.0
  t = np.asarray(sch.sample_timesteps(jax.random.key(1), n, T, "logit_normal", m, s))
  assert t.dtype == np.int32 and t.min() >= 0 and t.max() <= T - 1
  # P(t < k) = P(m + s·n < logit(k / T)) = Φ((logit(k / T) − m) / s).
  for k in (100, 380, 500, 800):
    expected = 0.5 * (1 + math.erf((math.log(k / (T - k)) - m) / s / math.sqrt(2)))
    assert abs(np.mean(t < k) - expected) < 0.01, k
  # Fewer nearly pure-noise steps: uniform sampling puts 20 % of them at t >= 800, this 3 %.
  assert np.mean(t >= 800) < 0.05


def test_sample_timesteps_names_an_unknown_density():
  with pytest.raises(ValueError, match=r"diffusion\.timestep_sampling: 'beta' is not one of"):
    sch.sample_timesteps(jax.random.key(0), 4, 1000, "beta")


def test_schedule_is_a_pytree_for_jit(sd):
  f = jax.jit(sch.q_sample)
  x0 = jnp.ones((2, 1, 1, 1))
  out = f(sd, x0, jnp.array([0, 999]), jnp.zeros_like(x0))
  np.testing.assert_allclose(out[:, 0, 0, 0], jnp.sqrt(sd.alphas_cumprod[jnp.array([0, 999])]), rtol=1e-6)
