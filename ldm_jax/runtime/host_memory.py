"""Keep freed host memory in the process (glibc malloc), so that XLA's CPU buffers are not faulted in anew.

glibc's malloc serves every request above its mmap threshold (at most 32 MiB) with a fresh `mmap` and
returns it with `munmap` when freed. XLA's CPU runtime allocates its buffers per execution, so each
call of a jitted function pays a page fault per 4 KiB of every large buffer it writes: a
[16384, 64] × [64, 512] matmul took 24 ms, 6.7 ms with the memory kept; an elementwise op with a
32 MiB output 15 ms against 2.7 ms (batch-16 U-Net shapes, AVX2 machine, QUIET, min of 11).
`keep_freed_memory()` has malloc serve large requests from its heap and keep what is freed there
(`mallopt(M_MMAP_MAX, 0)`, `mallopt(M_TRIM_THRESHOLD, 2 GiB)`): the same pages are reused by the
next call. The cost is that the process's resident memory stays at its peak instead of shrinking
after it.

It also has JAX run jitted calls on the thread that makes them (`jax_cpu_enable_async_dispatch`
off, as JAX did before 2024), when the CPU backend is not yet up. With asynchronous dispatch XLA runs
a call on a thread of its own, whose malloc arena has heaps of at most 64 MiB, and glibc mmaps a
larger block there whatever M_MMAP_MAX says; XLA allocates a call's temporaries as one block, so the
`benchmarks/vs_diffusers.py` train step (846 MiB of temporaries) faulted ~230,000 pages in anew every
step (0.6–0.8 s of system CPU time per step of ~3 s) and the batch-16 U-Net forward 27,000; on the
calling thread (the main one) they come from the kept heap, and no page is faulted after the first
steps (train step 6–16 % faster, compile unchanged: README, Performance). JAX releases the GIL
during a call, so other Python threads (input pipelines) keep running; what the training loops do
between steps no longer overlaps the step. (Limiting malloc to one arena, `M_ARENA_MAX=1`, removed
the page faults too but made XLA's multi-threaded compiles ~25 % slower.)

`ldm_jax.runtime.cli.run` (every entry point) and `ldm_jax.demo` call it first; a notebook can, before
its first JAX computation.

  LDM_JAX_MALLOC unset or 'keep'   keep freed memory and dispatch synchronously (on Linux with glibc;
                                   elsewhere nothing changes)
  LDM_JAX_MALLOC=system            leave malloc and JAX's dispatch as they are
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform

import jax
from absl import logging
from jax._src import xla_bridge  # backends_are_initialized: jax has no public way to ask

ENV = "LDM_JAX_MALLOC"
CHOICES = ("keep", "system")
# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: the largest, 2 GiB


def on_glibc() -> bool:
  """Whether this process runs on Linux with glibc, whose malloc `keep_freed_memory` configures."""
  return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@functools.cache
def _libc():
  name = ctypes.util.find_library("c")
  return ctypes.CDLL(name) if name else None


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to serve large requests from its heap and keep freed memory, and JAX to run
  CPU calls on the calling thread if its backend is not up yet (see the module docstring). Returns
  whether it set malloc: False with `LDM_JAX_MALLOC=system`, off Linux, without glibc (JAX's
  dispatch is then left as it is too).

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
  done = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
  if not done:
    logging.warning("%s: glibc's mallopt refused the settings; malloc left as it is.", ENV)
    return False
  if not xla_bridge.backends_are_initialized():  # the CPU client reads it when it is created
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  return True
