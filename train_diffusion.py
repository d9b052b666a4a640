"""Stage 2: train a latent diffusion model on a frozen stage-1 autoencoder.

  python train_diffusion.py --config configs/ldm/fmnist_class_cond.py --workdir runs/fmnist_ldm
  python train_diffusion.py --config configs/ldm/shapes_txt2img.py --workdir runs/shapes_ldm \
      --config.autoencoder.workdir=runs/shapes_ae

Fine-tuning a pretrained model (U-Net, frozen autoencoder and text encoder, schedule and
scale_factor are taken from it; see `ldm_jax.train.diffusion`):

  python -m ldm_jax.convert import --src stable-diffusion-v1-5 --out pretrained/sd15
  python train_diffusion.py --config configs/ldm/shapes_txt2img.py --workdir runs/sd15_shapes \
      --config.init.pretrained=pretrained/sd15 --config.data.image_size=256

Running the same command again resumes from the newest checkpoint in --workdir. Multi-host: the
same command on every host with --coordinator_address=HOST0:PORT --num_processes=N --process_id=I
(nothing to add on TPU pods, or under SLURM/Open MPI with several tasks); see README "Scaling".
"""

from ldm_jax.runtime import cli
from ldm_jax.train import diffusion, loop

main = loop.entry_point(diffusion.train_and_evaluate, "Final training scalars")

if __name__ == "__main__":
  cli.run(main)
