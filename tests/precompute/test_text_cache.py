"""The text-embedding half of the latent cache: a frozen pretrained text encoder (a tiny random SD 1.x
folder, imported) encodes the captions once; the trainer's step on the cached latents and context
equals the step on the images and captions, its classifier-free dropout gives the context of "",
and a cache made with another text encoder or tokenizer is refused before anything compiles."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import load
from ldm_jax.convert.__main__ import main as convert_cli
from ldm_jax.convert.pretrained import PARAMS_FILE
from ldm_jax.convert.safetensors_io import read_safetensors, write_safetensors
from ldm_jax.data import latent_cache
from ldm_jax.data.pipeline import batched
from ldm_jax.data.tokenizer import build_tokenizer, load_tokenizer
from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.precompute import encode
from ldm_jax.runtime import sharding
from ldm_jax.train import diffusion
from ldm_jax.train.diffusion import data, finetune, lora, setup, step as step_lib
from tests.conftest import load_config, plain_text_config
from tests.convert.conftest import diffusers_models, sd_pipeline, transformers_models  # noqa: F401
from tests.convert.reference import clip_tokenizer_vocab
from tests.data.test_shards import make_shards
from tests.precompute.test_encode import read_part
from tests.train.stage2 import Stage2


def text_cache_config(pretrained, shards_dir, **cond):
  """A fine-tuning config of `pretrained` on the shards at 16 px (the tiny VAE's size)."""
  config = plain_text_config()  # its U-Net, autoencoder and text encoder are the pretrained ones
  config.init.pretrained = pretrained
  config.latent.cache = False
  config.data.update(source="shards", path=str(shards_dir), image_size=16, min_caption_length=2)
  config.train.batch_size = 8
  config.cond.update(cond)
  return config


@pytest.fixture(scope="module")
def text_cache(sd_pipeline, tmp_path_factory):  # noqa: F811
  """(root, pretrained directory, manifest) of a cache of 3 shards made with the frozen CLIP of an
  imported tiny SD 1.x pipeline."""
  root = tmp_path_factory.mktemp("text_cache")
  pretrained = str(root / "sd")
  assert convert_cli(["import", "--src", sd_pipeline[0], "--out", pretrained]) == 0
  make_shards(root / "shards", num_shards=3, per_shard=6)
  manifest = encode.encode_dataset(text_cache_config(pretrained, root / "shards"), str(root / "out"), batch_size=8)
  return root, pretrained, manifest


def resolved(config, workdir):
  """`config` resolved against its pretrained model as the trainer does; (config, pretrained params, ae)."""
  params = finetune.apply_pretrained(config, workdir)
  ae_model, ae_config, ae_params = load.load_autoencoder(config.autoencoder.workdir)
  setup.resolve_config(config, ae_config)
  return config, params, (ae_model, ae_config, jax.device_put(ae_params, jax.devices()[0]))


def test_cache_holds_the_frozen_clips_context_of_each_caption(text_cache, sd_pipeline):  # noqa: F811
  torch = pytest.importorskip("torch")
  root, pretrained, manifest = text_cache
  assert manifest["text_encoder"] == pretrained and manifest["tokenizer"] == os.path.join(pretrained, "tokenizer")
  assert manifest["max_length"] == 16 and manifest["autoencoder"] == os.path.join(pretrained, "autoencoder")
  records = read_part(str(root / "out" / manifest["parts"][0]))
  _, pipe = sd_pipeline
  for record in records:
    tokens = pipe.tokenizer([record["caption"]], padding="max_length", max_length=16, return_tensors="pt")
    with torch.no_grad():
      expected = pipe.text_encoder(tokens.input_ids).last_hidden_state[0].numpy()
    assert record["context"].shape == (16, 128)
    np.testing.assert_allclose(record["context"], expected, atol=1e-4)


def _batches(config, root, manifest, tokenizer, latent_shape):
  """The first four records of part 0 as the step's input, from the cache and from the images."""
  images = next(batched(encode.part_records(config.data, {"shard": str(root / "shards" / "00000.tar")}),
                        config.data, 4))
  records = read_part(str(root / "out" / manifest["parts"][0]))[:4]
  cached = {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
  assert list(cached["caption"]) == list(images["caption"]) == [f"sample {n}" for n in (1, 2, 3, 5)]
  prepare = functools.partial(data.prepare_batch, config, tokenizer, latent_shape)
  return prepare(cached, 1), prepare(images, 1), images


@pytest.mark.extended
def test_a_step_on_cached_latents_and_context_equals_a_step_on_images_and_captions(text_cache, tmp_path):
  """Same state, same rng: the cached KL moments give the posterior sample the step would draw from the
  images, the cached context what the frozen CLIP gives the captions; with cond.dropout_prob 0.5 the
  same examples are dropped, to the context of "" (cached) or the tokens of "" (images)."""
  root, pretrained, manifest = text_cache
  config, params, (ae_model, ae_config, ae_params) = resolved(
      text_cache_config(pretrained, root / "shards", dropout_prob=0.5), str(tmp_path / "run"))
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  tokenizer = load_tokenizer(config.cond.tokenizer_dir, max_length=config.cond.max_length)
  latent_shape = ae_lib.latent_shape(ae_config.model, config.data.image_size)
  cached, from_images, _ = _batches(config, root, manifest, tokenizer, latent_shape)
  assert {"latent_moments", "cond/context"} <= set(cached) and "image" in from_images
  stage = Stage2(config, mesh, ae_model, ae_config, ae_params, from_images, scale_factor=0.5, tokenizer=tokenizer)
  initial = jax.device_get(stage.init(jax.random.PRNGKey(0), jnp.float32(0.5), params))
  out = []
  for batch in (cached, from_images):
    state, metrics = stage.train_step(jax.device_put(initial, stage.state_sharding),
                                      sharding.shard_batch(batch, mesh), ae_params)
    # The first update runs at the warm-up's learning rate 0: Adam's moments hold the gradients.
    out.append((float(metrics["loss"]), float(metrics["grad_norm"]), jax.device_get(state.opt_state)))
  assert out[0][1] > 0
  np.testing.assert_allclose(out[0][:2], out[1][:2], rtol=1e-5)
  scale = max(np.abs(x).max() for x in jax.tree.leaves(out[1][2]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale), out[0][2], out[1][2])


@pytest.mark.extended
@pytest.mark.slow
def test_a_fine_tuning_run_trains_from_the_cache_made_for_it(text_cache, tmp_path):
  """The job resolves init.pretrained as the trainer does: the run accepts the cache (same identity)
  and trains on its latents and context."""
  root, pretrained, _ = text_cache
  config = text_cache_config(pretrained, root / "shards")
  config.latent.cache_dir = str(root / "out")
  config.train.update(num_steps=2, checkpoint_every=2, image_every=100, log_every=1)
  workdir = str(tmp_path / "run")
  diffusion.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [json.loads(line)["train/loss"] for line in f]
  assert len(losses) == 2 and all(np.isfinite(losses))


def test_dropout_replaces_the_cached_context_by_the_context_of_the_empty_caption(text_cache, tmp_path):
  """cond.dropout_prob 1: the loss on the cached context of 'sample N' is the loss on the same latents
  captioned "" (the null condition, through the text encoder), whose context differs from theirs."""
  root, pretrained, manifest = text_cache
  config, params, (ae_model, ae_config, ae_params) = resolved(
      text_cache_config(pretrained, root / "shards", dropout_prob=1.0), str(tmp_path / "run"))
  tokenizer = load_tokenizer(config.cond.tokenizer_dir, max_length=config.cond.max_length)
  latent_shape = ae_lib.latent_shape(ae_config.model, config.data.image_size)
  cached, _, _ = _batches(config, root, manifest, tokenizer, latent_shape)
  # The same cached latents captioned "", without cached context: the text encoder encodes the tokens.
  empty = data.prepare_batch(config, tokenizer, latent_shape, {"latent_moments": cached["latent_moments"],
                                                               "caption": np.array([""] * 4)}, 1)
  assert "cond/context" not in empty
  ldm = load.build_ldm(config, ae_model, ae_config, tokenizer, 0.5, for_training=True)
  null = ldm.conditioner.apply({"params": params["cond"]}, ldm.null(1))["context"]
  assert np.abs(cached["cond/context"] - null).max() > 0.1
  kept = config.copy_and_resolve_references()
  kept.cond.dropout_prob = 0.0
  rng = jax.random.PRNGKey(3)
  loss = lambda cfg, batch: float(jax.jit(functools.partial(step_lib.loss_fn, cfg, ldm))(params, batch, rng,
                                                                                          ae_params))
  np.testing.assert_allclose(loss(config, cached), loss(kept, empty), rtol=1e-5)


def test_a_cache_made_with_another_text_encoder_or_tokenizer_is_refused_before_compiling(text_cache, tmp_path):
  """The text encoder and the tokenizer are named by their files: a cache made with this directory
  before its text encoder (or tokenizer) was replaced, and a cache without context, are refused."""
  transformers = pytest.importorskip("transformers")
  root, pretrained, _ = text_cache
  changed = str(tmp_path / "sd")
  shutil.copytree(pretrained, changed)
  cache, one_shard = str(tmp_path / "cache"), root / "shards" / "00000.tar"
  encode.encode_dataset(text_cache_config(changed, one_shard), cache, batch_size=8)
  # A cache of the same autoencoder for a run that trains its own text encoder: no context.
  no_context = str(tmp_path / "no_context")
  scratch = text_cache_config("", one_shard)
  scratch.autoencoder.workdir = os.path.join(changed, "autoencoder")
  assert encode.encode_dataset(scratch, no_context, batch_size=8)["text_encoder"] == ""

  def refused(cache_dir, key, made, has):
    config = text_cache_config(changed, one_shard)
    config.latent.cache_dir = cache_dir
    workdir = tmp_path / f"run_{key}"
    with pytest.raises(ValueError, match=rf"latent.cache_dir: the cache in {cache_dir} was made with {key}={made}"
                                         rf"( \([^)]*\))?, but this run has {key}={has} \([^)]*\);"):
      diffusion.train_and_evaluate(config, str(workdir))
    assert not os.path.exists(workdir / "checkpoints")

  refused(no_context, "text_encoder_sha256", "''", "'[0-9a-f]{64}'")
  params_file = os.path.join(changed, "text_encoder", PARAMS_FILE)
  original = {k: np.array(v) for k, v in read_safetensors(params_file).items()}  # not the mapped file
  first = sorted(original)[0]
  write_safetensors(params_file, {**original, first: original[first] + 0.01})
  refused(cache, "text_encoder_sha256", "'[0-9a-f]{64}'", "'[0-9a-f]{64}'")
  write_safetensors(params_file, original)
  vocab, merges = clip_tokenizer_vocab()
  shutil.rmtree(os.path.join(changed, "tokenizer"))
  transformers.CLIPTokenizer(vocab=vocab, merges=merges[:2], model_max_length=16).save_pretrained(
      os.path.join(changed, "tokenizer"))
  refused(cache, "tokenizer_sha256", "'[0-9a-f]{64}'", "'[0-9a-f]{64}'")


def test_the_cached_context_is_used_only_while_the_text_encoder_is_frozen_and_the_captions_are_the_datas():
  config = plain_text_config()
  config.latent.cache_dir = "/caches/sd"
  frozen_unet_lora = lora.LoraTuning(base={}, targets={"unet": ["mid_block/attn1/to_q"], "cond": []}, rank=1,
                                     scale=1.0)
  text_lora = lora.LoraTuning(base={}, targets={"unet": [], "cond": ["encoder/layers_0/self_attn/q_proj"]}, rank=1,
                              scale=1.0)
  assert data.uses_cached_context(config) and data.uses_cached_context(config, frozen_unet_lora)
  assert not data.uses_cached_context(config, text_lora)  # the text encoder trains: it must see the tokens
  dreambooth = load_config("configs/finetune/dreambooth.py:smoke")
  dreambooth.latent.cache_dir = "/caches/sd"
  assert not data.uses_cached_context(dreambooth)  # its prompts are not the cached captions
  config.latent.cache_dir = ""
  assert not data.uses_cached_context(config)

  tokenizer = build_tokenizer(config.cond, ["a red circle", "a blue square"])
  batch = {"latent_moments": np.zeros((2, 8, 8, 6), np.float32), "caption": np.array(["a red circle", ""]),
           "context": np.ones((2, config.cond.max_length, 128), np.float32)}
  kept = data.prepare_batch(config, tokenizer, (8, 8, 3), batch, 1)
  np.testing.assert_array_equal(kept["cond/context"], batch["context"])
  dropped = data.prepare_batch(config, tokenizer, (8, 8, 3), batch, 1, cached_context=False)
  assert "cond/context" not in dropped and dropped["cond/tokens"].shape == (2, config.cond.max_length)
