"""PyTorch state dicts ↔ flax parameter trees, for models whose flax paths mirror the torch names.

ldm_jax models name their submodules as diffusers/transformers do, with `_N` where torch has
`.N` (a list index), so a torch key maps to a flax path by one rule:

    down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj.weight
    down_blocks_0/attentions_1/transformer_blocks_0/ff/net_0/proj/kernel

and the tensor by its layer kind, read off the flax tree the model expects:

    Dense  kernel [in, out]          = weight [out, in]ᵀ
    Conv   kernel [kh, kw, in, out]  = weight [out, in, kh, kw] transposed (2, 3, 1, 0)
    Norm   scale, bias               = weight, bias   (also the old `gamma`, `beta`)
    Embed  embedding [n, d]          = weight [n, d]
    a raw parameter (VQ `quantize/embedding`)  = the tensor of the same path + `.weight`

A 1×1 convolution and a Dense layer hold the same matrix, so either torch layout loads into
either flax layer (CompVis stores attention projections as 1×1 convs, diffusers as linears).
Both directions check everything against the model: missing, unexpected and mis-shaped tensors
are collected and reported in one `WeightMismatchError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import jax
import numpy as np

_INDEXED = re.compile(r"^(.+)_(\d+)$")
# Torch module names that end in `_<digits>` themselves rather than being a list index.
LITERAL_NAMES = frozenset({"linear_1", "linear_2"})
_LIST_LIMIT = 25


class WeightMismatchError(ValueError):
  """The weights of a file and the parameters of a model do not correspond; lists every difference."""

  def __init__(self, what: str, missing=(), unexpected=(), misshaped=()):
    self.missing, self.unexpected, self.misshaped = list(missing), list(unexpected), list(misshaped)
    parts = [f"{what}: the weights do not fit the model ({len(self.missing)} missing, "
             f"{len(self.unexpected)} unexpected, {len(self.misshaped)} mis-shaped)."]
    for title, items in (("missing (the model needs them, the file lacks them)", self.missing),
                         ("unexpected (in the file, not in the model)", self.unexpected),
                         ("mis-shaped", self.misshaped)):
      if items:
        shown = "\n    ".join(items[:_LIST_LIMIT])
        more = f"\n    … and {len(items) - _LIST_LIMIT} more" if len(items) > _LIST_LIMIT else ""
        parts.append(f"  {title}:\n    {shown}{more}")
    super().__init__("\n".join(parts))


def torch_module_to_flax(name: str) -> str:
  """'down_blocks.0.attentions.1' → 'down_blocks_0/attentions_1' (numeric parts join their parent)."""
  out: list[str] = []
  for part in name.split("."):
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  return "/".join(out)


def flax_module_to_torch(path: str, literal: Iterable[str] = LITERAL_NAMES) -> str:
  """'down_blocks_0/attentions_1' → 'down_blocks.0.attentions.1'; names in `literal` are kept."""
  literal = frozenset(literal)
  out = []
  for part in path.split("/"):
    match = _INDEXED.match(part)
    out.append(f"{match.group(1)}.{match.group(2)}" if match and part not in literal else part)
  return ".".join(out)


def _shape_tree(expected) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{'a/b/kernel': (shape, dtype)} of a tree of arrays or ShapeDtypeStructs."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
    key = "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)
    flat[key] = (tuple(leaf.shape), np.dtype(leaf.dtype))
  return flat


def _fmt(shape) -> str:
  return "[" + ", ".join(map(str, shape)) + "]"


def _to_flax_layout(tensor: np.ndarray, leaf: str, target_shape: tuple[int, ...]) -> np.ndarray:
  if leaf != "kernel":
    return tensor
  if len(target_shape) == 2 and tensor.ndim == 4 and tensor.shape[2:] == (1, 1):
    tensor = tensor[:, :, 0, 0]  # 1×1 conv → Dense
  elif len(target_shape) == 4 and tensor.ndim == 2 and target_shape[:2] == (1, 1):
    tensor = tensor[:, :, None, None]  # Linear → 1×1 conv
  if tensor.ndim == 2:
    return tensor.T
  if tensor.ndim == 4:
    return tensor.transpose(2, 3, 1, 0)
  return tensor


def torch_to_flax(state: Mapping[str, np.ndarray], expected, *, what: str,
                  rename: Callable[[str], str | None] | None = None, dtype=np.float32) -> dict:
  """Builds the flax parameter tree `expected` describes from a torch state dict.

  Args:
    state: torch key → array (torch layout).
    expected: the model's parameter tree (arrays or ShapeDtypeStructs, e.g. from `jax.eval_shape`).
    what: names the source in errors ('diffusers AutoencoderKL in vae/').
    rename: maps a torch key to the torch-style key of the model ('model.diffusion_model.x' →
      'x'), or to None to skip a tensor the model does not use (buffers, EMA copies, losses).
    dtype: dtype of the returned arrays (the model's parameters are float32).

  Returns:
    A nested dict of numpy arrays with exactly the paths and shapes of `expected`.

  Raises:
    WeightMismatchError listing every missing, unexpected and mis-shaped tensor.
  """
  shapes = _shape_tree(expected)
  modules: dict[str, set[str]] = {}
  for path in shapes:
    module, _, leaf = path.rpartition("/")
    modules.setdefault(module, set()).add(leaf)

  flat, claimed, unexpected, misshaped = {}, set(), [], []
  for key, tensor in state.items():
    torch_key = rename(key) if rename else key
    if torch_key is None:
      continue
    module_name, _, leaf_name = torch_key.rpartition(".")
    module = torch_module_to_flax(module_name)
    target = None
    if leaf_name in ("weight", "gamma"):
      if module in shapes:  # a raw parameter: the module path is the parameter itself
        target = module
      else:
        leaf = next((n for n in ("kernel", "scale", "embedding") if n in modules.get(module, ())), None)
        target = f"{module}/{leaf}" if leaf else None
    elif leaf_name in ("bias", "beta"):
      target = f"{module}/bias" if "bias" in modules.get(module, ()) else None
    if target is None:
      unexpected.append(f"{key} {_fmt(np.shape(tensor))}")
      continue
    shape, _ = shapes[target]
    value = _to_flax_layout(np.asarray(tensor), target.rpartition("/")[2], shape)
    if tuple(value.shape) != shape:
      claimed.add(target)
      misshaped.append(f"{key} {_fmt(np.shape(tensor))} → {target}: the model needs {_fmt(shape)}")
      continue
    if target in flat:
      unexpected.append(f"{key} {_fmt(np.shape(tensor))} (a second tensor for {target})")
      continue
    flat[target] = np.asarray(value, dtype)
  missing = [f"{path} {_fmt(shape)}" for path, (shape, _) in shapes.items()
             if path not in flat and path not in claimed]
  if missing or unexpected or misshaped:
    raise WeightMismatchError(what, missing, unexpected, misshaped)
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def check_params(params, expected, *, what: str, dtype=np.float32) -> dict:
  """`params` (flax names already) as `dtype` arrays, if they fill exactly the tree `expected` describes.

  Raises:
    WeightMismatchError listing every missing, unexpected and mis-shaped parameter.
  """
  shapes, given = _shape_tree(expected), _shape_tree(params)
  missing = [f"{k} {_fmt(s)}" for k, (s, _) in shapes.items() if k not in given]
  unexpected = [f"{k} {_fmt(s)}" for k, (s, _) in given.items() if k not in shapes]
  misshaped = [f"{k} {_fmt(s)}: the model needs {_fmt(shapes[k][0])}" for k, (s, _) in given.items()
               if k in shapes and s != shapes[k][0]]
  if missing or unexpected or misshaped:
    raise WeightMismatchError(what, missing, unexpected, misshaped)
  return jax.tree.map(lambda x: np.asarray(x, dtype), params)


def flax_to_torch(params, *, prefix: str = "", overrides: Mapping[str, str] | None = None,
                  literal: Iterable[str] = LITERAL_NAMES, dtype=np.float32) -> dict[str, np.ndarray]:
  """The torch state dict of a flax parameter tree (the inverse of `torch_to_flax`).

  Args:
    params: nested dict of arrays, flax layout.
    prefix: prepended to every torch key ('text_model.').
    overrides: flax path → torch key for paths the rule does not cover
      ({'quantize/embedding': 'quantize.embedding.weight'}).
    literal: torch module names that end in `_<digits>` themselves.
    dtype: dtype of the returned arrays.
  """
  overrides = dict(overrides or {})
  out = {}
  for path, (shape, _) in _shape_tree(params).items():
    value = np.asarray(_get(params, path), dtype)
    if path in overrides:
      out[overrides[path]] = value
      continue
    module, _, leaf = path.rpartition("/")
    name = prefix + flax_module_to_torch(module, literal)
    if leaf == "kernel":
      value = value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)
      out[f"{name}.weight"] = np.ascontiguousarray(value)
    elif leaf in ("scale", "embedding"):
      out[f"{name}.weight"] = value
    elif leaf == "bias":
      out[f"{name}.bias"] = value
    else:
      raise ValueError(f"flax_to_torch: no torch name for parameter {path} {_fmt(shape)}; add an override.")
  return out


def _get(tree, path: str):
  for part in path.split("/"):
    tree = tree[part]
  return tree
