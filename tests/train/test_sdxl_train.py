"""Fine-tuning SDXL (`configs/ldm/sdxl_base.py`): a tiny random SDXL base pipeline (tests/convert/sdxl_tiny.py)
trained on a folder of non-square images of several sizes. The step's time_ids are the images' real
sizes and crop offsets; its conditions, loss and gradient equal diffusers' (the same U-Net in torch, the
pipeline's own prompt encoding, the same latents, noise and timesteps); a run checkpoints, resumes,
samples with sample.py's code and exports to a diffusers SDXL pipeline; a model that is not an SDXL
base is refused before anything compiles."""

import itertools
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from ldm_jax import load, sampling  # noqa: E402
from ldm_jax.config import common as config_lib  # noqa: E402
from ldm_jax.convert import write_diffusers  # noqa: E402
from ldm_jax.diffusion import schedule as schedule_lib  # noqa: E402
from ldm_jax.models import autoencoder as ae_lib  # noqa: E402
from ldm_jax.train import diffusion  # noqa: E402
from ldm_jax.train.diffusion import data, finetune, setup, step as step_lib  # noqa: E402
from tests.conftest import load_config  # noqa: E402
from tests.convert import sdxl_tiny  # noqa: E402
from tests.convert.conftest import diffusers_models, sd_pipeline, sdxl_pipeline, transformers_models  # noqa: E402,F401
from tests.convert.reference import nchw, nhwc, state_numpy  # noqa: E402
from tests.train.runs import read_state  # noqa: E402

# name → (height, width, caption): none square, none of the training size 16.
IMAGES = {"a": (40, 24, "a cat"), "b": (20, 36, "a dog and a cat"), "c": (17, 33, "a red bicycle"),
          "d": (48, 30, "a bowl of soup")}
SIZE = 16


@pytest.fixture(scope="module")
def sdxl(sdxl_pipeline):  # noqa: F811
  """(folder, StableDiffusionXLPipeline) of the tiny SDXL base (tests/convert/conftest.py)."""
  return sdxl_pipeline


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """A folder of captioned PNGs of the `IMAGES` sizes (smooth gradients, so that crops differ)."""
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for name, (h, w, caption) in IMAGES.items():
    y, x = np.mgrid[0:h, 0:w]
    image = np.stack([255 * y / h, 255 * x / w, np.full((h, w), rng.integers(0, 256))], -1).astype(np.uint8)
    Image.fromarray(image).save(root / f"{name}.png")
    (root / f"{name}.txt").write_text(caption)
  return str(root)


def sdxl_config(pretrained, images, **train):
  config = load_config("configs/ldm/sdxl_base.py:smoke")
  config.init.pretrained = pretrained
  config.data.update(source="folder", path=images, random_crop=True, random_flip=True)
  config.train.update(batch_size=8, **train)  # over the 8 test devices; the 4 images twice
  return config


def test_the_config_and_its_smoke_variant():
  full, smoke = load_config("configs/ldm/sdxl_base.py"), load_config("configs/ldm/sdxl_base.py:smoke")
  for config in (full, smoke):
    assert (config.cond.kind, config.cond.text_encoder, config.cond.micro_conditioning) == (
        "text", "pretrained", "target_size")
    assert config.data.random_crop
  assert full.data.image_size == 1024 and smoke.data.image_size == SIZE and smoke.train.num_steps <= 20
  assert (full.optim.learning_rate, full.cond.dropout_prob, full.train.dtype) == (1e-6, 0.2, "bfloat16")
  assert not full.data.buckets and (1024, 1024) in load_config("configs/ldm/sdxl_base.py:buckets").data.buckets
  assert load_config("configs/ldm/sdxl_base.py:smoke,buckets").data.buckets == ((16, 16), (24, 16), (16, 24))


def test_an_sdxl_refiner_is_refused_whatever_the_config_asks(tmp_path):
  """The refiner's micro-conditioning is an aesthetic score per image, which no data source gives:
  refused from what the imported model says, before its first batch would fail on the missing key."""
  for wanted in ("none", "target_size", "aesthetic_score"):
    config = load_config("configs/ldm/sdxl_base.py:smoke")
    config.cond.micro_conditioning = wanted
    config.init.pretrained = str(tmp_path / "refiner")
    with pytest.raises(ValueError, match=r"init\.pretrained: .*refiner is an SDXL refiner .*not supported"):
      load.check_micro_conditioning(config, str(tmp_path / "refiner"), {"micro_conditioning": "aesthetic_score"})


@pytest.mark.extended
def test_step_conditions_loss_and_gradient_equal_diffusers(sdxl, images, tmp_path):
  folder, pipe = sdxl
  config = sdxl_config(folder, images)
  config.cond.dropout_prob = 0.5
  workdir = str(tmp_path / "run")
  # The trainer's preparation (`train_and_evaluate`) up to its step.
  pretrained = finetune.apply_pretrained(config, workdir)
  ae_config = load.autoencoder_run(config.autoencoder.workdir)[1]
  config.latent.cache = True
  with pytest.raises(ValueError, match=r"latent\.cache: the in-memory latent cache keeps no original sizes or crop "
                                       "offsets"):
    setup.resolve_config(config, ae_config)
  config.latent.cache = False
  setup.resolve_config(config, ae_config)
  ae_model, _, ae_params = load.load_autoencoder(config.autoencoder.workdir)
  tokenizer, tokenizer_2 = setup.get_tokenizer(config, workdir), setup.get_tokenizer_2(config, workdir)
  assert tokenizer_2 is not None and os.path.isdir(os.path.join(workdir, "tokenizer_2"))
  latent_shape = ae_lib.latent_shape(ae_config.model, SIZE)
  raw = next(data.make_train_iterator(config))
  batch = data.prepare_batch(config, tokenizer, latent_shape, raw, 1, tokenizer_2=tokenizer_2)
  ldm = load.build_ldm(config, ae_model, ae_config, tokenizer, config.latent.scale_factor, for_training=True,
                       tokenizer_2=tokenizer_2)

  # time_ids: each image's real size, where its crop starts in the resized image, the training size.
  time_ids = np.asarray(batch["cond/time_ids"])
  for caption, row, (top, left) in zip(raw["caption"], time_ids, raw["crop_coords_top_left"]):
    h, w = next((h, w) for h, w, c in IMAGES.values() if c == caption)
    resized = (max(SIZE, round(h * SIZE / min(h, w))), max(SIZE, round(w * SIZE / min(h, w))))
    assert 0 <= top <= resized[0] - SIZE and 0 <= left <= resized[1] - SIZE
    np.testing.assert_array_equal(row, [h, w, top, left, SIZE, SIZE])
  assert time_ids[:, 2:4].any()  # some crops start inside the image

  # The conditions the step gives the U-Net are the pipeline's prompt embeddings.
  captions = [str(c) for c in raw["caption"]]
  with torch.no_grad():
    embeds, _, pooled, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False)
  cond_inputs = {k[len("cond/"):]: v for k, v in batch.items() if k.startswith("cond/")}
  cond = ldm.conditioner.apply({"params": pretrained["cond"]}, cond_inputs)
  np.testing.assert_allclose(cond["context"], embeds.numpy(), atol=2e-5)
  np.testing.assert_allclose(cond["text_embeds"], pooled.numpy(), atol=2e-5)

  rng = jax.random.PRNGKey(7)
  loss, grads = jax.jit(jax.value_and_grad(
      lambda p: step_lib.loss_fn(config, ldm, p, batch, rng, ae_params)))(pretrained)
  # The step's draws, in loss_fn's order: posterior sample, caption dropout, timesteps, noise.
  rng_enc, rng_drop, rng_t, rng_noise, _ = jax.random.split(rng, 5)
  z = np.asarray(ldm.encode(ae_params, batch["image"], rng_enc))
  dropped = np.asarray(jax.random.bernoulli(rng_drop, 0.5, (8,)))
  assert 0 < dropped.sum() < 8
  t = np.asarray(schedule_lib.sample_timesteps(rng_t, 8, 1000))
  eps = np.asarray(jax.random.normal(rng_noise, z.shape))
  with torch.no_grad():  # our posterior is diffusers' (its mean; the sample adds our noise)
    mean = pipe.vae.encode(nchw(np.asarray(batch["image"]))).latent_dist.mean * pipe.vae.config.scaling_factor
  np.testing.assert_allclose(nhwc(mean), ldm.encode(ae_params, batch["image"]), atol=1e-5)

  # diffusers: dropped captions zeroed (sgm's ucg, force_zeros_for_empty_prompt), time_ids kept, MSE on ε.
  keep = torch.from_numpy(1.0 - dropped.astype(np.float32))
  scheduler = diffusers.DDPMScheduler.from_config(pipe.scheduler.config)
  t_torch = torch.from_numpy(t.astype(np.int64))
  noisy = scheduler.add_noise(nchw(z), nchw(eps), t_torch)
  pipe.unet.zero_grad()
  pred = pipe.unet(noisy, t_torch, encoder_hidden_states=embeds * keep[:, None, None],
                   added_cond_kwargs=dict(text_embeds=pooled * keep[:, None],
                                          time_ids=torch.from_numpy(time_ids))).sample
  reference = torch.nn.functional.mse_loss(pred, nchw(eps))
  reference.backward()
  np.testing.assert_allclose(float(loss), reference.item(), rtol=1e-5)
  for ours, theirs, layout in ((grads["unet"]["conv_in"]["kernel"], pipe.unet.conv_in.weight.grad, (2, 3, 1, 0)),
                               (grads["unet"]["add_embedding"]["linear_1"]["kernel"],
                                pipe.unet.add_embedding.linear_1.weight.grad, (1, 0))):
    theirs = theirs.numpy().transpose(layout)
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())
  assert all(not np.asarray(g).any() for g in jax.tree.leaves(grads["cond"]))  # frozen text encoders


@pytest.mark.extended
@pytest.mark.slow
def test_finetunes_resumes_samples_and_exports(sdxl, images, tmp_path):
  folder, pipe = sdxl
  workdir = str(tmp_path / "run")
  diffusion.train_and_evaluate(sdxl_config(folder, images, num_steps=2, log_every=1, checkpoint_every=1,
                                           image_every=100), workdir)
  diffusion.train_and_evaluate(sdxl_config(folder, images, num_steps=3, log_every=1, checkpoint_every=1,
                                           image_every=3), workdir)  # resumes from step 2

  saved = config_lib.load_config(workdir)
  assert (saved.cond.micro_conditioning, saved.cond.null_text, saved.cond.dim) == ("target_size", "zeros", 64)
  assert saved.model.addition_embed_type == "text_time"
  _, params, _ = load.load_pretrained(folder)
  for encoder in ("text_encoder", "text_encoder_2"):  # frozen
    jax.tree.map(np.testing.assert_array_equal, read_state(workdir, ("params", "cond", encoder), step=3),
                 params[encoder])
  trained = read_state(workdir, ("params", "unet"), step=3)
  assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(params["unet"]))) > 0
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f if "train/loss" in line]
  assert steps == [1, 2, 3]

  out = str(tmp_path / "samples")
  summary = sampling.sample_to_dir(sampling.SampleRequest(
      out=out, workdir=workdir, prompts=("a cat", "a dog"), num_samples=8, steps=2, batch_size=8,
      guidance_scale=5.0, original_size=(40, 24), crops_coords_top_left=(2, 0)))
  assert summary["checkpoint_step"] == 3
  with np.load(os.path.join(out, "samples.npz")) as npz:
    assert npz["images"].shape == (8, SIZE, SIZE, 3) and npz["images"].std() > 0

  # Exported, the run is an SDXL pipeline again: its fine-tuned U-Net, the frozen encoders as they came.
  exported = str(tmp_path / "exported")
  write_diffusers(exported, load.read_workdir(workdir))
  reloaded = diffusers.StableDiffusionXLPipeline.from_pretrained(exported)
  assert reloaded.config.force_zeros_for_empty_prompt
  np.testing.assert_array_equal(reloaded.unet.conv_in.weight.detach().numpy().transpose(2, 3, 1, 0),
                                read_state(workdir, ("ema_params", "unet", "conv_in", "kernel"), step=3))
  for name in ("text_encoder", "text_encoder_2"):
    for key, value in state_numpy(getattr(pipe, name)).items():
      np.testing.assert_array_equal(state_numpy(getattr(reloaded, name))[key], value, err_msg=f"{name}.{key}")


def _without_second_encoder(folder: str, target: str) -> str:
  shutil.copytree(folder, target)
  for name in ("text_encoder_2", "tokenizer_2"):
    shutil.rmtree(os.path.join(target, name))
  with open(os.path.join(target, "model_index.json")) as f:
    index = json.load(f)
  index.update(text_encoder_2=[None, None], tokenizer_2=[None, None])
  with open(os.path.join(target, "model_index.json"), "w") as f:
    json.dump(index, f)
  return target


def _refused(pretrained, images, workdir):
  with pytest.raises(ValueError, match=rf"init\.pretrained: cond\.micro_conditioning='target_size' fine-tunes an "
                                       rf"SDXL base model .* but {pretrained} lacks text_encoder_2/, tokenizer_2/\."):
    diffusion.train_and_evaluate(sdxl_config(pretrained, images), workdir)
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))


def test_an_sdxl_folder_without_its_second_text_encoder_is_refused_before_compiling(sdxl, images, tmp_path):
  _refused(_without_second_encoder(sdxl[0], str(tmp_path / "no_encoder_2")), images, str(tmp_path / "run"))


@pytest.mark.extended  # the SD folder's fixtures take seconds to build
def test_an_sd_folder_is_refused_before_compiling(sd_pipeline, images, tmp_path):  # noqa: F811
  _refused(sd_pipeline[0], images, str(tmp_path / "run"))


@pytest.mark.extended
@pytest.mark.slow
def test_trains_on_aspect_ratio_buckets(sdxl, images, tmp_path):
  """Portrait images (a, d) go to 24 × 16, landscape ones (b, c) to 16 × 24: batches alternate, each
  bucket's step compiled once, the target size in time_ids is the bucket, the log has the histogram."""
  config = sdxl_config(sdxl[0], images, num_steps=3, log_every=1, checkpoint_every=3, image_every=100)
  config.data.buckets = load_config("configs/ldm/sdxl_base.py:smoke,buckets").data.buckets
  workdir = str(tmp_path / "run")
  diffusion.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if "train/loss" in line]
  histogram = [{k[len("data/bucket_"):]: v for k, v in row.items() if k.startswith("data/bucket_")} for row in rows]
  assert histogram == [{"24x16": 1.0}, {"16x24": 1.0}, {"24x16": 1.0}] or histogram == [
      {"16x24": 1.0}, {"24x16": 1.0}, {"16x24": 1.0}], histogram
  assert all(np.isfinite(row["train/loss"]) for row in rows)

  tokenizer, tokenizer_2 = setup.get_tokenizer(config, workdir), setup.get_tokenizer_2(config, workdir)
  for raw in itertools.islice(data.make_train_iterator(config), 2):
    batch = data.prepare_batch(config, tokenizer, (8, 8, 4), raw, 1, tokenizer_2=tokenizer_2)  # latent size unused
    height, width = raw["image"].shape[1:3]
    for caption, row in zip(raw["caption"], np.asarray(batch["cond/time_ids"])):
      h, w = next((h, w) for h, w, c in IMAGES.values() if c == caption)
      assert (height, width) == ((24, 16) if h > w else (16, 24))
      np.testing.assert_array_equal(row[[0, 1, 4, 5]], [h, w, height, width])
