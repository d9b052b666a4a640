"""The paper's unconditional CelebA-HQ 256 LDM-VQ-4 (CompVis `celebahq-ldm-vq-4.yaml`, 274M U-Net).

Data: the 30k CelebA-HQ images at 256 px (or larger; resized and center-cropped) in one folder,
optionally split into `train/` and `test/` sub-folders — `--config.data.path=/data/celebahq`.
A prepared TFDS copy works too: `--config.data.source=tfds --config.data.name=celeb_a_hq/256`.

  python train_autoencoder.py --config configs/autoencoder/vq_f4.py --workdir runs/vq_f4 …
  python train_diffusion.py --config configs/ldm/celebahq_ldm_vq4.py --workdir runs/celebahq_ldm \
      --config.data.path=/data/celebahq

U-Net on the 64×64×3 pre-quantization latents of `vq_f4`: 224 channels × (1, 2, 3, 4), two
ResNet blocks per level, self-attention with 32-channel heads at 32², 16² and 8² (ds 2, 4, 8).
The reference trains with lr = base_learning_rate 2e-6 × batch 48 × 1 GPU = 9.6e-5, the paper's
value (`optim.learning_rate` is this effective rate; it does not follow `train.batch_size`),
constant, AdamW (torch defaults: weight decay 0.01, no clipping), EMA 0.9999, scale_factor 1
(VQ latents unscaled), 410k steps. `:smoke` runs on the shapes data
against `configs/autoencoder/vq_f4.py:smoke` trained in runs/vq_f4_smoke.
"""

from ldm_jax.config import common as config_lib
from ldm_jax.config import diffusion


def get_config(arg=None):
  options = config_lib.parse_arg(arg)
  config_lib.check_options(options, {"smoke"}, "celebahq_ldm_vq4")
  config = diffusion.default_config()
  config.autoencoder.workdir = "runs/vq_f4"
  config.data.update(source="folder", path="", image_size=256, channels=3)
  config.cond.update(kind="none", dropout_prob=0.0)
  config.model.update(model_channels=224, channel_mult=(1, 2, 3, 4), num_res_blocks=2,
                      attention_resolutions=(2, 4, 8), num_head_channels=32, use_spatial_transformer=False,
                      context_dim=None)
  config.diffusion.update(beta_schedule="scaled_linear", linear_start=0.0015, linear_end=0.0195)
  config.latent.scale_factor = 1.0
  config.optim.update(learning_rate=9.6e-5, warmup_steps=0, weight_decay=0.01, grad_clip=0.0,
                      ema_decay=0.9999)
  config.sample.update(sampler="ddim", num_steps=50, guidance_scale=1.0, num_images=8)
  config.train.update(num_steps=410_000, batch_size=48, log_every=100, checkpoint_every=5_000,
                      image_every=5_000, eval_every=5_000)
  if "smoke" in options:
    config.autoencoder.workdir = "runs/vq_f4_smoke"
    config.data.update(source="shapes", path="")
    diffusion.apply_smoke(config)
  return config
