"""Samplers, guidance and applications: reference loops, Gaussian data with its exact denoiser, errors.

For data x0 ~ N(μ, σ²) (independent dimensions) the marginal of x_t = √ᾱ x0 + √(1−ᾱ) ε is
N(√ᾱ μ, V), V = ᾱσ² + 1 − ᾱ, and the optimal denoiser is linear:
    E[ε | x_t] = √(1−ᾱ)(x_t − √ᾱ μ)/V,    E[x0 | x_t] = μ + √ᾱ σ²(x_t − √ᾱ μ)/V.
A sampler driven by it should turn draws from the marginal at its first timestep into draws
from the data distribution, up to its discretization error.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import samplers as smp
from ldm_jax.diffusion import schedule as sch

MU = np.array([-1.0, 0.5, 2.0, 0.0])
SIGMA = np.array([1.0, 1.25, 1.5, 2.0])
N_DRAWS = 1 << 16


@pytest.fixture(scope="module")
def sd():
  return sch.make_schedule("scaled_linear", 1000, 0.00085, 0.012)


def gaussian_denoiser(schedule, parameterization):
  """The exact E[·| x_t] for x0 ~ N(MU, SIGMA²) on latents [B, 1, 2, 2]."""
  mu, sig2 = jnp.asarray(MU.reshape(1, 1, 2, 2), jnp.float32), jnp.asarray(SIGMA.reshape(1, 1, 2, 2) ** 2, jnp.float32)

  def model_fn(x, t):
    ab = schedule.alphas_cumprod[t][:, None, None, None]
    a, s = jnp.sqrt(ab), jnp.sqrt(1 - ab)
    v = ab * sig2 + 1 - ab
    eps = s * (x - a * mu) / v
    x0 = mu + a * sig2 * (x - a * mu) / v
    return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[parameterization]

  return model_fn


def marginal_draws(schedule, t, n=N_DRAWS, seed=0):
  """n draws from the exact marginal of x_t, [n, 1, 2, 2]."""
  ab = float(schedule.alphas_cumprod[t])
  z = np.asarray(jax.random.normal(jax.random.key(seed), (n, 4)))
  return jnp.asarray((np.sqrt(ab) * MU + np.sqrt(ab * SIGMA**2 + 1 - ab) * z).reshape(n, 1, 2, 2), jnp.float32)


def toy_model(x, t):
  """A smooth, nonlinear stand-in for a network (any parameterization)."""
  tt = (t.astype(jnp.float32) / 1000.0)[:, None, None, None]
  return 0.5 * jnp.sin(0.7 * x + tt) + 0.3 * x * tt


def toy_np(x, t):
  return np.asarray(toy_model(jnp.asarray(x, jnp.float32), jnp.full((x.shape[0],), t, jnp.int32)), np.float64)


def to_x0_eps(ab, x, out, parameterization):
  a, s = np.sqrt(ab), np.sqrt(1 - ab)
  if parameterization == "eps":
    return (x - s * out) / a, out
  if parameterization == "x0":
    return out, (x - a * out) / s
  return a * x - s * out, s * x + a * out


@pytest.fixture(scope="module")
def x_toy():
  return jax.random.normal(jax.random.key(3), (2, 4, 4, 3))


# ---------------------------------------------------------------------------------------------
# Timesteps

def test_uniform_timesteps_are_compvis_and_sd_leading_with_offset_one():
  np.testing.assert_array_equal(smp.make_timesteps(1000, 50), 981 - 20 * np.arange(50))
  np.testing.assert_array_equal(smp.make_timesteps(1000, 1000), np.arange(999, -1, -1))  # every timestep
  np.testing.assert_array_equal(smp.make_timesteps(1000, 7, "trailing"), [999, 856, 713, 570, 428, 285, 142])
  np.testing.assert_array_equal(smp.make_timesteps(1000, 7, "linspace"), [999, 832, 666, 500, 333, 166, 0])
  quad = smp.make_timesteps(1000, 50, "quadratic")
  assert quad[0] == int(800) + 1 and quad[-1] == 1 and np.all(np.diff(quad) < 0)  # CompVis repeats some
  assert quad.dtype == np.int32


def test_multistep_solver_spacings_lay_one_more_point_as_diffusers():
  """Issue 13's example, 20 of 1000 steps: DPM-Solver++ visits what diffusers' DPMSolverMultistep
  does when asked; by default every sampler keeps CompVis' 'uniform' 951 … 1."""
  for sampler in smp.SAMPLERS:
    np.testing.assert_array_equal(smp.make_timesteps(1000, 20, sampler=sampler), 951 - 50 * np.arange(20))
  linspace = smp.make_timesteps(1000, 20, "linspace", sampler="dpmpp_2m")
  assert (linspace[0], linspace[1], linspace[-1]) == (999, 949, 50)
  np.testing.assert_array_equal(smp.make_timesteps(1000, 20, "leading", steps_offset=1, sampler="dpmpp_2m"),
                                941 - 47 * np.arange(20))
  np.testing.assert_array_equal(smp.make_timesteps(1000, 20, "leading", steps_offset=1, sampler="ddim"),
                                smp.make_timesteps(1000, 20))
  with pytest.raises(ValueError, match="steps_offset=1"):
    smp.make_timesteps(1000, 1000, "leading", steps_offset=1)  # would reach t = 1000
  with pytest.raises(ValueError, match="steps_offset"):
    smp.make_timesteps(1000, 20, "leading", steps_offset=-1)


@pytest.mark.parametrize("num_steps", [0, 1001, 2.5])
def test_bad_num_steps_is_named(num_steps):
  with pytest.raises(ValueError, match="num_steps"):
    smp.make_timesteps(1000, num_steps)


def test_bad_spacing_and_timesteps_are_named(sd, x_toy):
  with pytest.raises(ValueError, match="spacing"):
    smp.make_timesteps(1000, 10, "cubic")
  with pytest.raises(ValueError, match="timesteps"):
    smp.ddim(toy_model, sd, x_toy, timesteps=[1, 500])  # increasing
  with pytest.raises(ValueError, match="num_steps"):
    smp.ddim(toy_model, sd, x_toy, num_steps=1001)


# ---------------------------------------------------------------------------------------------
# Reference loops: each scan equals the update rule written out step by step in float64

@pytest.mark.parametrize("parameterization,eta", [("eps", 0.0), ("v", 0.0), ("x0", 0.0), ("eps", 0.6)])
def test_ddim_scan_equals_python_reference_loop(sd, x_toy, parameterization, eta):
  n, rng, record = 12, jax.random.key(7), (0, 5, 11)
  ts = 1 + (1000 // n) * np.arange(n)[::-1]
  ab = np.asarray(sd.alphas_cumprod, np.float64)
  keys = jax.random.split(rng, n)  # the documented per-step key convention
  x, x0s = np.asarray(x_toy, np.float64), []
  for i, t in enumerate(ts):
    ab_t, ab_prev = ab[t], ab[ts[i + 1]] if i + 1 < n else ab[0]
    x0, eps = to_x0_eps(ab_t, x, toy_np(x, t), parameterization)
    sigma = eta * np.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
    x = np.sqrt(ab_prev) * x0 + np.sqrt(1 - ab_prev - sigma**2) * eps
    if eta:
      x = x + sigma * np.asarray(jax.random.normal(keys[i], x.shape))
    x0s.append(x0)
  out, preds = smp.ddim(toy_model, sd, x_toy, rng, num_steps=n, eta=eta, parameterization=parameterization,
                        return_x0_at=record)
  np.testing.assert_allclose(out, x, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(preds, np.stack([x0s[i] for i in record]), rtol=1e-4, atol=1e-4)


def test_ddim_eta_zero_is_deterministic_and_jits_with_a_traced_schedule(sd, x_toy):
  eager = smp.ddim(toy_model, sd, x_toy, num_steps=8)
  jitted = jax.jit(lambda s, x: smp.ddim(toy_model, s, x, num_steps=8))(sd, x_toy)
  np.testing.assert_array_equal(smp.ddim(toy_model, sd, x_toy, jax.random.key(1), num_steps=8), eager)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_dpmpp_2m_equals_algorithm_2_of_the_paper(sd, x_toy, parameterization):
  """Lu et al. 2022, Alg. 2 (DPM-Solver++(2M)) in λ = log(α/σ); the last step, to σ = 0, first order."""
  n = 10
  ts = 1 + 100 * np.arange(n)[::-1]
  ab = np.append(np.asarray(sd.alphas_cumprod, np.float64)[ts], 1.0)
  alpha, sigma = np.sqrt(ab), np.sqrt(1 - ab)
  lam = np.log(alpha) - np.log(np.maximum(sigma, 1e-300))
  x, prev = np.asarray(x_toy, np.float64), None
  for i in range(n):
    d, _ = to_x0_eps(ab[i], x, toy_np(x, ts[i]), parameterization)
    h = lam[i + 1] - lam[i]
    if prev is None or i == n - 1:
      D = d
    else:
      r = (lam[i] - lam[i - 1]) / h
      D = (1 + 1 / (2 * r)) * d - 1 / (2 * r) * prev
    x = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * np.expm1(-h) * D
    prev = d
  out = smp.dpmpp_2m(toy_model, sd, x_toy, num_steps=n, parameterization=parameterization)
  np.testing.assert_allclose(out, x, rtol=1e-4, atol=1e-5)


def test_plms_equals_compvis_loop(sd, x_toy):
  """CompVis plms.py: a Heun-like first step, then Adams–Bashforth on the stored eps (η = 0)."""
  n = 9
  ts = 1 + (1000 // n) * np.arange(n)[::-1]
  ab = np.asarray(sd.alphas_cumprod, np.float64)
  ab_next = lambda i: ab[ts[i + 1]] if i + 1 < n else ab[0]

  def transfer(x, e, i):
    x0 = (x - np.sqrt(1 - ab[ts[i]]) * e) / np.sqrt(ab[ts[i]])
    return np.sqrt(ab_next(i)) * x0 + np.sqrt(1 - ab_next(i)) * e

  x, old = np.asarray(x_toy, np.float64), []
  for i, t in enumerate(ts):
    e = toy_np(x, t)
    if not old:
      e_prime = (e + toy_np(transfer(x, e, i), ts[i + 1])) / 2
    elif len(old) == 1:
      e_prime = (3 * e - old[-1]) / 2
    elif len(old) == 2:
      e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
    else:
      e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
    x = transfer(x, e_prime, i)
    old.append(e)
  np.testing.assert_allclose(smp.plms(toy_model, sd, x_toy, num_steps=n), x, rtol=1e-4, atol=1e-5)


def test_ddpm_scan_equals_posterior_sampling_loop(sd, x_toy):
  n, rng = 6, jax.random.key(5)
  ts = 1 + (1000 // n) * np.arange(n)[::-1]
  ab = np.asarray(sd.alphas_cumprod, np.float64)
  keys = jax.random.split(rng, n)
  x = np.asarray(x_toy, np.float64)
  for i, t in enumerate(ts):
    ab_t, ab_prev = ab[t], ab[ts[i + 1]] if i + 1 < n else 1.0
    x0, _ = to_x0_eps(ab_t, x, toy_np(x, t), "eps")
    beta = 1 - ab_t / ab_prev
    mean = np.sqrt(ab_prev) * beta / (1 - ab_t) * x0 + np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t) * x
    x = mean + np.sqrt((1 - ab_prev) / (1 - ab_t) * beta) * np.asarray(jax.random.normal(keys[i], x.shape))
  np.testing.assert_allclose(smp.ddpm(toy_model, sd, x_toy, rng, num_steps=n), x, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Gaussian data and its exact denoiser

def _check_moments(samples, mean, var, var_allowance):
  """Sample mean within 5 standard errors (σ/√N); sample variance within 5 s.e. (σ²√(2/N)) plus
  the sampler's discretization error `var_allowance` (relative)."""
  s = np.asarray(samples, np.float64).reshape(-1, 4)
  n = s.shape[0]
  np.testing.assert_array_less(np.abs(s.mean(0) - mean), 5 * np.sqrt(var / n))
  np.testing.assert_array_less(np.abs(s.var(0, ddof=1) / var - 1), var_allowance + 5 * np.sqrt(2 / n))


def test_ddim_50_on_gaussian_data_follows_its_exact_discrete_law(sd):
  """DDIM (η = 0) with the exact denoiser is affine per dimension: each step scales x − √ᾱμ by
  (√(ᾱ'ᾱ)σ² + √((1−ᾱ')(1−ᾱ)))/V_ᾱ. That gives the output law exactly, so only sampling error is allowed."""
  ts = smp.make_timesteps(1000, 50)
  ab = np.asarray(sd.alphas_cumprod, np.float64)
  var, sig2 = ab[ts[0]] * SIGMA**2 + 1 - ab[ts[0]], SIGMA**2
  for i, t in enumerate(ts):
    a, a_prev = ab[t], ab[ts[i + 1]] if i + 1 < 50 else ab[0]
    var = var * ((np.sqrt(a_prev * a) * sig2 + np.sqrt((1 - a_prev) * (1 - a))) / (a * sig2 + 1 - a)) ** 2
  out = smp.ddim(gaussian_denoiser(sd, "eps"), sd, marginal_draws(sd, ts[0]), num_steps=50)
  _check_moments(out, np.sqrt(ab[0]) * MU, var, 0.0)
  np.testing.assert_array_less(np.abs(var / SIGMA**2 - 1), 0.06)  # 50 steps lose ≤ 6% of σ² here


# (sampler, steps, parameterization, relative variance error of that discretization on this data,
# see the docstring below, number of draws). DDPM draws noise at every step, the cost of which
# keeps it to 250 steps, 2^14 draws and two parameterizations.
GAUSSIAN_CASES = [(name, steps, p, allowance, N_DRAWS) for name, steps, allowance in
                  [("ddim", 50, 0.06), ("dpmpp_2m", 20, 0.10), ("plms", 50, 0.01)] for p in ("eps", "x0", "v")]
GAUSSIAN_CASES += [("ddpm", 250, p, 0.03, 1 << 14) for p in ("eps", "v")]


@pytest.mark.parametrize("name,num_steps,parameterization,allowance,draws", GAUSSIAN_CASES)
def test_samplers_reproduce_gaussian_data(sd, name, num_steps, parameterization, allowance, draws):
  """Mean: exact for every sampler here (the mean path x = √ᾱμ is a fixed point of each update).
  Variance: DDIM-50 loses 4–5% (first order; previous test), DPM-Solver++(2M)-20 with uniform
  spacing overshoots by ≤ 8.6% at σ = 1 (its long last second-order step), PLMS-50 is within 0.1%,
  DDPM-250 loses ≤ 2.7% (≤ 0.8% with all 1000 steps)."""
  ts = smp.make_timesteps(1000, num_steps)
  final_ab = float(sd.alphas_cumprod[0]) if name in ("ddim", "plms") else 1.0
  out = smp.sample(name, gaussian_denoiser(sd, parameterization), sd, marginal_draws(sd, ts[0], draws),
                   jax.random.key(1),
                   num_steps=num_steps, parameterization=parameterization)
  _check_moments(out, np.sqrt(final_ab) * MU, final_ab * SIGMA**2 + 1 - final_ab, allowance)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "plms"])
def test_eps_x0_and_v_forms_of_one_denoiser_give_the_same_samples(sd, name):
  x_T = marginal_draws(sd, 981, n=64)
  outs = [smp.sample(name, gaussian_denoiser(sd, p), sd, x_T, num_steps=10, parameterization=p)
          for p in ("eps", "x0", "v")]
  np.testing.assert_allclose(outs[1], outs[0], atol=2e-4)
  np.testing.assert_allclose(outs[2], outs[0], atol=2e-4)


def test_x0_predictions_at_chosen_steps(sd):
  x_T = marginal_draws(sd, 981, n=8)
  out, preds = smp.dpmpp_2m(gaussian_denoiser(sd, "eps"), sd, x_T, num_steps=10, return_x0_at=(0, -1))
  assert preds.shape == (2,) + x_T.shape
  np.testing.assert_allclose(preds[1], out, atol=1e-6)  # the last step returns the last x0 prediction
  # At the first step (t = 901) the prediction is the posterior mean given x_T.
  ab = float(sd.alphas_cumprod[smp.make_timesteps(1000, 10)[0]])
  expected = MU + np.sqrt(ab) * SIGMA**2 * (np.asarray(x_T).reshape(8, 4) - np.sqrt(ab) * MU) / (ab * SIGMA**2 + 1 - ab)
  np.testing.assert_allclose(np.asarray(preds[0]).reshape(8, 4), expected, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="return_x0_at"):
    smp.ddim(gaussian_denoiser(sd, "eps"), sd, x_T, num_steps=10, return_x0_at=(10,))


def test_same_seed_same_samples_other_seed_other_samples(sd, x_toy):
  run = jax.jit(lambda rng: smp.sample("ddpm", toy_model, sd, x_toy, rng, num_steps=20))
  first = run(jax.random.key(0))
  np.testing.assert_array_equal(run(jax.random.key(0)), first)
  assert np.abs(np.asarray(run(jax.random.key(1))) - np.asarray(first)).max() > 0.1


def test_sampler_errors_name_the_argument(sd, x_toy):
  with pytest.raises(ValueError, match="sampler: 'euler'"):
    smp.sample("euler", toy_model, sd, x_toy)
  with pytest.raises(ValueError, match="eta"):
    smp.ddim(toy_model, sd, x_toy, eta=-0.1)
  with pytest.raises(ValueError, match="rng"):
    smp.ddim(toy_model, sd, x_toy, None, eta=0.5)
  with pytest.raises(ValueError, match="parameterization"):
    smp.plms(toy_model, sd, x_toy, parameterization="epsilon")


# ---------------------------------------------------------------------------------------------
# Guidance

def _recording_apply(calls):
  """apply_fn(x, t, cond) = x·c + t/1000, c broadcast per example; records the batch sizes it sees."""
  def apply_fn(x, t, cond):
    calls.append(x.shape[0])
    return x * cond["scale"][:, None, None, None] + t[:, None, None, None] / 1000.0
  return apply_fn


def test_guidance_scale_one_is_the_conditional_prediction_in_one_pass(x_toy):
  calls = []
  cond, uncond = {"scale": jnp.array([2.0, -1.0])}, {"scale": jnp.array([0.0])}
  t = jnp.array([10, 20], jnp.int32)
  out = smp.cfg_model_fn(_recording_apply(calls), cond, uncond, 1.0)(x_toy, t)
  np.testing.assert_array_equal(out, _recording_apply([])(x_toy, t, cond))
  assert calls == [2]


@pytest.mark.parametrize("scale", [0.0, 3.0, 7.5])
def test_guidance_combination_in_one_batched_call(x_toy, scale):
  calls = []
  cond, uncond = {"scale": jnp.array([2.0, -1.0])}, {"scale": jnp.array([0.5])}  # batch-1 null condition
  t = jnp.array([10, 20], jnp.int32)
  out = smp.cfg_model_fn(_recording_apply(calls), cond, uncond, scale)(x_toy, t)
  x, tt = np.asarray(x_toy), np.array([10, 20])[:, None, None, None] / 1000
  c = x * np.array([2.0, -1.0])[:, None, None, None] + tt
  u = x * 0.5 + tt
  np.testing.assert_allclose(out, u + scale * (c - u), rtol=1e-5, atol=1e-5)
  assert calls == [4]


@pytest.mark.parametrize("interval", [None, (15, 30)])
def test_shared_input_gives_the_network_x_and_t_once(x_toy, interval):
  """share_input: apply_fn gets x, t of batch B with 2B conditions; the guided output is unchanged."""
  def sharing_apply(calls):  # takes x, t once for k·B conditions, as the U-Net does
    def apply_fn(x, t, cond):
      calls.append(x.shape[0])
      k = cond["scale"].shape[0] // x.shape[0]
      return _recording_apply([])(jnp.repeat(x, k, axis=0), jnp.repeat(t, k), cond)
    return apply_fn
  calls, shared_calls = [], []
  cond, uncond = {"scale": jnp.array([2.0, -1.0])}, {"scale": jnp.array([0.5])}
  t = jnp.array([10, 20], jnp.int32)
  plain = smp.cfg_model_fn(_recording_apply(calls), cond, uncond, 4.0, guidance_interval=interval)(x_toy, t)
  shared = smp.cfg_model_fn(sharing_apply(shared_calls), cond, uncond, 4.0, guidance_interval=interval,
                            share_input=True)(x_toy, t)
  np.testing.assert_array_equal(shared, plain)
  assert float(jnp.abs(plain - _recording_apply([])(x_toy, t, cond)).max()) > 0.1  # guided
  assert 4 in calls and set(shared_calls) == {2}  # the guided call: x repeated against x once


def test_guidance_rescale_matches_lin_et_al(x_toy):
  cond, uncond = {"scale": jnp.array([2.0, -1.0])}, {"scale": jnp.array([0.5, 0.5])}
  t = jnp.array([10, 20], jnp.int32)
  out = smp.cfg_model_fn(_recording_apply([]), cond, uncond, 5.0, guidance_rescale=0.7)(x_toy, t)
  x, tt = np.asarray(x_toy, np.float64), np.array([10, 20])[:, None, None, None] / 1000
  c, u = x * np.array([2.0, -1.0])[:, None, None, None] + tt, x * 0.5 + tt
  g = u + 5.0 * (c - u)
  std = lambda a: a.reshape(2, -1).std(1)[:, None, None, None]
  np.testing.assert_allclose(out, 0.7 * g * std(c) / std(g) + 0.3 * g, rtol=1e-5, atol=1e-5)
  full = smp.cfg_model_fn(_recording_apply([]), cond, uncond, 5.0, guidance_rescale=1.0)(x_toy, t)
  np.testing.assert_allclose(std(np.asarray(full, np.float64)), std(c), rtol=1e-5)


def test_guidance_interval_guides_only_its_timesteps(x_toy):
  calls = []
  cond, uncond = {"scale": jnp.array([2.0, -1.0])}, {"scale": jnp.array([0.5])}
  model_fn = smp.cfg_model_fn(_recording_apply(calls), cond, uncond, 4.0, guidance_interval=(100, 500))
  x = np.asarray(x_toy)
  expected = lambda t: (x * np.array([2.0, -1.0])[:, None, None, None] + t[:, None, None, None] / 1000,
                        x * 0.5 + t[:, None, None, None] / 1000)
  for t in ([100, 100], [500, 500], [300, 300]):  # inside, both ends included: guided
    c, u = expected(np.array(t))
    np.testing.assert_allclose(model_fn(x_toy, jnp.array(t, jnp.int32)), u + 4.0 * (c - u), rtol=1e-5, atol=1e-5)
  for t in ([99, 99], [501, 501], [999, 999]):  # outside: the conditional prediction
    c, _ = expected(np.array(t))
    np.testing.assert_allclose(model_fn(x_toy, jnp.array(t, jnp.int32)), c, rtol=1e-6, atol=1e-6)
  c, u = expected(np.array([300, 700]))  # a batch across the boundary: per example
  out = np.asarray(model_fn(x_toy, jnp.array([300, 700], jnp.int32)))
  np.testing.assert_allclose(out[0], (u + 4.0 * (c - u))[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[1], c[1], rtol=1e-6, atol=1e-6)
  assert set(calls) == {2, 4}  # the unguided branch is one pass on the batch, not two


@pytest.mark.parametrize("sampler", ["ddim", "plms", "dpmpp_2m"])
def test_guidance_interval_in_a_jitted_trajectory(sd, x_toy, sampler):
  """Inside `lax.scan`: an interval covering every step is plain guidance, one covering none the
  unguided conditional model, and one in between differs from both."""
  def apply_fn(x, t, cond):
    return toy_model(x * cond["scale"][:, None, None, None], t)
  cond, uncond = {"scale": jnp.array([1.0, 0.8])}, {"scale": jnp.array([0.5])}
  run = lambda fn: jax.jit(lambda x: smp.sample(sampler, fn, sd, x, num_steps=10))(x_toy)
  guided = lambda interval: run(smp.cfg_model_fn(apply_fn, cond, uncond, 3.0, guidance_interval=interval))
  plain = run(smp.cfg_model_fn(apply_fn, cond, uncond, 3.0))
  unguided = run(smp.cfg_model_fn(apply_fn, cond, uncond, 1.0))
  np.testing.assert_allclose(guided((0, 999)), plain, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(guided((1000, 2000)), unguided, rtol=1e-5, atol=1e-5)
  half = guided((0, 500))
  assert np.abs(half - plain).max() > 1e-3 and np.abs(half - unguided).max() > 1e-3


def test_guidance_errors_name_the_argument():
  apply_fn = _recording_apply([])
  cond = {"scale": jnp.ones((2,))}
  with pytest.raises(ValueError, match="guidance_scale"):
    smp.cfg_model_fn(apply_fn, cond, cond, -1.0)
  with pytest.raises(ValueError, match="guidance_rescale"):
    smp.cfg_model_fn(apply_fn, cond, cond, 5.0, guidance_rescale=1.5)
  with pytest.raises(ValueError, match="uncond"):
    smp.cfg_model_fn(apply_fn, cond, {"scale": jnp.ones((3,))}, 5.0)
  with pytest.raises(ValueError, match="uncond"):
    smp.cfg_model_fn(apply_fn, cond, {"other": jnp.ones((2,))}, 5.0)
  for bad in ((500, 100), (-1, 10), (1, 2, 3), "0,500", (0, True)):
    with pytest.raises(ValueError, match="guidance_interval"):
      smp.cfg_model_fn(apply_fn, cond, cond, 5.0, guidance_interval=bad)


def test_concat_model_fn_appends_channels(x_toy):
  extra = jnp.ones(x_toy.shape[:3] + (2,))
  seen = []
  fn = smp.concat_model_fn(lambda x, t: seen.append(x) or x[..., :3], extra)
  np.testing.assert_array_equal(fn(x_toy, jnp.zeros((2,), jnp.int32)), x_toy)
  np.testing.assert_array_equal(seen[0][..., 3:], extra)
  with pytest.raises(ValueError, match="concat"):
    smp.concat_model_fn(fn, jnp.ones((2, 5, 5, 1)))(x_toy, jnp.zeros((2,), jnp.int32))


# ---------------------------------------------------------------------------------------------
# Applications

def test_img2img_strength_zero_returns_the_input_and_bad_strength_is_named(sd, x_toy):
  for strength in (0.0, 0.01):  # ⌊50·0.01⌋ = 0 steps
    assert smp.img2img(toy_model, sd, x_toy, jax.random.key(0), strength=strength) is x_toy
  for strength in (-0.1, 1.5):
    with pytest.raises(ValueError, match="strength"):
      smp.img2img(toy_model, sd, x_toy, jax.random.key(0), strength=strength)


def test_img2img_runs_the_last_steps_from_the_noised_latent(sd, x_toy):
  rng = jax.random.key(4)
  out = smp.img2img(toy_model, sd, x_toy, rng, strength=0.3, num_steps=20)
  ts = smp.make_timesteps(1000, 20)[20 - 6:]
  noise = jax.random.normal(jax.random.split(rng)[0], x_toy.shape)
  x_start = sch.q_sample(sd, x_toy, jnp.full((2,), ts[0]), noise)
  np.testing.assert_allclose(out, smp.ddim(toy_model, sd, x_start, timesteps=ts), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["ddim", "plms", "dpmpp_2m", "ddpm"])
def test_inpainting_keeps_the_known_region_exactly(sd, name):
  known = marginal_draws(sd, 0, n=4, seed=1)
  mask = jnp.zeros((1, 1, 2, 1)).at[:, :, 0].set(1.0)  # keep the left column
  out = smp.inpaint(gaussian_denoiser(sd, "v"), sd, known, mask, jax.random.key(2), sampler=name, num_steps=10,
                    parameterization="v")
  np.testing.assert_array_equal(np.asarray(out)[:, :, 0], np.asarray(known)[:, :, 0])
  assert np.abs(np.asarray(out)[:, :, 1] - np.asarray(known)[:, :, 1]).min() > 1e-3


def test_inpainting_blends_the_renoised_known_latent_before_each_call(sd):
  """With a model that returns its input as x0, DDIM's state is what the model saw: in the known
  region that must be q_sample(known, t, ε) at every visited t."""
  known = marginal_draws(sd, 0, n=2, seed=1)
  mask = jnp.ones((2, 1, 2, 2))
  seen = []
  echo = lambda x, t: (jax.debug.callback(lambda a, b: seen.append((np.asarray(a), int(b[0]))), x, t), x)[1]
  rng = jax.random.key(9)
  smp.inpaint(echo, sd, known, mask, rng, num_steps=4, parameterization="x0")
  noise = jax.random.normal(jax.random.split(rng)[0], known.shape)
  assert [t for _, t in seen] == list(smp.make_timesteps(1000, 4))
  for x, t in seen:
    np.testing.assert_allclose(x, sch.q_sample(sd, known, jnp.full((2,), t), noise), rtol=1e-5, atol=1e-6)


def test_mask_errors_and_image_mask_downsampling(sd):
  known = jnp.zeros((2, 4, 4, 3))
  with pytest.raises(ValueError, match="mask"):
    smp.inpaint(toy_model, sd, known, jnp.ones((2, 32, 32, 1)), jax.random.key(0))
  with pytest.raises(ValueError, match="mask"):
    smp.mask_to_latent(jnp.ones((1, 30, 32, 1)), 8)
  image_mask = jnp.zeros((1, 32, 32, 1)).at[:, :16].set(1.0).at[:, 16:20, :8].set(1.0)
  latent_mask = np.asarray(smp.mask_to_latent(image_mask, 8))[0, :, :, 0]
  np.testing.assert_array_equal(latent_mask, [[1, 1, 1, 1], [1, 1, 1, 1], [0.5, 0, 0, 0], [0, 0, 0, 0]])
