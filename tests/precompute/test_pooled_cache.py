"""The pooled and SDXL half of the latent cache: the job writes what the frozen conditioner gives each
caption — SDXL's two-encoder context and bigG's pooled embedding, an exported ldm_jax conditioner's
context and mean-pooled embedding (`cond.pooled`, frozen under a U-Net LoRA) — and each record's
original size and centre-crop offsets; the loss and gradients of a step on the cache equal those of
the step on the images and captions (same posterior sample, same dropped captions), SDXL's time ids
included; a cache without a column the run needs is refused naming it."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from ldm_jax import load
from ldm_jax.config.lora import lora_config
from ldm_jax.convert import save_pretrained
from ldm_jax.convert.__main__ import main as convert_cli
from ldm_jax.convert.pretrained import Pretrained
from ldm_jax.data import latent_cache
from ldm_jax.data.pipeline import batched
from ldm_jax.data.tokenizer import build_tokenizer
from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.models import conditioning
from ldm_jax.precompute import encode
from ldm_jax.train.diffusion import data, finetune, lora, setup, step as step_lib
from tests.conftest import load_config
from tests.convert.conftest import sdxl_pipeline  # noqa: F401
from tests.data.test_shards import make_shards
from tests.precompute.test_encode import read_part

SIZE = 16


def shards_config(config, shards_dir):
  """`config` on one shard of `make_shards` at 16 px, centre crops: records 'sample 1, 2, 3, 5'
  (the 'x' captions are filtered), of which 'sample 5' is 24×8 (crop offsets (16, 0) at 16 px)."""
  config.data.update(source="shards", path=str(shards_dir), image_size=SIZE, min_caption_length=2, random_crop=False,
                     random_flip=False, buckets=())
  config.latent.cache = False
  config.train.batch_size = 4
  return config


def sdxl_cache_config(pretrained, shards_dir):
  config = shards_config(load_config("configs/ldm/sdxl_base.py:smoke"), shards_dir)
  config.init.pretrained = pretrained
  return config


@pytest.fixture(scope="module")
def sdxl_pretrained(sdxl_pipeline, tmp_path_factory):  # noqa: F811
  """(root, pretrained directory) of the tiny SDXL base, imported, and one shard next to it."""
  root = tmp_path_factory.mktemp("sdxl_cache")
  pretrained = str(root / "sdxl")
  assert convert_cli(["import", "--src", sdxl_pipeline[0], "--out", pretrained]) == 0
  make_shards(root / "shards", num_shards=1, per_shard=6)
  return root, pretrained


@pytest.fixture(scope="module")
def sdxl_cache(sdxl_pretrained):
  root, pretrained = sdxl_pretrained
  manifest = encode.encode_dataset(sdxl_cache_config(pretrained, root / "shards"), str(root / "out"), batch_size=8)
  return root, pretrained, manifest


def resolved(config, workdir, cache_dir=""):
  """`config` resolved against its pretrained model as the trainer does, its cache checked; (config,
  pretrained params, (ae model, ae config, ae params), tokenizer, tokenizer_2, latent shape)."""
  config.latent.cache_dir = cache_dir
  params = finetune.apply_pretrained(config, workdir)
  ae_model, ae_config, ae_params = load.load_autoencoder(config.autoencoder.workdir)
  setup.resolve_config(config, ae_config)
  data.check_disk_cache(config, ae_config)
  tokenizer, tokenizer_2 = setup.get_tokenizer(config, workdir), setup.get_tokenizer_2(config, workdir)
  latent_shape = ae_lib.latent_shape(ae_config.model, SIZE)
  return config, params, (ae_model, ae_config, ae_params), tokenizer, tokenizer_2, latent_shape


def cached_and_image_batches(config, root, manifest):
  """The four records of the shard, from the cache and from the images (the same, in the same order)."""
  images = next(batched(encode.part_records(config.data, {"shard": str(root / "shards" / "00000.tar")}),
                        config.data, 4))
  records = read_part(os.path.join(config.latent.cache_dir, manifest["parts"][0]))
  cached = {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
  assert list(cached["caption"]) == list(images["caption"]) == [f"sample {n}" for n in (1, 2, 3, 5)]
  return cached, images


def loss_and_grads(config, ldm, params, batch, ae_params, rng):
  return jax.device_get(jax.jit(jax.value_and_grad(
      lambda p: step_lib.loss_fn(config, ldm, p, batch, rng, ae_params)))(params))


def assert_same_step(cached, from_images):
  (loss_a, grads_a), (loss_b, grads_b) = cached, from_images
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  scale = max(np.abs(g).max() for g in jax.tree.leaves(grads_b["unet"]))
  assert scale > 0
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4 * scale), grads_a["unet"], grads_b["unet"])


@pytest.mark.extended
def test_sdxl_cache_holds_both_encoders_context_bigGs_pooled_output_and_the_crop(sdxl_cache, sdxl_pipeline):  # noqa: F811
  torch = pytest.importorskip("torch")
  root, pretrained, manifest = sdxl_cache
  assert manifest["text_encoder"] == pretrained and manifest["tokenizer"] == os.path.join(pretrained, "tokenizer")
  assert manifest["text_encoder_2"] == os.path.join(pretrained, "text_encoder_2")
  assert manifest["tokenizer_2"] == os.path.join(pretrained, "tokenizer_2")
  for key in ("text_encoder_sha256", "tokenizer_sha256", "text_encoder_2_sha256", "tokenizer_2_sha256"):
    assert len(manifest[key]) == 64
  assert manifest["text_encoder_sha256"] != manifest["text_encoder_2_sha256"]
  assert manifest["columns"] == ["latent_moments", "caption", "label", "original_size", "crop_coords_top_left",
                                 "context", "text_embeds"]
  records = read_part(str(root / "out" / manifest["parts"][0]))
  # Sizes from the shards' json (160 + n high, 80 wide); 'sample 5' is 24×8, resized to 48×16 and centre-cropped.
  np.testing.assert_array_equal([r["original_size"] for r in records], [[161, 80], [162, 80], [163, 80], [165, 80]])
  np.testing.assert_array_equal([r["crop_coords_top_left"] for r in records], [[0, 0], [0, 0], [0, 0], [16, 0]])
  _, pipe = sdxl_pipeline
  with torch.no_grad():  # the pipeline's own prompt encoding: penultimate states of both, bigG's projection
    embeds, _, pooled, _ = pipe.encode_prompt([r["caption"] for r in records], do_classifier_free_guidance=False)
  np.testing.assert_allclose(np.stack([r["context"] for r in records]), embeds.numpy(), atol=2e-5)
  np.testing.assert_allclose(np.stack([r["text_embeds"] for r in records]), pooled.numpy(), atol=2e-5)


@pytest.mark.extended
def test_an_sdxl_step_on_the_cache_equals_the_step_on_images_and_captions(sdxl_cache, tmp_path):
  """Micro-conditioning from the cache: the same time ids (original size, the centre crop's offsets,
  the training size); dropped captions zero the cached context and pooled embedding as the
  conditioner zeroes them (`cond.null_text='zeros'`)."""
  root, pretrained, manifest = sdxl_cache
  config = sdxl_cache_config(pretrained, root / "shards")
  config.cond.dropout_prob = 0.5
  config, params, (ae_model, ae_config, ae_params), tokenizer, tokenizer_2, latent_shape = resolved(
      config, str(tmp_path / "run"), str(root / "out"))
  assert config.cond.null_text == "zeros" and data.uses_cached_context(config)
  cached, images = cached_and_image_batches(config, root, manifest)
  prepare = lambda raw: data.prepare_batch(config, tokenizer, latent_shape, raw, 1, tokenizer_2=tokenizer_2)
  from_cache, from_images = prepare(cached), prepare(images)
  assert {"latent_moments", "cond/context", "cond/text_embeds"} <= set(from_cache) and "image" in from_images
  assert "cond/context" not in from_images
  np.testing.assert_array_equal(from_cache["cond/time_ids"], from_images["cond/time_ids"])
  np.testing.assert_array_equal(from_cache["cond/time_ids"][3], [165, 80, 16, 0, SIZE, SIZE])

  ldm = load.build_ldm(config, ae_model, ae_config, tokenizer, 0.5, for_training=True, tokenizer_2=tokenizer_2)
  rng = jax.random.PRNGKey(7)
  dropped = np.asarray(jax.random.bernoulli(jax.random.split(rng, 5)[1], 0.5, (4,)))
  assert 0 < dropped.sum() < 4  # both branches: cached embeddings kept and replaced by the null condition
  assert_same_step(loss_and_grads(config, ldm, params, from_cache, ae_params, rng),
                   loss_and_grads(config, ldm, params, from_images, ae_params, rng))


def test_a_cache_without_the_pooled_or_crop_columns_an_sdxl_run_needs_is_refused(sdxl_pretrained, tmp_path):
  """Manifests identical to this run's but for one column (as a cache written before the columns
  existed): refused naming the column and what needs it. The in-memory cache and random crops and
  flips stay refused with micro-conditioning, naming their keys."""
  root, pretrained = sdxl_pretrained
  config = sdxl_cache_config(pretrained, root / "shards")
  finetune.apply_pretrained(config, str(tmp_path / "run"))
  ae_config = load.autoencoder_run(config.autoencoder.workdir)[1]
  setup.resolve_config(config, ae_config)
  columns = encode.cache_columns(config, ae_config)
  assert columns[-3:] == ["crop_coords_top_left", "context", "text_embeds"]
  manifest = {"format": latent_cache.MANIFEST_FORMAT, "complete": True, "parts": [],
              **encode.cache_identity(config, ae_config)}

  def check(cache_columns):
    cache_dir = tmp_path / f"cache_{len(os.listdir(tmp_path))}"
    cache_dir.mkdir()
    (cache_dir / latent_cache.MANIFEST).write_text(json.dumps({**manifest, "columns": cache_columns}))
    config.latent.cache_dir = str(cache_dir)
    return data.check_disk_cache(config, ae_config)

  assert check(columns)["columns"] == columns
  with pytest.raises(ValueError, match=r"latent\.cache_dir: the cache in .* has no 'text_embeds' column .*this run "
                                       r"needs it for the pooled embedding of its frozen text encoders"):
    check([c for c in columns if c != "text_embeds"])
  with pytest.raises(ValueError, match=r"has no 'crop_coords_top_left' column .*SDXL's time ids "
                                       r"\(cond\.micro_conditioning='target_size'\)"):
    check([c for c in columns if c != "crop_coords_top_left"])
  config.latent.cache_dir = ""
  config.latent.cache = True
  with pytest.raises(ValueError, match=r"latent\.cache: the in-memory latent cache keeps no original sizes or crop "
                                       r"offsets.*latent\.cache_dir"):
    setup.resolve_config(config, ae_config)
  config.latent.update(cache=False, cache_dir=str(tmp_path / "cache"))
  for key in ("random_crop", "random_flip"):
    config.data[key] = True
    with pytest.raises(ValueError, match=rf"data\.{key}: True, but the cache of latent\.cache_dir holds one centre "
                                         "crop"):
      setup.resolve_config(config, ae_config)
    config.data[key] = False


def pooled_config(shards_dir, autoencoder):
  """The demo's `shapes_txt2img:smoke` (a scratch text encoder whose mean token is the U-Net's
  pooled `text_embeds`) on the shard."""
  config = shards_config(load_config("configs/ldm/shapes_txt2img.py:smoke"), shards_dir)
  config.autoencoder.workdir = autoencoder
  return config


@pytest.fixture(scope="module")
def pooled_pretrained(smoke_autoencoder, tmp_path_factory):
  """(root, directory) of a pooled `shapes_txt2img:smoke` model with random weights (zero-initialised
  layers moved off zero, so that context and pooled embedding reach the loss), as `convert import` of
  its workdir would write it; one shard next to it."""
  root = tmp_path_factory.mktemp("pooled_cache")
  make_shards(root / "shards", num_shards=1, per_shard=6)
  config = pooled_config(root / "shards", smoke_autoencoder)
  ae_model, ae_config, ae_params = load.load_autoencoder(smoke_autoencoder)
  setup.resolve_config(config, ae_config)
  tokenizer = build_tokenizer(config.cond, [f"sample {n}" for n in range(6)])
  tokenizer.save(str(root / "tokenizer"))
  conditioner = conditioning.make_conditioner(config.cond, tokenizer)
  tokens = tokenizer.tokenize(["sample 1"])
  cond_params = conditioner.init(jax.random.PRNGKey(0), {"tokens": tokens}, deterministic=True)["params"]
  cond = conditioner.apply({"params": cond_params}, {"tokens": tokens}, deterministic=True)
  h, w, c = ae_lib.latent_shape(ae_config.model, SIZE)
  unet_params = load.make_unet(config).init(jax.random.PRNGKey(1), np.zeros((1, h, w, c), np.float32),
                                             np.zeros((1,), np.int32), context=cond["context"],
                                             text_embeds=cond["text_embeds"])["params"]
  leaves, tree = jax.tree.flatten({"unet": unet_params, "conditioner": cond_params})
  keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
  moved = jax.tree.unflatten(tree, [np.asarray(x + 0.05 * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys)])
  bundle = Pretrained(
      configs={"unet": config.model.to_dict(), "autoencoder": ae_config.model.to_dict(),
               "diffusion": {k: config.diffusion[k] for k in load.MODEL_DIFFUSION_KEYS},
               "latent": {"scale_factor": 0.5}, "cond": config.cond.to_dict()},
      params={**moved, "autoencoder": jax.tree.map(np.asarray, ae_params)}, tokenizer_dir=str(root / "tokenizer"))
  save_pretrained(str(root / "pretrained"), bundle, autoencoder_workdir=True, image_size=SIZE)
  return root, str(root / "pretrained")


def pooled_lora_config(root, pretrained):
  config = pooled_config(root / "shards", "")
  config.init.pretrained = pretrained
  config.lora = lora_config(rank=2)  # the U-Net's attention only: the conditioner stays frozen
  return config


@pytest.mark.extended
def test_a_frozen_pooled_conditioner_is_cached_and_its_step_equals_the_step_on_captions(pooled_pretrained, tmp_path):
  """A U-Net LoRA of an exported pooled text model: the cache holds the frozen conditioner's context
  and mean-pooled embedding of each caption, and the step on it equals the step on the images and
  captions, dropped captions (cond.dropout_prob 0.5) taking the context and pooled embedding of ""."""
  root, pretrained = pooled_pretrained
  out = str(tmp_path / "out")
  manifest = encode.encode_dataset(pooled_lora_config(root, pretrained), out, batch_size=8)
  assert manifest["text_encoder"] == pretrained and manifest["text_encoder_2"] == ""
  assert manifest["columns"][-2:] == ["context", "text_embeds"]
  # Without the LoRA the conditioner trains with the U-Net: nothing of it is cached.
  full = pooled_config(root / "shards", "")
  full.init.pretrained = pretrained
  unfrozen = encode.encode_dataset(full, str(tmp_path / "no_text"), batch_size=8)
  assert unfrozen["text_encoder"] == "" and unfrozen["columns"][-1] == "crop_coords_top_left"

  config = pooled_lora_config(root, pretrained)
  config.cond.dropout_prob = 0.5
  config, params, (ae_model, ae_config, ae_params), tokenizer, _, latent_shape = resolved(
      config, str(tmp_path / "run"), out)
  assert config.cond.pooled and config.cond.text_encoder == "scratch"
  tuning = lora.make_tuning(config, params, lambda tree: tree)
  assert not tuning.trains_text_encoder and data.uses_cached_context(config, tuning)
  cached, images = cached_and_image_batches(config, root, manifest)
  prepare = lambda raw: data.prepare_batch(config, tokenizer, latent_shape, raw, 1,
                                           cached_context=data.uses_cached_context(config, tuning))
  from_cache, from_images = prepare(cached), prepare(images)
  assert {"cond/context", "cond/text_embeds"} <= set(from_cache) and "cond/context" not in from_images

  ldm = load.build_ldm(config, ae_model, ae_config, tokenizer, 0.5, for_training=True)
  expected = ldm.conditioner.apply({"params": params["cond"]}, {"tokens": from_images["cond/tokens"]},
                                   deterministic=True)
  np.testing.assert_allclose(from_cache["cond/context"], expected["context"], atol=1e-5)
  np.testing.assert_allclose(from_cache["cond/text_embeds"], expected["text_embeds"], atol=1e-5)
  null = ldm.conditioner.apply({"params": params["cond"]}, ldm.null(1), deterministic=True)["text_embeds"]
  assert np.abs(from_cache["cond/text_embeds"] - null).max() > 1e-2  # a dropped caption changes the input

  rng = jax.random.PRNGKey(7)
  dropped = np.asarray(jax.random.bernoulli(jax.random.split(rng, 5)[1], 0.5, (4,)))
  assert 0 < dropped.sum() < 4
  assert_same_step(loss_and_grads(config, ldm, params, from_cache, ae_params, rng),
                   loss_and_grads(config, ldm, params, from_images, ae_params, rng))
  shutil.rmtree(out)
