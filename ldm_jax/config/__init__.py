"""Checks shared by every config section and command-line flag (no jax here).

`check_number` is the one range check: a value that is not a number, not finite, not an integer
where one is needed, or outside its range is a ValueError naming the key. `check_finite` sweeps a
whole config, so that no NaN or infinity reaches a trainer through a key without its own check.
`run_kind` tells which trainer wrote a run's config.json, so that no command takes one kind of
run for another.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping


def _describe(integer: bool, gt, ge, lt, le) -> str:
  bounds = [f"{op} {bound:g}" for op, bound in ((">", gt), (">=", ge), ("<", lt), ("<=", le)) if bound is not None]
  return ("an integer" if integer else "a finite number") + (" " + " and ".join(bounds) if bounds else "")


def check_number(key: str, value, *, integer: bool = False, gt=None, ge=None, lt=None, le=None) -> None:
  """ValueError `key: expected <kind and range>, got <value>` unless `value` is a finite number
  (an int when `integer`; booleans are never numbers here) with gt < value, ge <= value, value < lt,
  value <= le for the bounds given."""
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
  ok = ok and (isinstance(value, numbers.Integral) if integer else math.isfinite(value))
  ok = ok and (gt is None or value > gt) and (ge is None or value >= ge)
  ok = ok and (lt is None or value < lt) and (le is None or value <= le)
  if not ok:
    raise ValueError(f"{key}: expected {_describe(integer, gt, ge, lt, le)}, got {value!r}.")


def check_known_keys(keys, known, prefix: str, what: str) -> None:
  """ValueError `prefix.key: not a <what> setting; known keys: …` for the first of `keys` (sorted)
  that is not in `known`."""
  unknown = sorted(set(keys) - set(known))
  if unknown:
    raise ValueError(f"{prefix}.{unknown[0]}: not a {what} setting; known keys: {', '.join(sorted(known))}.")


def check_finite(config: Mapping, prefix: str = "") -> None:
  """ValueError naming the first key of `config` (a dict or ConfigDict; nested sections and
  tuples of numbers included) whose value is a float NaN or infinity."""
  for key, value in config.items():
    name = f"{prefix}{key}"
    if hasattr(value, "items"):
      check_finite(value, f"{name}.")
    elif isinstance(value, (tuple, list)):
      for i, item in enumerate(value):
        if isinstance(item, float) and not math.isfinite(item):
          raise ValueError(f"{name}: item {i} is {item}; expected a finite number.")
    elif isinstance(value, float) and not math.isfinite(value):
      raise ValueError(f"{name}: expected a finite number, got {value}.")


# What each kind of run is, for messages.
RUN_KINDS = {"autoencoder": "stage-1 autoencoder run (train_autoencoder.py)",
             "diffusion": "stage-2 diffusion run (train_diffusion.py)",
             "classifier": "classifier run (python -m ldm_jax.eval.classifier)"}


def run_kind(config: Mapping) -> str | None:
  """'autoencoder', 'diffusion' or 'classifier': which trainer wrote this (resolved) config; None
  when none did. A pretrained directory's `autoencoder/` counts as stage 1 (it is a stage-1 workdir)."""
  model = config.get("model") or {}
  if "diffusion" in config and "autoencoder" in config:
    return "diffusion"
  if "kind" in model:
    return "autoencoder"
  if "feature_dim" in model:
    return "classifier"
  return None
