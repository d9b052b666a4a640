"""Fine-tuning SDXL base 1.0 (Podell et al. 2023), as diffusers' train_text_to_image_sdxl.py does.

`init.pretrained` is an SDXL base: a diffusers folder (unet/, vae/, text_encoder/, text_encoder_2/,
tokenizer/, tokenizer_2/, scheduler/; imported into WORKDIR/pretrained on the first run) or a
`python -m ldm_jax.convert import` directory of one. The U-Net (2.57 B parameters, the `model.*`
below are its published config and are taken from the model), the VAE (scaling factor 0.13025),
the noise schedule and the conditioning come from it; only the U-Net trains. Both text encoders
stay frozen: CLIP ViT-L's and OpenCLIP bigG's penultimate hidden states, concatenated to a
2048-wide context, and bigG's projected pooled output as the U-Net's `text_embeds` — the
conditioner `sample.py` uses for the same model.

Micro-conditioning: each example's `time_ids` = (original height, width, crop top, left, target
height, width): the image's size in the data (folder and shards record it before any
reduced-scale decoding), where the random crop started in the resized image (mirrored with the
flip: the offsets of diffusers, which flips before cropping) and the training size.

Captions are dropped for classifier-free guidance with probability `cond.dropout_prob` (0.2,
`--proportion_empty_prompts` of diffusers' SDXL fine-tuning example), to the model's null condition:
SDXL base imports with `cond.null_text='zeros'` (its pipeline's `force_zeros_for_empty_prompt`), so
a dropped caption zeroes both encoders' context and the pooled embedding, as sgm's conditioner
does with `ucg_rate`; the size and crop conditions are never dropped. Optimizer as that example:
AdamW, lr 1e-6 constant, weight decay 1e-2, gradients clipped at 1, no EMA; 1024 px, random crop
and flip. `:buckets` trains on aspect-ratio buckets instead of square crops (SDXL's multi-aspect
fine-tuning, §2.3 of the paper: `data.buckets = SDXL_BUCKETS`, the paper's 40 sizes from 512 × 2048
to 2048 × 512, each batch one bucket, the bucket as the target size).

  python train_diffusion.py --config configs/ldm/sdxl_base.py --workdir runs/sdxl_ft \
      --config.init.pretrained=/models/stable-diffusion-xl-base-1.0 --config.data.path=/data/captioned_images
  python sample.py --workdir runs/sdxl_ft --prompt "…" --height 1024 --width 1024 --out samples/sdxl_ft

`:smoke` fine-tunes the tiny random SDXL pipeline of the tests on the built-in shapes at 16 px:

  python -m tests.convert.sdxl_tiny runs/sdxl_tiny
  python train_diffusion.py --config configs/ldm/sdxl_base.py:smoke --workdir runs/sdxl_smoke
"""

from ldm_jax.config import common as config_lib
from ldm_jax.config import diffusion, sections

PROMPTS = ("a photograph of an astronaut riding a horse",
           "a majestic lion jumping from a big stone at night")


def get_config(arg=None):
  options = config_lib.parse_arg(arg)
  config_lib.check_options(options, {"smoke", "buckets"}, "sdxl_base")
  config = diffusion.default_config()
  config.init.pretrained = "pretrained/sdxl_base"
  config.data.update(source="folder", path="", image_size=1024, channels=3, random_crop=True, random_flip=True)
  # The conditioning and the U-Net are the pretrained model's; these say what it must be (checked).
  config.cond.update(kind="text", text_encoder="pretrained", dim=2048, max_length=77, null_text="zeros",
                     micro_conditioning="target_size", dropout_prob=0.2)
  config.model.update(model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2, attention_resolutions=(2, 4),
                      num_head_channels=64, transformer_depth=(1, 2, 10), context_dim=2048,
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                      addition_embed_dim=2816)
  config.diffusion.update(beta_schedule="scaled_linear", linear_start=0.00085, linear_end=0.012)
  config.optim.update(learning_rate=1e-6, warmup_steps=0, schedule="constant", weight_decay=1e-2, grad_clip=1.0,
                      ema_decay=0.0)
  config.sample.update(sampler="ddim", num_steps=30, guidance_scale=5.0, num_images=4, prompts=PROMPTS)
  config.train.update(num_steps=10_000, batch_size=16, log_every=50, checkpoint_every=1_000, image_every=1_000,
                      dtype="bfloat16", remat=True)
  if "buckets" in options:  # multi-aspect training (SDXL §2.3): ~1024² pixels, sides multiples of 64
    config.data.buckets = sections.SDXL_BUCKETS
  if "smoke" in options:
    config.init.pretrained = "runs/sdxl_tiny"
    config.data.update(source="shapes", path="", random_flip=False)  # flips break the shapes' left/right words
    config.sample.prompts = ("a red circle",)  # the tiny tokenizer is byte-level: 16 tokens
    diffusion.apply_smoke(config)
    config.optim.update(learning_rate=1e-4, warmup_steps=0, ema_decay=0.0)
    config.train.update(dtype="float32", remat=False)
    if "buckets" in options:  # the tiny U-Net takes sides that are multiples of 8
      config.data.buckets = ((16, 16), (24, 16), (16, 24))
  return config
