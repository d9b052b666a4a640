"""A Stable Diffusion 1.x-shaped text-to-image LDM at 512 px (CompVis/stable-diffusion `v1-inference.yaml`).

The U-Net is SD 1.x's exactly (859,520,964 parameters, diffusers names, so SD 1.x weights import
into it): 320 channels × (1, 2, 4, 4), two ResNet blocks per level, spatial transformers with 8
heads at ds 4, 2, 1 (none at the deepest level), cross-attention to a 77×768 context, on the
64×64×4 latents of SD's KL-f8 VAE scaled by 0.18215; betas 0.00085 → 0.012 (scaled linear).
Training follows the SD v1 model card: AdamW, lr warmed up linearly to 1e-4 over 10k steps and
then constant (`optim.learning_rate` is the effective rate; SD's was not scaled by the batch),
global batch 2048 (32 nodes × 8 GPUs × 4 × 2 accumulation), 10% of captions dropped to "" for
classifier-free guidance, EMA 0.9999; 225k steps as sd-v1-4's 512 px stage. Weight decay 0.01 and
no clipping are the torch AdamW defaults of the reference trainer.

Text encoder. SD 1.x conditions on the frozen, pretrained CLIP ViT-L/14 text encoder, which comes
with the weights of a pretrained model; a config that trains from scratch cannot have it, so this
one trains a transformer encoder of CLIP ViT-L/14's text size (12 blocks of width 768, 12 heads,
77 tokens, 49408-token vocabulary) jointly with the U-Net. Its context has CLIP's shape, so the
U-Net is interchangeable with SD's. Point `cond.tokenizer_dir` at a CLIP tokenizer folder (the
converter writes one to `pretrained/sd15/tokenizer`).

Data: image–caption pairs in a folder, `x.jpg` with its caption in `x.txt` (img2dataset's
layout for LAION), optionally with `train/` and `test/` — `--config.data.path=/data/laion_aesthetics`.
The autoencoder is SD's VAE imported as a stage-1 workdir (recorded at 512 px):

  python -m ldm_jax.convert import --src /models/stable-diffusion-v1-5 --out pretrained/sd15
  python train_diffusion.py --config configs/ldm/sd_v1.py --workdir runs/sd_v1 \
      --config.data.path=/data/laion_aesthetics --config.cond.tokenizer_dir=pretrained/sd15/tokenizer \
      --config.model.query_chunk_size=1024 --config.train.dtype=bfloat16 --config.train.remat=True

`:smoke` runs on the shapes captions against `configs/autoencoder/kl_f8.py:smoke` trained in
runs/kl_f8_smoke.
"""

from ldm_jax.config import common as config_lib
from ldm_jax.config import diffusion

PROMPTS = ("a photograph of an astronaut riding a horse",
           "a painting of a fox in the style of starry night",
           "a red bicycle leaning against a brick wall",
           "a bowl of ramen, studio photograph")


def get_config(arg=None):
  options = config_lib.parse_arg(arg)
  config_lib.check_options(options, {"smoke"}, "sd_v1")
  config = diffusion.default_config()
  config.autoencoder.workdir = "pretrained/sd15/autoencoder"
  config.data.update(source="folder", path="", image_size=512, channels=3)
  config.cond.update(kind="text", text_encoder="scratch", tokenizer_dir="", vocab_size=49408, max_length=77,
                     dim=768, depth=12, num_heads=12, head_dim=64, dropout_prob=0.1)
  config.model.update(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                      attention_resolutions=(4, 2, 1), num_heads=8, num_head_channels=-1,
                      use_spatial_transformer=True, use_linear_projection=False, transformer_depth=1,
                      context_dim=768)
  config.diffusion.update(beta_schedule="scaled_linear", linear_start=0.00085, linear_end=0.012)
  config.latent.scale_factor = 0.18215
  config.optim.update(learning_rate=1e-4, warmup_steps=10_000, weight_decay=0.01, grad_clip=0.0,
                      ema_decay=0.9999)
  config.sample.update(sampler="ddim", num_steps=50, guidance_scale=7.5, num_images=8, prompts=PROMPTS)
  config.train.update(num_steps=225_000, batch_size=2048, log_every=100, checkpoint_every=5_000,
                      image_every=5_000, eval_every=5_000)
  if "smoke" in options:
    config.autoencoder.workdir = "runs/kl_f8_smoke"
    config.data.update(source="shapes", path="")
    config.sample.prompts = ("a large red circle on a white background",)
    diffusion.apply_smoke(config)
  return config
