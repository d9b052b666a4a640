"""The paper's class-conditional ImageNet 256 LDM-VQ-4 (CompVis `cin256-v2.yaml`, 401M U-Net).

Data: ImageNet (ILSVRC-2012) as image folders with one sub-folder per class (the standard
`train/n01440764/…`, `val/n01440764/…` layout; labels are the sorted folder indices) —
`--config.data.path=/data/imagenet`; or the prepared TFDS set:
`--config.data.source=tfds --config.data.name=imagenet2012 --config.data.eval_split=validation
--config.data.labels_from_dirs=False`.

  python train_autoencoder.py --config configs/autoencoder/vq_f4.py --workdir runs/vq_f4 …
  python train_diffusion.py --config configs/ldm/cin256_ldm_vq4.py --workdir runs/cin256_ldm \
      --config.data.path=/data/imagenet

U-Net on the 64×64×3 latents of `vq_f4`: 192 channels × (1, 2, 3, 5), two ResNet blocks per
level, a spatial transformer (one head, as the released config) at ds 2, 4, 8 cross-attending to
a one-token context: the class label through a learned 512-wide table (CompVis `ClassEmbedder`,
`cond.class_mode='crossattn'`) of 1000 classes + the null class 1000, trained with the U-Net.
10% of labels are dropped to the null class for classifier-free guidance (the paper's best FID
uses scale 1.5). Learning rate 1e-4 as the paper (the reference does not scale it by the
batch; `optim.learning_rate` is the effective rate), constant, AdamW (torch defaults: weight
decay 0.01, no clipping), EMA 0.9999, scale_factor 1, batch 1200, 178k steps. `:smoke` runs on
the shapes data against `configs/autoencoder/vq_f4.py:smoke` trained in runs/vq_f4_smoke.
"""

from ldm_jax.config import common as config_lib
from ldm_jax.config import diffusion


def get_config(arg=None):
  options = config_lib.parse_arg(arg)
  config_lib.check_options(options, {"smoke"}, "cin256_ldm_vq4")
  config = diffusion.default_config()
  config.autoencoder.workdir = "runs/vq_f4"
  config.data.update(source="folder", path="", image_size=256, channels=3, random_crop=True,
                     labels_from_dirs=True, eval_split="val")
  config.cond.update(kind="class", class_mode="crossattn", num_classes=1000, dim=512, dropout_prob=0.1)
  config.model.update(model_channels=192, channel_mult=(1, 2, 3, 5), num_res_blocks=2,
                      attention_resolutions=(2, 4, 8), num_heads=1, num_head_channels=-1,
                      use_spatial_transformer=True, transformer_depth=1, context_dim=512)
  config.diffusion.update(beta_schedule="scaled_linear", linear_start=0.0015, linear_end=0.0195)
  config.latent.scale_factor = 1.0
  config.optim.update(learning_rate=1e-4, warmup_steps=0, weight_decay=0.01, grad_clip=0.0, ema_decay=0.9999)
  config.sample.update(sampler="ddim", num_steps=50, guidance_scale=3.0, num_images=16)
  config.train.update(num_steps=178_000, batch_size=1200, log_every=100, checkpoint_every=5_000,
                      image_every=5_000, eval_every=5_000)
  if "smoke" in options:
    config.autoencoder.workdir = "runs/vq_f4_smoke"
    config.data.update(source="shapes", path="", random_crop=False, labels_from_dirs=False, eval_split="test")
    config.cond.num_classes = 0  # from the shapes data
    diffusion.apply_smoke(config)
  return config
