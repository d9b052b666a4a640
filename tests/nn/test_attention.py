"""The shared attention: every implementation that runs here == a naive numpy softmax attention,
outputs and gradients; the automatic choice per backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.nn import AttentionConfig, MultiHeadSelfAttention, SpatialSelfAttention, dot_product_attention
from ldm_jax.nn import attention as attention_lib
from ldm_jax.nn import cpu_kernels
from ldm_jax.nn import fused_attention as fused_lib
from ldm_jax.nn.blocked_attention import blocked_attention, block_sizes


def naive_attention(q, k, v, allowed=None):
  """softmax(q kᵀ / √D) v in float64; q [B, Lq, H, D], k/v [B, Lk, H, D]; `allowed` [B, 1, Lq, Lk]
  bool, False logits dropped (a query with none left attends uniformly)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  if allowed is not None:
    logits = np.where(allowed, logits, -np.inf)
    logits = np.where(np.isneginf(logits).all(-1, keepdims=True), 0.0, logits)  # no key: uniform
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def _qkv(seed, q_len, k_len, heads=4, dim=8, batch=2, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q = 2.0 * jax.random.normal(kq, (batch, q_len, heads, dim))
  k = 2.0 * jax.random.normal(kk, (batch, k_len, heads, dim))
  v = jax.random.normal(kv, (batch, k_len, heads, dim))
  return tuple(a.astype(dtype) for a in (q, k, v))


def _key_mask(batch, k_len, seed=7):
  mask = np.random.default_rng(seed).uniform(size=(batch, k_len)) > 0.4
  mask[:, 0] = True
  mask[-1] = False  # a sequence without keys: attends uniformly
  return mask


def _allowed(mask, causal, q_len, k_len):
  allowed = np.ones((1, 1, q_len, k_len), bool)
  if causal:
    allowed = allowed & np.tril(np.ones((q_len, k_len), bool))[None, None]
  if mask is not None:
    allowed = allowed & mask[:, None, None, :]
  return allowed


# Small blocks, so that these short sequences still run over several blocks: (example·head pairs
# per block, queries per block) of the 2 × 4 pairs; 37 queries = 16 + 16 + 5 (a padded last
# chunk); 8 pairs span both examples (their key masks differ).
_TINY_BLOCKS = {"one pair, three chunks": (1, 16), "two pairs, one chunk": (2, 37), "all pairs": (8, 37)}


def _tiny_block_bytes(blocks, k_len):
  pairs, chunk = blocks
  return pairs * chunk * 4 * k_len


@pytest.mark.parametrize("blocks", _TINY_BLOCKS.values(), ids=_TINY_BLOCKS.keys())
@pytest.mark.parametrize("causal,masked", [(False, False), (False, True), (True, False), (True, True)])
def test_blocked_attention_equals_the_formula_with_gradients(blocks, causal, masked):
  q_len, k_len = 37, 37 if causal else 29
  q, k, v = _qkv(11, q_len, k_len)
  mask = _key_mask(2, k_len) if masked else None
  block_bytes = _tiny_block_bytes(blocks, k_len)
  assert block_sizes(2 * 4, q_len, k_len, block_bytes) == blocks
  out = blocked_attention(q, k, v, key_mask=mask, causal=causal, block_bytes=block_bytes)
  np.testing.assert_allclose(out, naive_attention(q, k, v, _allowed(mask, causal, q_len, k_len)),
                             atol=2e-5, rtol=1e-5)
  # Gradients against autodiff of the plain XLA formula.
  weights = jax.random.normal(jax.random.key(12), out.shape)
  loss = lambda impl: lambda q, k, v: jnp.sum(weights * impl(q, k, v))
  blocked = loss(lambda q, k, v: blocked_attention(q, k, v, key_mask=mask, causal=causal, block_bytes=block_bytes))
  plain = loss(lambda q, k, v: dot_product_attention(q, k, v, key_mask=mask, causal=causal, implementation="xla"))
  grads = jax.grad(blocked, argnums=(0, 1, 2))(q, k, v)
  expected = jax.grad(plain, argnums=(0, 1, 2))(q, k, v)
  for name, got, want in zip("qkv", grads, expected):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4, err_msg=f"d{name}")


def test_blocked_attention_bfloat16_keeps_dtype_and_float32_softmax():
  q, k, v = _qkv(13, 37, 21, dtype=jnp.bfloat16)
  out = blocked_attention(q, k, v, block_bytes=_tiny_block_bytes((1, 16), 21))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), naive_attention(q, k, v), atol=3e-2)
  grads = jax.grad(lambda q, k, v: jnp.sum(blocked_attention(q, k, v).astype(jnp.float32) ** 2),
                   argnums=(0, 1, 2))(q, k, v)
  expected = jax.grad(lambda q, k, v: jnp.sum(
      dot_product_attention(q, k, v, implementation="xla").astype(jnp.float32) ** 2), argnums=(0, 1, 2))(
          *(a.astype(jnp.float32) for a in (q, k, v)))
  for got, want in zip(grads, expected):
    assert got.dtype == jnp.bfloat16
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=0.05 * scale)


@pytest.mark.parametrize("causal", [False, True])
def test_pallas_flash_attention_in_interpret_mode_equals_the_formula(causal):
  """The TPU kernel, run by Pallas' TPU interpreter on this CPU (key mask as segment ids)."""
  from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
  q, k, v = _qkv(14, 128, 128, heads=2, dim=32, batch=2)
  mask = _key_mask(2, 128)
  mask[-1] = True  # the kernel has no uniform fallback for queries without keys
  with pltpu.force_tpu_interpret_mode():
    out = attention_lib._pallas_attention(q, k, v, mask, causal)  # the entry point refuses it off TPU
  np.testing.assert_allclose(out, naive_attention(q, k, v, _allowed(mask, causal, 128, 128)), atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("backend,kwargs,expected", [
    ("cpu", dict(batch=16, heads=8, q_len=1024, k_len=1024, head_dim=8), "fused"),
    ("cpu", dict(batch=16, heads=8, q_len=1024, k_len=77, head_dim=8), "fused"),       # cross-attention
    ("cpu", dict(batch=1, heads=1, q_len=64, k_len=64, head_dim=4), "fused"),
    ("cpu", dict(batch=16, heads=8, q_len=256, k_len=256, head_dim=16), "fused"),
    ("cpu", dict(batch=16, heads=8, q_len=256, k_len=256, head_dim=32), "blocked"),    # 32 MiB; heads of 32
    ("cpu", dict(batch=2, heads=8, q_len=1024, k_len=77, head_dim=40), "blocked"),     # SD cross-attention, 5 MiB
    ("cpu", dict(batch=1, heads=1, q_len=64, k_len=64, head_dim=64), "xla"),
    ("cpu", dict(batch=2, heads=8, q_len=77, k_len=77, head_dim=64, causal=True), "xla"),  # a text encoder
    ("cpu", dict(batch=2, heads=8, q_len=77, k_len=77, head_dim=64, has_mask=True), "xla"),
    ("cpu", dict(batch=1, heads=1, q_len=256, k_len=256, head_dim=512), "xla"),        # SD VAE mid-block, 128 px
    ("cpu", dict(batch=4, heads=1, q_len=1024, k_len=1024, head_dim=512), "blocked"),  # 16 MiB, not compiled in
    ("cpu", dict(batch=16, heads=8, q_len=1024, k_len=1024, head_dim=8, dtype=jnp.bfloat16), "blocked"),
    ("cpu", dict(batch=16, heads=8, q_len=1024, k_len=1024, head_dim=8, fused_available=False), "blocked"),
    ("cpu", dict(batch=1, heads=1, q_len=64, k_len=64, head_dim=4, fused_available=False), "xla"),
    ("gpu", dict(batch=2, heads=8, q_len=4096, k_len=4096, head_dim=40, dtype=jnp.bfloat16), "cudnn"),
    ("gpu", dict(batch=2, heads=8, q_len=4096, k_len=4096, head_dim=40), "xla"),       # float32: no cuDNN flash
    ("gpu", dict(batch=2, heads=8, q_len=4096, k_len=77, head_dim=36, dtype=jnp.float16), "xla"),  # 36 % 8
    ("gpu", dict(batch=2, heads=8, q_len=77, k_len=77, head_dim=64, dtype=jnp.bfloat16, has_mask=True), "xla"),
    ("gpu", dict(batch=2, heads=2, q_len=64, k_len=64, head_dim=256, dtype=jnp.bfloat16), "xla"),
    ("tpu", dict(batch=2, heads=8, q_len=4096, k_len=4096, head_dim=40), "pallas"),
    ("tpu", dict(batch=2, heads=8, q_len=4096, k_len=77, head_dim=40), "xla"),         # 77 keys: not a block
    ("tpu", dict(batch=2, heads=8, q_len=4096, k_len=256, head_dim=64, has_mask=True), "pallas"),
])
def test_auto_selects_per_backend_and_shape(backend, kwargs, expected):
  kwargs = {"dtype": jnp.float32, "has_mask": False, "fused_available": True, **kwargs}
  assert attention_lib.select_implementation("auto", backend=backend, **kwargs) == expected
  assert attention_lib.select_implementation("xla", backend=backend, **kwargs) == "xla"
  # A forced 'fused' runs the kernel where it applies and 'blocked' elsewhere.
  applies = kwargs["dtype"] == jnp.float32 and not kwargs["has_mask"] and not kwargs.get("causal") and (
      kwargs["head_dim"] in fused_lib.HEAD_DIMS)
  assert attention_lib.select_implementation("fused", backend=backend, **kwargs) == (
      "fused" if applies else "blocked")


def test_unknown_or_unavailable_implementation_names_the_key():
  with pytest.raises(ValueError, match=r"model\.attention: 'flash' is not one of auto, xla, blocked"):
    attention_lib.check_implementation("flash")
  with pytest.raises(ValueError, match=r"model\.attention: 'cudnn' needs a GPU, but JAX runs on cpu"):
    attention_lib.check_implementation("cudnn", backend="cpu")
  with pytest.raises(ValueError, match=r"model\.attention: 'pallas' needs a TPU"):
    attention_lib.check_implementation("pallas", backend="gpu")
  attention_lib.check_implementation("blocked", backend="tpu")  # pure JAX: runs everywhere
  with pytest.raises(ValueError, match=r"model\.attention: 'fused' needs a CPU, but JAX runs on tpu"):
    attention_lib.check_implementation("fused", backend="tpu")


def test_fused_kernel_without_a_compiler_is_a_clear_error_and_auto_falls_back(monkeypatch, tmp_path):
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
  monkeypatch.setenv("LDM_JAX_KERNEL_CACHE", str(tmp_path / "kernels"))
  cpu_kernels._build.cache_clear()
  try:
    assert "no-such-compiler" in fused_lib.unavailable_reason()
    with pytest.raises(ValueError, match=r"sample\.attention: 'fused' is unavailable here: .*no-such-compiler"):
      attention_lib.check_implementation("fused", key="sample.attention", backend="cpu")
    assert attention_lib.select_implementation(
        "auto", backend="cpu", batch=16, heads=8, q_len=1024, k_len=1024, head_dim=8, dtype=jnp.float32,
        has_mask=False) == "blocked"
  finally:
    cpu_kernels._build.cache_clear()


needs_fused = pytest.mark.skipif(fused_lib.unavailable_reason() is not None,
                                 reason=f"fused kernels unavailable: {fused_lib.unavailable_reason()}")


_FUSED_SHAPES = {  # (q_len, k_len, heads, head_dim): lengths not multiples of the kernel's 16 lanes
    "D2 37x29": (37, 29, 3, 2), "D4 70x29": (70, 29, 2, 4), "D8 self 37": (37, 37, 2, 8),
    "D8 cross 40x77": (40, 77, 2, 8), "D8 one key": (5, 1, 1, 8), "D16 33x20": (33, 20, 2, 16),
}


def test_fused_head_dims_are_the_ones_compiled_into_the_kernel():
  """`supports()` decides before any build which head sizes the kernel takes: the same list as the
  source's LDM_HEAD_DIMS (a size missing there would fail at run time inside the compiled step)."""
  import re  # pylint: disable=g-import-not-at-top
  macro = re.search(r"#define LDM_HEAD_DIMS\(X\) (.*)", fused_lib._SOURCE.read_text()).group(1)
  assert tuple(int(n) for n in re.findall(r"X\((\d+)\)", macro)) == fused_lib.HEAD_DIMS


@needs_fused
@pytest.mark.parametrize("shape", _FUSED_SHAPES.values(), ids=_FUSED_SHAPES.keys())
def test_fused_attention_equals_the_formula_with_gradients(shape):
  q_len, k_len, heads, dim = shape
  q, k, v = _qkv(21, q_len, k_len, heads=heads, dim=dim)
  out = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, implementation="fused"))(q, k, v)
  np.testing.assert_allclose(out, naive_attention(q, k, v), atol=2e-5, rtol=1e-5)
  weights = jax.random.normal(jax.random.key(22), out.shape)
  loss = lambda impl: lambda q, k, v: jnp.sum(weights * dot_product_attention(q, k, v, implementation=impl))
  grads = jax.grad(loss("fused"), argnums=(0, 1, 2))(q, k, v)
  expected = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for name, got, want in zip("qkv", grads, expected):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4, err_msg=f"d{name}")


@needs_fused
@pytest.mark.parametrize("threads,heads", [(1, 4), (1, 2), (64, 2)])
def test_fused_backward_equals_the_formula_whether_keys_are_split_or_not(threads, heads):
  """The backward kernel wants ~4 work items per thread: with fewer (example, head) pairs it splits
  each pair's keys into chunks and adds up their parts of dq. 77 keys are 5 blocks of 16: one
  thread and 4 pairs takes the pairs whole, one thread and 2 pairs chunks of 3 + 2 blocks,
  64 threads 5 chunks of one block. Each way the gradients are the formula's."""
  q, k, v = _qkv(24, 45, 77, heads=heads, dim=8, batch=1)
  weights = jax.random.normal(jax.random.key(25), q.shape)
  loss = lambda f: lambda q, k, v: jnp.sum(weights * f(q, k, v))
  grads = jax.jit(jax.grad(loss(lambda q, k, v: fused_lib.fused_attention(q, k, v, threads)),
                           argnums=(0, 1, 2)))(q, k, v)
  expected = jax.grad(loss(lambda q, k, v: dot_product_attention(q, k, v, implementation="xla")),
                      argnums=(0, 1, 2))(q, k, v)
  for name, got, want in zip("qkv", grads, expected):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4, err_msg=f"d{name}")


@needs_fused
@pytest.mark.parametrize("dim", [4, 16])
def test_fused_attention_exact_where_its_logit_bound_is_loose(dim):
  """The kernel shifts the logits by |q|·max|k|; a query nearly orthogonal to a huge key makes that
  bound hundreds of units too high (every exponential would underflow): redone with the true max."""
  q, k, v = (np.array(a) for a in _qkv(23, 6, 50, heads=1, dim=dim, batch=1))
  q[0, :3, 0] = 0.0
  q[0, :3, 0, 0] = 30.0
  k[0, 7, 0, 1:] = 60.0  # orthogonal to the first three queries, |k| ≈ 60·√D
  k[0, :, 0, 0] = np.clip(k[0, :, 0, 0], -1, 1)
  out = dot_product_attention(q, k, v, implementation="fused")
  np.testing.assert_allclose(out, naive_attention(q, k, v), atol=2e-5, rtol=1e-5)


def naive_group_norm(x, scale, bias, groups, eps):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def test_dot_product_attention_matches_numpy_chunked_or_not():
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = 2.0 * jax.random.normal(kq, (2, 20, 3, 8))
  k = 2.0 * jax.random.normal(kk, (2, 13, 3, 8))
  v = jax.random.normal(kv, (2, 13, 3, 8))
  expected = naive_attention(q, k, v)
  full = dot_product_attention(q, k, v)
  np.testing.assert_allclose(full, expected, atol=2e-5, rtol=1e-5)
  for chunk in (4, 7, 64):  # 7 does not divide 20: padded last chunk; 64 ≥ 20: unchunked
    chunked = dot_product_attention(q, k, v, query_chunk_size=chunk)
    assert chunked.shape == full.shape
    np.testing.assert_allclose(chunked, full, atol=1e-6, rtol=1e-6)


def test_dot_product_attention_bfloat16_stays_close_and_in_dtype():
  kq, kk, kv = jax.random.split(jax.random.key(1), 3)
  q, k, v = (jax.random.normal(key, (1, 16, 2, 8)).astype(jnp.bfloat16) for key in (kq, kk, kv))
  out = dot_product_attention(q, k, v, query_chunk_size=5)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), naive_attention(q, k, v), atol=3e-2)


@pytest.mark.parametrize("query_chunk_size", [None, 4, 7])
def test_causal_attention_sees_only_earlier_keys(query_chunk_size):
  kq, kk, kv, km = jax.random.split(jax.random.key(4), 4)
  q, k, v = (jax.random.normal(key, (2, 10, 2, 8)) for key in (kq, kk, kv))
  key_mask = np.array(jax.random.uniform(km, (2, 10)) > 0.3)
  key_mask[:, 0] = True  # every query keeps at least one key
  causal = np.tril(np.ones((10, 10), bool))[None, None]
  out = dot_product_attention(q, k, v, query_chunk_size=query_chunk_size, causal=True)
  np.testing.assert_allclose(out, naive_attention(q, k, v, causal), atol=2e-5, rtol=1e-5)
  out = dot_product_attention(q, k, v, query_chunk_size=query_chunk_size, key_mask=key_mask, causal=True)
  np.testing.assert_allclose(out, naive_attention(q, k, v, causal & key_mask[:, None, None, :]),
                             atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_multi_head_self_attention_names_and_matches_numpy(causal):
  x = jax.random.normal(jax.random.key(5), (2, 6, 16))
  module = MultiHeadSelfAttention(num_heads=2, head_dim=4, qkv_names=("q", "k", "v"), out_name="o",
                                  qkv_bias=False, causal=causal)
  params = module.init(jax.random.key(6), x)["params"]
  assert set(params) == {"q", "k", "v", "o"} and "bias" not in params["q"] and "bias" in params["o"]
  assert params["q"]["kernel"].shape == (16, 8) and params["o"]["kernel"].shape == (8, 16)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  q, k, v = (np.asarray(x, np.float64) @ p[n]["kernel"] for n in ("q", "k", "v"))
  heads = [a.reshape(2, 6, 2, 4) for a in (q, k, v)]
  allowed = np.tril(np.ones((6, 6), bool))[None, None] if causal else None
  expected = naive_attention(*heads, allowed).reshape(2, 6, 8) @ p["o"]["kernel"] + p["o"]["bias"]
  np.testing.assert_allclose(module.apply({"params": params}, x), expected, atol=2e-5, rtol=1e-5)
  # Without an output projection the heads come back concatenated.
  bare = MultiHeadSelfAttention(num_heads=2, out_name=None)
  assert set(bare.init(jax.random.key(6), x)["params"]) == {"to_q", "to_k", "to_v"}


@pytest.mark.parametrize("attention", [AttentionConfig("xla"), AttentionConfig("xla", 5), AttentionConfig("blocked")])
def test_spatial_self_attention_matches_numpy(attention):
  x = jax.random.normal(jax.random.key(2), (2, 4, 3, 32))
  module = SpatialSelfAttention(num_groups=8, epsilon=1e-6, attention=attention)
  # Random parameters drawn in numpy (no `init` to compile); the norm's affine parameters away
  # from identity, so that a mix-up of scale and bias would show.
  rng = np.random.default_rng(3)
  draw = lambda path, leaf: jnp.asarray(
      (1 if path[-1].key == "scale" else 0) + 0.3 * rng.normal(size=leaf.shape), jnp.float32)
  params = jax.tree_util.tree_map_with_path(draw, jax.eval_shape(module.init, jax.random.key(0), x)["params"])
  out = jax.jit(module.apply)({"params": params}, x)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  xn = np.asarray(x, np.float64)
  y = naive_group_norm(xn, p["group_norm"]["scale"], p["group_norm"]["bias"], 8, 1e-6)
  y = y.reshape(2, 12, 32)
  q, k, v = (y @ p[n]["kernel"] + p[n]["bias"] for n in ("to_q", "to_k", "to_v"))
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(32)  # single head: scale 1/√C
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  y = (weights @ v) @ p["to_out_0"]["kernel"] + p["to_out_0"]["bias"]
  expected = xn + y.reshape(xn.shape)
  np.testing.assert_allclose(out, expected, atol=5e-5, rtol=1e-5)


@needs_fused
def test_fused_attention_on_a_mesh_runs_per_device_without_gathering():
  """With the batch split over devices each device runs the kernels on its examples: no all-gather
  in the compiled program, the output keeps the batch sharding, values and gradients as unsharded."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
  q, k, v = _qkv(24, 40, 40, heads=2, dim=8, batch=4)
  sharded = [jax.device_put(a, NamedSharding(mesh, P(("data", "fsdp")))) for a in (q, k, v)]
  forward = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, implementation="fused"))
  assert "all-gather" not in forward.lower(*sharded).compile().as_text()
  out = forward(*sharded)
  assert out.sharding.spec == P(("data", "fsdp"))
  np.testing.assert_allclose(out, naive_attention(q, k, v), atol=2e-5, rtol=1e-5)
  loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(dot_product_attention(q, k, v, implementation=impl)))
  grad = jax.jit(jax.grad(loss("fused"), argnums=(0, 1, 2)))
  assert "all-gather" not in grad.lower(*sharded).compile().as_text()
  for got, want in zip(grad(*sharded), jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-4)
