"""Keep freed host memory in the process (glibc malloc), so that XLA's CPU buffers are not faulted in anew.

glibc's malloc serves every request above its mmap threshold (at most 32 MiB) with a fresh `mmap` and
returns it with `munmap` when freed. XLA's CPU runtime allocates its buffers per execution, so each
call of a jitted function pays a page fault per 4 KiB of every large buffer it writes: a
[16384, 64] × [64, 512] matmul took 24 ms, 6.7 ms with the memory kept; an elementwise op with a
32 MiB output 15 ms against 2.7 ms (batch-16 U-Net shapes, AVX2 machine, QUIET, min of 11).
`keep_freed_memory()` has malloc serve large requests from its heap and keep what is freed there
(`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, 2 GiB)`): the same pages are reused by the
next call. It also has every thread allocate from that one heap (`mallopt(M_ARENA_MAX, 1)`): a thread
other than the main one otherwise gets an arena of its own, whose heaps are at most 64 MiB, and glibc
mmaps a larger block there whatever M_MMAP_MAX says — XLA runs a jitted call on such a thread and
allocates its temporaries as one block, so a train step with 846 MiB of them faulted 226,000 pages
in anew every step (0.6–0.8 s of system CPU time per step of ~3 s, AVX2 machine), none with one
arena (whose peak resident memory was also 3–8 % lower). Threads that allocated before the call keep
their arenas, so call it before JAX computes anything. The cost is that the process's resident
memory stays at its peak instead of shrinking after it. `ldm_jax.runtime.cli.run` (every entry
point) and `ldm_jax.demo` call it; a notebook can.

  LDM_JAX_MALLOC unset or 'keep'   keep freed memory (on Linux with glibc; elsewhere nothing changes)
  LDM_JAX_MALLOC=system            leave malloc as it is
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

from absl import logging

ENV = "LDM_JAX_MALLOC"
CHOICES = ("keep", "system")
# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest, 2 GiB


def on_glibc() -> bool:
  """Whether this process runs on Linux with glibc, whose malloc `keep_freed_memory` configures."""
  return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@functools.cache
def _libc():
  name = ctypes.util.find_library("c")
  return ctypes.CDLL(name) if name else None


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to serve large requests from its heap and keep freed memory (see the module
  docstring). Returns whether it did: False with `LDM_JAX_MALLOC=system`, off Linux, without glibc.

  Raises:
    ValueError naming LDM_JAX_MALLOC when it is set to something else than 'keep' or 'system'.
  """
  choice = os.environ.get(ENV, "keep").strip().lower() or "keep"
  if choice not in CHOICES:
    raise ValueError(f"{ENV}: {os.environ[ENV]!r} is not one of {', '.join(CHOICES)}.")
  if choice == "system" or not on_glibc():
    return False
  libc = _libc()
  if libc is None or not hasattr(libc, "mallopt"):
    return False
  done = all(libc.mallopt(param, value) for param, value in
             ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_ARENA_MAX, 1)))
  if not done:
    logging.warning("%s: glibc's mallopt refused the settings; malloc left as it is.", ENV)
  return done
