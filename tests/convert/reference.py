"""Configs and helpers for the tiny random reference models of the parity tests.

Nothing is downloaded: every model is built from a config with random weights, with the norm
scales and biases moved off their 1/0 initialisation so that a swapped weight/bias would show.
torch, diffusers and transformers are imported inside the fixtures, so tests that need none of
them run without them; the parity test modules `importorskip` them.
"""

import json
import os

import numpy as np

# SD-shaped but tiny: two levels of 32/64 channels (GroupNorm needs 32 groups), 8×8 latents.
VAE_KL = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
              up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 64),
              layers_per_block=1, latent_channels=4, sample_size=16, scaling_factor=0.5)
VAE_VQ = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
              up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 32),
              layers_per_block=1, latent_channels=3, num_vq_embeddings=16, sample_size=16)
UNET_COMMON = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=32)
# SD 1.x: conv projections, one head count everywhere, attention on the upper level only.
UNET_SD1 = dict(UNET_COMMON, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=2)
# SD 2.x: linear projections, 64 channels per head (heads listed per level), attention on every level.
UNET_SD2 = dict(UNET_COMMON, block_out_channels=(64, 128),
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
                attention_head_dim=[1, 2], use_linear_projection=True)
# One level, attention at 8×8, context from the tiny CLIP below: the U-Net of the tiny SD pipeline
# and of the sampler trajectories (one level compiles in half the time of two).
UNET_SMALL = dict(UNET_COMMON, block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                  up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=32, attention_head_dim=2)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=16, hidden_act="quick_gelu")
BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=16, type_vocab_size=2)


def perturb(module, seed=0):
  """Moves every parameter off its initial value (norms near 1/0, zero-initialised layers random)."""
  import torch
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=generator)
      if "norm" in name.lower():
        p.add_(0.1 * noise)
      else:
        p.add_(0.02 * noise)
  return module.eval()


def state_numpy(module):
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


def clip_tokenizer_vocab():
  """A byte-level BPE vocabulary (the 256 byte symbols, their word-final forms, a few merges)."""
  import tokenizers
  chars = sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
  vocab = {c: i for i, c in enumerate(chars)}
  vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
  merges = [("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  vocab["<|startoftext|>"] = len(vocab)
  vocab["<|endoftext|>"] = len(vocab)
  return vocab, merges


def write_scheduler(folder, **overrides):
  cfg = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False, "steps_offset": 1,
         "clip_sample": False}
  cfg.update(overrides)
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "scheduler_config.json"), "w") as f:
    json.dump(cfg, f)


def nhwc(tensor):
  return tensor.detach().permute(0, 2, 3, 1).numpy()


def nchw(array):
  import torch
  return torch.from_numpy(np.ascontiguousarray(np.asarray(array).transpose(0, 3, 1, 2)))
