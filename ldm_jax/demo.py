"""`make demo`: the pipeline end to end on the built-in shapes data set, on a CPU, offline.

Stage 1 trains the small KL-f4 autoencoder (`configs/autoencoder/shapes_kl_f4.py`) and writes a
grid of held-out images above their reconstructions. Run from the repository root:
  python -m ldm_jax.demo --workdir runs/demo
"""

import os

from absl import app, flags

from ldm_jax.train import autoencoder
from ldm_jax.train.logging import setup_logging
from ldm_jax.train import config as config_lib

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where the demo's runs are written.")
_SMOKE = flags.DEFINE_bool("smoke", False, "Use the `:smoke` configs (a quick check, not a demo).")

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def main(argv):
  del argv
  setup_logging()
  suffix = ":smoke" if _SMOKE.value else ""
  ae_dir = os.path.join(_WORKDIR.value, "autoencoder")
  ae_config = config_lib.from_file(os.path.join(CONFIG_DIR, "autoencoder", "shapes_kl_f4.py") + suffix)
  results = autoencoder.train_and_evaluate(ae_config, ae_dir)
  grids = sorted(os.listdir(os.path.join(ae_dir, "samples")))
  print(f"\nStage 1 (autoencoder) held-out: "
        + ", ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in results.items()))
  print(f"Reconstruction grid (inputs above reconstructions): {os.path.join(ae_dir, 'samples', grids[-1])}")


if __name__ == "__main__":
  app.run(main)
