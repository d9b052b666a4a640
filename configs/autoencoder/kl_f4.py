"""KL-f4 (LDM `autoencoder_kl_64x64x3`): 256 px → 64×64×3 latents.

Hyperparameters of the released LDM first-stage configs: ch 128, two ResNet blocks per level,
Adam(4.5e-6 × global batch, β = (0.5, 0.9)), L1 + LPIPS + PatchGAN from `loss.disc_start`.
Data: an image folder of 256 px training images (the paper used OpenImages), e.g.
  python train_autoencoder.py --config configs/autoencoder/kl_f4.py --workdir runs/kl_f4 \
      --config.data.path=/data/openimages
`:smoke` trains a tiny version on the built-in shapes data set instead.
"""

from ldm_jax.train import autoencoder
from ldm_jax.train import config as config_lib


def get_config(arg=None):
  options = config_lib.parse_arg(arg)
  config_lib.check_options(options, {"smoke"}, "kl_f4")
  config = autoencoder.default_config()
  config.data.update(source="folder", path="", image_size=256, channels=3, random_crop=True, random_flip=True)
  config.model.update(kind="kl", embed_dim=3, z_channels=3, ch=128, ch_mult=(1, 2, 4),
                      num_res_blocks=2, attn_resolutions=())
  config.loss.update(disc_start=50001, disc_weight=0.5)
  config.train.update(batch_size=96, num_steps=300_000)  # 12 per GPU × 8 GPUs; steps not given by the paper
  if "smoke" in options:
    config.data.update(source="shapes", random_crop=False)
    autoencoder.apply_smoke(config)
  return config
