"""KL-f16 (LDM `autoencoder_kl_16x16x16`): 256 px → 16×16×16 latents.

  python train_autoencoder.py --config configs/autoencoder/kl_f16.py --workdir runs/kl_f16 \
      --config.data.path=/data/openimages
Shared settings and `:smoke`: `ldm_jax.config.autoencoder.paper_config`.
"""

from ldm_jax.config import autoencoder


def get_config(arg=None):
  return autoencoder.paper_config(
      arg, "kl_f16",
      model=dict(kind="kl", embed_dim=16, z_channels=16, ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(16,)),
      loss=dict(disc_start=50001, disc_weight=0.5))
