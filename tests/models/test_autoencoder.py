"""Autoencoders of stage 1: shapes for every f, posterior and quantizer math, config validation."""

import functools

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldm_jax.models import autoencoder as ae

TINY = dict(ch=32, num_res_blocks=1, in_channels=3, z_channels=4, embed_dim=3, dropout=0.0)


def flat_keys(params):
  return set(flax.traverse_util.flatten_dict(params, sep="/"))


def random_params(model, *args, method="init_all", seed=0):
  """Parameters of `model` drawn in numpy (kernels N(0, 1/fan_in), norms near identity) from the
  abstract tree, so that tests compile no `init` (the slowest part of a test on CPU)."""
  abstract = jax.eval_shape(functools.partial(model.init, method=method), jax.random.key(0), *args)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "scale":
      value = 1 + 0.1 * rng.normal(size=leaf.shape)
    elif name == "embedding":
      value = rng.normal(size=leaf.shape)
    elif name == "kernel":
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      value = 0.1 * rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract["params"])


def model_config(**overrides):
  cfg = dict(kind="kl", n_embed=16, ch_mult=(1, 2), attn_resolutions=(), resolution=16, **TINY)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


# ---- architecture -----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["kl", "vq"])
@pytest.mark.parametrize("levels", [1, 2, 3, 4, 5, 6])
def test_shapes_and_tree_for_every_downsampling_factor(kind, levels):
  """f = 1 … 32: latent [B, H/f, W/f, embed_dim] and image back, on a non-square image."""
  cfg = model_config(kind=kind, ch_mult=(1,) * levels, resolution=32)
  f = ae.downsampling_factor(cfg)
  assert f == 2 ** (levels - 1)
  ae.validate_autoencoder_config(cfg, (32, 64))
  model = ae.make_autoencoder(cfg)
  assert isinstance(model, ae.AutoencoderKL if kind == "kl" else ae.VQModel)
  x = jax.ShapeDtypeStruct((2, 32, 64, 3), jnp.float32)
  params = jax.eval_shape(functools.partial(model.init, method="init_all"), jax.random.key(0), x)["params"]
  latent = jax.eval_shape(functools.partial(model.apply, method="encode"), {"params": params}, x)
  if kind == "kl":
    assert latent.mean.shape == latent.logvar.shape == (2, 32 // f, 64 // f, 3)
    z = latent.mean
  else:
    assert latent.shape == (2, 32 // f, 64 // f, 3)
    z = latent
  assert ae.latent_shape(cfg, (32, 64)) == z.shape[1:]
  x_rec = jax.eval_shape(functools.partial(model.apply, method="decode"), {"params": params}, z)
  assert x_rec.shape == x.shape

  keys = flat_keys(params)
  for coder, blocks, resampler in (("encoder", "down_blocks", "downsamplers_0"),
                                   ("decoder", "up_blocks", "upsamplers_0")):
    assert {k.split("/")[1] for k in keys if k.startswith(f"{coder}/{blocks}_")} == {
        f"{blocks}_{i}" for i in range(levels)}
    assert sum(k.endswith(f"{resampler}/conv/kernel") for k in keys) == levels - 1
  assert params["decoder"]["conv_out"]["kernel"].shape == (3, 3, 32, 3)
  assert ("quantize/embedding" in keys) == (kind == "vq")


def test_attention_placement_follows_compvis_feature_map_resolutions():
  """attn_resolutions=(16,) at resolution 32 with two levels: the second encoder level and the
  first (deepest) decoder level, after every ResnetBlock; the mid block always has one."""
  model = ae.make_autoencoder(model_config(ch_mult=(1, 2), resolution=32, attn_resolutions=(16,)))
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  params = jax.eval_shape(functools.partial(model.init, method="init_all"), jax.random.key(0), x)["params"]
  attentions = {k.rsplit("/", 2)[0] for k in flat_keys(params) if "/attentions_" in k}
  assert attentions == {"encoder/down_blocks_1/attentions_0", "encoder/mid_block/attentions_0",
                        "decoder/mid_block/attentions_0", "decoder/up_blocks_0/attentions_0",
                        "decoder/up_blocks_0/attentions_1"}
  # up_blocks_0 is the deepest level: ch·ch_mult[-1] channels, num_res_blocks + 1 ResnetBlocks.
  assert params["decoder"]["up_blocks_0"]["resnets_1"]["conv2"]["kernel"].shape == (3, 3, 64, 64)
  assert params["decoder"]["up_blocks_1"]["resnets_0"]["conv_shortcut"]["kernel"].shape == (1, 1, 64, 32)


def test_kl_autoencoder_forward_is_encode_sample_decode():
  model = ae.make_autoencoder(model_config(attn_resolutions=(8,)))
  x = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  variables = {"params": random_params(model, x, seed=2)}
  rng = jax.random.key(3)

  @jax.jit
  def run(variables, x):
    x_rec, posterior = model.apply(variables, x, rng)
    decode = lambda z: model.apply(variables, z, method="decode")
    return (x_rec, posterior, model.apply(variables, x, method="encode"),
            decode(posterior.sample(rng)), decode(posterior.mode()))

  x_rec, posterior, encoded, decoded_sample, decoded_mode = run(variables, x)
  assert posterior.mean.dtype == jnp.float32 and posterior.mean.shape == (2, 8, 8, 3)
  np.testing.assert_allclose(encoded.mean, posterior.mean, atol=1e-6)
  np.testing.assert_allclose(encoded.logvar, posterior.logvar, atol=1e-6)
  np.testing.assert_allclose(x_rec, decoded_sample, atol=1e-5)
  assert not np.allclose(x_rec, decoded_mode, atol=1e-3)


def test_dropout_is_active_only_when_not_deterministic():
  model = ae.make_autoencoder(model_config(dropout=0.5, ch_mult=(1,), resolution=8))
  z = jax.random.normal(jax.random.key(4), (1, 8, 8, 3))
  params = random_params(model, z, method="decode")
  decode = jax.jit(lambda z, rng, det: model.apply({"params": params}, z, method="decode",
                                                    deterministic=det, rngs={"dropout": rng}),
                   static_argnums=2)
  a, b = decode(z, jax.random.key(6), True), decode(z, jax.random.key(7), True)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(decode(z, jax.random.key(6), False), a)


def test_bfloat16_compute_keeps_float32_posterior():
  model = ae.make_autoencoder(model_config(dtype="bfloat16"))
  x = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
  params = jax.eval_shape(functools.partial(model.init, method="init_all"), jax.random.key(0), x)["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  posterior = jax.eval_shape(functools.partial(model.apply, method="encode"), {"params": params}, x)
  assert posterior.mean.dtype == posterior.logvar.dtype == jnp.float32
  x_rec = jax.eval_shape(functools.partial(model.apply, method="decode"), {"params": params}, posterior.mean)
  assert x_rec.dtype == jnp.bfloat16


# ---- DiagonalGaussian ---------------------------------------------------------------------------

def test_posterior_kl_and_nll_equal_closed_forms():
  rng = np.random.default_rng(0)
  mean, logvar = 1.5 * rng.normal(size=(3, 4, 5, 2)), 2.0 * rng.normal(size=(3, 4, 5, 2))
  moments = jnp.asarray(np.concatenate([mean, logvar], -1), jnp.float32)
  post = ae.DiagonalGaussian.from_moments(moments)
  var = np.exp(logvar)
  expected_kl = 0.5 * np.sum(mean ** 2 + var - 1 - logvar, axis=(1, 2, 3))
  assert post.kl().shape == (3,)
  np.testing.assert_allclose(post.kl(), expected_kl, rtol=1e-5)
  x = rng.normal(size=mean.shape)
  expected_nll = 0.5 * np.sum(np.log(2 * np.pi) + logvar + (x - mean) ** 2 / var, axis=(1, 2, 3))
  np.testing.assert_allclose(post.nll(jnp.asarray(x, jnp.float32)), expected_nll, rtol=1e-5)
  # KL to another diagonal Gaussian; KL(p‖p) = 0.
  other = ae.DiagonalGaussian.from_moments(moments[::-1])
  o_mean, o_logvar = mean[::-1], logvar[::-1]
  expected = 0.5 * np.sum((mean - o_mean) ** 2 / np.exp(o_logvar) + var / np.exp(o_logvar) - 1
                          - logvar + o_logvar, axis=(1, 2, 3))
  np.testing.assert_allclose(post.kl(other), expected, rtol=1e-5)
  np.testing.assert_allclose(post.kl(post), 0.0, atol=1e-5)
  np.testing.assert_array_equal(post.mode(), post.mean)
  np.testing.assert_allclose(post.std, np.exp(0.5 * logvar), rtol=1e-6)


def test_posterior_logvar_is_clamped_to_minus30_20():
  moments = jnp.concatenate([jnp.zeros((1, 1, 1, 3)), jnp.array([-100.0, 5.0, 100.0]).reshape(1, 1, 1, 3)], -1)
  post = ae.DiagonalGaussian.from_moments(moments)
  np.testing.assert_array_equal(post.logvar.ravel(), [-30.0, 5.0, 20.0])
  assert np.all(np.isfinite(post.var)) and np.all(np.isfinite(post.kl()))


def test_posterior_samples_have_its_mean_and_std():
  mean = jnp.array([-1.0, 0.5, 2.0]).reshape(1, 1, 1, 3)
  logvar = jnp.log(jnp.array([0.25, 1.0, 4.0])).reshape(1, 1, 1, 3)
  post = ae.DiagonalGaussian(mean, logvar)
  n = 20000
  samples = np.asarray(jax.vmap(post.sample)(jax.random.split(jax.random.key(0), n))).reshape(n, 3)
  std = np.array([0.5, 1.0, 2.0])
  np.testing.assert_allclose(samples.mean(0), mean.ravel(), atol=5 * std.max() / np.sqrt(n))
  np.testing.assert_allclose(samples.std(0), std, rtol=0.03)
  assert not np.allclose(post.sample(jax.random.key(1)), post.sample(jax.random.key(2)))


# ---- VectorQuantizer ----------------------------------------------------------------------------

def quantizer_with(codebook, **kwargs):
  codebook = jnp.asarray(codebook, jnp.float32)
  vq = ae.VectorQuantizer(codebook.shape[0], codebook.shape[1], **kwargs)
  return lambda z: vq.apply({"params": {"embedding": codebook}}, z)


def test_vq_indices_equal_brute_force_nearest_code():
  rng = np.random.default_rng(1)
  codebook = rng.normal(size=(32, 4))
  z = rng.normal(size=(2, 5, 6, 4)) * 1.5
  z_q, loss, info = jax.jit(quantizer_with(codebook))(jnp.asarray(z, jnp.float32))
  brute = np.argmin(((z[..., None, :] - codebook) ** 2).sum(-1), axis=-1)
  assert info["indices"].shape == (2, 5, 6) and info["indices"].dtype == jnp.int32
  np.testing.assert_array_equal(info["indices"], brute)
  np.testing.assert_allclose(z_q, codebook[brute], atol=1e-6)
  # Both formulations have the value (1 + β)·mean‖e − z‖².
  np.testing.assert_allclose(loss, 1.25 * np.mean((codebook[brute] - z) ** 2), rtol=1e-5)


@pytest.mark.parametrize("legacy", [True, False])
def test_vq_straight_through_and_loss_gradients(legacy):
  rng = np.random.default_rng(2)
  codebook = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  z = jnp.asarray(rng.normal(size=(2, 3, 3, 3)), jnp.float32)
  g = jnp.asarray(rng.normal(size=z.shape), jnp.float32)
  vq = ae.VectorQuantizer(16, 3, beta=0.25, legacy=legacy)
  apply = lambda cb, z: vq.apply({"params": {"embedding": cb}}, z)

  # Straight-through: d Σ(z_q · g) / dz = g.
  grad_z = jax.grad(lambda z: jnp.sum(apply(codebook, z)[0] * g))(z)
  np.testing.assert_allclose(grad_z, g, atol=1e-6)

  # The loss splits into commitment (→ encoder) and codebook (→ embeddings) terms:
  # legacy: ‖sg[e] − z‖² + β‖e − sg[z]‖²;  not legacy: β‖sg[e] − z‖² + ‖e − sg[z]‖².
  indices = apply(codebook, z)[2]["indices"]
  e = codebook[indices]
  w_commit, w_codebook = (1.0, 0.25) if legacy else (0.25, 1.0)
  loss_grad_z, loss_grad_cb = jax.grad(lambda z, cb: apply(cb, z)[1], argnums=(0, 1))(z, codebook)
  np.testing.assert_allclose(loss_grad_z, w_commit * 2 * (z - e) / z.size, atol=1e-6)
  expected_cb = np.zeros(codebook.shape)
  np.add.at(expected_cb, np.asarray(indices).ravel(),
            (w_codebook * 2 * (e - z) / z.size).reshape(-1, 3))
  np.testing.assert_allclose(loss_grad_cb, expected_cb, atol=1e-6)


def test_vq_perplexity_and_usage():
  # 16 codes, the first 4 one-hot vectors are hit equally often, the others never.
  codebook = np.concatenate([np.eye(8)[:4] * 10, 100 + np.arange(12)[:, None] * np.ones((12, 8))])
  z = np.tile(np.eye(8)[:4] * 10 + 0.1, (2, 3, 1, 1)).reshape(2, 3, 4, 8)  # 24 vectors, 6 per code
  _, _, info = jax.jit(quantizer_with(codebook))(jnp.asarray(z, jnp.float32))
  np.testing.assert_allclose(info["perplexity"], 4.0, rtol=1e-5)
  np.testing.assert_allclose(info["usage"], 4 / 16)
  # Skewed usage: a single code → perplexity 1, usage 1/16.
  _, _, info = jax.jit(quantizer_with(codebook))(jnp.asarray(np.broadcast_to(z[:, :, :1], z.shape)))
  np.testing.assert_allclose(info["perplexity"], 1.0, rtol=1e-5)
  np.testing.assert_allclose(info["usage"], 1 / 16)


def test_vq_codebook_init_is_uniform_in_plus_minus_one_over_n():
  n = 512
  vq = ae.VectorQuantizer(n, 16)
  codebook = vq.init(jax.random.key(0), jnp.zeros((1, 2, 2, 16)))["params"]["embedding"]
  assert codebook.shape == (n, 16)
  assert float(jnp.max(jnp.abs(codebook))) <= 1 / n
  np.testing.assert_allclose(jnp.std(codebook), (2 / n) / np.sqrt(12), rtol=0.05)


def test_vq_model_decode_quantizes_first():
  model = ae.make_autoencoder(model_config(kind="vq"))
  x = jax.random.uniform(jax.random.key(8), (2, 16, 16, 3), minval=-1, maxval=1)
  variables = {"params": random_params(model, x, seed=9)}

  @jax.jit
  def run(variables, x):
    h = model.apply(variables, x, method="encode")
    z_q, _, info = model.apply(variables, h, method=lambda m, h: m.quantize(h))
    # One batch through the decoder: h quantized by decode, z_q as given, h not quantized.
    decoded = model.apply(variables, jnp.concatenate([h, z_q]), method="decode")
    raw = model.apply(variables, jnp.concatenate([z_q, h]), method="decode", force_not_quantize=True)
    return h, z_q, info, model.apply(variables, x), decoded, raw

  h, z_q, info, (x_rec, qloss, call_info), decoded, raw = run(variables, x)
  assert h.shape == (2, 8, 8, 3)
  assert not np.allclose(h, z_q)  # encode returns the continuous pre-quantization latent
  dec_h, dec_zq = np.split(np.asarray(decoded), 2)
  dec_zq_raw, dec_h_raw = np.split(np.asarray(raw), 2)
  np.testing.assert_allclose(dec_h, dec_zq, atol=1e-5)
  np.testing.assert_allclose(dec_h, dec_zq_raw, atol=1e-5)
  np.testing.assert_allclose(x_rec, dec_h, atol=1e-5)
  np.testing.assert_array_equal(call_info["indices"], info["indices"])
  np.testing.assert_allclose(qloss, 1.25 * np.mean((np.asarray(z_q) - np.asarray(h)) ** 2), rtol=1e-4)
  assert not np.allclose(dec_h_raw, dec_h, atol=1e-3)


# ---- config helpers -----------------------------------------------------------------------------

@pytest.mark.parametrize("overrides,image_size,message", [
    (dict(ch_mult=(1, 2, 4)), 30,
     r"^data\.image_size: 30 is not divisible by the downsampling factor f=4 of model\.ch_mult=\(1, 2, 4\)"),
    (dict(ch_mult=(1,) * 6), 16, r"^data\.image_size: 16 is smaller than the downsampling factor f=32"),
    (dict(ch_mult=(1, 2)), (16, 17), r"^data\.image_size: 17 is not divisible"),
    (dict(ch=48), 16, r"^model\.ch: 48 channels are not divisible by the 32 GroupNorm groups"),
    (dict(ch=16, ch_mult=(2, 4)), 16, r"^model\.ch: 16 channels"),
    (dict(ch=32, ch_mult=(1, 1.5)), 16, r"^model\.ch_mult"),
    (dict(ch=64, ch_mult=(1, 3, 2), resolution=16), 16, None),
    (dict(kind="gan"), 16, r"^model\.kind: 'gan' is not one of 'kl', 'vq'"),
    (dict(attn_resolutions=(4,)), 16, r"^model\.attn_resolutions: 4 is never reached"),
    (dict(ch_mult=()), 16, r"^model\.ch_mult"),
    (dict(kind="vq", n_embed=1), 16, r"^model\.n_embed"),
    (dict(embed_dim=0), 16, r"^model\.embed_dim"),
    (dict(dropout=1.0), 16, r"^model\.dropout"),
    (dict(ch_mult=(1, 2, 4), resolution=18), 16, r"^model\.resolution: 18 is not divisible"),
])
def test_validate_autoencoder_config_names_the_key(overrides, image_size, message):
  cfg = model_config(**overrides)
  if message is None:
    ae.validate_autoencoder_config(cfg, image_size)
  else:
    with pytest.raises(ValueError, match=message):
      ae.validate_autoencoder_config(cfg, image_size)


def test_validate_reports_missing_vq_keys():
  cfg = model_config(kind="vq")
  del cfg["n_embed"]
  with pytest.raises(ValueError, match=r"^model\.n_embed: missing"):
    ae.validate_autoencoder_config(cfg, 16)


def test_latent_shape_and_factor():
  cfg = model_config(ch_mult=(1, 2, 4, 4), embed_dim=4, resolution=256)
  assert ae.downsampling_factor(cfg) == 8
  assert ae.latent_shape(cfg, 256) == (32, 32, 4)
  assert ae.latent_shape(cfg, (64, 128)) == (8, 16, 4)
  with pytest.raises(ValueError, match=r"^data\.image_size"):
    ae.latent_shape(cfg, 100)
  vq = ae.make_autoencoder(model_config(kind="vq", n_embed=64, beta=0.5, legacy_loss=False))
  assert (vq.n_embed, vq.beta, vq.legacy_loss) == (64, 0.5, False)
