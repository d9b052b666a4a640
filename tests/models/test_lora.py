"""LoRA as a parameter transformation: identity at B = 0, merge/unmerge, training the adapters only, targets."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ldm_jax.config.lora import check_lora_config, lora_config, lora_scale, target_patterns
from ldm_jax.models.lora import (adapted_modules, apply_lora, count_parameters, init_lora, merge_lora,
                                 select_targets, unmerge_lora)
from ldm_jax.models.unet import UNet

# One level of 32 channels, a spatial transformer with 1×1-conv projections, cross-attention to 8 channels.
TINY = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1,), num_res_blocks=1,
            attention_resolutions=(1,), num_heads=2, context_dim=8, num_groups=8)


@pytest.fixture(scope="module")
def unet():
  model = UNet(**TINY)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  t = np.array([3, 500], np.int32)
  context = rng.normal(size=(2, 5, 8)).astype(np.float32)
  params = jax.jit(model.init)(jax.random.key(0), x, t, context)["params"]
  # Move the zero-initialised projections off zero, so that every adapted kernel changes the output.
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape), params)
  apply = jax.jit(lambda p: model.apply({"params": p}, x, t, context))
  return params, apply


def _random_up(adapter, seed=2):
  leaves, tree = jax.tree_util.tree_flatten_with_path(adapter)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(tree, [
      0.1 * jax.random.normal(k, leaf.shape) if path[-1].key == "up" else leaf
      for (path, leaf), k in zip(leaves, keys)])


def _assert_bitwise(a, b):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    assert np.asarray(x).dtype == np.asarray(y).dtype, path
    np.testing.assert_array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32), err_msg=str(path))


def test_default_targets_are_the_attention_projections(unet):
  params, _ = unet
  targets = select_targets(params, target_patterns(("attention",), "unet", "lora.unet_targets"))
  blocks = ("down_blocks_0/attentions_0", "mid_block/attentions_0", "up_blocks_0/attentions_0",
            "up_blocks_0/attentions_1")
  assert targets == sorted(f"{block}/transformer_blocks_0/attn{i}/{p}" for block in blocks for i in (1, 2)
                           for p in ("to_q", "to_k", "to_v", "to_out_0"))
  conv = select_targets(params, target_patterns(("conv", "proj"), "unet", "k"))
  assert "down_blocks_0/resnets_0/conv1" in conv and "mid_block/attentions_0/proj_in" in conv
  with pytest.raises(ValueError, match=r"lora.unet_targets: '\.\*/nothing' matches no module"):
    select_targets(params, [".*/nothing"])


def test_zero_b_is_the_identity_bitwise(unet):
  params, _ = unet
  targets = select_targets(params, target_patterns(("attention", "ff", "conv"), "unet", "k"))
  lora = init_lora(jax.random.key(3), params, targets, rank=4)
  assert adapted_modules(lora) == targets
  assert np.abs(np.asarray(lora["mid_block"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]["down"])).max() > 0
  _assert_bitwise(jax.jit(lambda p, a: apply_lora(p, [a], [0.7]))(params, lora), params)


def test_several_adapters_with_scales_merge_and_unmerge(unet):
  params, apply = unet
  targets = select_targets(params, target_patterns(("attention", "conv"), "unet", "k"))
  first = _random_up(init_lora(jax.random.key(4), params, targets, rank=4), seed=5)
  second = _random_up(init_lora(jax.random.key(6), params, targets[:5], rank=2), seed=7)
  merged = merge_lora(params, [first, second], [0.5, -1.5])
  module = targets[0]
  kernel = lambda tree: _at(tree, f"{module}/kernel")
  expected = (np.asarray(kernel(params)) + 0.5 * np.asarray(_at(first, f"{module}/down")) @ np.asarray(_at(first, f"{module}/up"))
              - 1.5 * np.asarray(_at(second, f"{module}/down")) @ np.asarray(_at(second, f"{module}/up")))
  np.testing.assert_allclose(kernel(merged), expected, atol=1e-6)
  assert np.abs(np.asarray(apply(merged)) - np.asarray(apply(params))).max() > 1e-2  # the adapters matter
  restored = unmerge_lora(merged, [first, second], [0.5, -1.5])
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
  # A traced scale: one compiled function serves every scale.
  scaled = jax.jit(lambda p, a, s: apply(apply_lora(p, [a], s[None])))
  np.testing.assert_allclose(scaled(params, first, jnp.float32(0.0)), apply(params), atol=1e-6)


def _at(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def test_training_step_changes_only_the_adapters(unet):
  params, apply = unet
  cfg = lora_config(rank=4, alpha=8.0, unet_targets=("attention",))
  check_lora_config(cfg)
  targets = select_targets(params, target_patterns(cfg.unet_targets, "unet", "lora.unet_targets"))
  lora = init_lora(jax.random.key(8), params, targets, cfg.rank)
  optimizer = optax.adamw(1e-2, weight_decay=0.1)
  opt_state = optimizer.init(lora)
  assert jax.tree.structure(opt_state[0].mu) == jax.tree.structure(lora)  # only the adapters have moments
  assert count_parameters(lora) == sum(np.size(x) for x in jax.tree.leaves(opt_state[0].mu))
  base = jax.tree.map(np.array, params)  # host copies to compare with

  @jax.jit
  def step(lora, opt_state, params):
    loss_fn = lambda a: jnp.mean(apply(apply_lora(params, [a], [lora_scale(cfg)])) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(lora)
    updates, opt_state = optimizer.update(grads, opt_state, lora)
    return optax.apply_updates(lora, updates), opt_state, loss

  new_lora, opt_state, _ = step(lora, opt_state, params)
  new_lora, opt_state, _ = step(new_lora, opt_state, params)
  _assert_bitwise(params, base)
  for module in targets:
    assert np.abs(np.asarray(_at(new_lora, f"{module}/up"))).max() > 0, module  # B left zero: it trains
  assert not np.array_equal(_at(new_lora, f"{targets[0]}/down"), _at(lora, f"{targets[0]}/down"))


def test_config_checks_name_the_key():
  check_lora_config(lora_config())
  for overrides, message in [
      (dict(rank=0), r"lora.rank: expected an integer >= 1"),
      (dict(alpha=-1.0), r"lora.alpha: expected a finite number > 0"),
      (dict(dropout=0.1), r"lora.dropout: 0.1; .* Set it to 0.0"),
      (dict(unet_targets="attention"), r"lora.unet_targets: expected a tuple"),
      (dict(text_encoder_targets=("[",)), r"lora.text_encoder_targets: '\[' is neither a preset"),
      (dict(unet_targets=()), r"lora.unet_targets: empty"),
  ]:
    with pytest.raises(ValueError, match=message):
      check_lora_config({**lora_config().to_dict(), **overrides})
  with pytest.raises(ValueError, match="lora.rnak: not a LoRA setting"):
    lora_config(rnak=4)
  assert lora_scale(lora_config(rank=4, alpha=8.0)) == 2.0
