"""Stage-2 runs at `:smoke` size on a smoke autoencoder: learning, sampling, checkpoints, resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import data as data_lib
from ldm_jax.config import common as config_lib
from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.runtime import checkpoint as ckpt_lib
from ldm_jax.runtime import sharding
from ldm_jax.train import diffusion, loop
from ldm_jax.train.loop import compile_ahead
from ldm_jax.diffusion import schedule as schedule_lib
from ldm_jax.train.diffusion import data, setup, state as state_lib, step as step_lib
from tests.train.stage2 import Stage2, prepare
from tests.conftest import load_config


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def restore(workdir, keys):
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  value = ckpt.restore_subtree(keys, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  ckpt.close()
  return jax.device_get(value)


def tiny_run(kind="kl", *, cache=False):
  """(config, mesh, (autoencoder, its config), ae_params) of a class-conditional `:smoke` LDM on the 16 px shapes (80
  images) over a random one-level autoencoder of `kind` ('kl' | 'vq'), on one device."""
  ae_config = load_config("configs/autoencoder/shapes_kl_f4.py:smoke" if kind == "kl"
                          else "configs/autoencoder/vq_f4.py:smoke")
  ae_config.model.ch_mult = (1,)
  model = ae_lib.make_autoencoder(ae_config.model)
  ae_params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 16, 16, 3)), method=model.init_all)["params"]
  config = load_config("configs/ldm/fmnist_class_cond.py:smoke")
  config.data.update(source="shapes", path="", channels=3, num_examples=80)
  config.cond.num_classes = 0
  config.latent.cache = cache
  setup.resolve_config(config, ae_config)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  return config, mesh, (model, ae_config), ae_params


def random_batch(config, ae):
  """A prepared batch of 8 random 16 px images, labels 0…5 in turn, empty captions."""
  rng = np.random.default_rng(0)
  raw = {"image": rng.uniform(-1, 1, (8, 16, 16, 3)).astype(np.float32), "label": np.arange(8, dtype=np.int32) % 6,
         "caption": np.array([""] * 8)}
  return prepare(config, ae[1], raw)


def make_stage(config, mesh, ae, ae_params, batch):
  """A `Stage2` for prepared batches like `batch`, with scale_factor 0.5."""
  return Stage2(config, mesh, *ae, ae_params, batch, scale_factor=0.5)


def test_pooled_text_embedding_needs_the_matching_unet_input():
  ae_config = load_config("configs/autoencoder/shapes_kl_f2.py:smoke")
  config = load_config("configs/ldm/shapes_txt2img.py:smoke")
  setup.resolve_config(config, ae_config)  # the demo's config: cond.pooled with addition_embed_type 'text'
  assert config.cond.pooled and config.model.addition_embed_dim == config.cond.dim
  for key, value in (("model.addition_embed_type", None), ("model.addition_embed_dim", 64), ("cond.pooled", False)):
    bad = load_config("configs/ldm/shapes_txt2img.py:smoke")
    section, name = key.split(".")
    bad[section][name] = value
    with pytest.raises(ValueError, match=r"cond\.pooled.*model\.addition_embed_dim = cond\.dim \(32\)"):
      setup.resolve_config(bad, ae_config)


def test_ema_decay_warms_up_as_litema():
  n = np.array([1, 2, 10, 1000, 10**6])
  decay = np.asarray(state_lib.ema_decay(jax.numpy.asarray(n), 0.999))
  np.testing.assert_allclose(decay, np.minimum(0.999, (1 + n) / (10 + n)), rtol=1e-6)


@pytest.mark.extended
def test_ema_updates_use_litema_decays_from_the_first_step():
  """LitEma's first update uses n = 1 (its counter is incremented first): decays 2/11, 3/12, 4/13."""
  config, mesh, ae, ae_params = tiny_run()
  batch = random_batch(config, ae)
  stage = make_stage(config, mesh, ae, ae_params, batch)
  state = stage.init(jax.random.PRNGKey(0), jnp.float32(stage.ldm.scale_factor))
  expected = jax.device_get(state.params)
  for decay in (2 / 11, 3 / 12, 4 / 13):
    state, metrics = stage.train_step(state, sharding.shard_batch(batch, mesh), ae_params)
    params = jax.device_get(state.params)
    expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, expected, params)
    np.testing.assert_allclose(float(metrics["ema_decay"]), decay, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), jax.device_get(state.ema_params),
               expected)


@pytest.mark.extended  # ~30 s: the loss compiled three times; moved to keep the default suite under 15 minutes
def test_the_step_draws_its_timesteps_from_diffusion_timestep_sampling(monkeypatch):
  """A logit-normal density pinned at the last step (mean 20: t/T = sigmoid(20 ± a few) → t = 999) gives the loss
  of a step whose every example is at t = 999; the uniform density gives another."""
  config, mesh, ae, ae_params = tiny_run()
  batch = random_batch(config, ae)
  stage = make_stage(config, mesh, ae, ae_params, batch)
  params = stage.init(jax.random.PRNGKey(0), jnp.float32(stage.ldm.scale_factor)).params
  # Compiled anew for each configuration (read while tracing): faster than running the ops one by one.
  loss = lambda: float(jax.jit(lambda *args: step_lib.loss_fn(config, stage.ldm, *args))(
      params, batch, jax.random.PRNGKey(3), ae_params))
  uniform = loss()
  config.diffusion.update(timestep_sampling="logit_normal", timestep_logit_mean=20.0, timestep_logit_std=1.0)
  pinned = loss()
  config.diffusion.timestep_sampling = "uniform"
  monkeypatch.setattr(schedule_lib, "sample_timesteps", lambda rng, b, T, *args: jnp.full((b,), T - 1, jnp.int32))
  np.testing.assert_allclose(pinned, loss(), rtol=1e-6)
  assert abs(pinned - uniform) > 1e-3 * abs(uniform)


# Extended: the cached path itself trains in every default run of shapes_txt2img:smoke (latent.cache).
@pytest.mark.extended
@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_a_step_on_cached_latents_equals_a_step_on_their_images(kind):
  """The cache keeps what the step would encode: KL moments (the step draws the same posterior
  sample from them as from the images), VQ's pre-quantization latent."""
  config, mesh, ae, ae_params = tiny_run(kind, cache=True)
  cache = data.cache_latents(config, ae[0], ae_params)
  assert len(cache) == 80
  images = next(data_lib.make_loader(config.data, config.data.train_split, batch_size=8, seed=0, shuffle=False,
                                     num_epochs=1))
  cached = {k: np.stack([cache[i][k] for i in range(8)]) for k in cache[0]}
  np.testing.assert_array_equal(cached["label"], images["label"])
  batches = [prepare(config, ae[1], b) for b in (images, cached)]
  assert {"latent_moments" if kind == "kl" else "latent"} == set(batches[1]) - {"cond/label"}
  stage = make_stage(config, mesh, ae, ae_params, batches[0])
  initial = jax.device_get(stage.init(jax.random.PRNGKey(0), jnp.float32(stage.ldm.scale_factor)))
  losses = []
  for batch in batches:
    _, metrics = stage.train_step(jax.device_put(initial, stage.state_sharding), sharding.shard_batch(batch, mesh),
                                  ae_params)
    losses.append(float(metrics["loss"]))
  np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_caching_latents_counts_and_reports_the_records_the_pipeline_drops(caplog):
  """The training loop's data/skipped_* counts read the cache, so the cache says what it left out."""
  config, _, ae, ae_params = tiny_run(cache=True)
  source = data_lib.make_source(config.data, config.data.train_split)
  lengths = sorted(len(source[i]["caption"].strip()) for i in range(len(source)))
  config.data.min_caption_length = lengths[len(lengths) // 2]
  dropped = sum(n < config.data.min_caption_length for n in lengths)
  assert 0 < dropped < 80
  with caplog.at_level("WARNING"):
    cache = data.cache_latents(config, ae[0], ae_params)
  assert len(cache) == 80 - dropped
  assert f"dropped {dropped} records of this host's share (caption_length {dropped}); the cache holds the other " \
      f"{80 - dropped}" in caplog.text


def test_each_host_trains_on_exactly_its_share_of_the_cached_latents(monkeypatch):
  """Two simulated hosts: each caches the images `make_loader` gives it, and one epoch of its train
  iterator visits each of its cached latents once (the cache is not split by host again)."""
  config, _, ae, ae_params = tiny_run(cache=True)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  shares = []
  for host in range(2):
    monkeypatch.setattr(jax, "process_index", lambda host=host: host)
    cache = data.cache_latents(config, ae[0], ae_params)
    rows = lambda moments: sorted(m.tobytes() for m in moments)
    cached = rows(cache[i]["latent_moments"] for i in range(len(cache)))
    batches = data.make_train_iterator(config, cache)
    epoch = np.concatenate([next(batches)["latent_moments"] for _ in range(len(cache) // 4)])  # 4 per host
    assert rows(epoch) == cached, f"host {host}: one epoch does not visit each of its cached latents once"
    shares.append(set(cached))
  assert len(shares[0]) == len(shares[1]) == 40 and not shares[0] & shares[1]  # 80 images, split in two


# Extended: the default suite trains the text smoke run once (tests/conftest.py's smoke_text_run,
# which tests/test_sample.py samples).
@pytest.mark.extended
@pytest.mark.slow
def test_text_smoke_run_samples_checkpoints_and_resumes(smoke_autoencoder, tmp_path, monkeypatch):
  workdir = str(tmp_path / "ldm")
  config = load_config("configs/ldm/shapes_txt2img.py:smoke")
  config.autoencoder.workdir = smoke_autoencoder
  ahead = []  # the train steps compiled ahead (while the state initialises or after it is restored)
  monkeypatch.setattr(loop, "compile_ahead", lambda *args: ahead.append(len(args)) or compile_ahead(*args))
  diffusion.train_and_evaluate(config, workdir)

  assert [r["step"] for r in read_metrics(workdir)] == [5, 10]
  assert os.path.isfile(os.path.join(workdir, "samples", "samples_0000010.png"))
  assert os.path.isfile(os.path.join(workdir, "tokenizer", "tokenizer.json"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "5"]
  scale = float(restore(workdir, ("scale_factor",)))
  assert 0 < scale < 100
  params = restore(workdir, ("params", "unet"))
  ema = restore(workdir, ("ema_params", "unet"))
  # EMA lags the parameters: close, but not equal after 10 updates.
  diffs = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ema))]
  assert max(diffs) > 0

  # Resuming keeps the estimated scale_factor (not re-estimated) and continues the step count.
  config.train.num_steps = 12
  config.train.log_every = 2
  diffusion.train_and_evaluate(config, workdir)
  assert [r["step"] for r in read_metrics(workdir)] == [5, 10, 12]
  assert float(restore(workdir, ("scale_factor",))) == scale
  # The same command on the finished run trains nothing and compiles no train step.
  assert len(ahead) == 2
  diffusion.train_and_evaluate(config, workdir)
  assert [r["step"] for r in read_metrics(workdir)] == [5, 10, 12] and len(ahead) == 2


@pytest.mark.slow
def test_class_conditional_overfits_a_small_set(smoke_class_run):
  """tests/conftest.py's 60-step run on 80 shapes images, cond.num_classes = 0 (from the data)."""
  rows = [r for r in read_metrics(smoke_class_run) if "train/loss" in r]
  assert [r["step"] for r in rows] == [20, 40, 60]
  losses = [r["train/loss"] for r in rows]
  assert losses[-1] < 0.6 * losses[0], losses
  assert config_lib.load_config(smoke_class_run).model.num_classes == 6  # the 6 shape kinds


def test_bad_configs_name_their_key(smoke_autoencoder, tmp_path):
  def check(match, **changes):
    config = load_config("configs/ldm/shapes_txt2img.py:smoke")
    config.autoencoder.workdir = smoke_autoencoder
    for key, value in changes.items():
      section, name = key.split("__")
      config[section][name] = value
    with pytest.raises((ValueError, FileNotFoundError), match=match):
      diffusion.train_and_evaluate(config, str(tmp_path / "bad"))

  check("model.context_dim", model__context_dim=64)
  check("data.image_size", data__image_size=32)
  check("model.in_channels", model__in_channels=5)
  check("model.attention_resolutions", model__attention_resolutions=(8,))
  check("autoencoder.workdir", autoencoder__workdir=str(tmp_path / "missing"))
