"""The C++ CPU kernels (`kernels/*.cc`, called through the XLA FFI): built on first use, cached.

`kernels/attention_cpu.cc` (fused attention for small heads, `fused_attention.py`) and
`kernels/conv_cpu.cc` (3×3 convolutions, `conv.py`) are compiled together into one library with the
system C++ compiler (`$CXX`, else `c++`) for the machine they run on (`-march=native`), into
`$LDM_JAX_KERNEL_CACHE` (default `~/.cache/ldm_jax/kernels`), one file per sources, flags, jax
version and CPU; later processes load that file. Without a compiler `available()` is False and the
callers fall back to XLA, saying why once (`unavailable_reason()`).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import jax

KERNELS = Path(__file__).with_name("kernels")
_SOURCES = (KERNELS / "attention_cpu.cc", KERNELS / "conv_cpu.cc")
_HEADERS = (KERNELS / "parallel.h",)
_TARGETS = {"ldm_fused_attention_forward": "LdmFusedAttentionForward",
            "ldm_fused_attention_backward": "LdmFusedAttentionBackward",
            "ldm_conv3x3": "LdmConv3x3",
            "ldm_conv3x3_weight_grad": "LdmConv3x3WeightGrad"}
_FLAGS = ("-w", "-O3", "-march=native", "-std=gnu++17", "-shared", "-fPIC", "-pthread")
_REGISTERED: list[Path] = []


def _cache_dir() -> Path:
  return Path(os.environ.get("LDM_JAX_KERNEL_CACHE", Path.home() / ".cache" / "ldm_jax" / "kernels"))


def _cpu_signature() -> str:
  """What `-march=native` depends on: the CPU's model and feature flags."""
  try:
    text = Path("/proc/cpuinfo").read_text()
  except OSError:
    return platform.processor() or platform.machine()
  lines = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
  return "\n".join(sorted(set(lines)))


@functools.cache
def _build() -> tuple[ctypes.CDLL | None, str | None]:
  """(the loaded kernel library, None) or (None, why it could not be built)."""
  compiler = os.environ.get("CXX", "c++")
  flags = (*_FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{KERNELS}")
  sources = b"\0".join(path.read_bytes() for path in (*_SOURCES, *_HEADERS))
  key = hashlib.sha256(b"\0".join([sources, compiler.encode(), " ".join(flags).encode(),
                                   jax.__version__.encode(), _cpu_signature().encode()])).hexdigest()[:16]
  library = _cache_dir() / f"ldm_kernels_cpu-{key}.so"
  names = ", ".join(path.name for path in _SOURCES)
  if not library.exists():
    try:
      library.parent.mkdir(parents=True, exist_ok=True)
      with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        built = Path(tmp) / library.name
        result = subprocess.run([compiler, *flags, *map(str, _SOURCES), "-o", str(built)], capture_output=True,
                                text=True, check=False)
        if result.returncode != 0:
          return None, f"{compiler} could not build {names}: {_errors(result.stderr)}"
        os.replace(built, library)  # atomic: concurrent processes each build, one file wins
    except (OSError, subprocess.SubprocessError) as e:
      return None, f"could not build {names} with {compiler!r} into {library.parent}: {e}"
  try:
    lib = ctypes.CDLL(str(library))
  except OSError as e:
    return None, f"could not load {library}: {e}"
  if not _REGISTERED:  # once per process (a rebuilt library would be the same kernels)
    for target, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    _REGISTERED.append(library)
  return lib, None


def _errors(stderr: str) -> str:
  lines = [line for line in stderr.splitlines() if "error" in line]
  return "\n".join(lines[:10]) or stderr.strip()[-2000:]


def unavailable_reason() -> str | None:
  """None if the kernels run here, else why not."""
  if platform.machine() not in ("x86_64", "AMD64", "aarch64", "arm64"):
    return f"the CPU kernels are built for x86_64/aarch64, not {platform.machine()}"
  return _build()[1]


def available() -> bool:
  return unavailable_reason() is None
