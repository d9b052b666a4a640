"""sample.py end to end on smoke runs: outputs, seeds, samplers, img2img, inpainting, bad input.

Two stage-2 runs are trained for a couple of steps on the session's smoke autoencoder (16 px,
f = 2): a text-conditional one (shapes_txt2img:smoke) and a class-conditional one
(fmnist_class_cond:smoke on the shapes data, 6 classes). Their weights are nearly untrained, which
is enough: these tests check what sample.py does with a model, not how good the model is.
"""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

import sample
from ldm_jax import load, sampling
from ldm_jax.train import diffusion
from tests.conftest import load_config
from tests.train.runs import Run, cpu_env, free_port, jax_cache, wait_all  # noqa: F401

FLAGS = flags.FLAGS
PROMPT = "a large red circle on a white background"


@pytest.fixture(scope="session")
def text_run(smoke_text_run):
  """The session's 4-step plain text-to-image run (tests/conftest.py)."""
  return smoke_text_run


@pytest.fixture(scope="session")
def class_run(smoke_class_run):
  """The session's 60-step class-conditional run on the shapes (tests/conftest.py)."""
  return smoke_class_run


@pytest.fixture(scope="session")
def text_ldm(text_run):
  return load.load_diffusion_run(text_run, sampling.sampling_mesh())


def cli(*args):
  """Runs sample.py's main with these flags, as `python sample.py ARGS` would."""
  FLAGS.unparse_flags()
  FLAGS(["sample.py", *args])
  sample.main([])


def outputs(out):
  with np.load(os.path.join(out, "samples.npz"), allow_pickle=False) as data:
    return {key: data[key] for key in data.files}


def init_image(tmp_path):
  """A 16 px RGB image (a red square on white) saved as PNG; (path, pixels in [-1, 1] [1, 16, 16, 3])."""
  pixels = np.full((16, 16, 3), 255, np.uint8)
  pixels[4:12, 3:11] = (220, 40, 40)
  path = str(tmp_path / "init.png")
  Image.fromarray(pixels).save(path)
  return path, pixels[None].astype(np.float32) / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------
# Outputs

@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "plms", "dpmpp_2m"])
def test_text_samples_have_the_documented_outputs(text_run, tmp_path, sampler):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text(f"{PROMPT}\n\na small blue square on a black background\n")
  out = str(tmp_path / "out")
  cli("--workdir", text_run, "--out", out, "--prompts_file", str(prompts), "--num_samples", "10",
      "--sampler", sampler, "--steps", "3", "--save_intermediates", "0,2")

  data = outputs(out)
  assert sorted(data) == ["images", "prompts"]
  assert data["images"].dtype == np.uint8 and data["images"].shape == (10, 16, 16, 3)
  assert data["prompts"].dtype.kind == "U"
  assert list(data["prompts"]) == [PROMPT, "a small blue square on a black background"] * 5
  assert sorted(os.listdir(os.path.join(out, "images"))) == [f"{i:05d}.png" for i in range(10)]
  np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(out, "images", "00007.png"))), data["images"][7])
  assert Image.open(os.path.join(out, "grid.png")).size == (2 * 18 + 2, 5 * 18 + 2)  # a column per prompt
  assert Image.open(os.path.join(out, "intermediates.png")).size == (3 * 18 + 2, 8 * 18 + 2)  # 2 x0 + final
  settings = json.load(open(os.path.join(out, "sampling.json")))
  assert settings["sampler"] == sampler and settings["checkpoint_step"] == 4
  assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []  # no staging left


@pytest.mark.slow
def test_class_labels_seeds_and_one_compilation_for_all_batches(class_run, tmp_path):
  def run(name, seed):
    request = sampling.SampleRequest(out=str(tmp_path / name), workdir=class_run, class_labels="all",
                                      num_samples=9, steps=2, seed=seed)
    summary = sampling.sample_to_dir(request)
    return summary, outputs(request.out)

  summary, first = run("a", seed=0)
  assert summary["compilations"] == 1  # two batches (8, then 1 padded to 8), one compiled function
  assert sorted(first) == ["images", "labels"]
  assert first["labels"].dtype.kind == "i"
  np.testing.assert_array_equal(first["labels"], [0, 1, 2, 3, 4, 5, 0, 1, 2])
  assert first["images"].dtype == np.uint8 and first["images"].shape == (9, 16, 16, 3)
  _, again = run("b", seed=0)
  _, other = run("c", seed=1)
  np.testing.assert_array_equal(first["images"], again["images"])
  assert np.abs(first["images"].astype(int) - other["images"].astype(int)).mean() > 5
  # Each sample has its own noise: the two samples of class 0 differ.
  assert np.abs(first["images"][0].astype(int) - first["images"][6].astype(int)).mean() > 5


# Extended: tests/diffusion covers the spacings themselves against diffusers' schedulers.
@pytest.mark.extended
@pytest.mark.slow
def test_timestep_spacing_flags_select_diffusers_timesteps(class_run, tmp_path):
  """--timestep_spacing leading --steps_offset 1 is DDIM's default 'uniform' (the same images);
  DPM-Solver++ with diffusers' 'linspace' visits other timesteps (other images); timesteps that do
  not fit are reported before loading."""
  def images(name, *args):
    out = str(tmp_path / name)
    cli("--workdir", class_run, "--out", out, "--class_label", "all", "--num_samples", "8", "--steps", "3", *args)
    return outputs(out)["images"]

  np.testing.assert_array_equal(images("leading", "--timestep_spacing", "leading", "--steps_offset", "1"),
                                images("uniform"))
  assert not np.array_equal(images("dpm_linspace", "--sampler", "dpmpp_2m", "--timestep_spacing", "linspace"),
                            images("dpm_uniform", "--sampler", "dpmpp_2m"))
  with pytest.raises(ValueError, match="--timestep_spacing / --steps_offset: .*steps_offset=1 are not distinct"):
    images("bad", "--steps", "1000", "--timestep_spacing", "leading", "--steps_offset", "1")
  assert not os.path.exists(tmp_path / "bad")


# Extended: the default suite runs two processes in tests/data (the same distributed setup).
@pytest.mark.extended
@pytest.mark.slow
def test_two_processes_sample_the_same_images_as_one(class_run, tmp_path, jax_cache):
  """sample.py on 2 processes × 2 CPU devices (gloo): one mesh over both, process 0 writes."""
  args = ["--workdir", class_run, "--class_label", "all", "--num_samples", "6", "--batch_size", "4",
          "--steps", "2", "--seed", "3"]
  port = free_port()
  runs = [Run(["sample.py", *args, "--out", str(tmp_path / f"out{i}"), f"--coordinator_address=localhost:{port}",
               "--num_processes=2", f"--process_id={i}", "--heartbeat_timeout=20"],
              cpu_env(2, jax_cache), str(tmp_path / f"sample_{i}.log")) for i in range(2)]
  codes = wait_all(runs, 600)
  assert codes == [0, 0], "\n".join(run.output()[-3000:] for run in runs)
  assert "2 local / 4 global devices" in runs[1].output()
  assert not os.path.exists(tmp_path / "out1")  # only process 0 writes
  two = outputs(str(tmp_path / "out0"))
  one_request = sampling.SampleRequest(out=str(tmp_path / "one"), workdir=class_run, class_labels="all",
                                        num_samples=6, batch_size=4, steps=2, seed=3)
  sampling.sample_to_dir(one_request, mesh=sampling.sampling_mesh(jax.devices()[:4]))
  one = outputs(one_request.out)
  np.testing.assert_array_equal(two["labels"], [0, 1, 2, 3, 4, 5])
  # The same request on a mesh of the same shape gives the same images, however many hosts.
  assert np.abs(two["images"].astype(int) - one["images"].astype(int)).max() <= 1


# ---------------------------------------------------------------------------------------------
# Image-to-image and inpainting

@pytest.mark.slow
def test_img2img_strength_zero_returns_the_reconstruction(text_run, text_ldm, tmp_path):
  path, pixels = init_image(tmp_path)
  ldm, _, ae_params = text_ldm
  reconstruction = np.asarray(jax.jit(lambda p, x: ldm.decode(p, ldm.encode(p, x)))(ae_params, pixels))
  expected = np.clip(np.round((reconstruction + 1) * 127.5), 0, 255)

  out = str(tmp_path / "s0")
  cli("--workdir", text_run, "--out", out, "--prompt", PROMPT, "--num_samples", "2", "--init_image", path,
      "--strength", "0")
  images = outputs(out)["images"]
  assert np.abs(images.astype(int) - expected).max() <= 1

  # An all-black mask keeps everything: inpainting gives the reconstruction as well.
  black = str(tmp_path / "black.png")
  Image.fromarray(np.zeros((16, 16), np.uint8)).save(black)
  out = str(tmp_path / "keep_all")
  cli("--workdir", text_run, "--out", out, "--prompt", PROMPT, "--num_samples", "2", "--init_image", path,
      "--mask", black, "--steps", "2")
  assert np.abs(outputs(out)["images"].astype(int) - expected).max() <= 1


@pytest.mark.slow
def test_inpainting_keeps_the_known_latent(text_ldm):
  ldm, params, ae_params = text_ldm
  h, w, c = ldm.latent_shape
  known = jax.random.normal(jax.random.key(0), (8, h, w, c))
  keep = np.zeros((1, h, w, 1), np.float32)
  keep[:, :, : w // 2] = 1.0
  cond = ldm.prepare({"caption": [PROMPT] * 8})

  @jax.jit
  def run(params, known, keep):
    return ldm.inpaint_latents(params, cond, known, keep, jax.random.key(1), num_steps=3, guidance_scale=2.0,
                               null_cond=ldm.null(1))

  z = np.asarray(run(params, known, keep))
  np.testing.assert_array_equal(z[:, :, : w // 2], np.asarray(known)[:, :, : w // 2])
  assert np.abs(z[:, :, w // 2:] - np.asarray(known)[:, :, w // 2:]).mean() > 0.1


def test_mask_white_means_repaint(text_run, tmp_path):
  path, _ = init_image(tmp_path)
  mask = np.zeros((16, 16), np.uint8)
  mask[:, :5] = 255  # repaint columns 0-4: latent columns 0-1 fully, 2 partly (f = 2)
  mask_path = str(tmp_path / "mask.png")
  Image.fromarray(mask).save(mask_path)
  request = sampling.SampleRequest(out=str(tmp_path / "o"), workdir=text_run, prompts=(PROMPT,), num_samples=1,
                                    init_image=path, mask=mask_path)
  plan = sampling.make_plan(request, sampling.read_run(text_run), num_devices=8)
  keep = plan.keep_mask[0, :, :, 0]
  assert keep.shape == (8, 8)
  np.testing.assert_array_equal(keep[:, :3], 0.0)  # a partly repainted block is repainted
  np.testing.assert_array_equal(keep[:, 3:], 1.0)
  assert plan.strength == 1.0 and plan.mode == "inpaint"


# ---------------------------------------------------------------------------------------------
# Pretrained directories

@pytest.mark.extended  # ~40 s: sample.py twice; moved to keep the default suite under 15 minutes
@pytest.mark.slow
def test_an_exported_run_samples_as_its_workdir(text_run, tmp_path):
  from ldm_jax.convert import save_pretrained
  from ldm_jax.load import read_workdir
  exported = str(tmp_path / "exported")
  save_pretrained(exported, read_workdir(text_run))
  common = ("--prompt", PROMPT, "--num_samples", "8", "--steps", "2", "--seed", "3")
  cli("--workdir", text_run, "--out", str(tmp_path / "from_workdir"), *common)
  cli("--pretrained", exported, "--out", str(tmp_path / "from_pretrained"), *common)
  cli("--workdir", exported, "--out", str(tmp_path / "pretrained_as_workdir"), *common)  # convert import's output
  from_workdir = outputs(str(tmp_path / "from_workdir"))
  from_pretrained = outputs(str(tmp_path / "from_pretrained"))
  assert list(from_pretrained["prompts"]) == [PROMPT] * 8
  assert np.abs(from_pretrained["images"].astype(int) - from_workdir["images"].astype(int)).max() <= 1
  np.testing.assert_array_equal(outputs(str(tmp_path / "pretrained_as_workdir"))["images"], from_pretrained["images"])


def test_a_pretrained_text_encoder_gives_the_context(text_run, tmp_path):
  """A source with a CLIP text encoder and a tokenizer (the Stable Diffusion layout) conditions
  the U-Net on the encoder's last hidden states of the tokenized prompt."""
  from ldm_jax.convert import save_pretrained
  from ldm_jax.load import read_workdir
  from ldm_jax.models.clip import clip_config, make_clip_text_encoder
  pretrained = read_workdir(text_run)
  clip = clip_config(vocab_size=512, max_length=16, dim=32, depth=1, num_heads=2, mlp_dim=64)
  encoder = make_clip_text_encoder(clip)
  encoder_params = encoder.init(jax.random.key(0), np.zeros((1, 16), np.int32))["params"]
  pretrained.params = {"unet": pretrained.params["unet"], "autoencoder": pretrained.params["autoencoder"],
                       "text_encoder": jax.tree.map(np.asarray, encoder_params)}
  pretrained.configs = {k: v for k, v in pretrained.configs.items() if k != "cond"}
  pretrained.configs["text_encoder"] = clip
  save_pretrained(str(tmp_path / "sd_like"), pretrained)

  info = sampling.read_pretrained(str(tmp_path / "sd_like"))
  assert (info.kind, info.num_timesteps, info.f, info.image_size, info.step) == ("text", 1000, 2, (16, 16), None)
  ldm, params, _ = info.load(sampling.sampling_mesh(), True)
  tokens = ldm.prepare({"caption": [PROMPT, ""]})["tokens"]
  context = ldm.condition(params["cond"], {"tokens": tokens})["context"]
  np.testing.assert_allclose(context, encoder.apply({"params": encoder_params}, tokens), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error before anything is loaded, and nothing written

@pytest.fixture
def no_loading(monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("weights were loaded before the request was checked")
  monkeypatch.setattr(load, "load_diffusion_run", fail)


# Extended: tests/nn/test_attention.py compares the implementations themselves.
@pytest.mark.extended
@pytest.mark.slow
def test_attention_flag_forces_an_implementation_with_the_same_images(text_run, tmp_path):
  images = {}
  for attention in ("xla", "blocked"):
    out = str(tmp_path / attention)
    cli("--workdir", text_run, "--out", out, "--prompt", PROMPT, "--num_samples", "2", "--steps", "3",
        "--attention", attention)
    images[attention] = outputs(out)["images"].astype(int)
    assert json.load(open(os.path.join(out, "sampling.json")))["attention"] == attention
  assert np.abs(images["xla"] - images["blocked"]).max() <= 1  # uint8 rounding of float32 differences


def test_bad_input_is_reported_before_loading_and_writes_nothing(text_run, class_run, tmp_path, no_loading):
  path, _ = init_image(tmp_path)
  wrong_mask = str(tmp_path / "mask8.png")
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(wrong_mask)
  no_checkpoint = str(tmp_path / "no_ckpt")
  os.makedirs(no_checkpoint)
  shutil.copy(os.path.join(text_run, "config.json"), no_checkpoint)
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "old.png").write_bytes(b"")
  text = ("--workdir", text_run, "--prompt", PROMPT, "--num_samples", "2")
  cls = ("--workdir", class_run, "--num_samples", "2")

  cases = [
      (ValueError, "--attention: 'cudnn' needs a GPU, but JAX runs on cpu", text + ("--attention", "cudnn")),
      (ValueError, "--attention: 'flash' is not one of auto, xla, blocked", text + ("--attention", "flash")),
      (ValueError, "--guidance_scale: expected a finite number >= 0", text + ("--guidance_scale", "-1")),
      (ValueError, "--guidance_scale: expected a finite number >= 0, got inf", text + ("--guidance_scale", "inf")),
      (ValueError, "--guidance_rescale: expected a finite number >= 0 and <= 1, got nan",
       text + ("--guidance_rescale", "nan")),
      (ValueError, re.escape("--guidance_interval: expected two timesteps LO,HI with 0 <= LO <= HI"),
       text + ("--guidance_interval", "500,100")),
      (ValueError, "--guidance_interval: expected two comma-separated integers", text + ("--guidance_interval", "5")),
      (ValueError, "--steps: 1001 is more than the 1000 timesteps", text + ("--steps", "1001")),
      (ValueError, "--steps: expected a positive integer", text + ("--steps", "0")),
      (ValueError, r"--strength: expected .* >= 0 and <= 1", text + ("--init_image", path, "--strength", "1.5")),
      (ValueError, r"--strength: expected .* >= 0 and <= 1", text + ("--init_image", path, "--strength", "-0.1")),
      (ValueError, "--strength: only used with --init_image", text + ("--strength", "0.5")),
      (ValueError, "--mask: .*mask8.png is 8×8 .*init.png is 16×16", text + ("--init_image", path, "--mask",
                                                                              wrong_mask)),
      (ValueError, "--mask: inpainting needs the image", text + ("--mask", wrong_mask)),
      (FileNotFoundError, "--init_image: .*missing.png is not a file", text + ("--init_image", "missing.png")),
      (FileNotFoundError, re.escape(f"--workdir: {tmp_path}/nowhere does not exist"),
       ("--workdir", str(tmp_path / "nowhere"), "--prompt", PROMPT)),
      (FileNotFoundError, re.escape(f"{no_checkpoint}/checkpoints holds no checkpoint"), ("--workdir", no_checkpoint,
                                                                              "--prompt", PROMPT)),
      (ValueError, r"--class_label: 6 is outside the model's classes \[0, 6\)", cls + ("--class_label", "6")),
      (ValueError, "--class_label: expected an integer", cls + ("--class_label", "cat")),
      (ValueError, "--class_label: the model .* is not class-conditional", ("--workdir", text_run,
                                                                           "--class_label", "1")),
      (ValueError, "--prompt / --prompts_file: the model .* is not text-conditional", cls + ("--prompt", PROMPT)),
      (ValueError, "--class_label: the model .* is class-conditional", cls),
      (ValueError, "--prompt / --prompts_file: the model .* is text-conditional", ("--workdir", text_run)),
      (ValueError, "--negative_prompt: the model .* is not text-conditional",
       cls + ("--class_label", "1", "--negative_prompt", "blue")),
      (ValueError, "--height: 18 is not a multiple of 4", text + ("--height", "18")),
      (ValueError, "--width: 6 is not a multiple of 4", text + ("--width", "6")),
      (ValueError, "--height: 32, but --init_image", text + ("--init_image", path, "--height", "32")),
      (ValueError, "--eta: only DDIM", text + ("--sampler", "plms", "--eta", "0.5")),
      (ValueError, "--batch_size: 6 is not divisible by the 8 devices", text + ("--batch_size", "6")),
      (ValueError, "--save_intermediates: step 3 does not run", text + ("--steps", "3", "--save_intermediates", "3")),
      (ValueError, "--save_intermediates: step 1 does not run",
       text + ("--steps", "4", "--init_image", path, "--strength", "0.3", "--save_intermediates", "1")),
      (ValueError, "--negative_prompt: .* --guidance_scale 1", text + ("--negative_prompt", "x", "--guidance_scale",
                                                                      "1")),
      (ValueError, "--vae_tile_size: 17 is not a multiple of the autoencoder's f = 2",
       text + ("--vae_tiling", "--vae_tile_size", "17")),
      (ValueError, r"--vae_tile_overlap: 0.25 of a 18-pixel tile \(9 latent pixels\) is not a whole number",
       text + ("--vae_tiling", "--vae_tile_size", "18")),
      (ValueError, "--vae_tile_size / --vae_tile_overlap: only used with --vae_tiling", text + ("--vae_tile_size", "8")),
      (ValueError, "--refiner / --denoising_end: give both", text + ("--denoising_end", "0.8")),
      (FileNotFoundError, "--refiner: .*nowhere does not exist", text + ("--refiner", str(tmp_path / "nowhere"),
                                                                         "--denoising_end", "0.8")),
      (ValueError, "--workdir / --pretrained: give exactly one", ("--prompt", PROMPT)),
      (FileNotFoundError, "--pretrained: .*nowhere does not exist", ("--pretrained", str(tmp_path / "nowhere"),
                                                                     "--prompt", PROMPT)),
      (ValueError, "--use_ema: a --pretrained directory", ("--pretrained", text_run, "--nouse_ema")),
      (FileExistsError, "--out: .*busy already exists", text),
  ]
  for error, match, args in cases:
    out = str(busy if "busy" in match else tmp_path / "out")
    with pytest.raises(error, match=match):
      cli("--out", out, *args)
    assert not os.path.exists(tmp_path / "out"), match
    assert os.listdir(busy) == ["old.png"]
  assert sorted(os.listdir(tmp_path)) == ["busy", "init.png", "mask8.png", "no_ckpt"]


def test_non_finite_samples_are_an_error_and_write_nothing(text_run, tmp_path):
  """Issue 12: a diverged model (here the run exported with a NaN U-Net bias) gives NaN samples;
  that stops the run with the images named, never black pictures and exit status 0."""
  from ldm_jax.convert import save_pretrained  # pylint: disable=g-import-not-at-top
  from ldm_jax.load import read_workdir  # pylint: disable=g-import-not-at-top
  model = read_workdir(text_run)
  model.params["unet"]["conv_out"]["bias"] = np.full_like(model.params["unet"]["conv_out"]["bias"], np.nan)
  diverged = str(tmp_path / "diverged")
  save_pretrained(diverged, model)
  out = str(tmp_path / "out")
  with pytest.raises(ValueError, match=r"images: \d+ of \d+ values are NaN or infinite"):
    cli("--pretrained", diverged, "--out", out, "--prompt", PROMPT, "--num_samples", "8", "--steps", "2")
  assert sorted(os.listdir(tmp_path)) == ["diverged"]


def test_long_prompts_are_truncated_with_a_warning(text_run, caplog):
  info = sampling.read_run(text_run)
  long_prompt = " ".join(["red circle"] * 40)
  request = sampling.SampleRequest(out="unused", workdir=text_run, prompts=(long_prompt,), num_samples=1)
  with caplog.at_level("WARNING"):
    plan = sampling.make_plan(request, info, num_devices=8)
  assert "truncated to max_length=16" in caplog.text
  tokens = plan.cond["tokens"]
  assert tokens.shape == (1, 16) and (tokens != info.tokenizer.pad_id).all()
