"""Samplers for latent diffusion, guidance, and the applications built on them, as pure functions.

Every sampler runs the whole reverse trajectory as one `jax.lax.scan`, so it jit-compiles once
for any number of steps, and calls the network through one interface:

    model_fn(x_t [B, H, W, C], t [B] int32) -> model_out [B, H, W, C]

with the network's `parameterization` ('eps' | 'x0' | 'v', see `schedule.py`) given to the
sampler. Conditioning is closed over by the caller; `cfg_model_fn` builds a guided model_fn and
`concat_model_fn` one for concat-conditioned models (inpainting, super-resolution). Arithmetic
is float32 whatever the dtype of `x_T` or of the network's output.

Timesteps (`make_timesteps`) are returned in the order they are visited, t_0 > t_1 > … > t_{n−1}.
The default spacing of every sampler, 'uniform', is CompVis `make_ddim_timesteps('uniform')`:
t = i·⌊T/n⌋ + 1, identical to diffusers' 'leading' spacing with `steps_offset=1` (the Stable
Diffusion scheduler configs) for DDIM, DDPM and PLMS. `spacing='leading' | 'linspace' | 'trailing'`
with `steps_offset` gives the timesteps of the diffusers scheduler of the same sampler and
`timestep_spacing` (DPMSolverMultistepScheduler's differ from DDIMScheduler's). A step from
the last timestep lands on ᾱ_0 in DDIM and PLMS (CompVis; diffusers with `set_alpha_to_one=False`),
on ᾱ = 1 in DDPM and DPM-Solver++ (diffusers: the final step returns the data prediction).

Samplers:
  `ddim`     Song et al. 2021, with η (η = 0 deterministic, η = 1 the DDPM posterior variance).
  `ddpm`     ancestral sampling (Ho et al. 2020) with the posterior variance β̃ ("fixed_small"),
             over every timestep or a subsequence.
  `plms`     PNDM's pseudo linear multistep (Liu et al. 2022) as CompVis `plms.py` and diffusers
             `PNDMScheduler(skip_prk_steps=True)`: a Heun-like first step (two network calls), then
             Adams–Bashforth of order 2, 3, 4 on eps; n + 1 network calls for n ≥ 2 steps.
  `dpmpp_2m` DPM-Solver++(2M) (Lu et al. 2022), data prediction, midpoint form, first order on the
             first and the last step, as diffusers `DPMSolverMultistepScheduler(solver_order=2,
             algorithm_type='dpmsolver++', lower_order_final=True, final_sigmas_type='zero')`.

Each step goes from one visited timestep to the next one visited. (diffusers' DDIM and PNDM go
to t − ⌊T/n⌋ instead, the same thing for 'uniform' and 'leading' spacing and for 'trailing' when
n divides T; DDPM and DPM-Solver++ visit as here.)

Samplers that draw noise (DDIM with η > 0, DDPM) split `rng` into one key per step, so the same
key gives the same samples. All samplers accept `timesteps=` (an explicit decreasing sequence
instead of `num_steps`, `spacing` and `steps_offset`), `return_x0_at=` (step indices whose
predicted x0 is returned for the denoising visualisation; the call then returns
`(x, x0_preds [K, B, H, W, C])`), `end_timestep=` (the last step lands on that timestep instead of
the end of the schedule: the first model of an ensemble of experts, `expert_timesteps`),
and the inpainting arguments `known_latent`, `mask` and `known_noise` (front end: `inpaint`).

Applications: `img2img` (strength → how many of the steps are run), `inpaint` (known region
re-noised and blended at every step), `mask_to_latent`, `expert_timesteps` (SDXL's base + refiner:
which timesteps each model denoises). Tiled decoding is `ldm_jax.diffusion.tiling`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.config.diffusion import SAMPLERS, SPACINGS, check_guidance_interval
from ldm_jax.diffusion.schedule import PARAMETERIZATIONS, Schedule, predict_eps, predict_x0, q_sample

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]
# Samplers whose diffusers scheduler (DPMSolverMultistepScheduler) lays n + 1 'leading' or
# 'linspace' points and visits the first n, the last step going to ᾱ = 1 instead.
_N_PLUS_ONE_GRID = ("dpmpp_2m",)


# ---------------------------------------------------------------------------------------------
# Timesteps

def make_timesteps(num_timesteps: int, num_steps: int, spacing: str = "uniform", *, steps_offset: int = 0,
                   sampler: str = "ddim") -> np.ndarray:
  """The `num_steps` training timesteps `sampler` visits, decreasing, int32 [num_steps].

  spacing (every sampler's default is CompVis' 'uniform'):
    'uniform'   i·⌊T/n⌋ + 1 for i < n (CompVis; diffusers 'leading' with steps_offset=1). With
                n = T the offset would leave the range, so every timestep T−1 … 0 is used.
    'quadratic' ⌊(i·√(0.8T)/(n−1))²⌋ + 1 (CompVis), bumped to be strictly increasing where the
                rounding repeats a timestep (CompVis repeats it, a wasted step for DDIM and a
                zero step size for the multistep solvers).
  and diffusers' `timestep_spacing`, as the sampler's scheduler sets them (DDIMScheduler,
  DDPMScheduler, PNDMScheduler; DPMSolverMultistepScheduler for 'dpmpp_2m', which lays n + 1
  points and visits the first n), so that a diffusers run can be reproduced:
    'leading'   i·⌊T/n⌋ + steps_offset for i < n; dpmpp_2m: i·⌊T/(n+1)⌋ + steps_offset, 1 ≤ i ≤ n.
    'linspace'  round(linspace(0, T−1, n)); dpmpp_2m: the n largest of round(linspace(0, T−1, n+1)).
    'trailing'  round(T − i·T/n) − 1 for i < n, all samplers (starts at T−1, what
                zero-terminal-SNR schedules need).
  `steps_offset` is diffusers' (0 by default there, 1 in the Stable Diffusion configs) and, as
  there, moves 'leading' timesteps only. E.g. 20 of T = 1000 steps: 'uniform' 951, 901, … 1;
  dpmpp_2m 'linspace' 999, 949, … 50, 'leading' with steps_offset=1 941, 894, … 48.
  """
  T, n = num_timesteps, num_steps
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or not 1 <= n <= T:
    raise ValueError(f"num_steps: expected an integer in [1, {T}] (the schedule's training timesteps), "
                     f"got {n!r}.")
  if not isinstance(steps_offset, (int, np.integer)) or isinstance(steps_offset, bool) or steps_offset < 0:
    raise ValueError(f"steps_offset: expected a non-negative integer, got {steps_offset!r}.")
  points = n + 1 if sampler in _N_PLUS_ONE_GRID else n
  if spacing == "uniform":
    step = T // n
    offset = 1 if (n - 1) * step + 1 < T else 0
    ts = np.arange(n) * step + offset
  elif spacing == "quadratic":
    ts = (np.linspace(0, np.sqrt(T * 0.8), n) ** 2).astype(np.int64) + 1
    ts = np.maximum.accumulate(ts - np.arange(n)) + np.arange(n)  # now ts[i] ≥ ts[i−1] + 1
  elif spacing == "leading":
    ts = np.arange(points)[points - n:] * (T // points) + steps_offset
  elif spacing == "linspace":
    ts = np.round(np.linspace(0, T - 1, points)).astype(np.int64)[points - n:]
  elif spacing == "trailing":
    ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64)[:n][::-1] - 1
  else:
    raise ValueError(f"spacing: {spacing!r} is not one of {', '.join(SPACINGS)}.")
  if ts[-1] > T - 1 or np.any(np.diff(ts) <= 0):
    raise ValueError(f"num_steps: {n} steps of spacing {spacing!r}"
                     f"{f' with steps_offset={steps_offset}' if spacing == 'leading' else ''} are not distinct "
                     f"timesteps in [0, {T}); use fewer steps or spacing='uniform'.")
  return np.ascontiguousarray(ts[::-1]).astype(np.int32)


def _resolve_timesteps(schedule: Schedule, num_steps, spacing, steps_offset, sampler, timesteps) -> np.ndarray:
  T = schedule.num_timesteps
  if timesteps is None:
    return make_timesteps(T, num_steps, spacing, steps_offset=steps_offset, sampler=sampler)
  ts = np.asarray(timesteps)
  if (ts.ndim != 1 or ts.size == 0 or not np.issubdtype(ts.dtype, np.integer) or ts.min() < 0
      or ts.max() >= T or np.any(np.diff(ts) >= 0)):
    raise ValueError(f"timesteps: expected a non-empty, strictly decreasing sequence of integers in [0, {T}), "
                     f"got {timesteps!r}.")
  return ts.astype(np.int32)


# ---------------------------------------------------------------------------------------------
# Model functions: guidance and concat conditioning

def cfg_model_fn(apply_fn: Callable[[jax.Array, jax.Array, Any], jax.Array], cond: Any, uncond: Any,
                 guidance_scale: float, guidance_rescale: float = 0.0,
                 guidance_interval: tuple[float, float] | None = None, *, share_input: bool = False) -> ModelFn:
  """Classifier-free guidance (Ho & Salimans 2022) as a model_fn.

  Args:
    apply_fn: `apply_fn(x [N, H, W, C], t [N], cond_pytree) -> out [N, H, W, C]`, the network with
      its parameters closed over.
    cond: pytree of conditions with leading axis B (text context [B, L, D], class labels [B], …).
    uncond: the same structure, leading axis B or 1: the null condition (empty-prompt context, the
      null class), or a negative prompt's condition.
    guidance_scale: s ≥ 0, a Python number (static): out = uncond + s·(cond − uncond), combined in
      the network's own parameterization as diffusers does. s = 1 calls the network once, on `cond`.
    guidance_rescale: φ ∈ [0, 1] (Lin et al. 2024, §3.4; diffusers `rescale_noise_cfg`): the guided
      output is rescaled to the conditional output's per-example standard deviation and mixed,
      φ·rescaled + (1 − φ)·guided. 0.7 is the paper's value.
    guidance_interval: (lo, hi): guide only the network calls at timesteps lo ≤ t ≤ hi
      (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval improves sample and
      distribution quality"); at the other timesteps the output is the conditional one, from one
      pass on B. None: guide every call. Guidance at high noise levels shifts the samples' colours
      (Fashion-MNIST: too bright) and adds little class fidelity; the README's recipe measures it.
    share_input: give `apply_fn` x and t once (batch B) with the conditions of both branches
      (batch 2B); it returns 2B outputs. ldm_jax's `UNet` takes that, and then computes the layers
      before its first cross-attention once for both branches. False: x and t twice.

  The conditional and unconditional passes are one call on a batch of 2B rows, example i's
  conditional row 2i and its unconditional row 2i + 1: on a mesh that splits the batch, each device
  keeps its examples' rows (no communication for the guidance).
  """
  guidance_scale = float(guidance_scale)
  guidance_rescale = float(guidance_rescale)
  if not guidance_scale >= 0:
    raise ValueError(f"guidance_scale: must be ≥ 0, got {guidance_scale}.")
  if not 0 <= guidance_rescale <= 1:
    raise ValueError(f"guidance_rescale: must be in [0, 1], got {guidance_rescale}.")
  if guidance_interval is not None:
    check_guidance_interval(guidance_interval, "guidance_interval")
  if guidance_scale == 1.0:
    return lambda x, t: apply_fn(x, t, cond)

  if jax.tree.structure(cond) != jax.tree.structure(uncond):
    raise ValueError(f"uncond: its pytree structure {jax.tree.structure(uncond)} differs from cond's "
                     f"{jax.tree.structure(cond)}.")
  for c, u in zip(jax.tree.leaves(cond), jax.tree.leaves(uncond)):
    if np.ndim(c) < 1 or np.ndim(u) != np.ndim(c) or np.shape(u)[1:] != np.shape(c)[1:] \
        or np.shape(u)[0] not in (1, np.shape(c)[0]):
      raise ValueError(f"uncond: a leaf of shape {np.shape(u)} does not match cond's {np.shape(c)}; "
                       "expected the same shape with batch size B or 1.")

  def both(c, u):  # [c0, u0, c1, u1, …]
    u = jnp.broadcast_to(u, c.shape).astype(jnp.asarray(c).dtype)
    return jnp.stack([c, u], axis=1).reshape((2 * c.shape[0],) + c.shape[1:])

  cond_uncond = jax.tree.map(both, cond, uncond)

  def model_fn(x, t):
    x_in, t_in = (x, t) if share_input else (jnp.repeat(x, 2, axis=0), jnp.repeat(t, 2, axis=0))
    out = apply_fn(x_in, t_in, cond_uncond).astype(jnp.float32)
    out = out.reshape((x.shape[0], 2) + out.shape[1:])
    out_cond, out_uncond = out[:, 0], out[:, 1]
    guided = out_uncond + guidance_scale * (out_cond - out_uncond)
    if guidance_rescale > 0:
      guided = rescale_guidance(guided, out_cond, guidance_rescale)
    if guidance_interval is not None:  # examples at other timesteps than the batch's guided ones
      guided = jnp.where(inside(t).reshape(t.shape + (1,) * (x.ndim - 1)), guided, out_cond)
    return guided

  if guidance_interval is None:
    return model_fn
  lo, hi = guidance_interval
  inside = lambda t: (t >= lo) & (t <= hi)
  conditional = lambda x, t: apply_fn(x, t, cond).astype(jnp.float32)
  return lambda x, t: jax.lax.cond(jnp.any(inside(t)), model_fn, conditional, x, t)


def rescale_guidance(guided: jax.Array, out_cond: jax.Array, guidance_rescale: float) -> jax.Array:
  """φ·guided·std(cond)/std(guided) + (1 − φ)·guided, std per example over all but the batch axis."""
  axes = tuple(range(1, guided.ndim))
  rescaled = guided * (jnp.std(out_cond, axis=axes, keepdims=True) / jnp.std(guided, axis=axes, keepdims=True))
  return guidance_rescale * rescaled + (1.0 - guidance_rescale) * guided


def concat_model_fn(model_fn: ModelFn, concat: jax.Array) -> ModelFn:
  """A model_fn for networks that take extra input channels: x_t ⊕ concat along channels.

  concat: [B, H, W, Cc] at the latent resolution — for SD-style inpainting models the mask
  (1 = repaint) then the masked image's latent; for super-resolution models the low-resolution
  image. The wrapped network returns the C channels of x_t. Wrap the guided model_fn
  (`concat_model_fn(cfg_model_fn(...), concat)`): guidance doubles the batch inside, the
  concatenation happens once outside.
  """
  concat = jnp.asarray(concat)

  def wrapped(x, t):
    if concat.shape[:3] != x.shape[:3]:
      raise ValueError(f"concat: shape {concat.shape} does not match the latent {x.shape} in [B, H, W].")
    return model_fn(jnp.concatenate([x, concat.astype(x.dtype)], axis=-1), t)

  return wrapped


# ---------------------------------------------------------------------------------------------
# What every sampler shares: argument checks, the inpainting blend, the x0 buffer, the scan

def _check_parameterization(parameterization: str) -> None:
  if parameterization not in PARAMETERIZATIONS:
    raise ValueError(f"parameterization: {parameterization!r} is not one of {', '.join(PARAMETERIZATIONS)}.")


def _check_mask(mask, latent_shape) -> None:
  shape = np.shape(mask)
  B, H, W, C = latent_shape
  if len(shape) != 4 or shape[1:3] != (H, W) or shape[0] not in (1, B) or shape[3] not in (1, C):
    raise ValueError(f"mask: shape {shape} does not match the latent {tuple(latent_shape)}; expected "
                     f"[B or 1, {H}, {W}, 1 or {C}] (1 = keep the known latent). An image-sized mask "
                     "goes through mask_to_latent(mask, f) first.")


class _Known:
  """The inpainting blend: before each network call at timestep t the state becomes
  mask·q_sample(known, t, noise) + (1 − mask)·x; at the end mask·known + (1 − mask)·x."""

  def __init__(self, schedule, x_T, known_latent, mask, known_noise):
    if (known_latent is None) != (mask is None):
      raise ValueError("known_latent, mask: pass both (inpainting) or neither.")
    self.active = known_latent is not None
    if not self.active:
      return
    if np.shape(known_latent) != np.shape(x_T):
      raise ValueError(f"known_latent: shape {np.shape(known_latent)} differs from x_T's {np.shape(x_T)}.")
    _check_mask(mask, np.shape(x_T))
    noise = x_T if known_noise is None else known_noise
    if np.shape(noise) != np.shape(x_T):
      raise ValueError(f"known_noise: shape {np.shape(noise)} differs from x_T's {np.shape(x_T)}.")
    self.schedule = schedule
    self.known = jnp.asarray(known_latent, jnp.float32)
    self.mask = jnp.asarray(mask, jnp.float32)
    self.noise = jnp.asarray(noise, jnp.float32)

  def at(self, x, t_vec):
    if not self.active:
      return x
    return self.mask * q_sample(self.schedule, self.known, t_vec, self.noise) + (1.0 - self.mask) * x

  def final(self, x):
    if not self.active:
      return x
    return self.mask * self.known + (1.0 - self.mask) * x


def _x0_slots(return_x0_at: Sequence[int], num_steps: int) -> np.ndarray:
  """slots[i] = position of step i in `return_x0_at`, or −1; [num_steps] int32."""
  slots = np.full(num_steps, -1, np.int32)
  for k, i in enumerate(return_x0_at):
    if not isinstance(i, (int, np.integer)) or not -num_steps <= i < num_steps:
      raise ValueError(f"return_x0_at: step index {i!r} is outside the {num_steps} steps of this run.")
    slots[int(i) % num_steps] = k
  if len(set(int(i) % num_steps for i in return_x0_at)) != len(return_x0_at):
    raise ValueError(f"return_x0_at: repeated step index in {tuple(return_x0_at)}.")
  return slots


def _record(buf, slot, x0):
  if buf is None:
    return None
  return jnp.where(slot >= 0, buf.at[jnp.maximum(slot, 0)].set(x0), buf)


class _Trajectory:
  """What every sampler shares: the checked arguments, the visited timesteps `ts` [n], ᾱ in
  float32 (`ab`), the inpainting blend and the x0 buffer. `predict` is the start of every step,
  `scan` runs the steps as one `lax.scan`."""

  def __init__(self, sampler, model_fn, schedule, x_T, *, parameterization, num_steps, spacing, steps_offset,
               timesteps, return_x0_at, known_latent, mask, known_noise, clip_x0=None, end_timestep=None):
    _check_parameterization(parameterization)
    self.model_fn, self.schedule, self.parameterization, self.clip_x0 = (
        model_fn, schedule, parameterization, clip_x0)
    self.ts = _resolve_timesteps(schedule, num_steps, spacing, steps_offset, sampler, timesteps)
    self.n = len(self.ts)
    self.ab = schedule.alphas_cumprod.astype(jnp.float32)
    if end_timestep is not None and (not isinstance(end_timestep, (int, np.integer)) or isinstance(end_timestep, bool)
                                     or not 0 <= end_timestep < self.ts[-1]):
      raise ValueError(f"end_timestep: expected an integer in [0, {self.ts[-1]}) (below the last visited "
                       f"timestep), got {end_timestep!r}.")
    self.end_timestep = end_timestep
    self.known = _Known(schedule, x_T, known_latent, mask, known_noise)
    self.x_T = jnp.asarray(x_T, jnp.float32)
    self.slots = _x0_slots(tuple(return_x0_at), self.n)
    self.buf = (jnp.zeros((len(return_x0_at),) + self.x_T.shape, jnp.float32)
                if len(return_x0_at) else None)

  def ab_after(self, default: jax.Array) -> jax.Array:
    """[n] ᾱ each step lands on: the next visited timestep's, then ᾱ at `end_timestep` or `default` [1]."""
    end = default if self.end_timestep is None else self.ab[self.end_timestep][None]
    return jnp.concatenate([self.ab[self.ts[1:]], end])

  def predict(self, x, t):
    """One network call at timestep t (a scalar) on x after the inpainting blend →
    (blended x, x̂0 clipped to `clip_x0`, ε̂), float32; a sampler uses x̂0, ε̂ or both."""
    t_vec = jnp.full((x.shape[0],), t, jnp.int32)
    x = self.known.at(x, t_vec)
    out = self.model_fn(x, t_vec).astype(jnp.float32)
    x0 = _clip(predict_x0(self.schedule, x, t_vec, out, self.parameterization), self.clip_x0)
    return x, x0, predict_eps(self.schedule, x, t_vec, out, self.parameterization)

  def scan(self, step, state, xs):
    """Runs `step(x, state, s) -> (x_next, state, x̂0)` over the rows s of `xs` from x_T, one
    `lax.scan`; x̂0 goes to the buffer at `s['slot']` ≥ 0. Returns the final x after the
    inpainting blend, or `(x, x0_preds)` with `return_x0_at`."""

    def body(carry, s):
      x, state, buf = carry
      x, state, x0 = step(x, state, s)
      return (x, state, _record(buf, s["slot"], x0)), None

    (x, _, buf), _ = jax.lax.scan(body, (self.x_T, state, self.buf), xs)
    x = self.known.final(x)
    return x if buf is None else (x, buf)


def _step_keys(rng, n, needed: bool, what: str):
  """One PRNG key per step (a placeholder when the sampler draws no noise)."""
  if not needed:
    return jnp.zeros((n,), jnp.int32)
  if rng is None:
    raise ValueError(f"rng: {what} draws noise and needs a PRNG key, got None.")
  return jax.random.split(rng, n)


def _clip(x0, clip_x0):
  return x0 if clip_x0 is None else jnp.clip(x0, -clip_x0, clip_x0)


# ---------------------------------------------------------------------------------------------
# Samplers

def ddim(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, rng: jax.Array | None = None, *,
         num_steps: int = 50, eta: float = 0.0, parameterization: str = "eps", spacing: str = "uniform",
         steps_offset: int = 0, timesteps=None, clip_x0: float | None = None, return_x0_at: Sequence[int] = (),
         known_latent=None, mask=None, known_noise=None, end_timestep: int | None = None):
  """DDIM: x_{t'} = √ᾱ_{t'}·x̂0 + √(1 − ᾱ_{t'} − σ²)·ε̂ + σ·z,  σ = η·√((1−ᾱ_{t'})/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ_{t'})).

  Args:
    model_fn: `model_fn(x_t [B, H, W, C], t [B] int32) -> out`.
    schedule: the training `Schedule`.
    x_T: [B, H, W, C] the starting latent (noise, or a noised latent with `timesteps`).
    rng: PRNG key, needed only when η > 0.
    num_steps, spacing, steps_offset: the timesteps (`make_timesteps`; spacing 'uniform' by
      default, diffusers' 'leading', 'linspace' or 'trailing' to reproduce its scheduler), unless
      `timesteps` gives them.
    eta: η ≥ 0.
    parameterization: what the network predicts, 'eps' | 'x0' | 'v'.
    clip_x0: if set, x̂0 is clipped to [−clip_x0, clip_x0] (pixel-space models).
    return_x0_at: step indices (0 = first step) whose x̂0 is returned.
    known_latent, mask, known_noise: inpainting (see `inpaint`).
    end_timestep: the timestep the last step lands on instead of the end of the schedule, below the
      last visited one: the first expert of an ensemble stops where the next one starts
      (`expert_timesteps`). Every sampler takes it.
  Returns:
    x [B, H, W, C] float32 at ᾱ_0, or at `end_timestep` (or `(x, x0_preds [K, B, H, W, C])` with
    `return_x0_at`).
  """
  if not eta >= 0:
    raise ValueError(f"eta: must be ≥ 0, got {eta}.")
  run = _Trajectory("ddim", model_fn, schedule, x_T, parameterization=parameterization, num_steps=num_steps,
                    spacing=spacing, steps_offset=steps_offset, timesteps=timesteps, return_x0_at=return_x0_at,
                    known_latent=known_latent, mask=mask, known_noise=known_noise, clip_x0=clip_x0,
                    end_timestep=end_timestep)
  ts, ab = run.ts, run.ab
  ab_t = ab[ts]
  ab_prev = run.ab_after(ab[:1])
  sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev))
  stochastic = eta > 0
  xs = dict(t=jnp.asarray(ts), ab_prev=ab_prev, sigma=sigma, slot=jnp.asarray(run.slots),
            key=_step_keys(rng, run.n, stochastic, "ddim with eta > 0"))

  def step(x, state, s):
    x, x0, eps = run.predict(x, s["t"])
    ab_prev, sigma = s["ab_prev"], s["sigma"]
    x = jnp.sqrt(ab_prev) * x0 + jnp.sqrt(jnp.maximum(1 - ab_prev - sigma**2, 0.0)) * eps
    if stochastic:
      x = x + sigma * jax.random.normal(s["key"], x.shape, x.dtype)
    return x, state, x0

  return run.scan(step, (), xs)


def ddpm(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, rng: jax.Array, *,
         num_steps: int | None = None, parameterization: str = "eps", spacing: str = "uniform",
         steps_offset: int = 0, timesteps=None, clip_x0: float | None = None, return_x0_at: Sequence[int] = (),
         known_latent=None, mask=None, known_noise=None, end_timestep: int | None = None):
  """Ancestral sampling from the posterior q(x_{t'} | x_t, x̂0) between consecutive visited timesteps.

  mean = √ᾱ_{t'}·β/(1−ᾱ_t)·x̂0 + √(1−β)·(1−ᾱ_{t'})/(1−ᾱ_t)·x_t, variance (1−ᾱ_{t'})/(1−ᾱ_t)·β with
  β = 1 − ᾱ_t/ᾱ_{t'}, and ᾱ = 1 after the last timestep (so the last step adds no noise and returns
  x̂0). `num_steps=None` visits every training timestep T−1 … 0. Other arguments as `ddim`.
  """
  run = _Trajectory("ddpm", model_fn, schedule, x_T, parameterization=parameterization,
                    num_steps=schedule.num_timesteps if num_steps is None else num_steps, spacing=spacing,
                    steps_offset=steps_offset, timesteps=timesteps, return_x0_at=return_x0_at,
                    known_latent=known_latent, mask=mask, known_noise=known_noise, clip_x0=clip_x0,
                    end_timestep=end_timestep)
  ts, ab = run.ts, run.ab
  ab_t = ab[ts]
  ab_prev = run.ab_after(jnp.ones((1,), jnp.float32))
  beta = 1 - ab_t / ab_prev
  xs = dict(t=jnp.asarray(ts), slot=jnp.asarray(run.slots), key=_step_keys(rng, run.n, True, "ddpm"),
            c_x0=jnp.sqrt(ab_prev) * beta / (1 - ab_t), c_xt=jnp.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t),
            std=jnp.sqrt(jnp.maximum((1 - ab_prev) / (1 - ab_t) * beta, 0.0)))

  def step(x, state, s):
    x, x0, _ = run.predict(x, s["t"])
    x = s["c_x0"] * x0 + s["c_xt"] * x + s["std"] * jax.random.normal(s["key"], x.shape, x.dtype)
    return x, state, x0

  return run.scan(step, (), xs)


def plms(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, rng: jax.Array | None = None, *,
         num_steps: int = 50, parameterization: str = "eps", spacing: str = "uniform", steps_offset: int = 0,
         timesteps=None, return_x0_at: Sequence[int] = (), known_latent=None, mask=None, known_noise=None,
         end_timestep: int | None = None):
  """Pseudo linear multistep (PNDM without Runge–Kutta warm-up), deterministic; `rng` is unused.

  Each network output is turned into ε̂ at the sample it was computed on; the step from t to t'
  is the DDIM (η = 0) transfer with the combined ε′:
    step 0:  ε′ = (ε̂(x, t_0) + ε̂(x̃, t_1))/2, x̃ the DDIM step of x with ε̂(x, t_0)   (two calls)
    step 1:  ε′ = (3ε_1 − ε_0)/2,   step 2: (23ε_2 − 16ε_1 + 5ε_0)/12,
    step ≥3: (55ε_k − 59ε_{k−1} + 37ε_{k−2} − 9ε_{k−3})/24,
  with ε_k the output at the start of step k (ε_0 from the first call). One step is a DDIM step.
  The last step lands on ᾱ_0 (or `end_timestep`). x0 predictions are those of ε′. Other arguments as `ddim`.

  diffusers' PNDM combines raw v outputs and converts them with the current sample; converting
  each one at its own sample (here) is the same for eps models and differs for v models. Like
  PNDM it needs ᾱ > 0 at the first timestep (x0 = (x − √(1−ᾱ)ε′)/√ᾱ): with a zero-terminal-SNR
  schedule, use another sampler or timesteps below T − 1.
  """
  run = _Trajectory("plms", model_fn, schedule, x_T, parameterization=parameterization, num_steps=num_steps,
                    spacing=spacing, steps_offset=steps_offset, timesteps=timesteps, return_x0_at=return_x0_at,
                    known_latent=known_latent, mask=mask, known_noise=known_noise, end_timestep=end_timestep)
  ts, n, step_slots = run.ts, run.n, run.slots
  last = -1 if end_timestep is None else end_timestep  # −1: ᾱ_0

  # The calls, as in diffusers' PNDM with skip_prk_steps: call 0 at t_0 (a provisional step),
  # call 1 at t_1 redoing step 0 from the saved sample, then call k at t_{k−1} doing step k−1.
  if n == 1:
    t_call, t_from, t_to = ts, ts, np.array([last])
    weights = np.array([[1.0, 0, 0, 0]])
    append, from_saved, slots = np.array([True]), np.array([False]), step_slots
  else:
    steps = np.arange(n)
    t_call = np.concatenate([ts[:1], ts[1:2], ts[1:]])
    t_from = np.concatenate([ts[:1], ts[:1], ts[1:]])
    t_to = np.concatenate([ts[1:2], ts[1:2], np.append(ts[2:], last)])
    ab_weights = {1: [1.0, 0, 0, 0], 2: [1.5, -0.5, 0, 0], 3: [23 / 12, -16 / 12, 5 / 12, 0],
                  4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}
    weights = np.array([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0]] + [ab_weights[min(k + 1, 4)] for k in steps[1:]])
    append = np.array([True, False] + [True] * (n - 1))
    from_saved = np.array([False, True] + [False] * (n - 1))
    slots = np.concatenate([[-1], step_slots])
  ab = run.ab
  ab_to = jnp.where(jnp.asarray(t_to) >= 0, ab[np.maximum(t_to, 0)], ab[0])
  xs = dict(t=jnp.asarray(t_call, jnp.int32), t_from=jnp.asarray(t_from, jnp.int32), ab_to=ab_to,
            w=jnp.asarray(weights, jnp.float32), append=jnp.asarray(append), from_saved=jnp.asarray(from_saved),
            slot=jnp.asarray(slots, jnp.int32))

  def step(x, state, s):
    saved, hist = state  # hist: the last three appended ε, newest first
    x, _, eps = run.predict(x, s["t"])
    w = s["w"]
    eps_comb = w[0] * eps + w[1] * hist[0] + w[2] * hist[1] + w[3] * hist[2]
    base = jnp.where(s["from_saved"], saved, x)
    ab_from = ab[s["t_from"]]
    x0 = (base - jnp.sqrt(1 - ab_from) * eps_comb) / jnp.sqrt(ab_from)
    ab_to = s["ab_to"]
    x_next = jnp.sqrt(ab_to) * x0 + jnp.sqrt(1 - ab_to) * eps_comb
    hist = jnp.where(s["append"], jnp.concatenate([eps[None], hist[:2]]), hist)
    saved = jnp.where(s["from_saved"], saved, x)
    return x_next, (saved, hist), x0

  return run.scan(step, (run.x_T, jnp.zeros((3,) + run.x_T.shape, jnp.float32)), xs)


def dpmpp_2m(model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, rng: jax.Array | None = None, *,
             num_steps: int = 20, parameterization: str = "eps", spacing: str = "uniform", steps_offset: int = 0,
             timesteps=None, clip_x0: float | None = None, return_x0_at: Sequence[int] = (), known_latent=None,
             mask=None, known_noise=None, end_timestep: int | None = None):
  """DPM-Solver++(2M): multistep second-order solver of the diffusion ODE in data prediction.

  With α = √ᾱ, σ = √(1−ᾱ), λ = log(α/σ), h = λ_{t'} − λ_t and D = x̂0:
    x_{t'} = (σ_{t'}/σ_t)·x − α_{t'}·(e^{−h} − 1)·(D_t + (D_t − D_prev)/(2r)),  r = h_prev/h,
  first order (no D_prev term) on the first step and on the last, which goes to ᾱ = 1 and so
  returns the last x̂0. With `end_timestep` the last step goes there, second order, as diffusers'
  scheduler steps in the middle of its timesteps (the first expert of an ensemble). Deterministic;
  `rng` is unused. Other arguments as `ddim`.
  """
  run = _Trajectory("dpmpp_2m", model_fn, schedule, x_T, parameterization=parameterization, num_steps=num_steps,
                    spacing=spacing, steps_offset=steps_offset, timesteps=timesteps, return_x0_at=return_x0_at,
                    known_latent=known_latent, mask=mask, known_noise=known_noise, clip_x0=clip_x0,
                    end_timestep=end_timestep)
  ts, n, ab = run.ts, run.n, run.ab
  ab_t = ab[ts]
  ab_next = run.ab_after(jnp.ones((1,), jnp.float32))
  # ς = σ/α = e^{−λ}; e^{−h} = ς_{t'}/ς_t stays finite at the last step, where ς_{t'} = 0.
  vs_t, vs_next = jnp.sqrt((1 - ab_t) / ab_t), jnp.sqrt((1 - ab_next) / ab_next)
  second = np.arange(n) >= 1
  second[-1] &= end_timestep is not None
  lam = -jnp.log(vs_t)
  h = jnp.where(second, -jnp.log(jnp.where(second, vs_next, 1.0)) - lam, 1.0)
  h_prev = jnp.where(second, lam - jnp.roll(lam, 1), 1.0)
  c0 = jnp.sqrt(ab_next) * (1 - vs_next / vs_t)
  xs = dict(t=jnp.asarray(ts), slot=jnp.asarray(run.slots), c_x=jnp.sqrt((1 - ab_next) / (1 - ab_t)), c0=c0,
            c1=jnp.where(second, 0.5 * c0 * h / h_prev, 0.0))

  def step(x, d_prev, s):
    x, d, _ = run.predict(x, s["t"])
    x = s["c_x"] * x + s["c0"] * d + s["c1"] * (d - d_prev)
    return x, d, d

  return run.scan(step, jnp.zeros_like(run.x_T), xs)


_SAMPLER_FNS = {"ddim": ddim, "ddpm": ddpm, "plms": plms, "dpmpp_2m": dpmpp_2m}


def sample(name: str, model_fn: ModelFn, schedule: Schedule, x_T: jax.Array, rng: jax.Array | None = None,
           **kwargs):
  """Runs the sampler `name` ('ddim' | 'ddpm' | 'plms' | 'dpmpp_2m') with its keyword arguments."""
  if name not in _SAMPLER_FNS:
    raise ValueError(f"sampler: {name!r} is not one of {', '.join(SAMPLERS)}.")
  return _SAMPLER_FNS[name](model_fn, schedule, x_T, rng, **kwargs)


# ---------------------------------------------------------------------------------------------
# Applications

def _strength_timesteps(schedule, num_steps, spacing, steps_offset, sampler, strength):
  """The tail of the timesteps that `strength` keeps: the last ⌊num_steps·strength⌋ (diffusers)."""
  if not 0 <= strength <= 1:
    raise ValueError(f"strength: must be in [0, 1], got {strength}.")
  ts = make_timesteps(schedule.num_timesteps, num_steps, spacing, steps_offset=steps_offset, sampler=sampler)
  return ts[num_steps - min(int(num_steps * strength), num_steps):]


def expert_timesteps(num_timesteps: int, timesteps, denoising_end: float) -> tuple[np.ndarray, np.ndarray]:
  """The timesteps of an ensemble of two experts (eDiff-I; SDXL's base then refiner), as diffusers.

  The first expert denoises the fraction `denoising_end` ∈ (0, 1) of the noise levels: the visited
  `timesteps` (decreasing) ≥ round(T·(1 − denoising_end)), landing on the second expert's first
  timestep (`end_timestep`); the second continues from its latents over the rest (diffusers'
  `denoising_end` / `denoising_start`). Either part may be empty.
  """
  if not 0 < denoising_end < 1:
    raise ValueError(f"denoising_end: expected a fraction in (0, 1), got {denoising_end!r}.")
  ts = np.asarray(timesteps)
  cutoff = int(round(num_timesteps - denoising_end * num_timesteps))
  k = int(np.sum(ts >= cutoff))
  return ts[:k], ts[k:]


def img2img(model_fn: ModelFn, schedule: Schedule, x0_latent: jax.Array, rng: jax.Array, *, strength: float,
            sampler: str = "ddim", num_steps: int = 50, spacing: str = "uniform", steps_offset: int = 0, **kwargs):
  """Image-to-image (SDEdit, Meng et al. 2022): noise a clean latent part-way and denoise it.

  strength ∈ [0, 1]: of the `num_steps` timesteps, the last ⌊num_steps·strength⌋ are run, starting
  from q_sample(x0_latent, t_start, noise) at the first of them (diffusers' convention). Strength 0
  returns `x0_latent` unchanged; strength 1 starts from (almost) pure noise at the first timestep.
  `rng` draws the noise, then the sampler's own noise. kwargs go to the sampler.
  Returns [B, H, W, C] float32 (or with `return_x0_at`, as the sampler).
  """
  ts = _strength_timesteps(schedule, num_steps, spacing, steps_offset, sampler, strength)
  if len(ts) == 0:
    return x0_latent
  rng_noise, rng_sample = jax.random.split(rng)
  x0_latent = jnp.asarray(x0_latent, jnp.float32)
  noise = jax.random.normal(rng_noise, x0_latent.shape, jnp.float32)
  x_start = q_sample(schedule, x0_latent, jnp.full((x0_latent.shape[0],), ts[0]), noise)
  return sample(sampler, model_fn, schedule, x_start, rng_sample, timesteps=ts, **kwargs)


def inpaint(model_fn: ModelFn, schedule: Schedule, known_latent: jax.Array, mask: jax.Array, rng: jax.Array, *,
            sampler: str = "ddim", num_steps: int = 50, spacing: str = "uniform", steps_offset: int = 0,
            strength: float = 1.0, **kwargs):
  """Inpainting with any model by latent blending (CompVis DDIM `mask`/`x0`; diffusers' legacy path).

  Args:
    known_latent: [B, H, W, C] the encoded image.
    mask: [B or 1, H, W, 1 or C] in [0, 1] at the latent resolution, 1 = keep `known_latent`,
      0 = generate (CompVis' convention; diffusers' mask images are the opposite: 1 − that).
    rng: draws the noise ε, then the sampler's own noise.
    strength: < 1 starts from the noised known latent instead of pure noise, as `img2img`.
  Before every network call at timestep t the known region is set to q_sample(known, t, ε), the
  same ε throughout; at the end it is exactly `known_latent`. For inpainting *models* (extra input
  channels) use `concat_model_fn` and, optionally, this blending as well.
  """
  _check_mask(mask, np.shape(known_latent))
  ts = _strength_timesteps(schedule, num_steps, spacing, steps_offset, sampler, strength)
  known_latent = jnp.asarray(known_latent, jnp.float32)
  if len(ts) == 0:
    return known_latent
  rng_noise, rng_sample = jax.random.split(rng)
  noise = jax.random.normal(rng_noise, known_latent.shape, jnp.float32)
  x_start = noise if strength == 1 else q_sample(
      schedule, known_latent, jnp.full((known_latent.shape[0],), ts[0]), noise)
  return sample(sampler, model_fn, schedule, x_start, rng_sample, timesteps=ts, known_latent=known_latent,
                mask=mask, known_noise=noise, **kwargs)


def mask_to_latent(mask: jax.Array, f: int) -> jax.Array:
  """An image-resolution mask [B, H·f, W·f, 1] → [B, H, W, 1] by averaging each f×f block.

  With 1 = keep, a latent pixel is fully kept only where its whole f×f block is kept.
  """
  shape = np.shape(mask)
  if len(shape) != 4 or shape[1] % f or shape[2] % f:
    raise ValueError(f"mask: shape {shape} is not [B, H, W, C] with H and W divisible by f = {f}.")
  B, H, W, C = shape
  return jnp.asarray(mask, jnp.float32).reshape(B, H // f, f, W // f, f, C).mean(axis=(2, 4))
