"""Sampler timesteps and trajectories on an imported U-Net equal diffusers' schedulers.

Timesteps: every sampler's `spacing` 'leading' / 'linspace' / 'trailing' with `steps_offset` gives
the `timesteps` of its diffusers scheduler with that `timestep_spacing`.

Trajectories: DDIM (η = 0), DDPM (the same noise fed to both: ldm_jax draws one key per step, the
test hands those draws to diffusers), PLMS and DPM-Solver++(2M), each with Stable Diffusion's
scheduler settings (scaled_linear 0.00085–0.012, 'leading' spacing with steps_offset 1), 10 steps
from the same x_T, against diffusers' scheduler driving the original U-Net. The network outputs
agree to ~1e-6; the trajectories must agree to 1e-4. The random U-Net is no denoiser, so the
trajectories end far from the data (|x| ≈ 10): a strict test of the updates.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ldm_jax.load import load_pretrained  # noqa: E402
from ldm_jax.diffusion import samplers  # noqa: E402
from ldm_jax.diffusion.schedule import make_schedule  # noqa: E402
from tests.convert.reference import nchw, nhwc  # noqa: E402

STEPS = 10
TOL = 1e-4
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   timestep_spacing="leading", steps_offset=1)
SCHEDULERS = {  # each sampler's diffusers scheduler
    "ddim": lambda **kw: diffusers.DDIMScheduler(**kw),
    "ddpm": lambda **kw: diffusers.DDPMScheduler(**kw),
    "plms": lambda **kw: diffusers.PNDMScheduler(skip_prk_steps=True, **kw),
    "dpmpp_2m": lambda **kw: diffusers.DPMSolverMultistepScheduler(**kw),
}


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
def test_timesteps_equal_the_diffusers_schedulers(sampler, spacing):
  for num_steps in (1, 2, 7, 20, 50, 250):
    for steps_offset in (0, 1):
      scheduler = SCHEDULERS[sampler](num_train_timesteps=1000, timestep_spacing=spacing, steps_offset=steps_offset)
      scheduler.set_timesteps(num_steps)
      ours = samplers.make_timesteps(1000, num_steps, spacing, steps_offset=steps_offset, sampler=sampler)
      if sampler == "plms" and num_steps > 1:  # PNDM lists the timestep of its two first-step calls twice
        ours = np.concatenate([ours[:2], ours[1:]])
      np.testing.assert_array_equal(ours, scheduler.timesteps.numpy(), err_msg=f"{num_steps} steps, "
                                    f"steps_offset={steps_offset}")


@pytest.fixture(scope="module")
def setup(diffusers_models):
  folder, unet = diffusers_models["unet_small"]
  modules, params, _ = load_pretrained(folder)
  rng = np.random.default_rng(0)
  context = rng.normal(size=(2, 5, 128)).astype(np.float32)
  x_T = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  model = modules["unet"]
  model_fn = lambda x, t: model.apply({"params": params["unet"]}, x, t, context)
  torch_context = torch.from_numpy(context)

  def torch_model(x, t):
    with torch.no_grad():
      return unet(x, t, encoder_hidden_states=torch_context).sample

  return model_fn, torch_model, x_T


def _diffusers_loop(scheduler, torch_model, x_T):
  """(x_0, the timesteps visited) of diffusers' sampling loop."""
  scheduler.set_timesteps(STEPS)
  x = nchw(x_T)
  for t in scheduler.timesteps:
    x = scheduler.step(torch_model(x, t), t, x).prev_sample
  return nhwc(x), scheduler.timesteps.numpy()


def _ours(name, model_fn, x_T, rng=None, **kwargs):
  return np.asarray(jax.jit(lambda x: samplers.sample(name, model_fn, make_schedule("scaled_linear"), x, rng,
                                                      **kwargs))(jnp.asarray(x_T)))


def test_ddim_trajectory_matches_diffusers(setup):
  model_fn, torch_model, x_T = setup
  scheduler = diffusers.DDIMScheduler(**SD_SCHEDULE, set_alpha_to_one=False, clip_sample=False)
  reference, timesteps = _diffusers_loop(scheduler, torch_model, x_T)
  np.testing.assert_array_equal(samplers.make_timesteps(1000, STEPS, "uniform"), timesteps)
  np.testing.assert_allclose(_ours("ddim", model_fn, x_T, num_steps=STEPS), reference, atol=TOL)


def test_dpmpp_2m_trajectory_matches_diffusers(setup):
  model_fn, torch_model, x_T = setup
  scheduler = diffusers.DPMSolverMultistepScheduler(**SD_SCHEDULE, solver_order=2, algorithm_type="dpmsolver++",
                                                    lower_order_final=True, final_sigmas_type="zero")
  reference, timesteps = _diffusers_loop(scheduler, torch_model, x_T)
  # diffusers' multistep solvers space 'leading' steps by T // (n + 1) (901, 811, …), unlike its DDIM
  # and DDPM (T // n, ldm_jax's 'uniform'): the sampler's spacing arguments say which.
  sd_spacing = dict(spacing="leading", steps_offset=1)
  np.testing.assert_array_equal(samplers.make_timesteps(1000, STEPS, **sd_spacing, sampler="dpmpp_2m"), timesteps)
  np.testing.assert_allclose(_ours("dpmpp_2m", model_fn, x_T, num_steps=STEPS, **sd_spacing), reference, atol=TOL)


def test_plms_trajectory_matches_diffusers_pndm(setup):
  model_fn, torch_model, x_T = setup
  scheduler = diffusers.PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False)
  reference, _ = _diffusers_loop(scheduler, torch_model, x_T)
  np.testing.assert_allclose(_ours("plms", model_fn, x_T, num_steps=STEPS, spacing="leading", steps_offset=1),
                             reference, atol=TOL)


def test_ddpm_trajectory_matches_diffusers_with_the_same_noise(setup, monkeypatch):
  model_fn, torch_model, x_T = setup
  rng = jax.random.key(7)
  # ldm_jax's ddpm draws step k's noise from the k-th of `split(rng, num_steps)`.
  noise = [nchw(jax.random.normal(key, x_T.shape, jnp.float32)) for key in jax.random.split(rng, STEPS)]
  from diffusers.schedulers import scheduling_ddpm
  monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *args, **kwargs: noise.pop(0))
  scheduler = diffusers.DDPMScheduler(**SD_SCHEDULE, variance_type="fixed_small", clip_sample=False)
  reference, timesteps = _diffusers_loop(scheduler, torch_model, x_T)
  assert not noise  # diffusers drew one noise per step
  np.testing.assert_array_equal(samplers.make_timesteps(1000, STEPS, "uniform"), timesteps)
  np.testing.assert_allclose(_ours("ddpm", model_fn, x_T, rng, num_steps=STEPS), reference, atol=TOL)


@pytest.mark.parametrize("denoising_end", [0.1, 0.45, 0.8, 0.99])
def test_expert_timesteps_are_diffusers_denoising_end_and_start(denoising_end):
  """The base's timesteps are StableDiffusionXLPipeline's with `denoising_end`, the refiner's
  StableDiffusionXLImg2ImgPipeline's with `denoising_start` (their cut-off rule, rewritten here)."""
  scheduler = diffusers.DDIMScheduler(**SD_SCHEDULE)
  scheduler.set_timesteps(25)
  timesteps = scheduler.timesteps.numpy()
  cutoff = int(round(1000 - denoising_end * 1000))
  base, refiner = samplers.expert_timesteps(1000, timesteps, denoising_end)
  np.testing.assert_array_equal(base, [t for t in timesteps if t >= cutoff])
  np.testing.assert_array_equal(refiner, timesteps[len(timesteps) - int((timesteps < cutoff).sum()):])
  assert len(base) + len(refiner) == 25 and 0 < len(base) < 25
  with pytest.raises(ValueError, match="denoising_end: expected a fraction in"):
    samplers.expert_timesteps(1000, timesteps, 1.0)


@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m"])
def test_an_ensemble_of_experts_matches_diffusers_handing_over_latents(setup, name):
  """diffusers' base loop over the timesteps ≥ the cut-off, then a fresh scheduler of the refiner
  from its begin index (what the two SDXL pipelines do; here one U-Net plays both experts): the
  first part lands on the refiner's first timestep (`end_timestep`), the second continues from it.
  DPM-Solver++'s last base step is second order and the refiner's first is first order."""
  model_fn, torch_model, x_T = setup
  make = {"ddim": lambda: diffusers.DDIMScheduler(**SD_SCHEDULE, set_alpha_to_one=False, clip_sample=False),
          "dpmpp_2m": lambda: diffusers.DPMSolverMultistepScheduler(
              **SD_SCHEDULE, solver_order=2, algorithm_type="dpmsolver++", lower_order_final=True,
              final_sigmas_type="zero")}[name]
  base_scheduler, refiner_scheduler = make(), make()
  base_scheduler.set_timesteps(STEPS)
  refiner_scheduler.set_timesteps(STEPS)
  ts, refiner_ts = samplers.expert_timesteps(1000, base_scheduler.timesteps.numpy(), 0.65)
  assert len(ts) >= 2 and len(refiner_ts) >= 2, (ts, refiner_ts)  # (6, 4) with DDIM, (7, 3) with DPM-Solver++
  x = nchw(x_T)
  for t in base_scheduler.timesteps[:len(ts)]:
    x = base_scheduler.step(torch_model(x, t), t, x).prev_sample
  handed_over = nhwc(x)
  if hasattr(refiner_scheduler, "set_begin_index"):  # as the img2img pipeline does; DDIM has no step index
    refiner_scheduler.set_begin_index(len(ts))
  for t in refiner_scheduler.timesteps[len(ts):]:
    x = refiner_scheduler.step(torch_model(x, t), t, x).prev_sample
  ours = _ours(name, model_fn, x_T, timesteps=ts, end_timestep=int(refiner_ts[0]))
  np.testing.assert_allclose(ours, handed_over, atol=TOL)
  np.testing.assert_allclose(_ours(name, model_fn, ours, timesteps=refiner_ts), nhwc(x), atol=TOL)
  with pytest.raises(ValueError, match=r"end_timestep: expected an integer in \[0, "):
    samplers.sample(name, model_fn, make_schedule("scaled_linear"), x_T, timesteps=ts, end_timestep=int(ts[-1]))


def test_a_ddpm_ensemble_matches_diffusers_with_the_same_noise(setup, monkeypatch):
  """DDPM hands over as DDIM does (its last base step lands on the refiner's first timestep, with
  that step's noise), each expert drawing one noise per step from its own key."""
  model_fn, torch_model, x_T = setup
  make = lambda: diffusers.DDPMScheduler(**SD_SCHEDULE, variance_type="fixed_small", clip_sample=False)
  base_scheduler, refiner_scheduler = make(), make()
  base_scheduler.set_timesteps(STEPS)
  refiner_scheduler.set_timesteps(STEPS)
  ts, refiner_ts = samplers.expert_timesteps(1000, base_scheduler.timesteps.numpy(), 0.65)
  keys = jax.random.key(3), jax.random.key(4)
  noise = [nchw(jax.random.normal(k, x_T.shape, jnp.float32))
           for key, n in zip(keys, (len(ts), len(refiner_ts))) for k in jax.random.split(key, n)]
  from diffusers.schedulers import scheduling_ddpm
  monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *args, **kwargs: noise.pop(0))
  x = nchw(x_T)
  for t in base_scheduler.timesteps[:len(ts)]:
    x = base_scheduler.step(torch_model(x, t), t, x).prev_sample
  handed_over = nhwc(x)
  for t in refiner_scheduler.timesteps[len(ts):]:
    x = refiner_scheduler.step(torch_model(x, t), t, x).prev_sample
  assert not noise
  ours = _ours("ddpm", model_fn, x_T, keys[0], timesteps=ts, end_timestep=int(refiner_ts[0]))
  np.testing.assert_allclose(ours, handed_over, atol=TOL)
  np.testing.assert_allclose(_ours("ddpm", model_fn, ours, keys[1], timesteps=refiner_ts), nhwc(x), atol=TOL)


def test_a_plms_ensemble_hands_over_as_diffusers_pndm_and_the_refiner_starts_afresh(setup):
  """PLMS: the base part is StableDiffusionXLPipeline's loop over PNDM's timesteps ≥ the cut-off (its
  warm-up step listed twice), landing on the refiner's first timestep; the refiner is a fresh PLMS
  run from there — the same as a fresh PNDMScheduler over those timesteps, with their warm-up."""
  model_fn, torch_model, x_T = setup
  make = lambda: diffusers.PNDMScheduler(**SD_SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False)
  base_scheduler, refiner_scheduler = make(), make()
  base_scheduler.set_timesteps(STEPS)
  refiner_scheduler.set_timesteps(STEPS)
  listed = base_scheduler.timesteps.numpy()  # t0, t1, t1, t2, …
  ts, refiner_ts = samplers.expert_timesteps(1000, np.concatenate([listed[:1], listed[2:]]), 0.65)
  assert len(ts) >= 2 and len(refiner_ts) >= 2, (ts, refiner_ts)
  cutoff = int(round(1000 - 0.65 * 1000))
  x = nchw(x_T)
  for t in [t for t in base_scheduler.timesteps if t >= cutoff]:  # the base pipeline's `denoising_end`
    x = base_scheduler.step(torch_model(x, t), t, x).prev_sample
  handed_over = nhwc(x)
  for t in [refiner_ts[0], refiner_ts[1], *refiner_ts[1:]]:
    t = torch.tensor(int(t))
    x = refiner_scheduler.step(torch_model(x, t), t, x).prev_sample
  ours = _ours("plms", model_fn, x_T, timesteps=ts, end_timestep=int(refiner_ts[0]))
  np.testing.assert_allclose(ours, handed_over, atol=TOL)
  np.testing.assert_allclose(_ours("plms", model_fn, ours, timesteps=refiner_ts), nhwc(x), atol=TOL)
