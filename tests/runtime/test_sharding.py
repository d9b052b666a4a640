"""Meshes, partition rules and sharded train steps (8 simulated CPU devices).

The step tests compare a train step on one device with the same step on a (data=2, fsdp=4) mesh
whose parameters, EMA and optimizer state are FSDP-sharded. They use SGD with momentum: Adam's
first update is ±lr for any gradient, so gradients that are zero up to rounding (a conv bias
before a GroupNorm) would turn summation-order noise into ±lr differences.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from ldm_jax.config import mesh as mesh_config
from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.runtime import checkpoint as ckpt_lib
from ldm_jax.runtime import sharding
from ldm_jax.train import autoencoder
from ldm_jax.train.diffusion import setup
from tests.conftest import load_config
from tests.train.stage2 import Stage2, prepare

FSDP = dict(data=2, fsdp=4, fsdp_min_size=0)
SINGLE = dict(data=1, fsdp=1)


def cfg(**kw):
  return ml_collections.ConfigDict(kw)


# ---- meshes and batches -------------------------------------------------------------------------

@pytest.mark.parametrize("mesh_cfg, expected", [
    (dict(data=-1, fsdp=1), (8, 1, 1)),
    (dict(data=2, fsdp=-1), (2, 4, 1)),
    (dict(data=4, fsdp=2), (4, 2, 1)),
    (dict(data=2, fsdp=2, tensor=-1), (2, 2, 2)),
])
def test_mesh_shape_resolves_minus_one(mesh_cfg, expected):
  assert sharding.mesh_shape(cfg(**mesh_cfg), 8) == expected


@pytest.mark.parametrize("mesh_cfg, key", [
    (dict(data=3, fsdp=-1), "mesh.fsdp"),
    (dict(data=4, fsdp=4), "mesh"),
    (dict(data=-1, fsdp=-1), "mesh"),
    (dict(data=0, fsdp=1), "mesh.data"),
    (dict(data=2, fsdp=2, tensor=1), "8 are available"),
])
def test_mesh_shape_errors_name_the_key(mesh_cfg, key):
  with pytest.raises(ValueError, match=key):
    sharding.mesh_shape(cfg(**mesh_cfg), 8)


def test_shard_batch_splits_the_batch_over_all_devices():
  mesh = sharding.make_mesh(cfg(data=-1, fsdp=1))
  batch = {"image": np.arange(16 * 2, dtype=np.float32).reshape(16, 2), "caption": np.array(["a"] * 16)}
  sharded = sharding.shard_batch(batch, mesh)
  assert set(sharded) == {"image"}  # strings stay on the host
  image = sharded["image"]
  assert len(image.addressable_shards) == 8
  assert {s.data.shape for s in image.addressable_shards} == {(2, 2)}
  np.testing.assert_array_equal(np.asarray(image), batch["image"])


def test_check_batch_size_names_the_key():
  mesh = sharding.make_mesh(cfg(data=-1, fsdp=1))
  sharding.check_batch_size(16, mesh)
  with pytest.raises(ValueError, match="train.batch_size"):
    sharding.check_batch_size(12, mesh)
  with pytest.raises(ValueError, match="train.grad_accum_steps: 4 micro-batches do not divide the 2"):
    sharding.check_batch_size(16, mesh, grad_accum_steps=4)


# ---- partition rules ----------------------------------------------------------------------------

def params_tree():
  return {"unet": {"conv": {"kernel": jnp.zeros((3, 3, 32, 64)), "bias": jnp.zeros(64)},
                   "proj": {"kernel": jnp.zeros((48, 6))},    # 48 % 4 == 0, 6 % 4 != 0
                   "odd": {"kernel": jnp.zeros((9, 7, 5))}},  # no dimension divisible by 4
          "cond": {"embedding": jnp.zeros((12, 64))}}


def specs(mesh_cfg, rules=sharding.DEFAULT_RULES, min_size=0, tree=None):
  mesh = sharding.make_mesh(cfg(**mesh_cfg))
  return sharding.partition_specs(mesh, params_tree() if tree is None else tree, rules, fsdp_min_size=min_size)


def test_fsdp_rule_shards_the_largest_divisible_dimension_and_replicates_the_rest():
  s = specs(dict(data=2, fsdp=4))
  assert s["unet"]["conv"]["kernel"] == P(None, None, None, "fsdp")  # 64 > 32
  assert s["unet"]["conv"]["bias"] == P(None, "fsdp") or s["unet"]["conv"]["bias"] == P("fsdp")
  assert s["unet"]["proj"]["kernel"] == P("fsdp")
  assert s["unet"]["odd"]["kernel"] == P()
  assert s["cond"]["embedding"] == P(None, "fsdp")
  # Small parameters stay replicated; with mesh.fsdp = 1 everything is (data parallelism).
  small = specs(dict(data=2, fsdp=4), min_size=2**12)
  assert small["unet"]["conv"]["kernel"] == P(None, None, None, "fsdp") and small["unet"]["conv"]["bias"] == P()
  assert all(spec == P() for spec in jax.tree.leaves(specs(dict(data=8, fsdp=1)), is_leaf=lambda x: isinstance(x, P)))


def test_first_matching_rule_wins_and_explicit_specs_apply():
  rules = ((r"unet/conv/kernel$", (None, None, "data", "tensor")), (r"^cond/", "replicate"), (r".*", "fsdp"))
  s = specs(dict(data=2, fsdp=2, tensor=2), rules)
  assert s["unet"]["conv"]["kernel"] == P(None, None, "data", "tensor")
  assert s["cond"]["embedding"] == P()
  assert s["unet"]["proj"]["kernel"] == P("fsdp")


@pytest.mark.parametrize("rules, match", [
    (((".*", (None, "model")),), r"mesh.rules\[0\]: axis 'model' is not a mesh axis"),
    ((("(", "fsdp"),), r"mesh.rules\[0\]: '\(' is not a valid regex"),
    (((".*", "shard"),), r"mesh.rules\[0\]: spec 'shard'"),
    (("fsdp",), r"mesh.rules\[0\]: expected a \(regex, spec\) pair"),
])
def test_bad_rules_name_the_rule(rules, match):
  with pytest.raises(ValueError, match=match):
    mesh_config.validate_mesh_config(cfg(data=-1, fsdp=1, rules=rules))


def test_rule_that_does_not_fit_a_parameter_names_rule_and_path():
  with pytest.raises(ValueError, match=r"mesh.rules\[1\]: dimension 1 of unet/proj/kernel \(48, 6\)"):
    specs(dict(data=2, fsdp=4), ((r"conv", "fsdp"), (r"proj", (None, "fsdp"))))
  with pytest.raises(ValueError, match=r"mesh.rules\[0\]: spec \(None, None, 'fsdp'\) has 3 entries, but cond/embedding"):
    specs(dict(data=2, fsdp=4), ((r"cond", (None, None, "fsdp")),))


def test_optimizer_state_and_ema_follow_their_parameters():
  mesh = sharding.make_mesh(cfg(data=2, fsdp=4))
  params = params_tree()
  state = {"params": params, "ema": params, "opt": optax.adam(1e-3).init(params), "step": jnp.zeros((), jnp.int32)}
  shardings = sharding.state_sharding(mesh, state, params, fsdp_min_size=0)
  kernel = P(None, None, None, "fsdp")
  assert shardings["params"]["unet"]["conv"]["kernel"].spec == kernel
  assert shardings["ema"]["unet"]["conv"]["kernel"].spec == kernel
  adam = shardings["opt"][0]
  assert adam.mu["unet"]["conv"]["kernel"].spec == kernel and adam.nu["cond"]["embedding"].spec == P(None, "fsdp")
  assert adam.count.spec == P() and shardings["step"].spec == P()


# ---- sharded train steps ------------------------------------------------------------------------

def ae_config(mesh, **train):
  config = load_config("configs/autoencoder/shapes_kl_f4.py:smoke")
  config.model.ch_mult = (1,)
  config.mesh.update(mesh)
  config.train.update(train)
  return config


def sgd(config, with_gan=True):
  del with_gan  # stage 1's optimizer before the GAN starts: the same SGD
  return optax.sgd(1e-4, momentum=0.9)


def make_stage1(mesh_cfg, devices=None, **train):
  """A stage-1 trainer with SGD instead of Adam (see the module docstring)."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(autoencoder, "make_optimizer", sgd)
    return autoencoder.Stage1(ae_config(mesh_cfg, **train), sharding.make_mesh(cfg(**mesh_cfg), devices))


@pytest.fixture(scope="module")
def stage1():
  """(single-device stage, FSDP stage, batch)."""
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32)}
  return make_stage1(SINGLE, jax.devices()[:1]), make_stage1(FSDP), batch


def run_steps(stage, state, batch, steps, *extra):
  """`steps` train steps of `stage` from a host copy of the state, placed by the stage's shardings
  (one init for both meshes: the same starting point, and one init compile less)."""
  state = jax.device_put(state, stage.state_sharding)
  step = stage.train_step[False] if isinstance(stage, autoencoder.Stage1) else stage.train_step
  for _ in range(steps):
    state, metrics = step(state, sharding.shard_batch(batch, stage.mesh), *extra)
  return state, jax.device_get(metrics)


def assert_trees_close(a, b, rtol=1e-4, scale=1e-5):
  """Leafwise allclose with an absolute tolerance of `scale` × the tree's largest magnitude, so that
  values that are rounding noise (gradients of biases followed by a GroupNorm) compare as equal."""
  atol = scale * max(float(np.max(np.abs(x))) for x in jax.tree.leaves(b))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol), a, b)


def test_stage1_fsdp_step_equals_single_device_step_and_restores_onto_other_meshes(stage1, tmp_path):
  single, fsdp, batch = stage1
  initial = jax.device_get(single.init(jax.random.PRNGKey(0)))
  state_1, metrics_1 = run_steps(single, initial, batch, 2)
  state_8, metrics_8 = run_steps(fsdp, initial, batch, 2)
  kernel = state_8.params["autoencoder"]["decoder"]["conv_in"]["kernel"]
  assert kernel.sharding.spec == P(None, None, None, "fsdp")
  assert {s.data.shape for s in kernel.addressable_shards} == {(3, 3, 3, 32 // 4)}
  assert metrics_1["nonfinite"] == 0
  assert_trees_close(metrics_1, metrics_8, rtol=1e-5)
  params_1, params_8 = jax.device_get(state_1.params), jax.device_get(state_8.params)
  assert_trees_close(params_1, params_8)
  assert_trees_close(jax.device_get(state_1.opt_state), jax.device_get(state_8.opt_state))
  assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(initial.params), jax.tree.leaves(params_1))) > 1e-6

  # A checkpoint of the FSDP state restores onto one device and onto an 8-way FSDP mesh.
  ckpt = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
  ckpt.save(2, state_8)
  fsdp8 = make_stage1(dict(data=1, fsdp=8, fsdp_min_size=0))
  for target in (single, fsdp8):
    restored = ckpt.restore(target.abstract_state)
    jax.tree.map(lambda r, s: (r.sharding == s) or pytest.fail(f"{r.sharding} != {s}"), restored, target.state_sharding)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), jax.device_get(state_8))
  ckpt.close()


def test_stage1_bfloat16_with_remat_keeps_float32_weights_and_close_losses(stage1):
  single, _, batch = stage1
  mixed = make_stage1(SINGLE, jax.devices()[:1], dtype="bfloat16", remat=True)
  assert mixed.model.dtype == jnp.bfloat16 and mixed.model.remat
  initial = jax.device_get(single.init(jax.random.PRNGKey(0)))
  state_32, metrics_32 = run_steps(single, initial, batch, 2)
  state_16, metrics_16 = run_steps(mixed, initial, batch, 2)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state_16.params))  # master weights
  for key in ("loss", "rec_loss", "kl_loss"):
    np.testing.assert_allclose(metrics_16[key], metrics_32[key], rtol=2e-2)
  assert metrics_16["nonfinite"] == 0


def test_stage1_non_finite_batch_skips_the_update(stage1):
  single, _, batch = stage1
  state = single.init(jax.random.PRNGKey(0))
  before = jax.device_get(state)
  bad = dict(batch, image=np.where(np.arange(8)[:, None, None, None] == 3, np.nan, batch["image"]))
  state, metrics = single.train_step[False](state, sharding.shard_batch(bad, single.mesh))
  assert float(metrics["nonfinite"]) == 1.0
  after = jax.device_get(state)
  assert int(after.step) == int(before.step) + 1
  assert not np.array_equal(after.rng, before.rng)  # the next step draws new randomness
  jax.tree.map(np.testing.assert_array_equal, (after.params, after.opt_state), (before.params, before.opt_state))


@pytest.fixture(scope="module")
def stage2():
  """(single-device stage, FSDP stage, prepared batch) of a class-conditional LDM on a random
  tiny autoencoder (encoded at every step, so the sharded frozen autoencoder is used too)."""
  stages = {}
  ae_cfg = ae_config(SINGLE)
  ae_model = ae_lib.make_autoencoder(ae_cfg.model)
  ae_init = ae_model.init(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)), method=ae_model.init_all)["params"]
  rng = np.random.default_rng(0)
  raw = {"image": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32),
         "label": rng.integers(0, 6, 8).astype(np.int32), "caption": np.array([""] * 8)}
  for name, m in (("single", SINGLE), ("fsdp", FSDP)):
    config = load_config("configs/ldm/fmnist_class_cond.py:smoke")
    config.data.update(source="shapes", path="", channels=3, num_examples=80)
    config.cond.num_classes = 0
    config.latent.cache = False
    config.mesh.update(m)
    setup.resolve_config(config, ae_cfg)
    mesh = sharding.make_mesh(cfg(**m), jax.devices()[:1] if name == "single" else None)
    ae_params = jax.device_put(ae_init, sharding.tree_sharding(mesh, ae_init, prefix="autoencoder",
                                                               **sharding.rules_of(config.mesh)))
    batch = prepare(config, ae_cfg, raw)
    stages[name] = Stage2(config, mesh, ae_model, ae_cfg, ae_params, batch, optimizer=sgd(config))
  return stages["single"], stages["fsdp"], batch


# Extended: the default suite compares stage 1's FSDP step (the same sharding rules).
@pytest.mark.extended
def test_stage2_fsdp_step_equals_single_device_step(stage2):
  single, fsdp, batch = stage2
  initial = jax.device_get(single.init(jax.random.PRNGKey(0), jnp.float32(0.5)))
  state_1, metrics_1 = run_steps(single, initial, batch, 2, single.ae_params)
  state_8, metrics_8 = run_steps(fsdp, initial, batch, 2, fsdp.ae_params)
  assert metrics_1["nonfinite"] == 0
  for tree in (state_8.params, state_8.ema_params, fsdp.ae_params):
    assert any(leaf.sharding.spec != P() for leaf in jax.tree.leaves(tree))
  assert_trees_close(metrics_1, metrics_8, rtol=1e-5)
  for field in ("params", "ema_params", "opt_state"):
    assert_trees_close(jax.device_get(getattr(state_1, field)), jax.device_get(getattr(state_8, field)))


def test_stage2_non_finite_batch_skips_the_update(stage2):
  single, _, batch = stage2
  state = single.init(jax.random.PRNGKey(0), jnp.float32(0.5))
  before = jax.device_get(state)
  bad = dict(batch, image=np.full_like(batch["image"], np.inf))
  state, metrics = single.train_step(state, sharding.shard_batch(bad, single.mesh), single.ae_params)
  after = jax.device_get(state)
  assert float(metrics["nonfinite"]) == 1.0 and int(after.step) == 1
  jax.tree.map(np.testing.assert_array_equal, (after.params, after.ema_params, after.opt_state),
               (before.params, before.ema_params, before.opt_state))
