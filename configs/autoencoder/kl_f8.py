"""KL-f8 (LDM `autoencoder_kl_32x32x4`, the shape of Stable Diffusion's VAE): 256 px → 32×32×4 latents.

  python train_autoencoder.py --config configs/autoencoder/kl_f8.py --workdir runs/kl_f8 \
      --config.data.path=/data/openimages
Shared settings and `:smoke`: `ldm_jax.config.autoencoder.paper_config`.
"""

from ldm_jax.config import autoencoder


def get_config(arg=None):
  return autoencoder.paper_config(
      arg, "kl_f8",
      model=dict(kind="kl", embed_dim=4, z_channels=4, ch_mult=(1, 2, 4, 4), attn_resolutions=()),
      loss=dict(disc_start=50001, disc_weight=0.5))
