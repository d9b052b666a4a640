"""VQ-f4 (LDM `first_stage_models/vq-f4`): 256 px → 64×64×3 latents, 8192 codes.

  python train_autoencoder.py --config configs/autoencoder/vq_f4.py --workdir runs/vq_f4 \
      --config.data.path=/data/openimages
Shared settings and `:smoke`: `ldm_jax.config.autoencoder.paper_config`.
"""

from ldm_jax.config import autoencoder


def get_config(arg=None):
  return autoencoder.paper_config(
      arg, "vq_f4",
      model=dict(kind="vq", embed_dim=3, z_channels=3, n_embed=8192, ch_mult=(1, 2, 4), attn_resolutions=()),
      loss=dict(disc_start=0, disc_weight=0.75, codebook_weight=1.0))
