"""Sampling from a trained stage-2 run or a pretrained model: read it, check a request against it, write images.

    request = SampleRequest(out="out/shapes", workdir="runs/shapes_ldm", num_samples=16,
                            prompts=("a large red circle on a white background",))
    sample_to_dir(request)   # out/shapes/grid.png, images/00000.png …, samples.npz, sampling.json

This is what `sample.py` runs; `SampleRequest` mirrors its flags (error messages name them).
The order is the point, one module per step:

  1. `request.check_request`: the request on its own (ranges, exclusive flags, the output directory).
  2. `model.read_model` → `ModelInfo`: for a workdir (`read_run`) the run's `config.json`, its
     autoencoder's, the newest checkpoint's step and the tokenizer — no weights; for
     `--pretrained` (`read_pretrained`, through `ldm_jax.load.load_pretrained_ldm`) configs and
     weights in host memory, as the converters read them together.
  3. `plan.make_plan`: the request against the model (conditioning kind, class range, timesteps,
     sizes divisible by the latent and U-Net factors, init image and mask) and every condition
     prepared on the host (prompts are tokenized here; the tokenizer warns when it truncates one).
  4. `ModelInfo.load` (`ldm_jax.load.load_diffusion_run` for workdirs): weights (EMA by default)
     replicated on a mesh of all devices.
  5. `run.run_batches`: one jit-compiled function per request (same padded shape for every
     batch): noise → sampler (one `lax.scan`, guidance inside) → decoder, batches split over the mesh.
     With `--refiner` (`model.read_refiner`, planned beside the model) the same function runs the
     model's share of the timesteps, the refiner's from its latents, and the refiner's decoder;
     `--vae_tiling` decodes in blended tiles.
  6. `outputs.write_outputs`: into a hidden staging directory beside `--out`, renamed at the end,
     so a failure at any point leaves no partial output.

Seeds: sample i starts from the noise `normal(fold_in(k_noise, i))`, so with a deterministic
sampler (DDIM η = 0, PLMS, DPM-Solver++) sample i is the same whatever the batch size; the
samplers' own noise (DDPM, DDIM η > 0) and img2img's noise are drawn per batch.
"""

from ldm_jax.sampling.model import ModelInfo, is_pretrained_dir, read_model, read_pretrained, read_refiner, read_run
from ldm_jax.sampling.outputs import write_outputs
from ldm_jax.sampling.plan import Plan, RefinerPlan, make_plan
from ldm_jax.sampling.request import SampleRequest, check_request
from ldm_jax.sampling.run import make_sample_fn, run_batches, sample_to_dir, sampling_mesh

__all__ = ["ModelInfo", "Plan", "RefinerPlan", "SampleRequest", "check_request", "is_pretrained_dir", "make_plan",
           "make_sample_fn", "read_model", "read_pretrained", "read_refiner", "read_run", "run_batches", "sample_to_dir",
           "sampling_mesh", "write_outputs"]
