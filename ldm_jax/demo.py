"""`make demo`: the pipeline end to end on the built-in shapes data set, on a CPU, offline.

1. Stage 1 trains the small KL-f4 autoencoder (`configs/autoencoder/shapes_kl_f4z4.py`) and writes
   a grid of held-out images above their reconstructions.
2. Stage 2 trains the text-conditioned LDM (`configs/ldm/shapes_txt2img.py`) on its latents,
   with a text encoder and tokenizer learned from the captions ("a red circle at the top left on
   a white background"; a few colour–kind pairs are held out of training).
3. Guided DDIM samples for the config's prompts (`sample.*`: sampler, steps, guidance scale), one
   prompt per column, the last prompts held out: `WORKDIR/samples/grid.png` and `samples.npz`.
4. An independent judge — a classifier trained here on drawn shapes images and their own labels
   (`ldm_jax.eval.shapes_scorer`), never on samples — reads kind, colour, quadrant and background
   off every sample and compares them with its prompt. The last line of output is
   `demo: shape accuracy X %, colour accuracy Y %`.
Run from the repository root:  python -m ldm_jax.demo --workdir runs/demo
Rerunning resumes: finished stages, samples and the judge are reused.
"""

import multiprocessing
import os
import time

import jax
import numpy as np
from absl import app, flags

from ldm_jax import load
from ldm_jax.config import common as config_lib
from ldm_jax.config import diffusion as diffusion_config
from ldm_jax.data import shapes
from ldm_jax.eval import shapes_scorer
from ldm_jax.runtime import host_memory
from ldm_jax.runtime.logging import setup_logging
from ldm_jax.sampling import SampleRequest, sample_to_dir
from ldm_jax.train import autoencoder, diffusion

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where the demo's runs are written.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Use the `:smoke` configs (a quick check, not a demo).")
_SAMPLES_PER_PROMPT = flags.DEFINE_integer("samples_per_prompt", 8, "Samples scored per prompt "
                                           "(the grid shows the first 8 rows).")
_SCORER_STEPS = flags.DEFINE_integer("scorer_steps", 400, "Training steps of the judge (batch 64).")
_CPU_DEVICES = flags.DEFINE_integer(
    "cpu_devices", 2, "JAX CPU devices (jax_num_cpu_devices): batches are split over them, one per core; "
    "on a quiet 2-core CPU, 2 trained the earlier demo's f = 2 autoencoder 1.35x and its U-Net 1.1x as fast as 1.")

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
AE_CONFIG = os.path.join(CONFIG_DIR, "autoencoder", "shapes_kl_f4z4.py")  # stage 1
LDM_CONFIG = os.path.join(CONFIG_DIR, "ldm", "shapes_txt2img.py")  # stage 2


def newest(directory: str, prefix: str) -> str:
  return os.path.join(directory, sorted(f for f in os.listdir(directory) if f.startswith(prefix))[-1])


def draw_samples(ldm_config, ldm_dir: str, out: str, per_prompt: int) -> tuple[np.ndarray, list[str]]:
  """(uint8 images, prompts) of `per_prompt` samples of each prompt of `sample.prompts`, cycled
  (sample i has prompt i mod P), drawn into `out` unless it already holds them."""
  s = ldm_config.sample
  if not os.path.exists(os.path.join(out, "samples.npz")):
    sample_to_dir(SampleRequest(out=out, workdir=ldm_dir, prompts=tuple(s.prompts),
                                num_samples=per_prompt * len(s.prompts), guidance_scale=s.guidance_scale,
                                guidance_interval=diffusion_config.guidance_interval(s), steps=s.num_steps,
                                eta=s.eta, sampler=s.sampler, batch_size=64))
  with np.load(os.path.join(out, "samples.npz")) as f:
    return f["images"], [str(p) for p in f["prompts"]]


def _train_and_save_scorer(directory: str, image_size: int, num_steps: int) -> None:
  os.nice(19)  # the lowest priority: the judge takes the cycles stage 1 leaves idle, not stage 1's
  shapes_scorer.save_scorer(shapes_scorer.train_scorer(num_steps=num_steps, image_size=image_size,
                                                       progress=False), directory)


def start_scorer(directory: str, image_size: int, num_steps: int) -> multiprocessing.Process | None:
  """Trains the judge into `directory` in a child process (None when one is saved there already).

  The judge depends on nothing the stages make, so it trains beside stage 1, at the lowest CPU
  priority: one XLA process does not keep two CPU cores busy with these small models, a second
  process fills the gaps.
  """
  if shapes_scorer.is_saved(directory):
    return None
  process = multiprocessing.get_context("spawn").Process(
      target=_train_and_save_scorer, args=(directory, image_size, num_steps), name="shapes judge",
      daemon=True)  # ends with the demo if a stage fails
  process.start()
  return process


def get_scorer(directory: str, process: multiprocessing.Process | None) -> shapes_scorer.Scorer:
  """The judge `start_scorer` trains or found in `directory`, once it is there."""
  if process is not None:
    process.join()
    if process.exitcode != 0:
      raise RuntimeError(f"training the shapes judge into {directory} failed (exit code {process.exitcode}); "
                         "its error is printed above.")
  return shapes_scorer.load_scorer(directory)


def reconstruct(ae_dir: str, images: np.ndarray) -> np.ndarray:
  """uint8 images through the stage-1 autoencoder of `ae_dir` (posterior mode): what stage 2 can at best draw."""
  model, _, params = load.load_autoencoder(ae_dir)
  rec = jax.jit(lambda p, x: model.apply(
      {"params": p}, model.apply({"params": p}, x, method=model.encode).mode(), method=model.decode))(
          params, images.astype(np.float32) / 127.5 - 1.0)
  return np.clip(np.asarray(rec) * 127.5 + 127.5 + 0.5, 0, 255).astype(np.uint8)


def real_images(prompts, image_size: int) -> np.ndarray:
  """Drawn images of the shapes data set that fit `prompts` (the judge's reference score)."""
  rng = np.random.default_rng(0)
  return np.stack([shapes.draw_scene(shapes.quadrant_scene(p, rng), image_size) for p in prompts])


def main(argv):
  del argv
  setup_logging()
  host_memory.keep_freed_memory()
  jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
  suffix = ":smoke" if _SMOKE.value else ""
  ae_dir = os.path.join(_WORKDIR.value, "autoencoder")
  ldm_dir = os.path.join(_WORKDIR.value, "ldm")

  seconds = {}
  start = time.perf_counter()
  ae_config = config_lib.from_file(AE_CONFIG + suffix)
  ldm_config = config_lib.from_file(LDM_CONFIG + suffix)
  ldm_config.autoencoder.workdir = ae_dir
  ldm_config.train.image_every = 0  # no grid at the end of training: the demo draws its own (step 3)
  size = ldm_config.data.image_size
  scorer_dir = os.path.join(_WORKDIR.value, "scorer")
  scorer_process = start_scorer(scorer_dir, size, min(_SCORER_STEPS.value, 20) if _SMOKE.value else _SCORER_STEPS.value)
  results = autoencoder.train_and_evaluate(ae_config, ae_dir)
  seconds["stage 1"], start = time.perf_counter() - start, time.perf_counter()

  scalars = diffusion.train_and_evaluate(ldm_config, ldm_dir)
  seconds["stage 2"], start = time.perf_counter() - start, time.perf_counter()

  samples_dir = os.path.join(_WORKDIR.value, "samples")
  images, prompts = draw_samples(ldm_config, ldm_dir, samples_dir, _SAMPLES_PER_PROMPT.value)
  seconds["sampling"], start = time.perf_counter() - start, time.perf_counter()
  scorer = get_scorer(scorer_dir, scorer_process)
  hits = shapes_scorer.correct(scorer, images, prompts)
  real = real_images(prompts, size)
  reference = shapes_scorer.score(scorer, real, prompts)
  ceiling = shapes_scorer.score(scorer, reconstruct(ae_dir, real), prompts)
  seconds["judge (scoring; it trained beside stage 1)"] = time.perf_counter() - start

  print("\nStage 1 (autoencoder), held-out: "
        + ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in results.items()))
  print(f"  reconstructions (inputs above reconstructions): {newest(os.path.join(ae_dir, 'samples'), 'reconstructions')}")
  print(f"Stage 2 (text-to-image LDM), final training loss {scalars.get('train/loss', float('nan')):.4f}")
  s = ldm_config.sample
  held_out = set(ldm_config.data.shapes_holdout)
  print(f"{s.sampler} samples ({s.num_steps} steps, guidance {s.guidance_scale}), one prompt per column: "
        f"{os.path.join(samples_dir, 'grid.png')}")
  print(f"  judged by the shapes classifier ({scorer_dir}); "
        "accuracy of kind / colour / position / background per prompt:")
  unique = list(dict.fromkeys(prompts))
  for prompt in unique:
    rows = np.array([p == prompt for p in prompts])
    labels = shapes.parse_quadrant_caption(prompt)
    tag = " (held out)" if f"{labels['colour']} {labels['kind']}" in held_out else ""
    print(f"    {' / '.join(f'{np.mean(h[rows]):4.0%}' for h in hits.values())}  {prompt}{tag}")
  print("  the same judge on drawn images of these prompts: "
        + ", ".join(f"{k} {v:.0%}" for k, v in reference.items()))
  print("  and on their stage-1 reconstructions (what stage 2 can at best reach): "
        + ", ".join(f"{k} {v:.0%}" for k, v in ceiling.items()))
  print("Time (this run; a rerun reuses what is done): " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()))
  print(f"  position accuracy {np.mean(hits['position']):.1%}, background accuracy {np.mean(hits['background']):.1%}")
  print(f"demo: shape accuracy {100 * np.mean(hits['kind']):.1f} %, "
        f"colour accuracy {100 * np.mean(hits['colour']):.1f} %")


if __name__ == "__main__":
  app.run(main)
