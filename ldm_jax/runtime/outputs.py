"""Writing into a folder the user names without destroying what is already there.

A writer that puts several entries (files or folders) into a user's folder — `python -m
ldm_jax.convert … --out DIR` — calls `claim(DIR, names, overwrite)` before writing anything and
`record(DIR, names)` once done. An entry it would write that already exists is an error naming
it. With `overwrite`, entries that an earlier ldm_jax writer recorded in `DIR/.ldm_jax_written.json`
are removed first; anything else (a training run, the user's own files) still stops the write.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable

MANIFEST = ".ldm_jax_written.json"


def recorded(directory: str) -> set[str]:
  """The entries of `directory` that ldm_jax wrote (from its manifest; empty without one)."""
  try:
    with open(os.path.join(directory, MANIFEST)) as f:
      return set(json.load(f).get("written", ()))
  except (OSError, ValueError):
    return set()


def claim(directory: str, names: Iterable[str], overwrite: bool) -> None:
  """Makes way for writing `names` (entries directly inside `directory`), or raises naming one
  that is in the way: FileExistsError, an OSError, which the entry points report as one line."""
  existing = [name for name in names if os.path.lexists(os.path.join(directory, name))]
  if not existing:
    return
  path = os.path.join(directory, existing[0])
  if not overwrite:
    raise FileExistsError(f"{path}: already exists and would be replaced; choose another --out, or pass "
                          "--overwrite to replace what an earlier export or import wrote there.")
  ours = recorded(directory)
  foreign = [name for name in existing if name not in ours]
  if foreign:
    raise FileExistsError(f"{os.path.join(directory, foreign[0])}: exists and was not written by ldm_jax (it is "
                          f"not in {MANIFEST}); --overwrite replaces only what ldm_jax wrote: move it away or "
                          "choose another --out.")
  for name in existing:
    path = os.path.join(directory, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)


def record(directory: str, names: Iterable[str]) -> None:
  """Adds `names` to the manifest of what ldm_jax wrote in `directory`."""
  written = sorted(recorded(directory) | set(names))
  with open(os.path.join(directory, MANIFEST), "w") as f:
    json.dump({"written": written}, f, indent=2)
