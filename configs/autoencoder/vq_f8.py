"""VQ-f8 (LDM `first_stage_models/vq-f8`): 256 px → 32×32×4 latents, 16384 codes.

Hyperparameters of the released LDM first-stage configs: ch 128, two ResNet blocks per level,
Adam(4.5e-6 × global batch, β = (0.5, 0.9)), L1 + LPIPS + PatchGAN from `loss.disc_start`.
Data: an image folder of 256 px training images (the paper used OpenImages), e.g.
  python train_autoencoder.py --config configs/autoencoder/vq_f8.py --workdir runs/vq_f8 \
      --config.data.path=/data/openimages
`:smoke` trains a tiny version on the built-in shapes data set instead.
"""

from ldm_jax.train import autoencoder
from ldm_jax.train import config as config_lib


def get_config(arg=None):
  options = config_lib.parse_arg(arg)
  config_lib.check_options(options, {"smoke"}, "vq_f8")
  config = autoencoder.default_config()
  config.data.update(source="folder", path="", image_size=256, channels=3, random_crop=True, random_flip=True)
  config.model.update(kind="vq", embed_dim=4, z_channels=4, ch=128, ch_mult=(1, 2, 2, 4),
                      num_res_blocks=2, attn_resolutions=(32,))
  config.loss.update(disc_start=1, disc_weight=0.6)
  config.model.n_embed = 16384
  config.loss.codebook_weight = 1.0
  config.loss.disc_num_layers = 2
  config.train.update(batch_size=96, num_steps=300_000)  # 12 per GPU × 8 GPUs; steps not given by the paper
  if "smoke" in options:
    config.data.update(source="shapes", random_crop=False)
    autoencoder.apply_smoke(config)
  return config
