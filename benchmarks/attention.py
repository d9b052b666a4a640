"""The attention core alone: time and memory of each implementation per sequence length.

  .venv/bin/python benchmarks/attention.py                                   # SD-shaped self-attention
  .venv/bin/python benchmarks/attention.py --tokens 1024,4096 --heads 8 --head_dim 8 --batch 8 --grad

For q, k, v of [batch, tokens, heads, head_dim] it prints, per implementation that runs on this
backend: the forward time (min / median over --repeats, after a warm-up; with --grad forward and
backward), and XLA's compiled temporary memory (`memory_analysis().temp_size_in_bytes`), which
shows how memory grows with the tokens: quadratically for 'xla' (the [B, H, L, L] logits),
linearly for 'blocked'. --tokens 4096 with 8 heads of 40 is SD 1.x's 64×64 level (512 px).
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ldm_jax.nn import attention  # noqa: E402

_TOKENS = flags.DEFINE_list("tokens", ["1024", "4096"], "Sequence lengths (self-attention).")
_BATCH = flags.DEFINE_integer("batch", 2, "Batch (2 = one image with classifier-free guidance).")
_HEADS = flags.DEFINE_integer("heads", 8, "Heads.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 40, "Channels per head.")
_IMPLS = flags.DEFINE_list("implementations", ["xla", "blocked", "fused"], "Implementations to compare.")
_GRAD = flags.DEFINE_bool("grad", False, "Time forward + backward instead of the forward.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repetitions.")
_TIME_LIMIT = flags.DEFINE_integer("max_time_tokens", 8192, "Above this length only memory is reported.")


def main(argv):
  del argv
  print(f"batch {_BATCH.value}, {_HEADS.value} heads of {_HEAD_DIM.value}, {'forward+backward' if _GRAD.value else 'forward'}"
        f", {jax.devices()[0].platform}")
  print(f"{'tokens':>8s}{'implementation':>16s}{'min s':>10s}{'median s':>10s}{'temp MiB':>11s}")
  rng = np.random.default_rng(0)
  for tokens in map(int, _TOKENS.value):
    shape = (_BATCH.value, tokens, _HEADS.value, _HEAD_DIM.value)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(3))
    for impl in _IMPLS.value:
      ran = attention.select_implementation(impl, backend=jax.default_backend(), batch=shape[0], heads=shape[2],
                                            q_len=tokens, k_len=tokens, head_dim=shape[3], dtype=q.dtype,
                                            has_mask=False)
      label = impl if ran == impl else f"{impl}->{ran}"  # 'fused' for heads it does not cover runs 'blocked'
      fn = lambda q, k, v, impl=impl: attention.dot_product_attention(q, k, v, implementation=impl)
      if _GRAD.value:
        fn = jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) ** 2), argnums=(0, 1, 2))
      compiled = jax.jit(fn).lower(q, k, v).compile()
      temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
      times = [float("nan")]
      if tokens <= _TIME_LIMIT.value:
        jax.block_until_ready(compiled(q, k, v))
        times = []
        for _ in range(_REPEATS.value):
          t0 = time.perf_counter()
          jax.block_until_ready(compiled(q, k, v))
          times.append(time.perf_counter() - t0)
      print(f"{tokens:8d}{label:>16s}{min(times):10.4f}{np.median(times):10.4f}{temp:11.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
