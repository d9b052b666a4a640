"""SDXL: the U-Net's size against diffusers' published models, and a tiny random SDXL pipeline
(text_time U-Net, CLIPTextModel + CLIPTextModelWithProjection, a VAE with 8 GroupNorm groups)
imported, sampled with `sample.py`'s code path and exported, against `StableDiffusionXLPipeline`."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from ldm_jax.config import common as config_lib  # noqa: E402
from ldm_jax.convert import components, save_pretrained, write_diffusers  # noqa: E402
from ldm_jax.convert.diffusers_format import unet_config_from_diffusers  # noqa: E402
from ldm_jax.load import load_pretrained, read_source  # noqa: E402
from ldm_jax.runtime import sharding  # noqa: E402
from ldm_jax.sampling import SampleRequest, check_request, sample_to_dir  # noqa: E402
from ldm_jax.sampling.model import read_model, read_refiner  # noqa: E402
from ldm_jax.sampling.plan import make_plan  # noqa: E402
from ldm_jax.sampling.run import make_sample_fn, sampling_mesh  # noqa: E402
from tests.convert.reference import nchw, nhwc, perturb, state_numpy  # noqa: E402
from tests.convert.sdxl_tiny import TINY_REFINER_UNET, TINY_UNET, TINY_VAE  # noqa: E402

# The published U-Net configs (stabilityai/stable-diffusion-xl-base-1.0 and -refiner-1.0, unet/config.json),
# keys at diffusers' defaults left out.
SDXL_BASE_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[320, 640, 1280],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[5, 10, 20],
    transformer_layers_per_block=[1, 2, 10], cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)
SDXL_REFINER_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=[384, 768, 1536, 1536],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    attention_head_dim=[6, 12, 24, 24], transformer_layers_per_block=4, cross_attention_dim=1280,
    use_linear_projection=True, addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2560, norm_num_groups=32,
    flip_sin_to_cos=True, freq_shift=0)
# diffusers' parameter counts of these configs (its modules built on the meta device). The base's is
# the published 2,567,463,684; the refiner's is 2,259,526,660 (the 2,318,337,084 sometimes quoted
# for it is not what its config builds).
PUBLISHED_COUNTS = {"base": 2_567_463_684, "refiner": 2_259_526_660}

PROMPTS = ["a cat", "a dog and a cat"]
HEIGHT, WIDTH = 16, 24  # pixels; latents 8×12 (the VAE's f = 2)
DEVICES = 2  # the batch of two prompts over two of the tests' 8 CPU devices


def _count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize("name, config", [("base", SDXL_BASE_UNET), ("refiner", SDXL_REFINER_UNET)])
def test_unet_parameter_count_equals_diffusers(name, config):
  with torch.device("meta"):
    reference = diffusers.UNet2DConditionModel(**config)
  theirs = sum(p.numel() for p in reference.parameters())
  assert theirs == PUBLISHED_COUNTS[name]
  ours = components.abstract_params("unet", unet_config_from_diffusers(dict(config, _class_name="UNet2DConditionModel")))
  assert _count(ours) == theirs
  assert ours["add_embedding"]["linear_1"]["kernel"].shape == (config["projection_class_embeddings_input_dim"],
                                                              4 * config["block_out_channels"][0])


def test_sdxl_base_config_is_the_published_unet():
  """`configs/ldm/sdxl_base.py` (what `benchmarks/memory_training.py --model sdxl` compiles) asks for the
  published base U-Net: every key the import derives from its config, the channels from the VAE's latents."""
  config = config_lib.from_file(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "ldm", "sdxl_base.py"))
  published = unet_config_from_diffusers(dict(SDXL_BASE_UNET, _class_name="UNet2DConditionModel"))
  plain = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
  assert {k: plain(v) for k, v in published.items() if k not in ("in_channels", "out_channels")} == {
      k: plain(config.model[k]) for k in published if k not in ("in_channels", "out_channels")}
  assert (published["in_channels"], published["out_channels"]) == (4, 4)
  assert (config.model.in_channels, config.model.out_channels) == (-1, -1)  # derived: 4 latent channels


def test_sdxl_unet_matches_diffusers(tmp_path):
  torch.manual_seed(0)
  unet = perturb(diffusers.UNet2DConditionModel(**TINY_UNET), seed=20)
  unet.save_pretrained(str(tmp_path / "unet"))
  modules, params, configs = load_pretrained(str(tmp_path / "unet"))
  cfg = configs["unet"]
  assert (tuple(cfg.transformer_depth), tuple(cfg.attention_resolutions), cfg.num_head_channels,
          cfg.addition_embed_type, cfg.addition_embed_dim) == ((1, 1, 2), (2, 4), 8, "text_time", 72)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 8, 12, 4)).astype(np.float32)
  t = np.array([3, 817], np.int32)
  context = rng.normal(size=(2, 5, 64)).astype(np.float32)
  text_embeds = rng.normal(size=(2, 24)).astype(np.float32)
  time_ids = np.array([[16, 24, 0, 0, 16, 24], [1024, 768, 3, 5, 16, 24]], np.float32)
  model = modules["unet"]
  out = jax.jit(lambda p: model.apply({"params": p}, x, t, context, text_embeds=text_embeds, time_ids=time_ids))(
      params["unet"])
  with torch.no_grad():
    reference = unet(nchw(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(context),
                     added_cond_kwargs=dict(text_embeds=torch.from_numpy(text_embeds),
                                            time_ids=torch.from_numpy(time_ids))).sample
  np.testing.assert_allclose(out, nhwc(reference), atol=1e-4, rtol=0)
  assert np.abs(nhwc(reference)).max() > 0.1
  exported = str(tmp_path / "exported")
  write_diffusers(exported, read_source(str(tmp_path / "unet")))
  reloaded = diffusers.UNet2DConditionModel.from_pretrained(exported)
  for key, value in state_numpy(unet).items():
    np.testing.assert_array_equal(state_numpy(reloaded)[key], value, err_msg=key)


def test_sdxl_folder_imports_every_component(sdxl_pipeline):
  folder, pipe = sdxl_pipeline
  modules, params, configs = load_pretrained(folder)
  assert set(modules) == {"unet", "autoencoder", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"}
  assert configs["latent"].scale_factor == 0.13025
  assert configs["autoencoder"].num_groups == 8
  assert configs["cond"].to_dict() == {"null_text": "zeros", "micro_conditioning": "target_size"}
  assert (configs["text_encoder_2"].projection_dim, configs["text_encoder_2"].skip_last_layers,
          configs["text_encoder_2"].norm_output) == (24, 1, False)
  for ours, theirs in (("tokenizer", pipe.tokenizer), ("tokenizer_2", pipe.tokenizer_2)):
    reference = theirs(PROMPTS + [""], padding="max_length", max_length=theirs.model_max_length,
                       truncation=True).input_ids
    np.testing.assert_array_equal(modules[ours].tokenize(PROMPTS + [""]), reference)

  tokens = modules["tokenizer_2"].tokenize(PROMPTS)
  context, pooled = modules["text_encoder_2"].apply({"params": params["text_encoder_2"]}, tokens, return_pooled=True)
  with torch.no_grad():
    reference = pipe.text_encoder_2(torch.from_numpy(np.asarray(tokens, np.int64)), output_hidden_states=True)
  np.testing.assert_allclose(context, reference.hidden_states[-2].numpy(), atol=1e-5)
  np.testing.assert_allclose(pooled, reference.text_embeds.numpy(), atol=1e-5)


def _diffusers_images(pipe, x_T, guidance_scale, **kwargs):
  with torch.no_grad():
    return pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=3, guidance_scale=guidance_scale,
                latents=nchw(x_T), output_type="np", **kwargs).images


# Guidance 1 runs in make test-extended, to keep make test within its time budget.
@pytest.mark.parametrize("guidance_scale", [5.0, pytest.param(1.0, marks=pytest.mark.extended)])
def test_text_to_image_matches_the_sdxl_pipeline(sdxl_pipeline, tmp_path, guidance_scale):
  """sample.py's compiled function from the same initial latents (--latents) against
  StableDiffusionXLPipeline with DDIM: two encoders, zeroed negative conditioning (with guidance),
  micro-conditioning, non-square images; float images within 1e-4 in [0, 1]."""
  folder, pipe = sdxl_pipeline
  x_T = np.random.default_rng(1).normal(size=(2, HEIGHT // 2, WIDTH // 2, 4)).astype(np.float32)
  latents = str(tmp_path / "latents.npy")
  np.save(latents, x_T)
  request = SampleRequest(out=str(tmp_path / "out"), pretrained=folder, prompts=tuple(PROMPTS),
                          guidance_scale=guidance_scale, steps=3, timestep_spacing="leading", steps_offset=1,
                          height=HEIGHT, width=WIDTH, latents=latents, original_size=(40, 32),
                          crops_coords_top_left=(2, 3), batch_size=2)
  info = read_model(request)
  mesh = sampling_mesh(jax.devices()[:DEVICES])
  plan = make_plan(request, info, sharding.data_parallel_size(mesh))
  assert plan.cond["time_ids"].tolist() == [[40, 32, 2, 3, HEIGHT, WIDTH]] * 2
  ldm, params, ae_params = info.load(mesh, True)
  fn, _ = make_sample_fn(ldm, request, plan, mesh)
  images, _ = fn(params, ae_params, plan.cond, plan.null, np.arange(2, dtype=np.int32), np.int32(0),
                 jax.random.PRNGKey(0), None, None, plan.x_T)
  ours = np.asarray(images) / 2 + 0.5
  reference = _diffusers_images(pipe, x_T, guidance_scale, original_size=(40, 32), crops_coords_top_left=(2, 3))
  assert reference.std() > 0.05
  np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


@pytest.mark.extended  # sample.py end to end (20 s); the compiled function is compared above
def test_sample_py_writes_the_sdxl_pipeline_images(sdxl_pipeline, tmp_path):
  """The whole request (sample_to_dir, what sample.py runs) with default micro-conditioning: the
  written uint8 images are diffusers' images rounded."""
  folder, pipe = sdxl_pipeline
  x_T = np.random.default_rng(2).normal(size=(2, HEIGHT // 2, WIDTH // 2, 4)).astype(np.float32)
  np.save(tmp_path / "latents.npy", x_T)
  out = str(tmp_path / "out")
  sample_to_dir(SampleRequest(out=out, pretrained=folder, prompts=tuple(PROMPTS), guidance_scale=5.0, steps=3,
                              timestep_spacing="leading", steps_offset=1, height=HEIGHT, width=WIDTH,
                              latents=str(tmp_path / "latents.npy"), batch_size=2),
                mesh=sampling_mesh(jax.devices()[:DEVICES]))
  ours = np.load(os.path.join(out, "samples.npz"))["images"]
  expected = np.round(_diffusers_images(pipe, x_T, 5.0) * 255)
  assert ours.shape == (2, HEIGHT, WIDTH, 3)
  assert np.abs(ours.astype(np.float64) - expected).max() <= 1


def test_sdxl_folder_import_reads_back(sdxl_pipeline, tmp_path):
  """`convert import` of an SDXL folder gives a pretrained directory that reads back unchanged (the first
  encoder's final LayerNorm, which SDXL does not use, included)."""
  folder, _ = sdxl_pipeline
  imported = read_source(folder)
  save_pretrained(str(tmp_path / "imported"), imported)
  again = read_source(str(tmp_path / "imported"))
  assert again.configs["text_encoder"]["norm_output"] is False
  assert "final_layer_norm" in again.params["text_encoder"]
  for component in imported.components:
    jax.tree.map(np.testing.assert_array_equal, again.params[component], imported.params[component])


def test_sdxl_export_loads_in_diffusers(sdxl_pipeline, tmp_path):
  folder, pipe = sdxl_pipeline
  exported = str(tmp_path / "exported")
  write_diffusers(exported, read_source(folder))
  with open(os.path.join(exported, "model_index.json")) as f:
    index = json.load(f)
  assert (index["_class_name"], index["force_zeros_for_empty_prompt"]) == ("StableDiffusionXLPipeline", True)
  reloaded = diffusers.StableDiffusionXLPipeline.from_pretrained(exported, add_watermarker=False)
  for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
    ours, theirs = state_numpy(getattr(reloaded, name)), state_numpy(getattr(pipe, name))
    assert sorted(ours) == sorted(theirs), name
    for key, value in theirs.items():
      np.testing.assert_array_equal(ours[key], value, err_msg=f"{name}: {key}")
  assert reloaded.vae.config.scaling_factor == 0.13025
  assert reloaded.vae.config.norm_num_groups == 8
  assert reloaded.tokenizer_2.pad_token == "!"


@pytest.fixture(scope="module")
def sdxl_refiner(sdxl_pipeline, tmp_path_factory):
  """(folder, StableDiffusionXLImg2ImgPipeline) of a tiny random SDXL refiner: the base's second text
  encoder and tokenizer (as the published refiner shares bigG), its own U-Net and VAE."""
  _, base = sdxl_pipeline
  pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
      vae=perturb(diffusers.AutoencoderKL(**TINY_VAE), seed=25), text_encoder=None,
      text_encoder_2=base.text_encoder_2, tokenizer=None, tokenizer_2=base.tokenizer_2,
      unet=perturb(diffusers.UNet2DConditionModel(**TINY_REFINER_UNET), seed=26),
      scheduler=diffusers.DDIMScheduler.from_config(base.scheduler.config), requires_aesthetics_score=True,
      force_zeros_for_empty_prompt=False, add_watermarker=False)
  folder = str(tmp_path_factory.mktemp("sdxl_refiner"))
  pipe.save_pretrained(folder)
  return folder, pipe


# Extended: the default suite compares the base (text to image, above) and the refiner (img2img, below)
# to diffusers' pipelines each.
@pytest.mark.extended
def test_base_and_refiner_match_the_diffusers_ensemble_of_experts(sdxl_pipeline, sdxl_refiner, tmp_path):
  """sample.py's compiled function with --refiner --denoising_end 0.6 against
  StableDiffusionXLPipeline(denoising_end=0.6, output_type='latent') then
  StableDiffusionXLImg2ImgPipeline(denoising_start=0.6) on those latents, both with DDIM and guidance:
  the base's 2 of the 4 steps, the refiner's 2 with its own conditioning (bigG only, aesthetic
  scores, the empty negative prompt encoded), decoded by the refiner's VAE in 8-pixel tiles."""
  folder, base = sdxl_pipeline
  refiner_folder, refiner = sdxl_refiner
  x_T = np.random.default_rng(3).normal(size=(2, HEIGHT // 2, WIDTH // 2, 4)).astype(np.float32)
  np.save(tmp_path / "latents.npy", x_T)
  micro = dict(original_size=(40, 32), crops_coords_top_left=(2, 3))
  request = SampleRequest(out=str(tmp_path / "out"), pretrained=folder, refiner=refiner_folder, denoising_end=0.6,
                          prompts=tuple(PROMPTS), guidance_scale=5.0, steps=4, timestep_spacing="leading",
                          steps_offset=1, height=HEIGHT, width=WIDTH, latents=str(tmp_path / "latents.npy"),
                          aesthetic_score=7.0, negative_aesthetic_score=2.0, batch_size=2, vae_tiling=True,
                          vae_tile_size=8, **micro)
  info, refiner_info = read_model(request), read_refiner(request)
  mesh = sampling_mesh(jax.devices()[:DEVICES])
  plan = make_plan(request, info, sharding.data_parallel_size(mesh), refiner_info)
  assert (plan.refiner.base_timesteps.tolist(), plan.refiner.refiner_timesteps.tolist()) == ([751, 501], [251, 1])
  assert plan.refiner.cond["time_ids"].tolist() == [[40, 32, 2, 3, 7.0]] * 2
  assert plan.refiner.null["time_ids"].tolist() == [[40, 32, 0, 0, 2.0]]  # diffusers: negative crops (0, 0)
  assert plan.decode_tile == (4, 1)  # diffusers: 8-pixel tiles stepping by int(4·0.75) = 3 latent pixels
  ldm, params, ae_params = info.load(mesh, True)
  refiner_ldm, refiner_params, refiner_ae_params = refiner_info.load(mesh, True)
  fn, _ = make_sample_fn(ldm, request, plan, mesh, refiner_ldm)
  expert = dict(params=refiner_params, ae_params=refiner_ae_params, cond=plan.refiner.cond, null=plan.refiner.null)
  images, _ = fn(params, ae_params, plan.cond, plan.null, np.arange(2, dtype=np.int32), np.int32(0),
                 jax.random.PRNGKey(0), None, None, plan.x_T, expert)
  ours = np.asarray(images) / 2 + 0.5

  refiner.vae.enable_tiling()
  refiner.vae.tile_sample_min_size, refiner.vae.tile_latent_min_size = 8, 4
  try:
    with torch.no_grad():
      latents = base(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=4, guidance_scale=5.0,
                     latents=nchw(x_T), denoising_end=0.6, output_type="latent", **micro).images
      reference = refiner(PROMPTS, image=latents, num_inference_steps=4, denoising_start=0.6, guidance_scale=5.0,
                          aesthetic_score=7.0, negative_aesthetic_score=2.0, output_type="np", **micro).images
  finally:
    refiner.vae.disable_tiling()
  assert reference.std() > 0.05
  np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
  # The refiner mattered: the base alone, decoding its own (partly denoised) latents, is far off.
  base_alone = np.asarray(ldm.decode(ae_params, np.asarray(latents).transpose(0, 2, 3, 1))) / 2 + 0.5
  assert np.abs(base_alone - reference).max() > 0.05


def test_refiner_requests_are_checked_before_any_compilation(sdxl_pipeline, sdxl_refiner, tmp_path):
  folder, _ = sdxl_pipeline
  refiner_folder, _ = sdxl_refiner
  common = dict(out=str(tmp_path / "out"), pretrained=folder, prompts=tuple(PROMPTS), height=HEIGHT, width=WIDTH,
                steps=4, batch_size=2)
  mesh = sampling_mesh(jax.devices()[:DEVICES])
  for match, kwargs in (
      (r"--refiner / --denoising_end: give both", dict(refiner=refiner_folder)),
      (r"--denoising_end: expected a finite number > 0 and < 1, got 1\.0", dict(refiner=refiner_folder,
                                                                            denoising_end=1.0)),
      (r"--refiner: .*nowhere does not exist", dict(refiner=str(tmp_path / "nowhere"), denoising_end=0.8)),
      (r"--denoising_end: 0\.1 of the 4 steps .* leaves 0 to the model and 4 to the --refiner",
       dict(refiner=refiner_folder, denoising_end=0.1)),
      (r"--target_size: the model in .* \(an SDXL refiner\)", dict(pretrained=refiner_folder, target_size=(8, 8))),
      (r"--vae_tile_size / --vae_tile_overlap: only used with --vae_tiling", dict(vae_tile_size=64)),
      (r"--vae_tile_size: 15 is not a multiple of the autoencoder's f = 2", dict(vae_tiling=True, vae_tile_size=15)),
      (r"--vae_tile_overlap: 0\.3 of a 16-pixel tile \(8 latent pixels\) is not a whole number",
       dict(vae_tiling=True, vae_tile_size=16, vae_tile_overlap=0.3)),
      (r"--vae_tile_overlap: expected a finite number >= 0 and < 1, got 1\.0", dict(vae_tiling=True,
                                                                                  vae_tile_overlap=1.0))):
    request = SampleRequest(**dict(common, **kwargs))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
      check_request(request)
      make_plan(request, read_model(request), sharding.data_parallel_size(mesh), read_refiner(request))
  assert not os.path.exists(tmp_path / "out")


def test_refiner_img2img_matches_the_sdxl_img2img_pipeline(sdxl_refiner, tmp_path, monkeypatch):
  """The refiner alone on an init image (--init_image, --strength 0.5): sample.py's compiled
  function against StableDiffusionXLImg2ImgPipeline given our encoded init latent and, for its
  noise, the noise our img2img draws from the seed (the last 2 of 4 DDIM steps, guidance,
  aesthetic scores, default micro-conditioning)."""
  from diffusers.pipelines.stable_diffusion_xl import pipeline_stable_diffusion_xl_img2img as img2img_module
  refiner_folder, refiner = sdxl_refiner
  init = str(tmp_path / "init.png")
  Image.fromarray(np.random.default_rng(4).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)).save(init)
  request = SampleRequest(out=str(tmp_path / "out"), pretrained=refiner_folder, prompts=tuple(PROMPTS),
                          init_image=init, strength=0.5, guidance_scale=5.0, steps=4, timestep_spacing="leading",
                          steps_offset=1, aesthetic_score=7.0, negative_aesthetic_score=2.0, batch_size=2)
  info = read_model(request)
  mesh = sampling_mesh(jax.devices()[:DEVICES])
  plan = make_plan(request, info, sharding.data_parallel_size(mesh))
  assert (plan.mode, plan.steps_run, plan.cond["time_ids"].tolist()) == ("img2img", 2, [[HEIGHT, WIDTH, 0, 0, 7.0]] * 2)
  ldm, params, ae_params = info.load(mesh, True)
  init_latent = jax.jit(ldm.encode)(ae_params, plan.init_image)
  fn, _ = make_sample_fn(ldm, request, plan, mesh)
  key = jax.random.PRNGKey(0)
  images, _ = fn(params, ae_params, plan.cond, plan.null, np.arange(2, dtype=np.int32), np.int32(0), key,
                 init_latent, None, None)
  ours = np.asarray(images) / 2 + 0.5

  # make_sample_fn: rng = fold_in(split(key)[1], batch 0); samplers.img2img: noise from split(rng)[0].
  rng = jax.random.fold_in(jax.random.split(key)[1], 0)
  noise = nchw(np.asarray(jax.random.normal(jax.random.split(rng)[0], (2,) + plan.latent_shape, jnp.float32)))
  monkeypatch.setattr(img2img_module, "randn_tensor", lambda *args, **kwargs: noise)
  with torch.no_grad():
    reference = refiner(PROMPTS, image=nchw(np.asarray(init_latent)), strength=0.5, num_inference_steps=4,
                        guidance_scale=5.0, aesthetic_score=7.0, negative_aesthetic_score=2.0, output_type="np").images
  assert reference.std() > 0.05
  np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)
