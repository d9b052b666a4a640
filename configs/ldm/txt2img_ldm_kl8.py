"""The paper's LAION text-to-image LDM-KL-8 (CompVis `txt2img-1p4B-eval.yaml`: 872M U-Net + 582M text encoder).

Data: image–caption pairs as files in a folder, `photo.jpg` with its caption in `photo.txt`
(the layout img2dataset writes for LAION-400M), optionally with `train/` and `test/`
sub-folders — `--config.data.path=/data/laion400m`. Images are resized and center-cropped to 256 px.

  python train_autoencoder.py --config configs/autoencoder/kl_f8.py --workdir runs/kl_f8 …
  python train_diffusion.py --config configs/ldm/txt2img_ldm_kl8.py --workdir runs/txt2img_ldm \
      --config.data.path=/data/laion400m --config.cond.tokenizer_dir=/models/bert-base-uncased

Text encoder: the paper's BERT-style transformer trained jointly with the U-Net from scratch
(CompVis `BERTEmbedder`: 32 pre-LayerNorm blocks of width 1280, 8 heads of 64 channels, 77
tokens). The reference tokenizes with bert-base-uncased's WordPiece (30522 tokens): point
`cond.tokenizer_dir` at a local copy of it, or leave it empty to train a WordPiece tokenizer on
the training captions. 10% of captions are dropped to "" for classifier-free guidance.

U-Net on the 32×32×4 latents of `kl_f8` scaled by 0.18215 (fixed, as the reference): 320
channels × (1, 2, 4, 4), two ResNet blocks per level, spatial transformers with 8 heads at ds
1, 2, 4 cross-attending to the 77×1280 context. Betas 0.00085 → 0.012. Learning rate 1e-4 as
the paper's table, not scaled by the batch (`optim.learning_rate` is the effective rate; the
eval yaml's base_learning_rate is 5e-5), constant, AdamW (torch defaults: weight decay 0.01, no
clipping), EMA 0.9999, batch 680, 390k steps. `:smoke` runs on the shapes captions against
`configs/autoencoder/kl_f8.py:smoke` trained in runs/kl_f8_smoke.
"""

from ldm_jax.config import common as config_lib
from ldm_jax.config import diffusion

PROMPTS = ("a painting of a squirrel eating a burger",
           "a photograph of an astronaut riding a horse",
           "a street sign that reads latent diffusion",
           "a watercolor painting of a chair that looks like an octopus")


def get_config(arg=None):
  options = config_lib.parse_arg(arg)
  config_lib.check_options(options, {"smoke"}, "txt2img_ldm_kl8")
  config = diffusion.default_config()
  config.autoencoder.workdir = "runs/kl_f8"
  config.data.update(source="folder", path="", image_size=256, channels=3)
  config.cond.update(kind="text", text_encoder="scratch", tokenizer_dir="", vocab_size=30522, max_length=77,
                     dim=1280, depth=32, num_heads=8, head_dim=64, dropout_prob=0.1)
  config.model.update(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                      attention_resolutions=(1, 2, 4), num_heads=8, num_head_channels=-1,
                      use_spatial_transformer=True, transformer_depth=1, context_dim=1280)
  config.diffusion.update(beta_schedule="scaled_linear", linear_start=0.00085, linear_end=0.012)
  config.latent.scale_factor = 0.18215
  config.optim.update(learning_rate=1e-4, warmup_steps=0, weight_decay=0.01, grad_clip=0.0, ema_decay=0.9999)
  config.sample.update(sampler="ddim", num_steps=50, guidance_scale=5.0, num_images=8, prompts=PROMPTS)
  config.train.update(num_steps=390_000, batch_size=680, log_every=100, checkpoint_every=5_000,
                      image_every=5_000, eval_every=5_000)
  if "smoke" in options:
    config.autoencoder.workdir = "runs/kl_f8_smoke"
    config.data.update(source="shapes", path="")
    config.sample.prompts = ("a large red circle on a white background",)
    diffusion.apply_smoke(config)
  return config
