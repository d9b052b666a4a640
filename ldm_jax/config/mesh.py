"""The `mesh.*` keys: axis names, the default partition rules, and their validation (no jax).

`ldm_jax.runtime.sharding` builds meshes and places arrays by these rules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import ml_collections

MESH_AXES = ("data", "fsdp", "tensor")
DEFAULT_RULES = ((".*", "fsdp"),)
DEFAULT_FSDP_MIN_SIZE = 2**12  # elements; biases and norm scales stay replicated


def validate_mesh_config(mesh_cfg: ml_collections.ConfigDict) -> None:
  """Checks `mesh.rules` and `mesh.fsdp_min_size` on their own; ValueError names the key."""
  for axis in MESH_AXES:
    size = mesh_cfg.get(axis, 1)
    if isinstance(size, bool) or not isinstance(size, int) or size == 0 or size < -1:
      raise ValueError(f"mesh.{axis}: {size!r} is not a valid axis size (a positive int or -1).")
  min_size = mesh_cfg.get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE)
  if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
    raise ValueError(f"mesh.fsdp_min_size: expected an integer >= 0 (elements), got {min_size!r}.")
  parse_rules(mesh_cfg.get("rules", DEFAULT_RULES))


def parse_rules(rules) -> list[tuple[re.Pattern, Any]]:
  """[(compiled regex, spec)]; spec is 'fsdp', or a tuple of per-dimension axis entries."""
  if isinstance(rules, str) or not isinstance(rules, Sequence):
    raise ValueError(f"mesh.rules: expected a sequence of (regex, spec) pairs, got {rules!r}.")
  parsed = []
  for i, rule in enumerate(rules):
    key = f"mesh.rules[{i}]"
    if isinstance(rule, str) or not isinstance(rule, Sequence) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f"{key}: expected a (regex, spec) pair, got {rule!r}.")
    pattern, spec = rule
    try:
      regex = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"{key}: {pattern!r} is not a valid regex ({e}).") from e
    if spec in ("replicate", None):
      spec = ()
    elif spec == "fsdp":
      pass
    elif isinstance(spec, str) or not isinstance(spec, Sequence):
      raise ValueError(f"{key}: spec {spec!r} is not 'fsdp', 'replicate' or a tuple of per-dimension "
                       f"mesh axes such as (None, 'tensor').")
    else:
      spec = tuple(tuple(e) if isinstance(e, (list, tuple)) else e for e in spec)
      for entry in spec:
        for axis in (entry if isinstance(entry, tuple) else (entry,)):
          if axis is not None and axis not in MESH_AXES:
            raise ValueError(f"{key}: axis {axis!r} is not a mesh axis; the mesh has {MESH_AXES}.")
    parsed.append((regex, spec))
  return parsed
