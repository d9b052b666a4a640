"""The entry points' persistent compilation cache (`ldm_jax.runtime.compilation_cache`): where it
goes, how it is turned off, and that a second process loads what the first compiled."""

import os
import subprocess
import sys

import jax
import pytest

from ldm_jax.runtime import compilation_cache
from tests.conftest import ROOT

# Caches any program (a real one taking > 1 s to compile would slow the test down); JAX logs each hit.
PROGRAM = """
import logging
logging.basicConfig(level=logging.WARNING)
logging.getLogger("jax._src.compiler").setLevel(logging.DEBUG)
import jax, jax.numpy as jnp
from ldm_jax.runtime import compilation_cache
print("DIR", compilation_cache.enable())
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
f = jax.jit(lambda x: jnp.sin(x) @ x.T + 1)
f(jnp.ones((64, 64))).block_until_ready()
"""


def run(env_value, tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ("LDM_JAX_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")}
  env.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  if env_value is not None:
    env["LDM_JAX_COMPILATION_CACHE"] = env_value
  done = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=120,
                        check=True)
  return done.stdout.split("DIR ", 1)[1].split()[0], "Persistent compilation cache hit" in done.stderr


@pytest.mark.parametrize("value, where", [(None, "xdg/ldm_jax/jax"), ("CUSTOM", "custom"), ("off", None)])
def test_cache_directory_from_the_environment_and_a_second_process_reuses_it(value, where, tmp_path):
  value = str(tmp_path / "custom") if value == "CUSTOM" else value
  directory, hit = run(value, tmp_path)
  assert not hit
  if where is None:
    assert directory == "None"
    assert not (tmp_path / "xdg").exists()
    assert run(value, tmp_path) == ("None", False)
    return
  assert directory == str(tmp_path / where)
  assert any(name.startswith("jit_") for name in os.listdir(directory))
  assert run(value, tmp_path) == (directory, True)  # the second process loads what the first compiled


def test_a_multi_process_cpu_run_turns_the_cache_off():
  """Only there: gloo's 30 s at a program's first collective, and entries only process 0 can use
  (`compilation_cache` module docstring); tests/multihost runs two processes."""
  assert jax.config.jax_enable_compilation_cache
  try:
    assert compilation_cache.agree_across_processes(1, "cpu")
    assert compilation_cache.agree_across_processes(2, "gpu") and compilation_cache.agree_across_processes(4, "tpu")
    assert not compilation_cache.agree_across_processes(2, "cpu")
    assert not jax.config.jax_enable_compilation_cache
  finally:
    jax.config.update("jax_enable_compilation_cache", True)
