"""DreamBooth (Ruiz et al. 2023, as diffusers' train_dreambooth.py / train_dreambooth_lora.py).

The subject's images (a handful, in `data.path`) are all captioned `dreambooth.instance_prompt`
(a rare identifier + the class). With prior preservation (`dreambooth.prior_loss_weight` λ > 0)
every step also trains on as many of the base model's own images of `class_prompt`, L =
L_instance + λ·L_prior; `num_class_images` of them are sampled from `init.pretrained` into
WORKDIR/class_images before the first step (kept there; images already there count).
`prior_prompts` spreads them over more prompts whose outputs must not drift either (a model that
knows a few classes: all their captions, see benchmarks/concept_learning.py). The whole
U-Net trains (a pretrained text encoder stays frozen), or with `:lora` only LoRA adapters
(configs/finetune/lora.py's, written to WORKDIR/pytorch_lora_weights.safetensors).

  python train_diffusion.py --config configs/finetune/dreambooth.py --workdir runs/sd15_db \
      --config.init.pretrained=pretrained/sd15 --config.data.path=/data/my_dog \
      --config.dreambooth.instance_prompt="a photo of sks dog" --config.dreambooth.class_prompt="a photo of a dog"
  python train_diffusion.py --config configs/finetune/dreambooth.py:lora --workdir runs/sd15_db_lora …

Full: AdamW at 5e-6, 400 steps; LoRA: 1e-4, 500 steps (diffusers' examples); no EMA, no caption
dropout. `:smoke` (with or without `lora`) teaches "sks circle" from the 16 px shapes to a
`shapes_txt2img:smoke` run (runs/shapes_ldm_smoke; see configs/finetune/lora.py) with 8 class images.
"""

from ldm_jax.config import common as config_lib
from ldm_jax.config import diffusion
from ldm_jax.config.dreambooth import dreambooth_config
from ldm_jax.config.lora import lora_config


def get_config(arg=None):
  options = config_lib.parse_arg(arg)
  config_lib.check_options(options, {"smoke", "lora"}, "dreambooth")
  config = diffusion.default_config()
  config.init.pretrained = "pretrained/sd15"
  config.dreambooth = dreambooth_config(instance_prompt="a photo of sks dog", class_prompt="a photo of a dog",
                                        prior_loss_weight=1.0, num_class_images=100)
  config.data.update(source="folder", path="", image_size=512, channels=3)
  config.cond.update(kind="text", dropout_prob=0.0)
  config.optim.update(learning_rate=5e-6, warmup_steps=0, weight_decay=0.01, grad_clip=1.0, ema_decay=0.0)
  config.sample.update(sampler="ddim", num_steps=30, guidance_scale=7.5, num_images=4,
                       prompts=("a photo of sks dog in a bucket",))
  config.train.update(num_steps=400, batch_size=4, log_every=20, checkpoint_every=200, image_every=200)
  if "lora" in options:
    config.lora = lora_config(rank=4, alpha=4.0, unet_targets=("attention",))
    config.optim.learning_rate = 1e-4
    config.train.num_steps = 500
  if "smoke" in options:
    config.init.pretrained = "runs/shapes_ldm_smoke"
    config.dreambooth.update(instance_prompt="a large red sks circle on a white background",
                             class_prompt="a large red circle on a white background", num_class_images=8,
                             class_sample_steps=2)
    config.data.update(source="shapes", path="")
    config.sample.update(guidance_scale=3.0, prompts=("a large red sks circle on a white background",))
    diffusion.apply_smoke(config)
    config.optim.update(warmup_steps=0, ema_decay=0.0)
  return config
