"""Stage 1: train a KL or VQ autoencoder.

  python train_autoencoder.py --config configs/autoencoder/fmnist_kl_f4.py --workdir runs/fmnist_ae
  python train_autoencoder.py --config configs/autoencoder/kl_f8.py:smoke --workdir /tmp/ae \
      --config.train.batch_size=16

Running the same command again resumes from the newest checkpoint in --workdir. Multi-host: the
same command on every host with --coordinator_address=HOST0:PORT --num_processes=N --process_id=I
(nothing to add on TPU pods, or under SLURM/Open MPI with several tasks); see README "Scaling".
"""

from ldm_jax.runtime import cli
from ldm_jax.train import autoencoder, loop

main = loop.entry_point(autoencoder.train_and_evaluate, "Final held-out metrics")

if __name__ == "__main__":
  cli.run(main)
