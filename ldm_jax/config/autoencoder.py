"""Stage-1 config: every key of `train_autoencoder.py` with its default, the paper's variants and `:smoke`.

Config files (`configs/autoencoder/*.py`) start from `default_config()` or `paper_config(...)`;
`ldm_jax.train.autoencoder` validates a config against the model, data and losses.
"""

from __future__ import annotations

import ml_collections

from ldm_jax.config import common, sections


def default_config() -> ml_collections.ConfigDict:
  """All stage-1 keys with defaults: the paper's KL-f8 at 256 px (LDM `autoencoder_kl_32x32x4`)."""
  config = ml_collections.ConfigDict()
  config.data = sections.default_data_config()
  config.data.image_size = 256
  config.data.channels = 3
  # kind: 'kl' (KL-regularised), 'vq' (vector-quantised, n_embed codes) or 'identity' (no autoencoder:
  # z = x, f = 1, for diffusion in pixel space; ch_mult=(1,), embed_dim = in_channels).
  config.model = ml_collections.ConfigDict(dict(
      kind="kl", embed_dim=4, n_embed=8192, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2,
      attn_resolutions=(), z_channels=4, dropout=0.0))
  # Linked, so that --config.data.channels / image_size move the model with them.
  config.model.in_channels = config.data.get_ref("channels")
  config.model.resolution = config.data.get_ref("image_size")
  config.loss = sections.default_loss_config()
  config.optim = ml_collections.ConfigDict(dict(
      # LDM scales the base rate by the global batch size (and #GPUs × accumulation there).
      base_learning_rate=4.5e-6, scale_lr=True, b1=0.5, b2=0.9,
      # 'constant' as LDM; 'cosine' decays to 0 at train.num_steps (short runs end sharper).
      schedule="constant"))
  config.eval = ml_collections.ConfigDict(dict(
      metrics=("psnr", "ssim", "lpips"),  # some of 'psnr', 'ssim', 'lpips', 'rfd'
      extractor="vgg16:64"))               # rfd's features: 'vgg16[:SIZE]', 'inception', 'classifier:RUN'
  config.train = common.train_config()
  config.mesh = common.mesh_config()
  return config


def paper_config(arg: str | None, name: str, *, model: dict, loss: dict) -> ml_collections.ConfigDict:
  """A 256 px first-stage config of the paper (LDM's released `first_stage_models` configs).

  Shared by `configs/autoencoder/{kl,vq}_f*.py`: ch 128, two ResNet blocks per level, Adam at
  4.5e-6 × global batch with β = (0.5, 0.9), L1 + LPIPS + PatchGAN from `loss.disc_start`, on an
  image folder (`--config.data.path`; the paper used OpenImages). `model` and `loss` hold what
  differs between the variants. `arg` 'smoke' trains a tiny version on the built-in shapes.
  """
  options = common.parse_arg(arg)
  common.check_options(options, {"smoke"}, name)
  config = default_config()
  config.data.update(source="folder", path="", image_size=256, channels=3, random_crop=True, random_flip=True)
  config.model.update(ch=128, num_res_blocks=2, **model)
  config.loss.update(**loss)
  config.train.update(batch_size=96, num_steps=300_000)  # 12 per GPU × 8 GPUs; steps not given by the paper
  if "smoke" in options:
    config.data.update(source="shapes", random_crop=False)
    apply_smoke(config)
  return config


def apply_smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any stage-1 config to a < 1 minute CPU run; keeps its kind and data source."""
  config.data.image_size = 16
  config.data.num_examples = min(config.data.get("num_examples", 256) or 256, 256)
  config.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), n_embed=64)
  config.loss.disc_start = 6
  config.loss.disc_num_layers = 1
  config.loss.disc_ndf = 8
  config.optim.update(base_learning_rate=1e-3, scale_lr=False)
  config.train.update(num_steps=12, batch_size=8, log_every=4, checkpoint_every=6, eval_every=12,
                      eval_batches=2, image_every=12)
  return config
