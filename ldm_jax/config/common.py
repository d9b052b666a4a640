"""Config pieces shared by both trainers: the `train.*` and `mesh.*` keys, `:smoke`, validation,
reading and writing a run's `config.json`, and resume checks (no jax).

Config files are Python (`configs/<stage>/<name>.py` with `get_config(arg)`), as in big_vision.
The argument after the colon is a comma-separated list of options; `smoke` shrinks any config
so that it runs on a 2-core CPU in under a minute.
"""

from __future__ import annotations

import importlib.util
import json
import os

import ml_collections

from ldm_jax import config as checks
from ldm_jax.config import mesh as mesh_lib


def parse_arg(arg: str | None) -> set[str]:
  """'smoke,foo' → {'smoke', 'foo'}; unknown options are rejected by the caller."""
  return {part.strip() for part in (arg or "").split(",") if part.strip()}


def check_options(options: set[str], allowed: set[str], config_name: str) -> None:
  unknown = options - allowed
  if unknown:
    raise ValueError(f"{config_name}: unknown config argument(s) {sorted(unknown)}; "
                     f"allowed: {sorted(allowed)}.")


def train_config(**overrides) -> ml_collections.ConfigDict:
  """`train.*` keys with their defaults; `batch_size` is global (all devices of all processes)."""
  cfg = ml_collections.ConfigDict(dict(
      num_steps=100_000,
      batch_size=32,
      seed=0,
      log_every=50,
      checkpoint_every=2_000,
      max_checkpoints=3,
      eval_every=5_000,
      eval_batches=8,
      image_every=5_000,          # 0: no sample grids
      dtype="float32",            # compute dtype of every module; parameters stay float32
      remat=False,                # recompute block activations in the backward pass (less memory)
      grad_accum_steps=1,         # micro-batches per step, accumulated inside the jitted step
      max_nonfinite_steps=10,     # this many skipped (non-finite) steps in a row stop the run
  ))
  cfg.update(overrides)
  return cfg


def mesh_config() -> ml_collections.ConfigDict:
  """`mesh.data` × `mesh.fsdp` × `mesh.tensor` devices (−1 = all remaining devices) and the
  partition rules of the parameters; see `ldm_jax.runtime.sharding`."""
  return ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules=mesh_lib.DEFAULT_RULES,
                                        fsdp_min_size=mesh_lib.DEFAULT_FSDP_MIN_SIZE))


COMPUTE_DTYPES = ("float32", "bfloat16")


def validate_train_config(train: ml_collections.ConfigDict) -> None:
  """ValueError naming the `train.*` key whose value cannot work."""
  positive = ("num_steps", "batch_size", "log_every", "checkpoint_every", "max_checkpoints",
              "eval_every", "eval_batches")
  for key in positive:
    checks.check_number(f"train.{key}", train.get(key), integer=True, ge=1)
  checks.check_number("train.image_every", train.get("image_every"), integer=True, ge=0)  # 0: no sample grids
  checks.check_number("train.seed", train.seed, integer=True)
  for key in ("grad_accum_steps", "max_nonfinite_steps"):
    checks.check_number(f"train.{key}", train.get(key, 1), integer=True, ge=1)
  if train.get("dtype", "float32") not in COMPUTE_DTYPES:
    raise ValueError(f"train.dtype: {train.dtype!r} is not one of {COMPUTE_DTYPES}.")
  if not isinstance(train.get("remat", False), bool):
    raise ValueError(f"train.remat: expected True or False, got {train.remat!r}.")


def validate_model_overrides(model_cfg: ml_collections.ConfigDict, train: ml_collections.ConfigDict) -> None:
  """Training builds its modules with `train.dtype` and `train.remat`; a model section that sets
  `dtype` or `remat` to something else is an error naming the key, not silently overridden."""
  for key, default in (("dtype", "float32"), ("remat", False)):
    value = model_cfg.get(key, default)
    if value != default and value != train.get(key, default):
      raise ValueError(f"model.{key}: {value!r}, but training uses train.{key}={train.get(key, default)!r}; "
                       f"set train.{key} instead.")


def with_train_overrides(model_cfg, train: ml_collections.ConfigDict, *, remat: bool | None = None) -> dict:
  """The model section as a dict with `dtype` and `remat` taken from `train.*` (or `remat` given)."""
  cfg = model_cfg.to_dict() if isinstance(model_cfg, ml_collections.ConfigDict) else dict(model_cfg)
  cfg["dtype"] = train.get("dtype", "float32")
  cfg["remat"] = train.get("remat", False) if remat is None else remat
  return cfg


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes the resolved config as `workdir/config.json` (read back by later stages)."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


# Model keys a resumed run may change: how the same parameters compute, not what they are.
RESUMABLE_MODEL_KEYS = ("model.attention", "model.query_chunk_size", "model.dtype", "model.remat", "model.dropout")


def check_resume(config: ml_collections.ConfigDict, workdir: str, kind: str, fixed: tuple[str, ...]) -> None:
  """Before anything is built or written: a `workdir` that holds a run must be a run of `kind`
  whose keys under the prefixes `fixed` (those its checkpoints depend on, e.g. 'model.'; less
  `RESUMABLE_MODEL_KEYS`) equal `config`'s; otherwise ValueError naming the workdir or the keys
  that differ. A key only one of the two configs has (added to ldm_jax since the run was saved)
  is not compared: its default describes the saved run.

  `config` must be resolved as the trainer saves it (derived keys filled in).
  """
  if not os.path.isfile(os.path.join(workdir, "config.json")):
    return
  try:
    saved = load_config(workdir)
  except ValueError as e:
    raise ValueError(f"--workdir: {workdir}/config.json is not readable JSON ({e}); is it an ldm_jax run?") from e
  saved_kind = checks.run_kind(saved)
  if saved_kind != kind:
    what = checks.RUN_KINDS.get(saved_kind, "folder whose config.json no ldm_jax trainer wrote")
    raise ValueError(f"--workdir: {workdir} holds a {what}, not a {checks.RUN_KINDS[kind]}; give this run its own "
                     "--workdir (a new folder, or a run of this kind to resume).")
  new, old = _flat(_as_saved(config)), _flat(_as_saved(saved))
  differ = [key for key in sorted(set(new) & set(old))
            if key.startswith(fixed) and not key.startswith(RESUMABLE_MODEL_KEYS) and new[key] != old[key]]
  if differ:
    key = differ[0]
    also = f" (also differ: {', '.join(differ[1:])})" if len(differ) > 1 else ""
    raise ValueError(f"{key}: {new[key]!r}, but the run in {workdir} was trained with {old[key]!r}{also}; "
                     "its checkpoints cannot continue under another model: leave the key as it was, or use a "
                     "new --workdir.")


def _as_saved(config: ml_collections.ConfigDict) -> dict:
  # Through JSON, as save_config writes it, so that tuples and lists compare equal.
  return json.loads(config.to_json_best_effort())


def _flat(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flat(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """Reads `workdir/config.json`; FileNotFoundError names the path."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no config.json; is {workdir} a ldm_jax workdir?")
  with open(path) as f:
    return ml_collections.ConfigDict(lists_to_tuples(json.load(f)))


def lists_to_tuples(value):
  """JSON lists back to tuples, recursively (also for config dicts read from pretrained directories)."""
  # JSON has no tuples; model fields such as ch_mult are tuples in the config files.
  if isinstance(value, dict):
    return {k: lists_to_tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(lists_to_tuples(v) for v in value)
  return value


def from_file(spec: str) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` as `--config` does: imports the file and calls `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: config file not found.")
  module_spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
