"""VQ-f8 (LDM `first_stage_models/vq-f8`): 256 px → 32×32×4 latents, 16384 codes.

  python train_autoencoder.py --config configs/autoencoder/vq_f8.py --workdir runs/vq_f8 \
      --config.data.path=/data/openimages
Shared settings and `:smoke`: `ldm_jax.config.autoencoder.paper_config`.
"""

from ldm_jax.config import autoencoder


def get_config(arg=None):
  return autoencoder.paper_config(
      arg, "vq_f8",
      model=dict(kind="vq", embed_dim=4, z_channels=4, n_embed=16384, ch_mult=(1, 2, 2, 4), attn_resolutions=(32,)),
      loss=dict(disc_start=1, disc_weight=0.6, codebook_weight=1.0, disc_num_layers=2))
