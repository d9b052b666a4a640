"""The `lora.*` config section: which weights get low-rank adapters, their rank and alpha (no jax here).

    config.lora = lora_config(rank=8, unet_targets=("attention", "ff"))
    check_lora_config(config.lora)

Targets are regular expressions matched in full (`re.fullmatch`) against the module paths of a
model's parameter tree ('down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q'), or the names
of `TARGET_PRESETS`. Only modules with a `kernel` (Dense, Conv) can be adapted.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import ml_collections

from ldm_jax.config import check_known_keys, check_number

# Module-path regexes per model and preset name. U-Net paths are diffusers' (`ldm_jax.models.unet`),
# text-encoder paths those of CLIP (`q_proj`…), the scratch transformer (`to_q`…) and BERT (`query`…).
TARGET_PRESETS = {
    "unet": {
        "attention": r".*/(to_q|to_k|to_v|to_out_0)",  # self- and cross-attention projections
        "ff": r".*/ff/(net_0/proj|net_2)",  # the transformer blocks' GEGLU feed-forward
        "proj": r".*/attentions_\d+/(proj_in|proj_out)",  # the spatial transformers' in/out projections
        "conv": r".*/(resnets_\d+/(conv1|conv2|conv_shortcut)|(downsamplers|upsamplers)_0/conv)",
    },
    "text_encoder": {
        "attention": r".*/(self_attn/(q_proj|k_proj|v_proj|out_proj)|attn/(to_q|to_k|to_v|to_out)"
                     r"|attention/self/(query|key|value)|attention/output/dense)",
        "mlp": r".*/(mlp/(fc1|fc2)|ff/(net_0|net_2)|intermediate/dense|layer_\d+/output/dense)",
    },
}
COMPONENTS = tuple(TARGET_PRESETS)


def lora_config(**overrides) -> ml_collections.ConfigDict:
  """Defaults of the `lora` section (the adapters of diffusers' train_text_to_image_lora.py)."""
  cfg = ml_collections.ConfigDict(dict(
      rank=4,  # r: the adapters' inner width; an adapted kernel gets r·(in + out) trainable numbers
      alpha=4.0,  # α: the update is (α/r)·B·A, so that the learning rate need not follow r (α = r: scale 1)
      dropout=0.0,  # only 0: dropout on the adapter's input cannot be expressed by merging B·A into W
      unet_targets=("attention",),  # U-Net modules to adapt: preset names (attention, ff, proj, conv) or regexes
      text_encoder_targets=(),  # text-encoder modules to adapt (attention, mlp or regexes); () = frozen
  ))
  check_known_keys(overrides, cfg, "lora", "LoRA")
  cfg.update(overrides)
  return cfg


def target_patterns(targets, component: str, key: str) -> tuple[str, ...]:
  """The regexes of `targets` (preset names resolved for `component`); ValueError naming `key`."""
  if isinstance(targets, str):
    raise ValueError(f"{key}: expected a tuple of preset names or regexes, got the string {targets!r}; "
                     f"write ({targets!r},).")
  presets = TARGET_PRESETS[component]
  patterns = []
  for target in targets:
    if not isinstance(target, str) or not target:
      raise ValueError(f"{key}: {target!r} is neither a preset ({', '.join(presets)}) nor a regex.")
    pattern = presets.get(target, target)
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{key}: {target!r} is neither a preset ({', '.join(presets)}) nor a valid regex ({e}).") \
          from e
    patterns.append(pattern)
  return tuple(patterns)


def check_lora_config(cfg: Mapping, prefix: str = "lora") -> None:
  """ValueError naming the first bad key of a `lora` section."""
  check_known_keys(cfg, lora_config(), prefix, "LoRA")
  check_number(f"{prefix}.rank", cfg["rank"], integer=True, ge=1)
  check_number(f"{prefix}.alpha", cfg["alpha"], gt=0)
  check_number(f"{prefix}.dropout", cfg["dropout"], ge=0, lt=1)
  if cfg["dropout"] != 0:
    raise ValueError(f"{prefix}.dropout: {cfg['dropout']}; ldm_jax applies adapters by adding (α/r)·B·A to the "
                     "weights (ldm_jax.models.lora.apply_lora), and dropout on the adapter's input activations "
                     "has no such form. Set it to 0.0 (regularise with fewer steps or a lower rank instead).")
  unet = target_patterns(cfg["unet_targets"], "unet", f"{prefix}.unet_targets")
  text = target_patterns(cfg["text_encoder_targets"], "text_encoder", f"{prefix}.text_encoder_targets")
  if not unet and not text:
    raise ValueError(f"{prefix}.unet_targets: empty, and so is {prefix}.text_encoder_targets; nothing would train.")


def lora_scale(cfg: Mapping) -> float:
  """α/r, the factor of B·A in W' = W + (α/r)·B·A."""
  return float(cfg["alpha"]) / int(cfg["rank"])
