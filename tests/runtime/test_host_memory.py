"""LDM_JAX_MALLOC: glibc's malloc keeps freed large blocks in the process, or is left as it is."""

import os
import subprocess
import sys

import pytest

from ldm_jax.runtime import host_memory

# Allocates and frees 256 MiB with numpy (malloc), then prints the resident MiB before and after.
_PROBE = """
import numpy as np
from ldm_jax.runtime import host_memory
def rss_mib():
  return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
print(host_memory.keep_freed_memory())
before = rss_mib()
block = np.ones(64 * 2**20, np.float32)
del block
print(before, rss_mib())
"""

glibc_only = pytest.mark.skipif(not host_memory.on_glibc(), reason="mallopt is glibc's")


def _run(source, choice):
  """The first two lines a Python subprocess running `source` prints, with LDM_JAX_MALLOC=choice."""
  env = dict(os.environ, **{host_memory.ENV: choice})
  out = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  return out.stdout.split("\n")[:2]


def _probe(choice):
  done, sizes = _run(_PROBE, choice)
  before, after = (float(v) for v in sizes.split())
  return done == "True", after - before


@glibc_only
def test_kept_memory_stays_resident_after_free_and_system_malloc_returns_it():
  done, kept = _probe("keep")
  assert done and kept > 200, kept  # the 256 MiB block stays in the heap, ready for the next buffer
  done, returned = _probe("system")
  assert not done and returned < 50, returned  # glibc's default munmaps it


# A jitted call with a 128 MiB temporary (the [8192, 4096] product): the fewest page faults of its
# third to sixth calls.
_CALL_PROBE = """
import resource
import jax, jax.numpy as jnp
from ldm_jax.runtime import host_memory
print(host_memory.keep_freed_memory(), jax.config.read("jax_cpu_enable_async_dispatch"))
f = jax.jit(lambda a, b: jnp.sum(a @ b) + jnp.max(a @ b))
a, b = jnp.ones((8192, 64)), jnp.ones((64, 4096))
for _ in range(2):
  f(a, b).block_until_ready()
faults = []
for _ in range(4):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(a, b).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults))
"""


@glibc_only
def test_a_jitted_calls_large_temporaries_are_not_faulted_in_again():
  # With asynchronous dispatch XLA runs the call on a thread whose malloc arena mmaps blocks over
  # 64 MiB (and munmaps them when freed) even with M_MMAP_MAX = 0: 32,768 faults on every call.
  settings, faults = _run(_CALL_PROBE, "keep")
  assert settings == "True False"
  assert int(faults) < 3000, faults  # the temporaries reuse the kept heap


def test_a_bad_value_names_the_variable(monkeypatch):
  monkeypatch.setenv(host_memory.ENV, "fast")
  with pytest.raises(ValueError, match=r"LDM_JAX_MALLOC: 'fast' is not one of keep, system"):
    host_memory.keep_freed_memory()
