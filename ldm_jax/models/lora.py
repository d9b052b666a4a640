"""LoRA (Hu et al. 2021) as a transformation of a model's parameter tree: W' = W + s·(α/r)·B·A.

An adapter set of one model is a plain nested dict that mirrors the model's parameters: where the
model has a module with a `kernel` W, the adapter has `{'down': A, 'up': B}` in flax layout,

    Dense  W [in, out]           down A [in, r]           up B [r, out]
    Conv   W [kh, kw, in, out]   down A [kh, kw, in, r]   up B [r, out]   (A is a conv, B a 1×1 conv)

and the update is ΔW = A·B contracted over r (`jnp.tensordot(A, B, 1)`), the transpose of PEFT's and
kohya's B·A in torch layout. B starts at zero, so a fresh adapter leaves the model unchanged.

Why a function of the weights rather than LoRA layers inside the modules. `apply_lora(params,
adapters, scales)` returns the merged tree, and everything else stays as it is:
  * training differentiates `loss(apply_lora(base, [lora], [α/r]))` with respect to `lora` only: the
    optimizer state holds only the adapters, and the frozen `base` is an input the step never
    writes, so it stays bit-identical;
  * sampling applies several adapters with their scales (traced values: a new scale does not
    recompile); merging and unmerging are the same function with +s and −s;
  * the modules, the converters and the checkpoints keep one parameter layout.
The cost is one r-rank product per adapted kernel per step (for SD 1.x's attention projections,
r=4: ~4·(320…1280)² multiply-adds per kernel, against ~10⁹ per U-Net evaluation), and the merged
kernels exist as temporaries inside the jitted function.

What it cannot do: PEFT's `lora_dropout` drops the adapter's input activations, B·A·dropout(x), which
is no function of the weights alone; `ldm_jax.config.lora.check_lora_config` rejects dropout > 0.

The adapters carry no α: an adapter set means ΔW = A·B (PEFT's convention for files without α,
scale 1). A training config's α/r is the scale a trainer passes to `apply_lora`, and
`ldm_jax.convert.lora.save_lora` multiplies it into B; files with α (kohya, PEFT metadata) are read
with α/r multiplied into B.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

Adapter = dict  # nested like the model's parameters: {…: {module: {'down': A, 'up': B}}}


def _flat(tree) -> dict[str, jax.Array]:
  return flax.traverse_util.flatten_dict(tree, sep="/") if tree else {}


def _nest(flat: Mapping[str, jax.Array]) -> dict:
  return flax.traverse_util.unflatten_dict(dict(flat), sep="/")


def adapted_modules(adapter: Adapter) -> list[str]:
  """The module paths an adapter set changes ('down_blocks_0/…/attn1/to_q'), sorted."""
  return sorted({path.rpartition("/")[0] for path in _flat(adapter)})


def select_targets(params, patterns: Sequence[str], *, key: str = "lora.unet_targets") -> list[str]:
  """Module paths of `params` whose `kernel` a LoRA can adapt and that a pattern matches in full.

  Args:
    params: the model's parameter tree (arrays or ShapeDtypeStructs).
    patterns: regexes over module paths (`ldm_jax.config.lora.target_patterns` resolves presets).
    key: the config key named in errors.

  Raises:
    ValueError naming `key` when a pattern matches no module with a 2-D or 4-D kernel.
  """
  modules = sorted(path.rpartition("/")[0] for path, leaf in _flat(params).items()
                   if path.endswith("/kernel") and np.ndim(leaf) in (2, 4))
  chosen = set()
  for pattern in patterns:
    hits = [m for m in modules if re.fullmatch(pattern, m)]
    if not hits:
      shown = ", ".join(modules[:4]) + (", …" if len(modules) > 4 else "")
      raise ValueError(f"{key}: {pattern!r} matches no module with a kernel (paths look like {shown}).")
    chosen.update(hits)
  return sorted(chosen)


def init_lora(rng: jax.Array, params, targets: Sequence[str], rank: int) -> Adapter:
  """Fresh adapters for the modules `targets` of `params`: A as PEFT initialises it, B = 0.

  A is drawn from PEFT's default (torch's Kaiming-uniform with a = √5: U(±1/√fan_in), fan_in =
  in·kh·kw), in float32 whatever the kernels' dtype.
  """
  flat = _flat(params)
  out = {}
  for i, module in enumerate(sorted(targets)):
    kernel = flat.get(f"{module}/kernel")
    if kernel is None or np.ndim(kernel) not in (2, 4):
      raise ValueError(f"init_lora: {module} has no Dense or Conv kernel to adapt.")
    *fan, out_features = np.shape(kernel)
    bound = 1.0 / np.sqrt(np.prod(fan))
    out[f"{module}/down"] = jax.random.uniform(jax.random.fold_in(rng, i), (*fan, rank), jnp.float32,
                                               -bound, bound)
    out[f"{module}/up"] = jnp.zeros((rank, out_features), jnp.float32)
  return _nest(out)


def lora_delta(down: jax.Array, up: jax.Array) -> jax.Array:
  """ΔW = A·B: down [in, r] or [kh, kw, in, r], up [r, out] → [in, out] or [kh, kw, in, out] (float32)."""
  return jnp.tensordot(down.astype(jnp.float32), up.astype(jnp.float32), axes=1)


def apply_lora(params, adapters: Sequence[Adapter], scales: Sequence[float] | jax.Array | None = None):
  """W + Σᵢ sᵢ·Aᵢ·Bᵢ for every adapted kernel; every other leaf of `params` is returned as is.

  Args:
    params: the model's parameter tree (the frozen base).
    adapters: adapter sets of this model (`init_lora`, `ldm_jax.convert.lora.read_lora`).
    scales: one factor per adapter (floats or a traced array; default 1.0 each) — a training run's
      α/r, a user's `--lora FILE:SCALE`.

  Returns:
    A new tree with the structure, shapes and dtypes of `params`; the deltas are summed in float32
    and added once, so B = 0 returns every kernel bit for bit.
  """
  if scales is None:
    scales = [1.0] * len(adapters)
  if len(scales) != len(adapters):
    raise ValueError(f"apply_lora: {len(adapters)} adapters but {len(scales)} scales.")
  flat = _flat(params)
  deltas: dict[str, jax.Array] = {}
  for i, adapter in enumerate(adapters):
    pieces = _flat(adapter)
    for module in adapted_modules(adapter):
      name = f"{module}/kernel"
      if name not in flat:
        raise ValueError(f"apply_lora: adapter {i} changes {module}, which has no kernel in the parameters.")
      delta = scales[i] * lora_delta(pieces[f"{module}/down"], pieces[f"{module}/up"])
      deltas[name] = deltas[name] + delta if name in deltas else delta
  for name, delta in deltas.items():
    kernel = flat[name]
    if delta.shape != kernel.shape:
      raise ValueError(f"apply_lora: the update of {name} is {list(delta.shape)}, the kernel {list(kernel.shape)}.")
    flat[name] = (kernel + delta).astype(kernel.dtype)
  return _nest(flat)


def merge_lora(params, adapters: Sequence[Adapter], scales: Sequence[float] | None = None):
  """The weights with the adapters merged in (`apply_lora`, named for the command that writes them)."""
  return apply_lora(params, adapters, scales)


def unmerge_lora(params, adapters: Sequence[Adapter], scales: Sequence[float] | None = None):
  """The inverse of `merge_lora` up to float rounding: W − Σᵢ sᵢ·Aᵢ·Bᵢ."""
  scales = [1.0] * len(adapters) if scales is None else scales
  return apply_lora(params, adapters, [-s for s in scales])


def count_parameters(adapter: Adapter) -> int:
  """Trainable numbers in an adapter set."""
  return int(sum(np.size(x) for x in jax.tree.leaves(adapter)))
