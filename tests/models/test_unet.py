"""The latent-diffusion U-Net: structure, parameter layout, attention numerics and config checks.

Models are tiny (32–64 channels, 8×8 inputs). Parameters are drawn in numpy from the shapes that
`jax.eval_shape(model.init, …)` reports: it is quicker than compiling `init`, and random output
convolutions and attention projections (zero at init, as in CompVis) let every path show in the output.
"""

import dataclasses
import math

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.scipy.special import erf

from ldm_jax.models import unet as unet_lib
from ldm_jax.config.sections import default_unet_config
from ldm_jax.models.unet import Attention, FeedForward, SpatialTransformer, UNet, make_unet, validate_unet_config

SD1_TINY = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
                attention_resolutions=(1,), num_heads=2, context_dim=16)
SD2_TINY = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(1, 2), num_head_channels=16, use_linear_projection=True,
                context_dim=24)
CLASS_TINY = dict(in_channels=5, out_channels=4, model_channels=32, channel_mult=(1, 1, 2), num_res_blocks=1,
                  attention_resolutions=(2,), num_head_channels=32, context_dim=None, num_classes=3,
                  use_scale_shift_norm=True)
UPDOWN_TINY = dict(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(), num_heads=1, context_dim=8, resblock_updown=True)
REMAT_TINY = dict(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1,), num_res_blocks=1,
                  attention_resolutions=(1,), num_heads=1, context_dim=8, dropout=0.5)
LEGACY_TINY = dict(in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                   attention_resolutions=(2,), num_head_channels=16, context_dim=None,
                   use_spatial_transformer=False)


def _inputs(cfg, batch=2, size=8, context_len=3, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(keys[0], (batch, size, size, cfg["in_channels"]))
  t = jnp.arange(batch) * 400 + 7
  context = None
  if cfg.get("context_dim"):
    context = jax.random.normal(keys[1], (batch, context_len, cfg["context_dim"]))
  y = jnp.arange(batch) % cfg["num_classes"] if cfg.get("num_classes") else None
  return x, t, context, y


def _random_params(model, *args, seed=0, **kwargs):
  """Random variables with init's tree: kernels ~ N(0, 1/fan_in), norms' scales near 1."""
  shapes = jax.eval_shape(lambda key: model.init(key, *args, **kwargs), jax.random.key(0))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(size=leaf.shape) / math.sqrt(np.prod(leaf.shape[:-1]))
    elif name == "scale":
      value = 1 + 0.1 * rng.normal(size=leaf.shape)
    else:
      value = (0.1 if name == "bias" else 1.0) * rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _flat(params):
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(params["params"]).items()}


# --- shapes and layout ------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [SD1_TINY, SD2_TINY, CLASS_TINY, UPDOWN_TINY, LEGACY_TINY],
                         ids=["sd1", "sd2", "class_scale_shift", "resblock_updown", "legacy_attention"])
def test_output_shape_and_dependence_on_inputs(cfg):
  model = UNet(**cfg)
  x, t, context, y = _inputs(cfg)
  params = _random_params(model, x, t, context, y)
  apply = jax.jit(model.apply)
  out = apply(params, x, t, context, y)
  assert out.shape == (2, 8, 8, cfg["out_channels"])
  assert np.all(np.isfinite(out)) and float(out.std()) > 1e-3
  # The timestep reaches the output (the same x at two times gives two answers).
  out_t = apply(params, x, t + 1, context, y)
  assert float(jnp.abs(out_t - out).max()) > 1e-4


def test_sd1_shaped_parameter_tree_has_diffusers_paths():
  cfg = SD1_TINY
  model = UNet(**cfg)
  flat = _flat(jax.eval_shape(model.init, jax.random.key(0), *_inputs(cfg)))
  shapes = {k: v.shape for k, v in flat.items()}
  assert {k.split("/")[0] for k in shapes} == {
      "time_embedding", "conv_in", "down_blocks_0", "down_blocks_1", "mid_block", "up_blocks_0",
      "up_blocks_1", "conv_norm_out", "conv_out"}
  block = "down_blocks_0/attentions_1/transformer_blocks_0"
  expected = {
      "time_embedding/linear_1/kernel": (32, 128),
      "time_embedding/linear_2/kernel": (128, 128),
      "conv_in/kernel": (3, 3, 4, 32),
      "down_blocks_0/resnets_0/time_emb_proj/kernel": (128, 32),
      "down_blocks_0/attentions_0/norm/scale": (32,),
      "down_blocks_0/attentions_0/proj_in/kernel": (1, 1, 32, 32),
      f"{block}/attn1/to_q/kernel": (32, 32),
      f"{block}/attn2/to_k/kernel": (16, 32),  # context_dim → inner dim
      f"{block}/attn2/to_v/kernel": (16, 32),
      f"{block}/attn2/to_out_0/bias": (32,),
      f"{block}/norm3/scale": (32,),
      f"{block}/ff/net_0/proj/kernel": (32, 256),  # GEGLU: 2 × 4 × 32
      f"{block}/ff/net_2/kernel": (128, 32),
      "down_blocks_0/downsamplers_0/conv/kernel": (3, 3, 32, 32),
      "down_blocks_1/resnets_0/conv_shortcut/kernel": (1, 1, 32, 64),
      "mid_block/resnets_0/conv1/kernel": (3, 3, 64, 64),
      "mid_block/attentions_0/transformer_blocks_0/attn2/to_k/kernel": (16, 64),
      "mid_block/resnets_1/conv2/kernel": (3, 3, 64, 64),
      "up_blocks_0/resnets_0/conv1/kernel": (3, 3, 128, 64),  # deepest level first; h ⧺ skip
      "up_blocks_0/resnets_2/conv1/kernel": (3, 3, 96, 64),  # the skip from level 0's downsampler
      "up_blocks_0/upsamplers_0/conv/kernel": (3, 3, 64, 64),
      "up_blocks_1/resnets_0/conv1/kernel": (3, 3, 96, 32),
      "up_blocks_1/attentions_2/proj_out/kernel": (1, 1, 32, 32),
      "conv_norm_out/scale": (32,),
      "conv_out/kernel": (3, 3, 32, 4),
  }
  for key, shape in expected.items():
    assert shapes.get(key) == shape, key
  # No attention at the deepest level (diffusers DownBlock2D/UpBlock2D), no resampling past the ends.
  for absent in ("down_blocks_1/attentions_0", "up_blocks_0/attentions_0", "down_blocks_1/downsamplers_0",
                 "up_blocks_1/upsamplers_0", f"{block}/attn1/to_q/bias", "class_embedding"):
    assert not any(k.startswith(absent) for k in shapes), absent
  assert sum(k.startswith("up_blocks_1/resnets_") and k.endswith("conv1/kernel") for k in shapes) == 3


def test_sd2_linear_projection_and_head_channels():
  model = UNet(**SD2_TINY)
  flat = _flat(jax.eval_shape(model.init, jax.random.key(0), *_inputs(SD2_TINY)))
  assert flat["down_blocks_0/attentions_0/proj_in/kernel"].shape == (32, 32)  # Dense, not 1×1 conv
  assert flat["down_blocks_1/attentions_0/proj_out/kernel"].shape == (64, 64)
  assert flat["mid_block/attentions_0/transformer_blocks_0/attn2/to_k/kernel"].shape == (24, 64)
  assert unet_lib.attention_heads(64, 8, 16) == (4, 16)  # num_head_channels wins over num_heads
  assert unet_lib.attention_heads(64, 8, -1) == (8, 8)


def test_legacy_attention_block_layout():
  model = UNet(**LEGACY_TINY)
  flat = _flat(jax.eval_shape(model.init, jax.random.key(0), *_inputs(LEGACY_TINY)))
  keys = {k.rsplit("/", 2)[0] + "/" + k.rsplit("/", 2)[1] for k in flat if k.startswith("mid_block/attentions_0")}
  assert keys == {f"mid_block/attentions_0/{n}" for n in ("group_norm", "to_q", "to_k", "to_v", "to_out_0")}
  assert "mid_block/attentions_0/to_q/bias" in flat  # openaimodel's qkv conv has a bias
  assert not any(k.startswith("down_blocks_0/attentions") for k in flat)
  assert "down_blocks_1/attentions_0/to_q/kernel" in flat


def test_full_size_sd1_and_sd2_parameter_counts():
  # diffusers' UNet2DConditionModel: 859,520,964 (SD 1.x) and 865,910,724 (SD 2.x) parameters.
  def count(**kw):
    model = UNet(**kw)
    context = jnp.zeros((1, 77, kw["context_dim"]))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 4)), jnp.zeros((1,)), context)
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert count(context_dim=768) == 859_520_964
  assert count(context_dim=1024, num_head_channels=64, use_linear_projection=True) == 865_910_724


# --- conditioning ---------------------------------------------------------------------------------

def test_cross_attention_uses_the_context_only_through_attn2():
  cfg = SD1_TINY
  model = UNet(**cfg)
  x, t, context, _ = _inputs(cfg)
  params = _random_params(model, x, t, context)
  apply = jax.jit(model.apply)
  other = context + jax.random.normal(jax.random.key(5), context.shape)
  assert float(jnp.abs(apply(params, x, t, context) - apply(params, x, t, other)).max()) > 1e-3
  # With every cross-attention output projection zeroed, the context has no way in.
  cut = flax.traverse_util.path_aware_map(
      lambda path, v: jnp.zeros_like(v) if "attn2" in path and "to_out_0" in path else v, params)
  np.testing.assert_allclose(apply(cut, x, t, context), apply(cut, x, t, other), atol=1e-6)


def test_class_labels_and_null_class():
  cfg = CLASS_TINY
  model = UNet(**cfg)
  x, t, _, y = _inputs(cfg)
  params = _random_params(model, x, t, None, y)
  assert params["params"]["class_embedding"]["embedding"].shape == (4, 128)  # 3 classes + null
  assert model.null_class == 3
  apply = jax.jit(model.apply)
  out = apply(params, x, t, None, y)
  out_null = apply(params, x, t, None, jnp.full_like(y, model.null_class))
  assert float(jnp.abs(out - out_null).max()) > 1e-3


def test_per_level_depth_and_text_time_embedding():
  """transformer_depth per level (the middle block takes the last level's); text_time adds
  add_embedding(concat(text_embeds, sinusoids of each time id)) to the time embedding."""
  cfg = dict(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
             attention_resolutions=(2, 4), num_head_channels=8, num_groups=8, transformer_depth=(1, 1, 3),
             use_linear_projection=True, context_dim=8, addition_embed_type="text_time", addition_time_embed_dim=4,
             addition_embed_dim=6 + 3 * 4)
  model = make_unet(cfg)
  x, t, context, _ = _inputs(cfg, size=8)
  text_embeds, time_ids = jnp.ones((2, 6)), jnp.array([[8.0, 8, 0], [16, 12, 2]])
  params = _random_params(model, x, t, context, text_embeds=text_embeds, time_ids=time_ids)["params"]
  blocks = lambda tree: sorted(k for k in tree if k.startswith("transformer_blocks"))
  assert "attentions_0" not in params["down_blocks_0"]
  assert len(blocks(params["down_blocks_1"]["attentions_0"])) == 1
  assert len(blocks(params["down_blocks_2"]["attentions_0"])) == 3
  assert len(blocks(params["mid_block"]["attentions_0"])) == 3
  assert len(blocks(params["up_blocks_0"]["attentions_1"])) == 3
  assert params["add_embedding"]["linear_1"]["kernel"].shape == (18, 64)
  apply = lambda ids: model.apply({"params": params}, x, t, context, text_embeds=text_embeds, time_ids=ids)
  assert not np.allclose(apply(time_ids), apply(time_ids.at[1, 0].add(1.0)))
  with pytest.raises(ValueError, match="text_embeds and time_ids are required"):
    model.apply({"params": params}, x, t, context)
  with pytest.raises(ValueError, match="give 22 features for add_embedding; model.addition_embed_dim is 18"):
    model.apply({"params": params}, x, t, context, text_embeds=text_embeds, time_ids=jnp.ones((2, 4)))


def test_text_addition_embedding_adds_the_pooled_text_embedding():
  cfg = dict(SD1_TINY, addition_embed_type="text", addition_embed_dim=6)
  model = make_unet(cfg)
  x, t, context, _ = _inputs(cfg)
  text_embeds = jnp.ones((2, 6))
  params = _random_params(model, x, t, context, text_embeds=text_embeds)["params"]
  assert params["add_embedding"]["linear_1"]["kernel"].shape == (6, 4 * cfg["model_channels"])
  apply = lambda e: model.apply({"params": params}, x, t, context, text_embeds=e)
  assert not np.allclose(apply(text_embeds), apply(text_embeds.at[1, 0].add(1.0)))
  np.testing.assert_array_equal(apply(text_embeds)[0], apply(text_embeds.at[1, 0].add(1.0))[0])
  with pytest.raises(ValueError, match=r"'text' needs text_embeds \[B, 6\]"):
    model.apply({"params": params}, x, t, context)
  with pytest.raises(ValueError, match="model.addition_embed_dim: None; 'text' needs"):
    make_unet(dict(SD1_TINY, addition_embed_type="text"))


SHARED_PREFIX_TINY = dict(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                         attention_resolutions=(2, 4), num_head_channels=8, num_groups=8, transformer_depth=(1, 2, 1),
                         use_linear_projection=True, context_dim=8)


@pytest.mark.parametrize("cfg", [SD1_TINY, SD2_TINY, SHARED_PREFIX_TINY, UPDOWN_TINY,
                                 dict(SD1_TINY, num_classes=3)],
                         ids=["sd1", "sd2", "no_attention_at_level_0", "attention_only_in_the_middle", "labels"])
def test_k_conditions_per_input_equal_the_input_repeated(cfg):
  """x [B] with conditions [2B] (input i's under rows 2i, 2i + 1) gives what x with each row
  repeated gives, row for row."""
  model = UNet(**cfg)
  x, t, context, y = _inputs(cfg, batch=2)
  _, _, context_2, y_2 = _inputs(cfg, batch=2, seed=1)
  context, y = jnp.concatenate([context, context_2]), None if y is None else jnp.concatenate([y, (y_2 + 1) % 3])
  params = _random_params(model, x, t, context, y)
  shared = jax.jit(model.apply)(params, x, t, context, y)
  repeated = jax.jit(model.apply)(params, jnp.repeat(x, 2, axis=0), jnp.repeat(t, 2), context, y)
  assert shared.shape == (4, 8, 8, cfg["out_channels"])
  np.testing.assert_allclose(shared, repeated, rtol=1e-5, atol=1e-5 * float(jnp.abs(repeated).max()))
  assert float(jnp.abs(shared[0::2] - shared[1::2]).max()) > 1e-3  # an input's two conditions differ


def test_layers_before_the_first_cross_attention_run_once_per_input():
  """With a context of 2B rows for B inputs, conv_in, the level-0 ResnetBlocks, the downsampler
  and the first SpatialTransformer's self-attention see B rows; its cross-attention and all after 2B."""
  cfg = SHARED_PREFIX_TINY
  model = UNet(**cfg)
  x, t, context, _ = _inputs(cfg, batch=2)
  context = jnp.concatenate([context, context + 1])
  params = _random_params(model, x, t, context)
  _, state = model.apply(params, x, t, context, capture_intermediates=True)
  rows = {"/".join(k[:-1]): jax.tree.leaves(v)[0].shape[0] for k, v in  # a down block's first output: h
          flax.traverse_util.flatten_dict(state["intermediates"]).items() if k[-1] == "__call__"}
  block = "down_blocks_1/attentions_0/transformer_blocks_0"
  assert rows["conv_in"] == rows["down_blocks_0/resnets_0"] == rows["down_blocks_0/downsamplers_0"] == 2
  assert rows["down_blocks_1/resnets_0"] == rows[f"{block}/attn1"] == 2
  assert rows[f"{block}/attn2"] == rows[block] == rows["down_blocks_1/attentions_0"] == 4
  assert rows["mid_block"] == rows["up_blocks_2"] == rows["conv_out"] == 4


def test_inputs_are_checked():
  model = UNet(**SD1_TINY)
  x, t, context, _ = _inputs(SD1_TINY)
  with pytest.raises(ValueError, match="context_dim=16 needs a context"):
    model.init(jax.random.key(0), x, t, None)
  with pytest.raises(ValueError, match="model.in_channels"):
    model.init(jax.random.key(0), x[..., :3], t, context)
  with pytest.raises(ValueError, match="model.num_classes"):
    model.init(jax.random.key(0), x, t, context, jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="not divisible by 2"):
    model.init(jax.random.key(0), x[:, :7, :7], t, context)
  with pytest.raises(ValueError, match=r"batches \{'context': 3\} must be one N = k·B, a multiple of x's batch B = 2"):
    model.init(jax.random.key(0), x, t, jnp.concatenate([context, context[:1]]))
  with pytest.raises(ValueError, match=r"batches \{'context': 4, 'y': 2\} must be one N"):
    UNet(**dict(SD1_TINY, num_classes=3)).init(jax.random.key(0), x, t, jnp.concatenate([context, context]),
                                               jnp.zeros((2,), jnp.int32))


def test_resblock_updown_layout():
  model = UNet(**UPDOWN_TINY)
  flat = _flat(jax.eval_shape(model.init, jax.random.key(0), *_inputs(UPDOWN_TINY)))
  assert "down_blocks_0/downsamplers_0/conv1/kernel" in flat  # a ResnetBlock, not a strided conv
  assert "up_blocks_0/upsamplers_0/norm2/scale" in flat
  assert not any(k.endswith("downsamplers_0/conv/kernel") for k in flat)


def test_resnet_block_resampling():
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 32))
  temb = jax.random.normal(jax.random.key(1), (1, 16))
  up = unet_lib.ResnetBlock(32, resample="up")
  params = _random_params(up, x, temb)
  # GroupNorm statistics do not change under nearest upsampling, so resampling inside the block
  # equals resampling its input.
  nearest = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  np.testing.assert_allclose(up.apply(params, x, temb), unet_lib.ResnetBlock(32).apply(params, nearest, temb),
                             rtol=1e-4, atol=1e-5)
  down = unet_lib.ResnetBlock(32, resample="down")
  silent = flax.traverse_util.path_aware_map(lambda path, v: jnp.zeros_like(v) if "conv2" in path else v, params)
  pooled = x.reshape(1, 2, 2, 2, 2, 32).mean(axis=(2, 4))  # the skip path is 2×2 average pooled
  np.testing.assert_allclose(down.apply(silent, x, temb), pooled, rtol=1e-5, atol=1e-6)


def test_remat_gives_the_same_loss_and_gradients_and_dropout_is_live():
  cfg = REMAT_TINY
  x, t, context, _ = _inputs(cfg)
  model, rematted = UNet(**cfg), UNet(**cfg, remat=True)
  params = _random_params(model, x, t, context)
  assert jax.tree.structure(_random_params(rematted, x, t, context)) == jax.tree.structure(params)

  def loss(p, m):
    return jnp.mean(m.apply(p, x, t, context) ** 2)

  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  value, g = grad(params, model)
  value_remat, g_remat = grad(params, rematted)
  np.testing.assert_allclose(value_remat, value, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  train = jax.jit(lambda p, rng: rematted.apply(p, x, t, context, deterministic=False, rngs={"dropout": rng}))
  out_a, out_b = train(params, jax.random.key(1)), train(params, jax.random.key(2))
  assert float(jnp.abs(out_a - out_b).max()) > 1e-3


# --- attention numerics ----------------------------------------------------------------------------

def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def _np_attention(p, x, context, heads):
  """Per-head slices of the channel axis, written out head by head."""
  context = x if context is None else context
  q, k, v = x @ p["to_q"]["kernel"], context @ p["to_k"]["kernel"], context @ p["to_v"]["kernel"]
  d = q.shape[-1] // heads
  outs = [_softmax(q[..., h * d:(h + 1) * d] @ np.swapaxes(k[..., h * d:(h + 1) * d], -1, -2) / math.sqrt(d))
          @ v[..., h * d:(h + 1) * d] for h in range(heads)]
  return np.concatenate(outs, -1) @ p["to_out_0"]["kernel"] + p["to_out_0"]["bias"]


def _np_layer_norm(p, x, eps):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_group_norm(p, x, groups, eps):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean, var = g.mean((1, 2, 4), keepdims=True), g.var((1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * p["scale"] + p["bias"]


def _np_gelu(x):
  return 0.5 * x * (1 + np.asarray(erf(x / math.sqrt(2))))


def _np_feed_forward(p, x):
  value, gate = np.split(x @ p["net_0"]["proj"]["kernel"] + p["net_0"]["proj"]["bias"], 2, axis=-1)
  return (value * _np_gelu(gate)) @ p["net_2"]["kernel"] + p["net_2"]["bias"]


def _np_spatial_transformer(p, x, context, heads, group_norm_eps=1e-6):
  b, h, w, c = x.shape
  tokens = _np_group_norm(p["norm"], x, 32, group_norm_eps).reshape(b, h * w, c)
  tokens = tokens @ p["proj_in"]["kernel"].reshape(c, -1) + p["proj_in"]["bias"]
  blk = p["transformer_blocks_0"]
  tokens = tokens + _np_attention(blk["attn1"], _np_layer_norm(blk["norm1"], tokens, 1e-5), None, heads)
  tokens = tokens + _np_attention(blk["attn2"], _np_layer_norm(blk["norm2"], tokens, 1e-5), context, heads)
  tokens = tokens + _np_feed_forward(blk["ff"], _np_layer_norm(blk["norm3"], tokens, 1e-5))
  tokens = tokens @ p["proj_out"]["kernel"].reshape(-1, c) + p["proj_out"]["bias"]
  return x + tokens.reshape(b, h, w, c)


def test_attention_head_split_equals_hand_reshape():
  module = Attention(num_heads=3, head_dim=4)
  x = jax.random.normal(jax.random.key(0), (2, 5, 6))
  context = jax.random.normal(jax.random.key(1), (2, 7, 9))
  params = _random_params(module, x, context)
  p = jax.tree.map(np.asarray, params["params"])
  assert "bias" not in p["to_q"] and p["to_k"]["kernel"].shape == (9, 12)
  np.testing.assert_allclose(module.apply(params, x, context),
                             _np_attention(p, np.asarray(x), np.asarray(context), 3), rtol=1e-4, atol=1e-5)
  self_params = _random_params(module, x)
  np.testing.assert_allclose(module.apply(self_params, x),
                             _np_attention(jax.tree.map(np.asarray, self_params["params"]), np.asarray(x), None, 3),
                             rtol=1e-4, atol=1e-5)


def test_feed_forward_is_geglu_with_exact_gelu():
  x = jax.random.normal(jax.random.key(0), (2, 3, 8)) * 3
  params = _random_params(FeedForward(), x)
  expected = _np_feed_forward(jax.tree.map(np.asarray, params["params"]), np.asarray(x))
  np.testing.assert_allclose(FeedForward().apply(params, x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("linear", [False, True], ids=["conv_proj", "linear_proj"])
def test_spatial_transformer_matches_reference_math(linear):
  # A small input scale makes the GroupNorm epsilon (1e-6 here, not 1e-5) visible in the output.
  module = SpatialTransformer(num_heads=2, head_dim=16, use_linear_projection=linear)
  x = 3e-3 * jax.random.normal(jax.random.key(0), (2, 4, 4, 32))
  context = jax.random.normal(jax.random.key(1), (2, 3, 10))
  params = _random_params(module, x, context)
  p = jax.tree.map(np.asarray, params["params"])
  x64, context64 = np.asarray(x, np.float64), np.asarray(context, np.float64)
  got = module.apply(params, x, context)
  np.testing.assert_allclose(got, _np_spatial_transformer(p, x64, context64, 2), rtol=2e-4, atol=2e-5)
  assert np.abs(got - _np_spatial_transformer(p, x64, context64, 2, group_norm_eps=1e-5)).max() > 1e-2


# --- configuration ---------------------------------------------------------------------------------

def _cfg(**overrides):
  cfg = default_unet_config()
  cfg.update(overrides)
  return cfg


def test_make_unet_reads_the_config():
  cfg = _cfg(model_channels=32, channel_mult=[1, 2], attention_resolutions=[1], num_classes=10,
             dtype="bfloat16", context_dim=None)
  model = make_unet(cfg)
  assert isinstance(model, UNet)
  assert model.channel_mult == (1, 2) and model.attention_resolutions == (1,)
  assert model.num_classes == 10 and model.context_dim is None and model.dtype == jnp.bfloat16
  assert make_unet(default_unet_config()) == UNet()  # the config's defaults are the module's
  assert set(default_unet_config()) == {f.name for f in dataclasses.fields(UNet)} - {"parent", "name"}
  with pytest.raises(ValueError, match="model.num_head_channel: not a U-Net setting"):
    make_unet(ml_collections.ConfigDict({"num_head_channel": 64}))


@pytest.mark.parametrize("overrides, latent, conditioner, concat, message", [
    (dict(channel_mult=(1, 2, 4), attention_resolutions=(16,)), (32, 32, 4), 768, 0,
     r"model.attention_resolutions: 16 is never reached by channel_mult=\(1, 2, 4\) \(downsampling factors 1, 2, 4\)"),
    (dict(num_head_channels=48), (32, 32, 4), 768, 0,
     "model.num_head_channels: 48 does not divide the 320 channels of level 0"),
    (dict(num_heads=3), (32, 32, 4), 768, 0, "model.num_heads: 3 does not divide the 320 channels of level 0"),
    (dict(), (32, 32, 4), 512, 0, "model.context_dim: 768 does not match the conditioner's 512"),
    (dict(), (32, 32, 4), None, 0, "model.context_dim: 768, but the conditioner gives no"),
    (dict(), (36, 36, 4), 768, 0, "model.channel_mult: 4 levels downsample by 8, which does not divide the 36×36"),
    (dict(model_channels=48), (32, 32, 4), 768, 0, "model.model_channels: 48 channels are not divisible by the 32"),
    (dict(model_channels=64, channel_mult=(1, 2, 3.5)), (32, 32, 4), 768, 0, "model.channel_mult: expected a sequence"),
    (dict(model_channels=224, channel_mult=(1, 2, 3, 4), num_head_channels=32, attention_resolutions=(2, 4, 8),
          context_dim=None, use_spatial_transformer=False, in_channels=3, out_channels=3), (64, 64, 4), None, 0,
     "model.out_channels: 3 does not match the autoencoder's 4 latent channels"),
    (dict(in_channels=4), (32, 32, 4), 768, 1, "model.in_channels: 4 does not match the 4 latent channels \\+ 1 concat"),
    (dict(context_dim=512, use_spatial_transformer=False), (32, 32, 4), 512, 0,
     "model.context_dim: cross-attention needs model.use_spatial_transformer=True"),
    (dict(transformer_depth=(1, 2, 10)), (32, 32, 4), 768, 0,
     r"model.transformer_depth: 3 depths \(1, 2, 10\) for 4 levels"),
    (dict(transformer_depth=(1, 0, 1, 1)), (32, 32, 4), 768, 0, "model.transformer_depth: expected positive"),
    (dict(addition_embed_type="text_time"), (32, 32, 4), 768, 0, "model.addition_embed_dim: None; 'text_time' needs"),
    (dict(addition_embed_type="text"), (32, 32, 4), 768, 0, "model.addition_embed_dim: None; 'text' needs"),
    (dict(addition_embed_type="pooled"), (32, 32, 4), 768, 0, "model.addition_embed_type: 'pooled' is not one of"),
])
def test_validate_unet_config_names_the_key(overrides, latent, conditioner, concat, message):
  with pytest.raises(ValueError, match=message):
    validate_unet_config(_cfg(**overrides), latent, conditioner, concat_channels=concat)


@pytest.mark.parametrize("overrides, latent, conditioner", [
    (dict(), (64, 64, 4), 768),  # SD 1.x
    (dict(num_head_channels=64, use_linear_projection=True, context_dim=1024), (96, 96, 4), 1024),  # SD 2.x
    (dict(model_channels=224, channel_mult=(1, 2, 3, 4), num_head_channels=32, attention_resolutions=(8, 4, 2),
          context_dim=None, use_spatial_transformer=False, in_channels=3, out_channels=3), (64, 64, 3), None),
    (dict(model_channels=192, channel_mult=(1, 2, 3, 5), num_head_channels=32, attention_resolutions=(8, 4, 2),
          context_dim=512, in_channels=3, out_channels=3, num_classes=1000), (64, 64, 3), 512),
    (dict(channel_mult=(1, 2, 4), attention_resolutions=(2, 4), num_head_channels=64, use_linear_projection=True,
          transformer_depth=(1, 2, 10), context_dim=2048, addition_embed_type="text_time",
          addition_embed_dim=2816), (128, 128, 4), 2048),  # SDXL base
])
def test_validate_unet_config_accepts_the_reference_models(overrides, latent, conditioner):
  validate_unet_config(_cfg(**overrides), latent, conditioner)
