"""The paper's unconditional LSUN-Churches 256 LDM-KL-8 (CompVis `lsun_churches-ldm-kl-8.yaml`, 295M U-Net).

Data: the LSUN church_outdoor images (center-cropped square, resized to 256 px, random flips as
the reference) as files in a folder, optionally with `train/` and `test/` sub-folders —
`--config.data.path=/data/lsun_churches` — or the prepared TFDS set:
`--config.data.source=tfds --config.data.name=lsun/church_outdoor --config.data.eval_split=validation`.

  python train_autoencoder.py --config configs/autoencoder/kl_f8.py --workdir runs/kl_f8 …
  python train_diffusion.py --config configs/ldm/lsun_churches_ldm_kl8.py --workdir runs/churches_ldm \
      --config.data.path=/data/lsun_churches

U-Net on the 32×32×4 latents of `kl_f8`: 192 channels × (1, 2, 2, 4, 4) (down to 2×2), two
ResNet blocks per level with scale-shift (FiLM) time conditioning and ResNet up/downsampling,
8-head self-attention at ds 1, 2, 4, 8 (32² … 4²). L1 loss, betas 0.0015 → 0.0155,
`scale_factor` = 1/std of the first batch (the reference's `scale_by_std`). Learning rate 5e-5,
not scaled by the batch (the reference runs with `--scale_lr False`; `optim.learning_rate` is
always the effective rate), linear warm-up over 10k steps, AdamW (torch defaults: weight decay
0.01, no clipping), EMA 0.9999, batch 96, 500k steps. `:smoke` runs on the shapes data against
`configs/autoencoder/kl_f8.py:smoke` trained in runs/kl_f8_smoke.
"""

from ldm_jax.config import common as config_lib
from ldm_jax.config import diffusion


def get_config(arg=None):
  options = config_lib.parse_arg(arg)
  config_lib.check_options(options, {"smoke"}, "lsun_churches_ldm_kl8")
  config = diffusion.default_config()
  config.autoencoder.workdir = "runs/kl_f8"
  config.data.update(source="folder", path="", image_size=256, channels=3, random_flip=True)
  config.cond.update(kind="none", dropout_prob=0.0)
  config.model.update(model_channels=192, channel_mult=(1, 2, 2, 4, 4), num_res_blocks=2,
                      attention_resolutions=(1, 2, 4, 8), num_heads=8, num_head_channels=-1,
                      use_spatial_transformer=False, use_scale_shift_norm=True, resblock_updown=True,
                      context_dim=None)
  config.diffusion.update(beta_schedule="scaled_linear", linear_start=0.0015, linear_end=0.0155, loss_type="l1")
  config.latent.scale_factor = 0.0  # 1/std of the first batch's latents
  config.optim.update(learning_rate=5e-5, warmup_steps=10_000, weight_decay=0.01, grad_clip=0.0,
                      ema_decay=0.9999)
  config.sample.update(sampler="ddim", num_steps=50, guidance_scale=1.0, num_images=8)
  config.train.update(num_steps=500_000, batch_size=96, log_every=100, checkpoint_every=5_000,
                      image_every=5_000, eval_every=5_000)
  if "smoke" in options:
    config.autoencoder.workdir = "runs/kl_f8_smoke"
    config.data.update(source="shapes", path="")
    diffusion.apply_smoke(config)
  return config
