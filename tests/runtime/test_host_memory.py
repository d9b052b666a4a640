"""LDM_JAX_MALLOC: glibc's malloc keeps freed large blocks in the process, or is left as it is."""

import os
import subprocess
import sys

import pytest

from ldm_jax.runtime import host_memory

# Allocates and frees 256 MiB with numpy (malloc) in the main thread or in a new one (as XLA runs a
# jitted call), then prints the resident MiB before and after.
_PROBE = """
import sys, threading
import numpy as np
from ldm_jax.runtime import host_memory
def rss_mib():
  return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
def allocate_and_free():
  block = np.ones(64 * 2**20, np.float32)
  del block
print(host_memory.keep_freed_memory())
before = rss_mib()
if sys.argv[1] == "thread":
  worker = threading.Thread(target=allocate_and_free)
  worker.start()
  worker.join()
else:
  allocate_and_free()
print(before, rss_mib())
"""

glibc_only = pytest.mark.skipif(not host_memory.on_glibc(), reason="mallopt is glibc's")


def _probe(choice, where):
  env = dict(os.environ, **{host_memory.ENV: choice})
  out = subprocess.run([sys.executable, "-c", _PROBE, where], env=env, capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
  done, sizes = out.stdout.split("\n")[:2]
  before, after = (float(v) for v in sizes.split())
  return done == "True", after - before


@glibc_only
@pytest.mark.parametrize("where", ["main", "thread"])
def test_kept_memory_stays_resident_after_free_and_system_malloc_returns_it(where):
  # In a thread, the block comes from the thread's own arena unless there is only one: glibc mmaps a
  # block larger than such an arena's 64 MiB heaps even when M_MMAP_MAX is 0.
  done, kept = _probe("keep", where)
  assert done and kept > 200, kept  # the 256 MiB block stays in the heap, ready for the next buffer
  done, returned = _probe("system", where)
  assert not done and returned < 50, returned  # glibc's default munmaps it


def test_a_bad_value_names_the_variable(monkeypatch):
  monkeypatch.setenv(host_memory.ENV, "fast")
  with pytest.raises(ValueError, match=r"LDM_JAX_MALLOC: 'fast' is not one of keep, system"):
    host_memory.keep_freed_memory()
