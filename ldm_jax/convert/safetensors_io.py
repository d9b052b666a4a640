"""Reading and writing weight files: safetensors (any dtype, sharded or not) and, on request, torch pickles.

`read_safetensors` parses the format itself (an 8-byte header length, a JSON header, raw
little-endian tensors) and memory-maps the file, so neither torch nor a device is needed and
bfloat16 tensors (which `safetensors.numpy` cannot read) come back as `ml_dtypes.bfloat16`.
A `*.safetensors.index.json` (diffusers' and transformers' sharded layout) is read as the union of
its shards. Torch pickles (`.ckpt`, `.pt`, `.bin`) are read only through
`torch.load(weights_only=True)`, which refuses arbitrary objects, and only when torch is installed.

Flax parameter trees are flattened to '/'-joined keys ('encoder/conv_in/kernel') for the
safetensors files of a pretrained directory (`flatten_params` / `unflatten_params`).
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from collections.abc import Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
SAFETENSORS_SUFFIXES = (".safetensors", ".safetensors.index.json")
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of a `.safetensors` file, or of the shards a `.safetensors.index.json` names.

  Arrays are read-only views of a memory map (copy before writing into them); the file's
  metadata is dropped (`read_safetensors_metadata` returns it).
  """
  if path.endswith(".index.json"):
    with open(path) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    out = {}
    for shard in shards:
      out.update(read_safetensors(os.path.join(os.path.dirname(path), shard)))
    return out
  header, offset = _header(path)
  size = os.path.getsize(path) - offset
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset) if size > 0 else None
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, which ldm_jax cannot read "
                       f"(known: {', '.join(_DTYPES)}).")
    start, end = info["data_offsets"]
    dtype = np.dtype(_DTYPES[info["dtype"]])
    expected = int(np.prod(info["shape"])) * dtype.itemsize
    if not 0 <= start <= end <= size or end - start != expected:
      raise ValueError(f"{path}: tensor {name} claims bytes [{start}, {end}) of a {size}-byte data section for "
                       f"{expected} bytes of {info['dtype']} {info['shape']}; the file is truncated or damaged.")
    raw = data[start:end] if end > start else np.zeros((0,), np.uint8)
    out[name] = raw.view(dtype).reshape(info["shape"])
  return out


def read_safetensors_metadata(path: str) -> dict[str, str]:
  """The `__metadata__` strings of a safetensors file ({} when it has none)."""
  return dict(_header(path)[0].get("__metadata__") or {})


def _header(path: str) -> tuple[dict, int]:
  with open(path, "rb") as f:
    prefix = f.read(8)
    if len(prefix) < 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length).")
    (length,) = struct.unpack("<Q", prefix)
    if length > os.path.getsize(path) - 8:
      raise ValueError(f"{path}: not a safetensors file (header length {length} exceeds the file).")
    try:
      header = json.loads(f.read(length))
    except ValueError as e:
      raise ValueError(f"{path}: not a safetensors file (unreadable header: {e}).") from e
  return header, 8 + length


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
  """Writes `tensors` (numpy or jax arrays) to `path`, keys sorted, with string `metadata`.

  diffusers and transformers expect `metadata={'format': 'pt'}` on the files they load.
  """
  entries, offset = {}, 0
  arrays = {}
  for name in sorted(tensors):
    array = np.asarray(tensors[name])
    array = np.ascontiguousarray(array).reshape(array.shape)  # ascontiguousarray makes a 0-d array [1]
    if array.dtype not in _NAMES:
      raise ValueError(f"{path}: tensor {name} has dtype {array.dtype}, which safetensors cannot store.")
    arrays[name] = array
    entries[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                     "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
  if metadata:
    entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  header = json.dumps(entries, separators=(",", ":")).encode()
  header += b" " * (-len(header) % 8)  # the format aligns the data to 8 bytes
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(header)))
    f.write(header)
    for array in arrays.values():
      f.write(array.tobytes())


def read_torch_checkpoint(path: str) -> dict[str, np.ndarray]:
  """Tensors of a torch pickle through `torch.load(weights_only=True)` (needs torch).

  A CompVis/Stability `.ckpt` keeps its tensors under 'state_dict'; that level is unwrapped.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"{path}: reading a torch pickle needs PyTorch (pip install torch); convert it to "
                     ".safetensors elsewhere, or install torch.") from e
  try:
    with warnings.catch_warnings():  # torch warns about pickle protocols before it refuses a file
      warnings.simplefilter("ignore")
      obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    # torch's message goes on to suggest weights_only=False, which is what must not happen here.
    reason = str(e).partition("WeightsUnpickler error: ")[2].split(". ")[0] or type(e).__name__
    raise ValueError(f"{path}: torch.load(weights_only=True) refused it ({reason}); ldm_jax does not unpickle "
                     "arbitrary objects. Convert it to .safetensors with a tool you trust.") from e
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path}: expected a mapping of tensors (a state dict), got {type(obj).__name__}.")
  out = {}
  for name, value in obj.items():
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      out[name] = (value.float().numpy().astype(ml_dtypes.bfloat16) if value.dtype == torch.bfloat16
                   else value.numpy())
  return out


def read_weights(path: str) -> dict[str, np.ndarray]:
  """Tensors of a weight file: safetensors (or its index), else a torch pickle (see above)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such weight file.")
  if path.endswith(SAFETENSORS_SUFFIXES):
    return read_safetensors(path)
  if path.endswith(TORCH_SUFFIXES):
    return read_torch_checkpoint(path)
  raise ValueError(f"{path}: unknown weight file type; expected one of "
                   f"{', '.join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)}.")


def flatten_params(params: Mapping) -> dict[str, np.ndarray]:
  """{'a': {'b': x}} → {'a/b': np.asarray(x)} (host copies, for writing)."""
  out = {}

  def visit(prefix, node):
    if isinstance(node, Mapping):
      for key, value in node.items():
        visit(f"{prefix}/{key}" if prefix else str(key), value)
    else:
      out[prefix] = np.asarray(node)

  visit("", params)
  return out


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict:
  """{'a/b': x} → {'a': {'b': x}}; the inverse of `flatten_params`."""
  out: dict = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return out
