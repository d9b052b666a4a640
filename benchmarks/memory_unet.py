"""Memory of a Stable Diffusion 1.x U-Net forward per latent size and attention implementation.

  .venv/bin/python benchmarks/memory_unet.py                          # 32×32, 64×64 and 96×96 latents
  .venv/bin/python benchmarks/memory_unet.py --latents 64 --batch 2 --implementations xla,blocked

The U-Net has SD 1.x's published shape (860M parameters, 4 latent channels, context [B, 77, 768]);
its parameters are abstract, so nothing runs: the forward is lowered and compiled for the CPU and
XLA's `memory_analysis()` gives the temporaries (activations and attention logits) and the peak
(parameters + inputs + outputs + temporaries). A 64×64 latent is a 512 px image: its first level
has 4096 tokens and 8 heads, so the [B, 8, 4096, 4096] float32 logits of plain attention are
512 MiB per image; `blocked` keeps ~2 MiB of them at a time, and memory grows linearly in tokens.
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ldm_jax.config.sections import default_unet_config  # noqa: E402
from ldm_jax.models import unet as unet_lib  # noqa: E402

_LATENTS = flags.DEFINE_list("latents", ["32", "64", "96"], "Latent sizes (side, in latent pixels).")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch (2 = one image with classifier-free guidance).")
_IMPLS = flags.DEFINE_list("implementations", ["xla", "blocked"], "Attention implementations to compare.")
MIB = 2**20


def main(argv):
  del argv
  print(f"SD 1.x U-Net forward, batch {_BATCH.value}, float32, {jax.devices()[0].platform} compiler")
  print(f"{'latent':>8s}{'tokens':>8s}{'implementation':>16s}{'temp MiB':>11s}{'peak MiB':>11s}{'compile s':>11s}")
  cfg = default_unet_config()
  for side in map(int, _LATENTS.value):
    b = _BATCH.value
    x = jax.ShapeDtypeStruct((b, side, side, cfg.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((b,), jnp.int32)
    context = jax.ShapeDtypeStruct((b, 77, cfg.context_dim), jnp.float32)
    for impl in _IMPLS.value:
      cfg.attention = impl
      model = unet_lib.make_unet(cfg)
      params = jax.eval_shape(model.init, jax.random.key(0), x, t, context)
      t0 = time.perf_counter()
      compiled = jax.jit(model.apply).lower(params, x, t, context).compile()
      m = compiled.memory_analysis()
      peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
      print(f"{side:8d}{side * side:8d}{impl:>16s}{m.temp_size_in_bytes / MIB:11.0f}{peak / MIB:11.0f}"
            f"{time.perf_counter() - t0:11.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
