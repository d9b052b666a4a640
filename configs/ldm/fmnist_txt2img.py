"""Text-to-image LDM on Fashion-MNIST tar shards, trained from the on-disk latent cache.

  python -m ldm_jax.data write-shards --config configs/ldm/fmnist_txt2img.py --source idx \
      --path /usr/share/datasets/fashion-mnist --out data/fmnist_shards       # "a photo of a sneaker" …
  python train_autoencoder.py --config configs/autoencoder/fmnist_kl_f4.py --workdir runs/fmnist_ae
  python -m ldm_jax.precompute --config configs/ldm/fmnist_txt2img.py --out data/fmnist_cache
  python train_diffusion.py --config configs/ldm/fmnist_txt2img.py --workdir runs/fmnist_txt2img
The shards stand in for img2dataset output (KEY.png, KEY.txt caption, KEY.json with the label);
the text encoder (2 layers of width 128) and its WordPiece tokenizer are trained from scratch.
`:idx` trains on the same images and captions read from the idx files (latents cached in memory;
no shards, no precompute job), e.g. with a class left out for benchmarks/concept_learning.py:
  python train_diffusion.py --config configs/ldm/fmnist_txt2img.py:idx --workdir runs/fmnist_t2i_no_boots \
      --config.data.holdout_labels='(9,)'
"""

from ldm_jax.config import common as config_lib
from ldm_jax.config import diffusion

PROMPTS = ("a photo of a t-shirt", "a photo of a trouser", "a photo of a sneaker", "a photo of a bag",
           "a photo of an ankle boot")


def get_config(arg=None):
  options = config_lib.parse_arg(arg)
  config_lib.check_options(options, {"smoke", "idx"}, "fmnist_txt2img")
  config = diffusion.default_config()
  config.autoencoder.workdir = "runs/fmnist_ae"
  config.data.update(source="shards", path="data/fmnist_shards/*.tar", image_size=32, channels=1,
                     min_caption_length=1)
  config.cond.update(kind="text", dropout_prob=0.1, vocab_size=512, max_length=16, dim=128, depth=2,
                     num_heads=4, head_dim=32)
  config.model.update(model_channels=64, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(1, 2),
                      num_head_channels=32, context_dim=128)
  config.latent.cache_dir = "data/fmnist_cache"
  config.optim.update(learning_rate=3e-4, warmup_steps=200, ema_decay=0.999)
  # The class-conditional recipe's objective and guidance (configs/ldm/fmnist_class_cond.py): v on a
  # zero-terminal-SNR schedule, guidance 4 on the steps t <= 400.
  config.diffusion.update(zero_terminal_snr=True, parameterization="v")
  config.sample.update(sampler="ddim", num_steps=50, guidance_scale=4.0, guidance_interval=(0, 400), num_images=10,
                       prompts=PROMPTS)
  config.train.update(num_steps=3_000, batch_size=64, log_every=100, checkpoint_every=1_000,
                      image_every=1_000, eval_every=1_000)
  if "idx" in options:
    config.data.update(source="idx", path="/usr/share/datasets/fashion-mnist")
    config.latent.update(cache=True, cache_dir="")
  if "smoke" in options:
    diffusion.apply_smoke(config)
  return config
