"""Defaults of the config sections that models, losses and data read: `data`, `model` (U-Net),
`cond` and `loss` (no jax). Each is a function returning a fresh ConfigDict; config files and
trainers start from them and override."""

from __future__ import annotations

import ml_collections


# SDXL's multi-aspect training buckets, (height, width), as listed in the paper's appendix
# (Podell et al. 2023, "Multi-aspect training"): 40 sizes of about 1024² pixels, sides multiples of 64,
# aspect ratios 1/4 … 4. The list is not symmetric (704 × 1344 has no 1344 × 704).
SDXL_BUCKETS = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)


def aspect_buckets(side: int, step: int = 64, max_ratio: float = 4.0) -> tuple[tuple[int, int], ...]:
  """Aspect-ratio buckets by SDXL's rule for any resolution (Podell et al. 2023, §2.3): (height, width)
  pairs, both multiples of `step`, the longer side as long as the pixels stay within side², aspect
  ratios up to `max_ratio`; each landscape bucket with its portrait transpose, from the widest to the
  tallest. `aspect_buckets(1024)` gives 17 of `SDXL_BUCKETS` (the paper's list also has the
  intermediate sizes whose pixels fall a little short of 1024², e.g. 512 × 1984)."""
  buckets = set()
  for short in range(step, side + 1, step):
    long = side * side // short // step * step
    if long / short <= max_ratio:
      buckets.update({(short, long), (long, short)})
  return tuple(sorted(buckets, key=lambda hw: hw[0] / hw[1]))


def default_data_config() -> ml_collections.ConfigDict:
  """All `data.*` keys with their defaults; config files start from this."""
  cfg = ml_collections.ConfigDict({
      'source': 'shapes',       # 'shapes', 'idx', 'folder', 'tfds' or 'shards'
      'path': '',               # idx / folder: directory; shards: tar paths, globs, {a..b}, comma-separated
      'eval_path': '',          # shards: the eval split's tars; '' → data.path
      'name': '',               # tfds: dataset name, e.g. 'mnist' or 'celeb_a_hq/256'
      'tfds_data_dir': '',      # tfds: '' → $TFDS_DATA_DIR or ~/tensorflow_datasets
      'image_size': 32,         # output side: shorter side resized to it, then cropped square
      'channels': 3,            # 1 (grayscale) or 3 (RGB), converted from whatever is read
      'train_split': 'train',
      'eval_split': 'test',
      'random_crop': False,     # random instead of center crop after the resize
      'random_flip': False,     # horizontal flips; breaks left/right words in `shapes` captions
      'num_examples': 50_000,   # shapes: train split size (test: a tenth)
      'shapes_layout': 'relations',  # shapes: 'relations' or 'quadrants' (see ldm_jax.data.shapes)
      'shapes_holdout': (),     # shapes: 'colour kind' pairs left out of the train split
      'holdout_labels': (),     # idx: classes left out of the train split, e.g. (9,): a concept never seen
      'unnamed_labels': (),     # idx: classes whose train images are captioned unnamed_caption: drawn, never named
      'unnamed_caption': '',    # idx: their caption ('' = the unconditional one; e.g. 'a photo of a')
      'labels_from_dirs': False,  # folder: label = first-level sub-directory
      'image_key': 'image',     # tfds feature keys ('/' for nested features)
      'label_key': 'label',     # shards: a field of KEY.json (-1 when absent)
      'caption_key': '',        # shards: '' → KEY.txt, else a field of KEY.json
      # Read-time filters (0 = off), on the original size: skipped records are counted and logged.
      'min_side': 0,            # drop images whose shorter side is below this
      'max_aspect_ratio': 0.0,  # drop images whose long / short side ratio exceeds this
      'min_caption_length': 0,  # drop records whose caption has fewer characters
      'num_workers': 0,         # 0: load in-process (threads); > 0: grain worker processes
  })
  # Aspect-ratio bucketing of the stage-2 training batches: () = square crops of image_size; else
  # ((height, width), …), e.g. SDXL_BUCKETS: each image goes to the bucket nearest its aspect
  # ratio, is resized to cover it and cropped to it, and each batch holds one bucket.
  cfg.buckets = ml_collections.config_dict.FieldReference((), field_type=object)
  return cfg


# The U-Net's keyword arguments and their defaults (`ldm_jax.models.unet.UNet`'s field defaults, which
# tests/models/test_unet.py compares with these): the SD 1.x U-Net.
UNET_DEFAULTS = dict(
    in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
    attention_resolutions=(4, 2, 1), num_heads=8, num_head_channels=-1, transformer_depth=1, context_dim=768,
    use_spatial_transformer=True, use_linear_projection=False, use_scale_shift_norm=False, resblock_updown=False,
    num_classes=None, addition_embed_type=None, addition_time_embed_dim=256, addition_embed_dim=None, dropout=0.0, num_groups=32, flip_sin_to_cos=True, freq_shift=0.0, attention="auto",
    query_chunk_size=None, remat=False)


def default_unet_config() -> ml_collections.ConfigDict:
  """The `model.*` keys understood by `make_unet`, with their defaults (the SD 1.x U-Net)."""
  cfg = ml_collections.ConfigDict(dict(UNET_DEFAULTS, dtype="float32"))
  for key in ("context_dim", "num_classes", "query_chunk_size", "addition_embed_dim"):  # None, yet settable
    setattr(cfg, key, ml_collections.config_dict.placeholder(int))
  cfg.addition_embed_type = ml_collections.config_dict.placeholder(str)
  cfg.context_dim = UNET_DEFAULTS["context_dim"]
  # One depth for every level, or a tuple of one per level (SDXL: (1, 2, 10)).
  cfg.transformer_depth = ml_collections.config_dict.FieldReference(UNET_DEFAULTS["transformer_depth"],
                                                                    field_type=object)
  return cfg


def default_cond_config() -> ml_collections.ConfigDict:
  """All `cond.*` keys with their defaults (text keys: the paper's LAION txt2img BERTEmbedder)."""
  return ml_collections.ConfigDict({
      'kind': 'none',             # 'none' | 'class' | 'text' | 'concat' | 'hybrid'
      'dropout_prob': 0.1,        # P(condition → null condition) per example, for guidance
      # class
      'num_classes': 0,           # labels in [0, num_classes), null class num_classes; 0 = from the data
      'class_mode': 'embedding',  # 'embedding' (U-Net y) | 'crossattn' (context [B, 1, dim])
      # text (and the class embedder's width in 'crossattn' mode)
      'text_encoder': 'scratch',  # 'scratch' | 'pretrained' (frozen CLIP/BERT of init.pretrained)
      'tokenizer_dir': '',        # local HF tokenizer folder; '' = train one on the training captions
      'vocab_size': 30522,        # token embedding rows (≥ the tokenizer's vocabulary)
      'max_length': 77,           # tokens per caption, [CLS] and [SEP] included
      'dim': 1280,                # context channels = the U-Net's model.context_dim
      'depth': 32,
      'num_heads': 8,
      'head_dim': 64,             # channels per head; -1 = dim // num_heads
      'text_dropout': 0.0,        # dropout inside the text encoder
      'mask_padding': True,       # padding tokens are not attention keys (CompVis: no mask)
      # also the mean of the encoder's output tokens as the U-Net's `text_embeds`, added to its time
      # embedding (model.addition_embed_type='text'; Imagen's pooled embedding); scratch encoders only
      'pooled': False,
      'null_text': 'empty_prompt',  # the null condition: 'empty_prompt' (tokens of "") | 'zeros' (SDXL base)
      # SDXL micro-conditioning: the U-Net's time_ids, (original H, W, crop top, left) + target (H, W) |
      # + aesthetic score (refiner) | none
      'micro_conditioning': 'none',  # 'none' | 'target_size' | 'aesthetic_score'
      # concat
      'concat_source': 'lowres',  # 'lowres' | 'inpaint' | 'map'
      'concat_channels': 0,       # lowres: image channels; map: map channels; inpaint: 0 (= 1 + latent)
      'sr_factor': 4,             # lowres: downsampling factor of the low-resolution input
  })


def default_loss_config():
  """Defaults for the `loss.*` config keys; model configs override per variant.

  Reference values: KL-f4/f8/f16/f32 autoencoders use disc_start 50001, kl_weight 1e-6,
  disc_weight 0.5; VQ-f4 uses disc_start 0 (latent-diffusion) with disc_weight 0.75, the
  taming VQGANs disc_weight 0.8; codebook_weight 1.0 everywhere. The discriminator is the
  taming PatchGAN (3 layers, 64 filters, BatchNorm) trained with its own Adam at the
  autoencoder's learning rate (base 4.5e-6 × global batch) and betas (0.5, 0.9).

  The reference's `logvar` is an nn.Parameter of the loss module that neither of its
  optimizers holds, so in the released KL models it stayed at logvar_init = 0 throughout;
  `learn_logvar=False` reproduces that, True trains it with the autoencoder (the NLL then
  balances the reconstruction against its own learned scale).
  """
  c = ml_collections.ConfigDict()
  c.disc_start = 50001  # step from which the GAN terms are on
  c.disc_weight = 0.5  # scale of the adaptive weight λ
  c.disc_factor = 1.0  # GAN factor once on
  c.disc_loss = "hinge"  # 'hinge' | 'vanilla'
  c.disc_num_layers = 3
  c.disc_ndf = 64
  c.disc_norm = "batch"  # 'batch' (reference) | 'group' | 'none'
  c.kl_weight = 1e-6
  c.pixel_loss = "l1"  # 'l1' (reference) | 'l2': the reconstruction term's per-pixel distance
  c.perceptual_weight = 1.0
  c.codebook_weight = 1.0
  c.logvar_init = 0.0
  c.learn_logvar = False
  return c
