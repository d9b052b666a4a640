"""The `dreambooth.*` config section: instance and class prompts, prior preservation (no jax)."""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections

from ldm_jax.config import check_known_keys, check_number


def dreambooth_config(**overrides) -> ml_collections.ConfigDict:
  """Defaults of the `dreambooth` section (diffusers' train_dreambooth.py with --with_prior_preservation)."""
  cfg = ml_collections.ConfigDict(dict(
      instance_prompt="a photo of sks object",  # the caption of every instance image: a rare identifier + class
      class_prompt="a photo of an object",  # the caption of the class (prior) images
      prior_prompts=(),  # more prompts to preserve: the class images are spread over class_prompt and these
      prior_loss_weight=1.0,  # λ in L = L_instance + λ·L_prior; 0 = no class images, no prior term
      num_class_images=100,  # class images in WORKDIR/class_images; missing ones are sampled from the base
      class_sample_steps=50,  # DDIM steps of that sampling
      class_guidance_scale=5.0,  # its classifier-free guidance scale
  ))
  check_known_keys(overrides, cfg, "dreambooth", "DreamBooth")
  cfg.update(overrides)
  return cfg


def check_dreambooth_config(cfg: Mapping, prefix: str = "dreambooth") -> None:
  """ValueError naming the first bad key of a `dreambooth` section."""
  check_known_keys(cfg, dreambooth_config(), prefix, "DreamBooth")
  for key in ("instance_prompt", "class_prompt"):
    if not isinstance(cfg[key], str) or not cfg[key].strip():
      raise ValueError(f"{prefix}.{key}: expected a non-empty prompt, got {cfg[key]!r}.")
  prior = cfg["prior_prompts"]
  if not isinstance(prior, (tuple, list)) or not all(isinstance(p, str) and p.strip() for p in prior):
    raise ValueError(f"{prefix}.prior_prompts: expected a tuple of non-empty prompts, got {prior!r}.")
  if cfg["class_prompt"] in prior or len(set(prior)) < len(prior):
    raise ValueError(f"{prefix}.prior_prompts: a prompt is given twice (class_prompt {cfg['class_prompt']!r}, "
                     f"prior_prompts {tuple(prior)!r}).")
  if cfg["instance_prompt"] in prior:
    raise ValueError(f"{prefix}.prior_prompts: holds the instance prompt {cfg['instance_prompt']!r}.")
  check_number(f"{prefix}.prior_loss_weight", cfg["prior_loss_weight"], ge=0)
  for key in ("num_class_images", "class_sample_steps"):
    check_number(f"{prefix}.{key}", cfg[key], integer=True, ge=1)
  check_number(f"{prefix}.class_guidance_scale", cfg["class_guidance_scale"], ge=0)
  if cfg["num_class_images"] < 1 + len(prior):
    raise ValueError(f"{prefix}.num_class_images: {cfg['num_class_images']} is fewer than the {1 + len(prior)} "
                     f"class prompts (class_prompt and prior_prompts); each needs an image.")
