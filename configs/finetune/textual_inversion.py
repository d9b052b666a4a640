"""Textual inversion (Gal et al. 2022, as diffusers' textual_inversion.py): learn a new token's embedding.

A placeholder token (`textual_inversion.token`, `num_vectors` vectors) is added to the tokenizer
and its rows to the text encoder's token-embedding table, initialised as the row of
`initializer_token`; only those rows train (U-Net, text encoder and every other row stay
bit-identical). Every training caption is a template of `textual_inversion.prompts` with the
placeholder; the images are the concept's, in `data.path` (a folder; a handful suffice). Every
checkpoint writes WORKDIR/learned_embeds.safetensors ({token: [n, dim]}, what diffusers'
`load_textual_inversion` and `sample.py --textual_inversion` read).

  python train_diffusion.py --config configs/finetune/textual_inversion.py --workdir runs/sd15_ti \
      --config.init.pretrained=pretrained/sd15 --config.data.path=/data/my_concept \
      --config.textual_inversion.token='<my-cat>' --config.textual_inversion.initializer_token=cat
  python sample.py --pretrained pretrained/sd15 --textual_inversion runs/sd15_ti/learned_embeds.safetensors \
      --prompt "a painting of <my-cat>" --out samples/ti

AdamW at 5e-4 (the rate of diffusers' textual-inversion example), no EMA
(`optim.ema_decay=0`), no caption dropout. `:smoke` learns `<shape>` from the 16 px shapes on a
`shapes_txt2img:smoke` run (runs/shapes_ldm_smoke; see configs/finetune/lora.py).
"""

from ldm_jax.config import common as config_lib
from ldm_jax.config import diffusion
from ldm_jax.config.textual_inversion import ti_config

TEMPLATES = ("a photo of a {}", "a rendering of a {}", "a close-up photo of a {}", "a good photo of a {}",
             "a bright photo of a {}", "a cropped photo of a {}")


def get_config(arg=None):
  options = config_lib.parse_arg(arg)
  config_lib.check_options(options, {"smoke"}, "textual_inversion")
  config = diffusion.default_config()
  config.init.pretrained = "pretrained/sd15"
  config.textual_inversion = ti_config(token="<concept>", initializer_token="object", num_vectors=1,
                                       prompts=TEMPLATES)
  config.data.update(source="folder", path="", image_size=512, channels=3, random_flip=True)
  config.cond.update(kind="text", dropout_prob=0.0)
  config.optim.update(learning_rate=5e-4, warmup_steps=0, weight_decay=0.0, grad_clip=0.0, ema_decay=0.0)
  config.sample.update(sampler="ddim", num_steps=30, guidance_scale=7.5, num_images=4,
                       prompts=("a photo of a <concept>",))
  config.train.update(num_steps=3_000, batch_size=8, log_every=50, checkpoint_every=500, image_every=500)
  if "smoke" in options:
    config.init.pretrained = "runs/shapes_ldm_smoke"
    config.textual_inversion.update(token="<shape>", initializer_token="circle",
                                    prompts=("a large red {} on a white background",))
    config.data.update(source="shapes", path="", random_flip=False)
    config.sample.update(guidance_scale=3.0, prompts=("a large red <shape> on a white background",))
    diffusion.apply_smoke(config)
    config.optim.update(warmup_steps=0, ema_decay=0.0)
  return config
