"""KL-f4 (LDM `autoencoder_kl_64x64x3`): 256 px → 64×64×3 latents.

  python train_autoencoder.py --config configs/autoencoder/kl_f4.py --workdir runs/kl_f4 \
      --config.data.path=/data/openimages
Shared settings and `:smoke`: `ldm_jax.config.autoencoder.paper_config`.
"""

from ldm_jax.config import autoencoder


def get_config(arg=None):
  return autoencoder.paper_config(
      arg, "kl_f4",
      model=dict(kind="kl", embed_dim=3, z_channels=3, ch_mult=(1, 2, 4), attn_resolutions=()),
      loss=dict(disc_start=50001, disc_weight=0.5))
