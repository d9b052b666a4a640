"""A tiny random SDXL base pipeline (diffusers `StableDiffusionXLPipeline`), built offline.

The parity tests of SDXL import, sample, export and fine-tune it; `configs/ldm/sdxl_base.py:smoke`
fine-tunes the folder this writes (torch, diffusers and transformers needed):

    python -m tests.convert.sdxl_tiny runs/sdxl_tiny
"""

import sys

from tests.convert.reference import clip_tokenizer_vocab, perturb

# Tiny SDXL: three levels (16, 32, 64 channels, 8 GroupNorm groups), no attention on level 0, one
# transformer block on level 1 and two on level 2 and the middle, linear projections, heads of 8
# channels (4, then 8 heads); a 64-wide context (32 + 32 from the two encoders) and a 24-wide
# pooled embedding.
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=8,
                 block_out_channels=(16, 32, 64),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8), use_linear_projection=True,
                 cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=24 + 6 * 8)
# The refiner's: the context is the second encoder's alone (32 wide), and 5 time ids (aesthetic score
# instead of the target size).
TINY_REFINER_UNET = dict(TINY_UNET, cross_attention_dim=32, projection_class_embeddings_input_dim=24 + 5 * 8)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(16, 32),
                layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=0.13025)
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                 max_position_embeddings=16)


def build_pipeline():
  """The tiny SDXL base pipeline with random weights (fixed seeds) and a DDIM scheduler."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  vocab, merges = clip_tokenizer_vocab()
  length = TINY_CLIP["max_position_embeddings"]
  tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=length)
  tokenizer_2 = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=length, pad_token="!")
  special = dict(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"], pad_token_id=vocab["<|endoftext|>"])
  text_encoder = perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      eos_token_id=vocab["<|endoftext|>"], hidden_act="quick_gelu", **special, **TINY_CLIP)), seed=21)
  # OpenCLIP bigG as SDXL ships it: exact GELU, a projection, transformers' legacy eos_token_id 2.
  text_encoder_2 = perturb(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      eos_token_id=2, hidden_act="gelu", projection_dim=24, **special, **TINY_CLIP)), seed=22)
  return diffusers.StableDiffusionXLPipeline(
      vae=perturb(diffusers.AutoencoderKL(**TINY_VAE), seed=23), text_encoder=text_encoder,
      text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
      unet=perturb(diffusers.UNet2DConditionModel(**TINY_UNET), seed=24),
      scheduler=diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                        timestep_spacing="leading"),
      add_watermarker=False)


if __name__ == "__main__":
  if len(sys.argv) != 2:
    sys.exit("usage: python -m tests.convert.sdxl_tiny OUT_FOLDER")
  build_pipeline().save_pretrained(sys.argv[1])
  print(f"wrote a tiny random SDXL base pipeline to {sys.argv[1]}")
