"""Textual inversion through train_diffusion (`configs/finetune/textual_inversion.py`): only the new rows train.

The fast test drives `EmbeddingTuning` on a toy text encoder; the extended one learns `<shape>` on
a two-step `shapes_txt2img:smoke` run and reads `learned_embeds.safetensors` back.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ldm_jax.config import common as config_lib
from ldm_jax.config import sections
from ldm_jax.config.textual_inversion import ti_config
from ldm_jax.convert import textual_inversion as ti
from ldm_jax.data.tokenizer import build_tokenizer, load_tokenizer
from ldm_jax.models import conditioning
from ldm_jax.runtime import sharding
from ldm_jax.train import diffusion
from ldm_jax.train.diffusion import finetune
from tests.conftest import load_config
from tests.train.runs import read_state

CAPTIONS = ["a large red circle on a white background", "a small blue square on a black background"] * 8


def toy_setup(**ti_overrides):
  cond = sections.default_cond_config()
  cond.update(kind="text", vocab_size=64, max_length=8, dim=8, depth=1, num_heads=2, head_dim=-1)
  tokenizer = build_tokenizer(cond, CAPTIONS)
  conditioner = conditioning.make_conditioner(cond, tokenizer)
  rng = np.random.default_rng(0)
  base = {"unet": {"conv_in": {"kernel": rng.standard_normal((3, 3, 4, 8)).astype(np.float32)}},
          "cond": {"text_encoder": {"token_emb": {"embedding": rng.standard_normal((64, 8)).astype(np.float32)},
                                    "norm": {"scale": np.ones(8, np.float32)}}}}
  config = ml_collections.ConfigDict(dict(
      textual_inversion=ti_config(**{**dict(token="<shape>", initializer_token="circle", num_vectors=2,
                                            prompts=("a large red {} on a white background", "a {}")),
                                     **ti_overrides}),
      mesh=config_lib.mesh_config(), cond=cond, init=dict(pretrained="base")))
  return config, base, tokenizer, conditioner


def test_only_the_placeholder_rows_train():
  config, base, tokenizer, conditioner = toy_setup()
  tuning = finetune.make_tuning(config, base, tokenizer, conditioner, sharding.make_mesh(config.mesh))
  ids = list(tuning.ids)
  assert ids == [tokenizer.vocab_size, tokenizer.vocab_size + 1]
  assert tuning.tokenizer.token_id("<shape>") == ids[0] and tuning.tokenizer.token_id("<shape>_1") == ids[1]
  circle = base["cond"]["text_encoder"]["token_emb"]["embedding"][tokenizer.token_id("circle")]
  np.testing.assert_array_equal(tuning.initial, np.stack([circle, circle]))
  # Captions: the templates with the placeholder, cycled over the run's examples.
  batch = tuning.captions({"caption": np.array(["x", "y", "z"]), "image": np.zeros((3, 1))}, step=1)
  assert list(batch["caption"]) == ["a <shape>", "a large red <shape> on a white background", "a <shape>"]

  optimizer = optax.adamw(0.1)
  rows = tuning.init(jax.random.PRNGKey(0))
  opt_state = optimizer.init(rows)
  assert sorted(x.shape for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0) == [(2, 8), (2, 8)]

  def loss(r, base):
    table = tuning.compose(r, base)["cond"]["text_encoder"]["token_emb"]["embedding"]
    return jnp.sum(jnp.sin(table) * jnp.arange(table.size, dtype=jnp.float32).reshape(table.shape))

  @jax.jit
  def step(r, opt_state, base):
    updates, opt_state = optimizer.update(jax.grad(loss)(r, base), opt_state, r)
    return optax.apply_updates(r, updates), opt_state

  for _ in range(3):
    rows, opt_state = step(rows, opt_state, tuning.base)
  trained = jax.device_get(tuning.compose(rows, tuning.base))
  table = trained["cond"]["text_encoder"]["token_emb"]["embedding"]
  old = base["cond"]["text_encoder"]["token_emb"]["embedding"]
  others = np.setdiff1d(np.arange(64), ids)
  np.testing.assert_array_equal(table[others], old[others])  # every other row bit-identical
  assert np.abs(table[ids] - np.stack([circle, circle])).min() > 1e-3  # the new rows moved
  jax.tree.map(np.testing.assert_array_equal, trained["unet"], base["unet"])
  np.testing.assert_array_equal(trained["cond"]["text_encoder"]["norm"]["scale"], np.ones(8))


def test_bad_textual_inversion_configs_name_their_key():
  config, base, tokenizer, conditioner = toy_setup(initializer_token="purple circle")
  mesh = sharding.make_mesh(config.mesh)
  with pytest.raises(ValueError, match=r"textual_inversion: .*initializer_token 'purple circle' is 2 tokens"):
    finetune.make_tuning(config, base, tokenizer, conditioner, mesh)
  config.textual_inversion.update(initializer_token="circle", prompts=("no placeholder",))
  with pytest.raises(ValueError, match=r"textual_inversion\.prompts: expected templates with one \{\}"):
    finetune.check_method(config)
  config.textual_inversion.prompts = ("a {}",)
  config.lora = ml_collections.ConfigDict()
  with pytest.raises(ValueError, match=r"a run trains one of lora, textual_inversion"):
    finetune.check_method(config)


@pytest.mark.extended
def test_textual_inversion_run_on_a_stage2_workdir(smoke_text_run, tmp_path):
  base_run = smoke_text_run

  run = str(tmp_path / "ti")
  config = load_config("configs/finetune/textual_inversion.py:smoke")
  config.init.pretrained = base_run
  config.train.update(num_steps=3, checkpoint_every=3, image_every=3)
  diffusion.train_and_evaluate(config, run)

  rows = read_state(run, ("params",))
  assert set(rows) == {"rows"} and rows["rows"].shape == (1, 32)
  moments = [x for x in jax.tree.leaves(read_state(run, ("opt_state",))) if np.ndim(x) > 0]
  assert sorted(x.shape for x in moments) == [(1, 32), (1, 32)]
  token, vectors = ti.read_learned_embeds(run)
  assert token == "<shape>"
  np.testing.assert_array_equal(vectors, rows["rows"])
  table = read_state(base_run, ("ema_params", "cond", "text_encoder", "token_emb", "embedding"))
  circle = table[load_tokenizer(os.path.join(run, "tokenizer")).token_id("circle")]
  assert np.abs(vectors[0] - circle).max() > 0  # trained away from the initializer's row
