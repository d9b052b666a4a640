"""LoRA fine-tuning through train_diffusion (`configs/finetune/lora.py`): adapters train, the base does not.

The fast tests drive `LoraTuning` on a toy parameter tree; the extended one trains a
`shapes_txt2img:smoke` base for two steps, then LoRA on it (from that stage-2 workdir) on a
data × fsdp mesh, resumes it, and reads the adapter file back.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ldm_jax import load
from ldm_jax.config import common as config_lib
from ldm_jax.config.lora import lora_config
from ldm_jax.convert import lora as lora_files
from ldm_jax.models import lora as lora_lib
from ldm_jax.runtime import sharding
from ldm_jax.train import diffusion
from ldm_jax.train.diffusion import finetune
from ldm_jax.train.diffusion import state as state_lib
from tests.conftest import load_config
from tests.train.runs import read_state


def toy_base():
  rng = np.random.default_rng(0)
  block = lambda: {"attn1": {n: {"kernel": rng.standard_normal((8, 8)).astype(np.float32)}
                             for n in ("to_q", "to_k", "to_v", "to_out_0")},
                   "ff": {"net_2": {"kernel": rng.standard_normal((16, 8)).astype(np.float32),
                                    "bias": rng.standard_normal(8).astype(np.float32)}}}
  return {"unet": {"mid_block": block(), "conv_in": {"kernel": rng.standard_normal((3, 3, 4, 8)).astype(np.float32)}},
          "cond": {"text_encoder": {"encoder": {"layers_0": {"self_attn": {
              "q_proj": {"kernel": rng.standard_normal((8, 8)).astype(np.float32)}}}}}}}


def toy_config(pretrained="base", **lora):
  config = ml_collections.ConfigDict(dict(lora=lora_config(**lora), mesh=config_lib.mesh_config(),
                                          cond=dict(text_encoder="pretrained"), init=dict(pretrained=pretrained)))
  config.mesh.fsdp_min_size = 0
  return config


def test_only_adapters_train_and_the_base_stays_bit_identical():
  base = toy_base()
  tuning = finetune.make_tuning(toy_config(rank=2, alpha=4.0), base, None, None, sharding.make_mesh(toy_config().mesh))
  assert tuning.targets == {"unet": [f"mid_block/attn1/{n}" for n in ("to_k", "to_out_0", "to_q", "to_v")]}
  adapters = tuning.init(jax.random.PRNGKey(0))
  jax.tree.map(np.testing.assert_array_equal, tuning.compose(adapters, tuning.base), base)  # B = 0

  optimizer = state_lib.make_optimizer(ml_collections.ConfigDict(dict(
      optim=dict(schedule="constant", learning_rate=0.1, warmup_steps=0, grad_clip=1.0, b1=0.9, b2=0.999,
                 weight_decay=0.01), train=dict(num_steps=3))))
  opt_state = optimizer.init(adapters)
  # Adam's two moments of each adapter leaf and nothing of the 4 + 2 + 1 + 1 base kernels.
  moments = [x for x in jax.tree.leaves(opt_state) if np.ndim(x) > 0]
  assert sorted(x.shape for x in moments) == sorted(2 * [x.shape for x in jax.tree.leaves(adapters)])

  def loss(a, base):
    params = tuning.compose(a, base)
    return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(params))

  @jax.jit
  def step(a, opt_state, base):
    grads = jax.grad(loss)(a, base)
    updates, opt_state = optimizer.update(grads, opt_state, a)
    return optax.apply_updates(a, updates), opt_state

  for _ in range(3):
    adapters, opt_state = step(adapters, opt_state, tuning.base)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(tuning.base), base)
  trained = tuning.compose(adapters, tuning.base)
  q = "mid_block/attn1/to_q"
  assert np.abs(np.asarray(trained["unet"]["mid_block"]["attn1"]["to_q"]["kernel"]) -
                base["unet"]["mid_block"]["attn1"]["to_q"]["kernel"]).max() > 1e-3, q
  np.testing.assert_array_equal(trained["unet"]["mid_block"]["ff"]["net_2"]["kernel"],
                                base["unet"]["mid_block"]["ff"]["net_2"]["kernel"])  # not a target


def test_the_train_state_is_the_adapters_their_ema_and_adam_moments():
  """The state the trainer builds (`StateBuilder` with `tuning.init`): per adapter leaf its value, its
  EMA and Adam's two moments — 4 × the adapters' bytes, nothing of the base (benchmarks/memory_training.py
  --finetune_table measures this on SD 1.5)."""
  config = toy_config(rank=2, alpha=4.0)
  mesh = sharding.make_mesh(config.mesh)
  tuning = finetune.make_tuning(config, toy_base(), None, None, mesh)
  config.update(dict(model=dict(in_channels=4), train=dict(num_steps=3), optim=dict(
      schedule="constant", learning_rate=0.1, warmup_steps=0, grad_clip=1.0, b1=0.9, b2=0.999, weight_decay=0.01)))
  builder = state_lib.StateBuilder(config, mesh, None, None, (4, 4, 4), {}, state_lib.make_optimizer(config),
                                   init_params=tuning.init)
  state, adapters = builder.abstract_state, jax.eval_shape(tuning.init, jax.random.PRNGKey(0))
  assert jax.tree.structure(state.params) == jax.tree.structure(state.ema_params) == jax.tree.structure(adapters)
  # Besides step, rng and scale_factor; Adam's step count is a scalar.
  arrays = [x for x in jax.tree.leaves((state.params, state.ema_params, state.opt_state)) if x.ndim > 0]
  assert sorted(x.shape for x in arrays) == sorted(4 * [x.shape for x in jax.tree.leaves(adapters)])
  nbytes = lambda leaves: sum(x.size * x.dtype.itemsize for x in leaves)
  # 4 copies × 4 projections × (A [8, 2] + B [2, 8]) float32: 2 KiB, of 8 + 2 + 1 + 1 base kernels.
  assert nbytes(arrays) == 4 * nbytes(jax.tree.leaves(adapters)) == 4 * 4 * (8 * 2 + 2 * 8) * 4


def test_text_encoder_adapters_and_the_file(tmp_path):
  base = toy_base()
  tuning = finetune.make_tuning(toy_config(rank=2, alpha=1.0, text_encoder_targets=("attention",)), base, None,
                                None, sharding.make_mesh(toy_config().mesh))
  assert tuning.targets["cond"] == ["text_encoder/encoder/layers_0/self_attn/q_proj"]
  adapters = jax.tree.map(lambda x: x + 1.0, tuning.init(jax.random.PRNGKey(1)))  # B ≠ 0
  path = tuning.save(str(tmp_path), jax.device_get(adapters))
  assert path == str(tmp_path / lora_files.WEIGHTS_NAME)
  read = lora_files.read_lora(path, {"unet": base["unet"], "text_encoder": base["cond"]["text_encoder"]})
  merged = lora_lib.apply_lora(base, [{"unet": read["unet"], "cond": {"text_encoder": read["text_encoder"]}}])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), merged,
               jax.device_get(tuning.compose(adapters, tuning.base)))


def test_bad_lora_configs_name_their_key():
  mesh = sharding.make_mesh(toy_config().mesh)
  with pytest.raises(ValueError, match=r"lora\.unet_targets: '\.\*/nothing' matches no module"):
    finetune.make_tuning(toy_config(unet_targets=(".*/nothing",)), toy_base(), None, None, mesh)
  with pytest.raises(ValueError, match=r"lora: adapters are trained on a base model; set init\.pretrained"):
    finetune.check_method(toy_config(pretrained=""))
  scratch = {"unet": toy_base()["unet"], "cond": {"encoder": {}, "token_emb": {}}}
  with pytest.raises(ValueError, match=r"lora\.text_encoder_targets: adapters of a text encoder need"):
    finetune.make_tuning(toy_config(text_encoder_targets=("attention",)), scratch, None, None, mesh)


@pytest.mark.extended
def test_lora_run_from_a_stage2_workdir(smoke_text_run, tmp_path):
  base_run = smoke_text_run

  run = str(tmp_path / "lora")
  config = load_config("configs/finetune/lora.py:smoke")
  config.init.pretrained = base_run
  config.mesh.update(fsdp=2, fsdp_min_size=0)  # adapters and base sharded over 2 devices
  config.train.update(num_steps=3, checkpoint_every=2, image_every=3, log_every=1)
  diffusion.train_and_evaluate(config, run)
  base = read_state(base_run, ("ema_params",))

  # The checkpoints hold adapters of the attention projections; Adam's moments are those and only those.
  adapters = read_state(run, ("params",), step=3)
  assert set(adapters) == {"unet"}
  modules = lora_lib.adapted_modules(adapters["unet"])
  assert modules and all(m.rsplit("/", 1)[-1] in ("to_q", "to_k", "to_v", "to_out_0") for m in modules)
  moments = [x for x in jax.tree.leaves(read_state(run, ("opt_state",), step=3)) if np.ndim(x) > 0]
  assert sorted(x.shape for x in moments) == sorted(2 * [x.shape for x in jax.tree.leaves(adapters)])
  ups = [np.abs(x).max() for path, x in jax.tree_util.tree_leaves_with_path(adapters) if "up" in str(path[-1])]
  assert len(ups) == len(modules) and min(ups) > 0  # every B moved away from 0
  # The base the run imported is the base run's EMA weights, and it is all the run has of the model.
  _, pretrained, _ = load.load_pretrained(os.path.join(run, "pretrained"))
  jax.tree.map(np.testing.assert_array_equal, pretrained["unet"], base["unet"])

  # The file: the EMA adapters (= the trained ones, ema_decay 0) with α/r in B, read by the reader.
  read = lora_files.read_lora(os.path.join(run, lora_files.WEIGHTS_NAME), {"unet": base["unet"]})
  ema = read_state(run, ("ema_params",), step=3)
  jax.tree.map(np.testing.assert_array_equal, ema, adapters)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), read["unet"], adapters["unet"])

  # Resume: the same command with more steps continues from step 3 and rewrites the file.
  config.train.num_steps = 4
  diffusion.train_and_evaluate(config, run)
  with open(os.path.join(run, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [1, 2, 3, 4]
  resumed = lora_files.read_lora(os.path.join(run, lora_files.WEIGHTS_NAME), {"unet": base["unet"]})
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               resumed["unet"], read_state(run, ("ema_params", "unet"), step=4))
  with pytest.raises(ValueError, match=r"is a LoRA run; its checkpoints hold adapters"):
    load.read_diffusion_run(run)
