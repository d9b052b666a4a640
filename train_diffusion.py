"""Stage 2: train a latent diffusion model on a frozen stage-1 autoencoder.

  python train_diffusion.py --config configs/ldm/fmnist_class_cond.py --workdir runs/fmnist_ldm
  python train_diffusion.py --config configs/ldm/shapes_txt2img.py --workdir runs/shapes_ldm \
      --config.autoencoder.workdir=runs/shapes_ae

Running the same command again resumes from the newest checkpoint in --workdir. Multi-host: the
same command on every host with --coordinator_address=HOST0:PORT --num_processes=N --process_id=I
(nothing to add on TPU pods, or under SLURM/Open MPI with several tasks); see README "Scaling".
"""

from absl import app, flags, logging
from ml_collections import config_flags

from ldm_jax.train import diffusion, distributed
from ldm_jax.train.logging import setup_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (`path.py[:arg]`).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run: checkpoints, logs, samples.")
flags.mark_flags_as_required(["config", "workdir"])
distributed.define_flags()


def main(argv):
  del argv
  setup_logging()
  distributed.initialize_from_flags()
  results = diffusion.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.info("Final training scalars: %s", results)


if __name__ == "__main__":
  app.run(main)
