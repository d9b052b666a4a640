"""LoRA fine-tuning of a pretrained text-to-image model (Hu et al. 2021, as diffusers' train_text_to_image_lora.py).

The U-Net's attention projections (to_q/k/v/out) get rank-4 adapters with α = r (scale 1); the
pretrained weights stay frozen and bit-identical, only the adapters are in the optimizer state, and
every checkpoint writes WORKDIR/pytorch_lora_weights.safetensors (diffusers/PEFT layout) besides
the orbax checkpoint. `init.pretrained` is a `convert import` directory (or a diffusers folder,
imported into the workdir) or a stage-2 workdir of ldm_jax; data: images with captions, `x.jpg` +
`x.txt` in `data.path`.

  python -m ldm_jax.convert import --src stable-diffusion-v1-5 --out pretrained/sd15
  python train_diffusion.py --config configs/finetune/lora.py --workdir runs/sd15_lora \
      --config.data.path=/data/my_captioned_images --config.lora.rank=8 --config.lora.alpha=8
  python sample.py --pretrained pretrained/sd15 --lora runs/sd15_lora/pytorch_lora_weights.safetensors:0.8 \
      --prompt "…" --out samples/lora

No EMA (`optim.ema_decay=0`: the EMA adapters, which the sample grids and the file use, are the
trained ones), AdamW at 1e-4 with weight decay 0.01, no caption dropout: diffusers' defaults.

`:smoke` adapts a `shapes_txt2img:smoke` run (runs/shapes_ldm_smoke) on the 16 px shapes:

  python train_autoencoder.py --config configs/autoencoder/shapes_kl_f4.py:smoke --workdir runs/shapes_ae_smoke
  python train_diffusion.py --config configs/ldm/shapes_txt2img.py:smoke --workdir runs/shapes_ldm_smoke \
      --config.autoencoder.workdir=runs/shapes_ae_smoke
  python train_diffusion.py --config configs/finetune/lora.py:smoke --workdir runs/lora_smoke
"""

from ldm_jax.config import common as config_lib
from ldm_jax.config import diffusion
from ldm_jax.config.lora import lora_config


def get_config(arg=None):
  options = config_lib.parse_arg(arg)
  config_lib.check_options(options, {"smoke"}, "lora")
  config = diffusion.default_config()
  config.init.pretrained = "pretrained/sd15"
  config.lora = lora_config(rank=4, alpha=4.0, unet_targets=("attention",))
  config.data.update(source="folder", path="", image_size=512, channels=3, random_flip=False)
  config.cond.update(kind="text", dropout_prob=0.0)
  config.optim.update(learning_rate=1e-4, warmup_steps=0, weight_decay=0.01, grad_clip=1.0, ema_decay=0.0)
  config.sample.update(sampler="ddim", num_steps=30, guidance_scale=7.5, num_images=4,
                       prompts=("a photograph of an astronaut riding a horse",))
  config.train.update(num_steps=5_000, batch_size=8, log_every=50, checkpoint_every=500, image_every=500)
  if "smoke" in options:
    config.init.pretrained = "runs/shapes_ldm_smoke"
    config.data.update(source="shapes", path="")
    config.sample.update(guidance_scale=3.0, prompts=("a large red circle on a white background",))
    diffusion.apply_smoke(config)
    config.optim.update(warmup_steps=0, ema_decay=0.0)
  return config
