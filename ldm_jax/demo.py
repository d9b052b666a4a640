"""`make demo`: the pipeline end to end on the built-in shapes data set, on a CPU, offline.

1. Stage 1 trains the small KL-f4 autoencoder (`configs/autoencoder/shapes_kl_f4.py`) and writes
   a grid of held-out images above their reconstructions.
2. Stage 2 trains the text-conditioned LDM (`configs/ldm/shapes_txt2img.py`) on its latents,
   with a text encoder and tokenizer learned from the captions, and writes guided DDIM sample
   grids for a few prompts.
Run from the repository root:  python -m ldm_jax.demo --workdir runs/demo
"""

import os

from absl import app, flags

from ldm_jax.config import common as config_lib
from ldm_jax.runtime.logging import setup_logging
from ldm_jax.train import autoencoder, diffusion

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where the demo's runs are written.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Use the `:smoke` configs (a quick check, not a demo).")

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def newest(directory: str, prefix: str) -> str:
  return os.path.join(directory, sorted(f for f in os.listdir(directory) if f.startswith(prefix))[-1])


def main(argv):
  del argv
  setup_logging()
  suffix = ":smoke" if _SMOKE.value else ""
  ae_dir = os.path.join(_WORKDIR.value, "autoencoder")
  ldm_dir = os.path.join(_WORKDIR.value, "ldm")

  ae_config = config_lib.from_file(os.path.join(CONFIG_DIR, "autoencoder", "shapes_kl_f4.py") + suffix)
  results = autoencoder.train_and_evaluate(ae_config, ae_dir)

  ldm_config = config_lib.from_file(os.path.join(CONFIG_DIR, "ldm", "shapes_txt2img.py") + suffix)
  ldm_config.autoencoder.workdir = ae_dir
  scalars = diffusion.train_and_evaluate(ldm_config, ldm_dir)

  print("\nStage 1 (autoencoder), held-out: "
        + ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in results.items()))
  print(f"  reconstructions (inputs above reconstructions): {newest(os.path.join(ae_dir, 'samples'), 'reconstructions')}")
  print(f"Stage 2 (text-to-image LDM), final training loss {scalars.get('train/loss', float('nan')):.4f}")
  prompts = ldm_config.sample.prompts
  print(f"  guided DDIM samples for {len(prompts)} prompts, one per column, two rows:")
  for prompt in prompts:
    print(f"    - {prompt}")
  print(f"  {newest(os.path.join(ldm_dir, 'samples'), 'samples')}")


if __name__ == "__main__":
  app.run(main)
