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
                  up_block_types=("CrossAttnUpBlock2D",), cross_attention_dim=128, attention_head_dim=2)
# 64 channels per head, as every CLIP and OpenCLIP text tower (single files do not store the head count).
CLIP = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
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


# ---------------------------------------------------------------------------------------------
# diffusers/transformers state dicts → CompVis / Stability single-file layouts (the inverse of what
# ldm_jax.convert.compvis reads; the tests check these against diffusers' own CompVis converters).

_RESNET_TO_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                  "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_to_ldm(state, config):
  """diffusers UNet2DConditionModel → openaimodel names (no prefix)."""
  per_level = config["layers_per_block"] + 1
  attended = ["CrossAttn" in t for t in config["down_block_types"]]
  out = {}
  for key, value in state.items():
    p = key.split(".")
    fixed = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "class_embedding": "label_emb.0"}
    if p[0] in fixed:
      new = [fixed[p[0]]] + p[1:]
    elif p[0] == "add_embedding":  # SDXL (sgm): the `vector` condition's label_emb Sequential
      new = ["label_emb.0", "0" if p[1] == "linear_1" else "2"] + p[2:]
    elif p[0] == "time_embedding":
      new = ["time_embed", "0" if p[1] == "linear_1" else "2"] + p[2:]
    elif p[0] == "down_blocks":
      level, kind = int(p[1]), p[2]
      if kind == "downsamplers":
        new = [f"input_blocks.{1 + level * per_level + per_level - 1}.0.op"] + p[5:]
      else:
        n = 1 + level * per_level + int(p[3])
        new = [f"input_blocks.{n}.0", _RESNET_TO_LDM[p[4]]] + p[5:] if kind == "resnets" else [f"input_blocks.{n}.1"] + p[4:]
    elif p[0] == "mid_block":
      if p[1] == "attentions":
        new = ["middle_block.1"] + p[3:]
      else:
        new = [f"middle_block.{0 if p[2] == '0' else 2}", _RESNET_TO_LDM[p[3]]] + p[4:]
    elif p[0] == "up_blocks":
      i, kind = int(p[1]), p[2]
      level = len(attended) - 1 - i
      if kind == "upsamplers":
        new = [f"output_blocks.{i * per_level + per_level - 1}.{2 if attended[level] else 1}.conv"] + p[5:]
      else:
        n = i * per_level + int(p[3])
        new = [f"output_blocks.{n}.0", _RESNET_TO_LDM[p[4]]] + p[5:] if kind == "resnets" else [f"output_blocks.{n}.1"] + p[4:]
    else:
      raise KeyError(key)
    out[".".join(new)] = value
  return out


_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def vae_to_ldm(state, config):
  """diffusers AutoencoderKL/VQModel → CompVis names, attention projections as 1×1 convs."""
  levels = len(config["block_out_channels"])
  out = {}
  for key, value in state.items():
    p = key.split(".")
    if p[0] not in ("encoder", "decoder"):
      out[key] = value
      continue
    coder, rest = p[0], p[1:]
    if rest[0] in ("down_blocks", "up_blocks"):
      level = int(rest[1]) if rest[0] == "down_blocks" else levels - 1 - int(rest[1])
      head = ["down" if rest[0] == "down_blocks" else "up", str(level)]
      if rest[2] == "resnets":
        new = head + ["block", rest[3], "nin_shortcut" if rest[4] == "conv_shortcut" else rest[4]] + rest[5:]
      elif rest[2] == "attentions":
        new = head + ["attn", rest[3], _VAE_ATTN_TO_LDM[rest[4]]] + rest[-1:]
      else:
        new = head + ["downsample" if rest[2] == "downsamplers" else "upsample"] + rest[4:]
    elif rest[0] == "mid_block":
      sub = {"resnets.0": "block_1", "attentions.0": "attn_1", "resnets.1": "block_2"}[f"{rest[1]}.{rest[2]}"]
      name = _VAE_ATTN_TO_LDM[rest[3]] if rest[1] == "attentions" else \
          ("nin_shortcut" if rest[3] == "conv_shortcut" else rest[3])
      new = ["mid", sub, name] + rest[-1:]
    elif rest[0] == "conv_norm_out":
      new = ["norm_out"] + rest[1:]
    else:
      new = rest
    if ("attn" in new or "attn_1" in new) and new[-1] == "weight" and value.ndim == 2:
      value = value[:, :, None, None]
    out[".".join([coder] + new)] = value
  return out


def clip_to_openclip(state):
  """transformers CLIPTextModel → OpenCLIP text tower names (fused q/k/v), as SD 2.x checkpoints keep them;
  a CLIPTextModelWithProjection's `text_projection.weight` [P, D] becomes OpenCLIP's matrix [D, P]
  (pooled @ text_projection), as SDXL's bigG keeps it (else an unused identity, as SD 2.x)."""
  state = {k.removeprefix("text_model."): v for k, v in state.items()}
  width = state["final_layer_norm.weight"].shape[0]
  projection = state["text_projection.weight"].T if "text_projection.weight" in state else np.eye(width, dtype=np.float32)
  out = {"token_embedding.weight": state["embeddings.token_embedding.weight"],
         "positional_embedding": state["embeddings.position_embedding.weight"],
         "ln_final.weight": state["final_layer_norm.weight"], "ln_final.bias": state["final_layer_norm.bias"],
         "text_projection": np.ascontiguousarray(projection), "logit_scale": np.array(4.6, np.float32)}
  names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
           "self_attn.out_proj": "attn.out_proj"}
  layers = {int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")}
  for i in layers:
    src = f"encoder.layers.{i}."
    for leaf in ("weight", "bias"):
      out[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = np.concatenate(
          [state[f"{src}self_attn.{p}_proj.{leaf}"] for p in "qkv"])
      for ours, theirs in names.items():
        out[f"transformer.resblocks.{i}.{theirs}.{leaf}"] = state[f"{src}{ours}.{leaf}"]
  return out
