"""The forward diffusion process and the training objective, as pure functions.

Notation (DDPM; Rombach et al. §3): β_t is the noise added at step t ∈ {0, …, T−1},
ᾱ_t = `alphas_cumprod[t]` = ∏_{s≤t} (1 − β_s), and a noisy latent is

    x_t = √ᾱ_t · x0 + √(1 − ᾱ_t) · eps,        eps ~ N(0, I).

The network may predict `eps`, `x0`, or the velocity v = √ᾱ_t · eps − √(1 − ᾱ_t) · x0
(Salimans & Ho 2022); `predict_x0`, `predict_eps`, `predict_v` convert any of them into the others
given x_t, and `target` gives what each parameterization regresses. SNR(t) = ᾱ_t / (1 − ᾱ_t).

Beta schedule names follow diffusers: 'linear' is linspace(β_start, β_end); 'scaled_linear' is
linspace(√β_start, √β_end)² — what CompVis calls 'linear' and what LDM and Stable Diffusion use;
'cosine' is Nichol & Dhariwal's ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), with β clipped at 0.999.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.config.diffusion import TIMESTEP_SAMPLING

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
PARAMETERIZATIONS = ("eps", "x0", "v")
LOSS_TYPES = ("l2", "l1")


def beta_schedule(name: str, num_timesteps: int = 1000, linear_start: float = 0.00085,
                  linear_end: float = 0.012, cosine_s: float = 8e-3) -> np.ndarray:
  """β_0 … β_{T−1} as a float64 numpy array [T].

  `linear_start`/`linear_end` are β_0 and β_{T−1} for 'linear' and 'scaled_linear'
  (SD: 0.00085–0.012; the paper's LDMs: 0.0015–0.0195); 'cosine' uses only `cosine_s`.
  """
  if name == "linear":
    return np.linspace(linear_start, linear_end, num_timesteps, dtype=np.float64)
  if name == "scaled_linear":
    return np.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=np.float64) ** 2
  if name == "cosine":
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    alpha_bar = np.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    return np.clip(1 - alpha_bar[1:] / alpha_bar[:-1], 0, 0.999)
  raise ValueError(f"diffusion.beta_schedule: {name!r} is not one of {', '.join(BETA_SCHEDULES)}.")


def alphas_cumprod(betas) -> np.ndarray:
  """ᾱ_t = ∏_{s≤t} (1 − β_s), float64 [T]."""
  return np.cumprod(1.0 - np.asarray(betas, np.float64))


def rescale_zero_terminal_snr(betas) -> np.ndarray:
  """Shifts and scales √ᾱ so that ᾱ_{T−1} = 0 while ᾱ_0 is kept (Lin et al. 2024, Alg. 1).

  Training then sees pure noise at the last step, as sampling does. With ᾱ_{T−1} = 0, x0 cannot
  be recovered from an eps prediction at that step: use 'v' (or 'x0') with it.
  """
  sqrt_ab = np.sqrt(alphas_cumprod(betas))
  first, last = sqrt_ab[0], sqrt_ab[-1]
  sqrt_ab = (sqrt_ab - last) * first / (first - last)
  ab = sqrt_ab**2
  return 1.0 - np.concatenate([ab[:1], ab[1:] / ab[:-1]])


class Schedule(NamedTuple):
  """A discrete noise schedule; a pytree, so it can be passed to jitted functions.

  Attributes:
    betas: [T] float32.
    alphas_cumprod: [T] float32 ᾱ_t, computed in float64 before rounding.
  """
  betas: jax.Array
  alphas_cumprod: jax.Array

  @property
  def num_timesteps(self) -> int:
    return self.betas.shape[0]


def make_schedule(beta_schedule_name: str = "scaled_linear", num_timesteps: int = 1000,
                  linear_start: float = 0.00085, linear_end: float = 0.012, cosine_s: float = 8e-3,
                  zero_terminal_snr: bool = False) -> Schedule:
  """Builds a `Schedule` (see `beta_schedule` for the arguments)."""
  if not isinstance(num_timesteps, int) or num_timesteps < 2:
    raise ValueError(f"diffusion.num_timesteps: expected an integer ≥ 2, got {num_timesteps!r}.")
  if beta_schedule_name != "cosine" and not 0 < linear_start <= linear_end < 1:
    raise ValueError(f"diffusion.linear_start/linear_end: need 0 < {linear_start} ≤ {linear_end} < 1.")
  betas = beta_schedule(beta_schedule_name, num_timesteps, linear_start, linear_end, cosine_s)
  if zero_terminal_snr:
    betas = rescale_zero_terminal_snr(betas)
  return Schedule(jnp.asarray(betas, jnp.float32), jnp.asarray(alphas_cumprod(betas), jnp.float32))


def schedule_from_config(cfg) -> Schedule:
  """`make_schedule` from the `diffusion` ConfigDict: `beta_schedule` ('scaled_linear'),
  `num_timesteps` (1000), `linear_start` (0.00085), `linear_end` (0.012), `cosine_s` (0.008),
  `zero_terminal_snr` (False); keys it lacks take these defaults."""
  get = lambda key, default: cfg.get(key, default)
  return make_schedule(get("beta_schedule", "scaled_linear"), get("num_timesteps", 1000),
                       get("linear_start", 0.00085), get("linear_end", 0.012), get("cosine_s", 8e-3),
                       get("zero_terminal_snr", False))


def _coefficients(schedule: Schedule, t: jax.Array, ndim: int):
  """(√ᾱ_t, √(1 − ᾱ_t)) shaped [B, 1, …, 1] to broadcast against [B, …] arrays of rank `ndim`."""
  ab = schedule.alphas_cumprod[t].reshape(-1, *([1] * (ndim - 1)))
  return jnp.sqrt(ab), jnp.sqrt(1.0 - ab)


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = √ᾱ_t x0 + √(1 − ᾱ_t) noise.  x0, noise: [B, …]; t: [B] int → [B, …]."""
  a, s = _coefficients(schedule, t, x0.ndim)
  return a * x0 + s * noise


def _check_parameterization(parameterization: str) -> None:
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(f"diffusion.parameterization: {parameterization!r} is not one of "
                     f"{', '.join(PARAMETERIZATIONS)}.")


def predict_x0(schedule: Schedule, x_t: jax.Array, t: jax.Array, model_out: jax.Array,
               parameterization: str) -> jax.Array:
  """x0 implied by the network output: eps → (x_t − √(1−ᾱ) eps)/√ᾱ; v → √ᾱ x_t − √(1−ᾱ) v."""
  _check_parameterization(parameterization)
  a, s = _coefficients(schedule, t, x_t.ndim)
  if parameterization == "eps":
    return (x_t - s * model_out) / a
  if parameterization == "x0":
    return model_out
  return a * x_t - s * model_out


def predict_eps(schedule: Schedule, x_t: jax.Array, t: jax.Array, model_out: jax.Array,
                parameterization: str) -> jax.Array:
  """eps implied by the network output: x0 → (x_t − √ᾱ x0)/√(1−ᾱ); v → √(1−ᾱ) x_t + √ᾱ v."""
  _check_parameterization(parameterization)
  a, s = _coefficients(schedule, t, x_t.ndim)
  if parameterization == "eps":
    return model_out
  if parameterization == "x0":
    return (x_t - a * model_out) / s
  return s * x_t + a * model_out


def v_target(schedule: Schedule, x0: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """v = √ᾱ_t eps − √(1 − ᾱ_t) x0."""
  a, s = _coefficients(schedule, t, x0.ndim)
  return a * eps - s * x0


def predict_v(schedule: Schedule, x_t: jax.Array, t: jax.Array, model_out: jax.Array,
              parameterization: str) -> jax.Array:
  """v implied by the network output (via its x0 and eps)."""
  if parameterization == "v":
    return model_out
  x0 = predict_x0(schedule, x_t, t, model_out, parameterization)
  eps = predict_eps(schedule, x_t, t, model_out, parameterization)
  return v_target(schedule, x0, eps, t)


def target(schedule: Schedule, x0: jax.Array, eps: jax.Array, t: jax.Array,
           parameterization: str) -> jax.Array:
  """What the network regresses under `parameterization`: eps, x0 or v."""
  _check_parameterization(parameterization)
  if parameterization == "eps":
    return eps
  if parameterization == "x0":
    return x0
  return v_target(schedule, x0, eps, t)


def snr(schedule: Schedule, t: jax.Array) -> jax.Array:
  """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t), [B]."""
  ab = schedule.alphas_cumprod[t]
  return ab / (1.0 - ab)


def min_snr_weight(snr_t: jax.Array, gamma: float, parameterization: str) -> jax.Array:
  """Min-SNR-γ loss weights (Hang et al. 2023) for a loss on the parameterization's own target.

  The paper weights the x0 loss by min(SNR, γ). Since ‖eps − ê‖² = SNR · ‖x0 − x̂0‖² and
  ‖v − v̂‖² = (SNR + 1) · ‖x0 − x̂0‖², the same weighting is min(SNR, γ)/SNR = min(1, γ/SNR) on the
  eps loss and min(SNR, γ)/(SNR + 1) on the v loss.
  """
  _check_parameterization(parameterization)
  if parameterization == "x0":
    return jnp.minimum(snr_t, gamma)
  if parameterization == "eps":
    return jnp.minimum(1.0, gamma / snr_t)  # γ/0 = inf gives weight 1 at a zero-SNR step
  return jnp.minimum(snr_t, gamma) / (snr_t + 1.0)


def diffusion_loss(model_out: jax.Array, x0: jax.Array, eps: jax.Array, t: jax.Array,
                   schedule: Schedule, parameterization: str = "eps", loss_type: str = "l2",
                   min_snr_gamma: float | None = None) -> jax.Array:
  """Per-example denoising loss, mean over all but the batch axis, [B] float32.

  Args:
    model_out: [B, …] network output for x_t = q_sample(schedule, x0, t, eps).
    x0, eps: [B, …] the clean latents and the noise that made x_t.
    t: [B] integer timesteps.
    parameterization: 'eps' | 'x0' | 'v'.
    loss_type: 'l2' (squared error) or 'l1' (absolute error).
    min_snr_gamma: if set, weight each example by `min_snr_weight` (γ = 5 in the paper).
  """
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"diffusion.loss_type: {loss_type!r} is not one of {', '.join(LOSS_TYPES)}.")
  err = model_out.astype(jnp.float32) - target(schedule, x0, eps, t, parameterization).astype(jnp.float32)
  err = jnp.square(err) if loss_type == "l2" else jnp.abs(err)
  loss = jnp.mean(err.reshape(err.shape[0], -1), axis=-1)
  if min_snr_gamma is not None:
    loss = loss * min_snr_weight(snr(schedule, t), min_snr_gamma, parameterization)
  return loss


def offset_noise(rng: jax.Array, shape, strength: float, dtype=jnp.float32) -> jax.Array:
  """Gaussian noise plus `strength` × a per-example, per-channel constant (Guttenberg 2023).

  shape: [B, H, W, C]. The constant shifts a whole channel's mean, which plain noise almost never
  does, so the model learns to change overall brightness. Use the result as `eps` in training.
  """
  rng_pixels, rng_offset = jax.random.split(rng)
  noise = jax.random.normal(rng_pixels, shape, dtype)
  offset = jax.random.normal(rng_offset, (shape[0],) + (1,) * (len(shape) - 2) + (shape[-1],), dtype)
  return noise + strength * offset


def sample_timesteps(rng: jax.Array, batch: int, num_timesteps: int, sampling: str = "uniform",
                     logit_mean: float = 0.0, logit_std: float = 1.0) -> jax.Array:
  """Training timesteps, [batch] int32 in {0, …, num_timesteps − 1}.

  'uniform': t ~ Uniform (DDPM, CompVis, diffusers). 'logit_normal': t = ⌊T · sigmoid(m + s·n)⌋,
  n ~ N(0, 1) (Esser et al. 2024, SD3's timestep density; `logit_mean` m, `logit_std` s): more of
  each batch on the middle noise levels, fewer on the nearly clean and the nearly pure-noise ones;
  m < 0 moves the mass towards less noise. Either way the loss of a timestep keeps its weight.
  """
  if sampling == "uniform":
    return jax.random.randint(rng, (batch,), 0, num_timesteps, dtype=jnp.int32)
  if sampling != "logit_normal":
    raise ValueError(f"diffusion.timestep_sampling: {sampling!r} is not one of {TIMESTEP_SAMPLING}.")
  u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, (batch,), jnp.float32))
  return jnp.minimum((u * num_timesteps).astype(jnp.int32), num_timesteps - 1)
