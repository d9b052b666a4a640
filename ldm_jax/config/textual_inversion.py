"""The `textual_inversion.*` config section: the placeholder, its initializer and the training prompts (no jax)."""

from __future__ import annotations

from collections.abc import Mapping

import ml_collections

from ldm_jax.config import check_known_keys, check_number


def ti_config(**overrides) -> ml_collections.ConfigDict:
  """Defaults of the `textual_inversion` section (diffusers' textual_inversion.py: one vector)."""
  cfg = ml_collections.ConfigDict(dict(
      token="<concept>",  # the placeholder the prompts use; new to the tokenizer
      initializer_token="object",  # a word the tokenizer keeps whole; the new rows start as its row
      num_vectors=1,  # n: embedding vectors (tokens tok, tok_1, …) of the placeholder
      prompts=("a photo of a {}",),  # training captions: templates with {} for the placeholder, cycled
  ))
  check_known_keys(overrides, cfg, "textual_inversion", "textual-inversion")
  cfg.update(overrides)
  return cfg


def check_ti_config(cfg: Mapping, prefix: str = "textual_inversion") -> None:
  """ValueError naming the first bad key of a `textual_inversion` section."""
  check_known_keys(cfg, ti_config(), prefix, "textual-inversion")
  check_number(f"{prefix}.num_vectors", cfg["num_vectors"], integer=True, ge=1)
  for key in ("token", "initializer_token"):
    if not isinstance(cfg[key], str) or not cfg[key].strip():
      raise ValueError(f"{prefix}.{key}: expected a non-empty string, got {cfg[key]!r}.")
  prompts = cfg["prompts"]
  if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.count("{}") == 1 for p in prompts):
    raise ValueError(f"{prefix}.prompts: expected templates with one {{}} each (the placeholder), got {prompts!r}.")
