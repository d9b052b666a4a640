"""A small KL-f4 autoencoder on the built-in shapes data set: 32 px RGB → 8×8×3 latents.

Runs on a laptop CPU in minutes (an early `make demo` candidate; its `:smoke` variant is the tests'
small autoencoder); no files needed. `make demo` trains `shapes_kl_f4z4.py`.
  python train_autoencoder.py --config configs/autoencoder/shapes_kl_f4.py --workdir runs/shapes_ae
"""

from ldm_jax.config import autoencoder
from ldm_jax.config import common as config_lib

# The demo's held-out colour–kind pairs: no training image of either stage shows one (each colour
# and each kind is in at most one pair, so every word is still seen in other pairs).
HOLDOUT = ("green triangle", "red star", "orange diamond", "blue cross", "purple circle", "cyan square")


def get_config(arg=None):
  options = config_lib.parse_arg(arg)
  config_lib.check_options(options, {"smoke"}, "shapes_kl_f4")
  config = autoencoder.default_config()
  config.data.update(source="shapes", image_size=32, channels=3, num_examples=20_000, shapes_layout="quadrants",
                     shapes_holdout=HOLDOUT)
  config.model.update(kind="kl", embed_dim=3, z_channels=3, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1,
                      attn_resolutions=())
  # A GAN needs far more steps than a CPU run has; L1 + LPIPS alone reconstructs shapes sharply.
  # LPIPS (VGG16) would cost ~10× the tiny autoencoder per step on a CPU; L1 + KL alone here.
  config.loss.update(disc_start=100_000, disc_weight=0.5, kl_weight=1e-6, perceptual_weight=0.0)
  # × batch 16 = 6.4e-4, cosine to 0 over 600 steps (273 s on 2 cores; README: the demo, candidate 1).
  config.optim.update(base_learning_rate=4e-5, schedule="cosine")
  config.train.update(num_steps=600, batch_size=16, log_every=50, checkpoint_every=600,
                      eval_every=600, eval_batches=4, image_every=600)
  if "smoke" in options:
    autoencoder.apply_smoke(config)
  return config
