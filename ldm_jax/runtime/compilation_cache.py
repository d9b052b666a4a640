"""A persistent XLA compilation cache for the command-line entry points.

Compiling is a large part of a CPU run (a U-Net training step of the benchmark's shape: ~30 s) and
is the same every time a run is resumed, sampled again or evaluated again. `enable()`, called by
`ldm_jax.runtime.cli.run` before any entry point's main, points JAX's persistent compilation cache
at a directory shared by all runs, so a program compiled once is loaded afterwards:

  LDM_JAX_COMPILATION_CACHE unset   $XDG_CACHE_HOME/ldm_jax/jax (default ~/.cache/ldm_jax/jax)
  LDM_JAX_COMPILATION_CACHE=DIR     DIR (e.g. a shared filesystem on a cluster)
  LDM_JAX_COMPILATION_CACHE=off     no cache (also '', '0', 'false', 'none')

A cache directory set through JAX itself (`JAX_COMPILATION_CACHE_DIR`, `jax.config`) is left as it
is. Entries are keyed on the program, the devices and the JAX/XLA versions, so a stale entry is
never used; the directory is bounded (least recently used entries go first).

A multi-process run on CPU devices (gloo collectives) turns the cache off (`agree_across_processes`,
called by `ldm_jax.runtime.distributed.initialize`). There, JAX writes entries from process 0 only
(`jax._src.compiler._cache_write`) and a CPU program's key includes each process's own compile
options, so process 0 loads every program of a resumed run at once while the others compile it
again. The processes then meet a program's first collective that much apart, and gloo gives them
30 s there: the first execution of each program connects a gloo context whose rendezvous waits
gloo's fixed default timeout (XLA sets none, JAX exposes none), and fails with "Gloo context
initialization failed: DEADLINE_EXCEEDED". Compiling on every process costs no wall time: the run
always waited for the slowest process. GPU and TPU runs keep the cache (their collectives are not
gloo's).
"""

from __future__ import annotations

import os

import jax
from absl import logging

ENV = "LDM_JAX_COMPILATION_CACHE"
OFF = ("", "0", "off", "false", "none")
MAX_BYTES = 4 << 30


def default_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "ldm_jax", "jax")


def enable() -> str | None:
  """Turns the persistent compilation cache on (see the module docstring); returns its directory,
  or None when it is off."""
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  value = os.environ.get(ENV)
  if value is not None and value.strip().lower() in OFF:
    return None
  path = os.path.abspath(os.path.expanduser(value.strip())) if value else default_dir()
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return path


def agree_across_processes(process_count: int, platform: str) -> bool:
  """After `jax.distributed.initialize`, before anything compiles: turns the cache off when
  `process_count` processes run on `platform` 'cpu' (see the module docstring); returns whether
  the cache stays on."""
  if process_count > 1 and platform == "cpu" and jax.config.jax_enable_compilation_cache:
    jax.config.update("jax_enable_compilation_cache", False)
    logging.info("Persistent compilation cache off: %d processes on CPU devices compile every program alike, "
                 "so that they reach its first gloo collective together.", process_count)
  return bool(jax.config.jax_enable_compilation_cache)
