"""SDXL single files (Stability's sgm layout) against diffusers' `from_single_file`.

A tiny random SDXL base and refiner (32 GroupNorm groups and 64-channel text heads, as the published
models: single files do not store either) are saved by diffusers and written as sgm single files by
the inverse key maps of `tests.convert.reference`, which diffusers' own single-file loader must read
back bit-identically. Importing a file must give the parameters of importing the diffusers folder,
sample the images of `StableDiffusionXLPipeline.from_single_file`, and export to a folder diffusers loads.
"""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from ldm_jax.convert import WeightMismatchError  # noqa: E402
from ldm_jax.convert.__main__ import main as convert_main  # noqa: E402
from ldm_jax.convert.safetensors_io import read_safetensors, write_safetensors  # noqa: E402
from ldm_jax.load import read_source  # noqa: E402
from ldm_jax.runtime import sharding  # noqa: E402
from ldm_jax.sampling import SampleRequest  # noqa: E402
from ldm_jax.sampling.model import read_model  # noqa: E402
from ldm_jax.sampling.plan import make_plan  # noqa: E402
from ldm_jax.sampling.run import make_sample_fn, sampling_mesh  # noqa: E402
from tests.convert.reference import (clip_to_openclip, clip_tokenizer_vocab, nchw, perturb, state_numpy,  # noqa: E402
                                     unet_to_ldm, vae_to_ldm)

# Three levels (32, 64, 64 channels), no attention on level 0, transformer depths 1 then 2 (and the
# middle block), two heads of 32 channels; the context is 64 (ViT-L) + 128 (bigG) wide.
UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 2, 2), use_linear_projection=True,
            cross_attention_dim=192, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=24 + 6 * 8)
REFINER_UNET = dict(UNET, cross_attention_dim=128, projection_class_embeddings_input_dim=24 + 5 * 8)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
           up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 64),
           layers_per_block=1, latent_channels=4, sample_size=32, scaling_factor=0.13025)
HEAD_CHANNELS = 32  # the U-Net's (SDXL's 64 is the default guess for linear projections)
PROMPTS = ["a cat", "a dog and a cat"]
HEIGHT, WIDTH = 16, 24
DEVICES = 2


def _prefixed(prefix, state):
  return {prefix + k: v for k, v in state.items()}


def to_sgm(pipe):
  """A diffusers SDXL pipeline (base, or refiner without text_encoder) as an sgm single-file state dict."""
  state = {**_prefixed("model.diffusion_model.", unet_to_ldm(state_numpy(pipe.unet), pipe.unet.config)),
           **_prefixed("first_stage_model.", vae_to_ldm(state_numpy(pipe.vae), pipe.vae.config))}
  bigg = clip_to_openclip(state_numpy(pipe.text_encoder_2))
  if pipe.text_encoder is None:
    return {**state, **_prefixed("conditioner.embedders.0.model.", bigg)}
  vit_l = {k if k.startswith("text_model.") else "text_model." + k: v
           for k, v in state_numpy(pipe.text_encoder).items()}
  return {**state, **_prefixed("conditioner.embedders.0.transformer.", vit_l),
          **_prefixed("conditioner.embedders.1.model.", bigg)}


def _ddim():
  return diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                 set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory):
  """name → (diffusers folder, single file, pipeline) for 'base' and 'refiner'."""
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp("sdxl_single_file")
  vocab, merges = clip_tokenizer_vocab()
  special = dict(vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"], pad_token_id=vocab["<|endoftext|>"],
                 max_position_embeddings=16)
  tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16)
  tokenizer_2 = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=16, pad_token="!")
  vit_l = perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      eos_token_id=vocab["<|endoftext|>"], hidden_act="quick_gelu", hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=1, **special)), seed=30)
  bigg = perturb(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
      eos_token_id=2, hidden_act="gelu", projection_dim=24, hidden_size=128, intermediate_size=256,
      num_hidden_layers=3, num_attention_heads=2, **special)), seed=31)
  pipes = {
      "base": diffusers.StableDiffusionXLPipeline(
          vae=perturb(diffusers.AutoencoderKL(**VAE), seed=32), text_encoder=vit_l, text_encoder_2=bigg,
          tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=perturb(diffusers.UNet2DConditionModel(**UNET), seed=33),
          scheduler=_ddim(), add_watermarker=False),
      "refiner": diffusers.StableDiffusionXLImg2ImgPipeline(
          vae=perturb(diffusers.AutoencoderKL(**VAE), seed=34), text_encoder=None, text_encoder_2=bigg,
          tokenizer=None, tokenizer_2=tokenizer_2,
          unet=perturb(diffusers.UNet2DConditionModel(**REFINER_UNET), seed=35), scheduler=_ddim(),
          requires_aesthetics_score=True, force_zeros_for_empty_prompt=False, add_watermarker=False)}
  out = {}
  for name, pipe in pipes.items():
    folder, path = str(root / name), str(root / f"sd_xl_{name}.safetensors")
    pipe.save_pretrained(folder)
    write_safetensors(path, to_sgm(pipe))
    out[name] = (folder, path, pipe)
  return out


def _assert_same_state(ours, theirs, what):
  assert sorted(ours) == sorted(theirs), what
  for key, value in theirs.items():
    np.testing.assert_array_equal(ours[key], value, err_msg=f"{what}: {key}")


def test_the_sgm_files_are_what_diffusers_single_file_loader_reads(sdxl_files):
  """The test's diffusers → sgm maps are the inverse of diffusers' own (from_single_file with the
  folder's configs, offline): every tensor comes back bit-identical."""
  for name, cls in (("base", diffusers.StableDiffusionXLPipeline),
                    ("refiner", diffusers.StableDiffusionXLImg2ImgPipeline)):
    folder, path, pipe = sdxl_files[name]
    assert any(k.startswith("model.diffusion_model.label_emb.0.2.") for k in read_safetensors(path))
    loaded = cls.from_single_file(path, config=folder, local_files_only=True, add_watermarker=False)
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
      if getattr(pipe, component) is not None:
        _assert_same_state(state_numpy(getattr(loaded, component)), state_numpy(getattr(pipe, component)),
                           f"{name} {component}")


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_single_file_imports_as_the_diffusers_folder(sdxl_files, name):
  folder, path, _ = sdxl_files[name]
  tokenizers = dict(tokenizer_2=os.path.join(folder, "tokenizer_2"))
  if name == "base":
    tokenizers["tokenizer"] = os.path.join(folder, "tokenizer")
  ours, theirs = read_source(path, num_head_channels=HEAD_CHANNELS, **tokenizers), read_source(folder)
  assert ours.components == theirs.components == (
      ["autoencoder", "unet", "text_encoder", "text_encoder_2"] if name == "base" else
      ["autoencoder", "unet", "text_encoder_2"])
  for component in ours.components:
    assert jax.tree.structure(ours.params[component]) == jax.tree.structure(theirs.params[component])
    jax.tree.map(np.testing.assert_array_equal, ours.params[component], theirs.params[component])
  unet, heads = ours.configs["unet"], ("num_heads", "num_head_channels")
  # diffusers' folder lists 2 heads per level, the file leaves the width per head to the option: the same heads.
  assert {k: v for k, v in unet.items() if k not in heads} == \
      {k: theirs.configs["unet"][k] for k in unet if k not in heads}
  assert (unet["transformer_depth"], unet["num_head_channels"], unet["addition_time_embed_dim"],
          unet["addition_embed_dim"]) == ((1, 1, 2), HEAD_CHANNELS, 8, 24 + (6 if name == "base" else 5) * 8)
  assert ours.configs["cond"] == theirs.configs["cond"] == (
      {"null_text": "zeros", "micro_conditioning": "target_size"} if name == "base" else
      {"null_text": "empty_prompt", "micro_conditioning": "aesthetic_score"})
  assert ours.configs["latent"] == {"scale_factor": 0.13025}
  assert ours.configs["diffusion"] == {k: theirs.configs["diffusion"][k] for k in ours.configs["diffusion"]}
  bigg = ours.configs["text_encoder_2"]
  assert (bigg["projection_dim"], bigg["eos_token_id"], bigg["skip_last_layers"], bigg["norm_output"],
          bigg["activation"], bigg["num_heads"]) == (24, 2, 1, False, "gelu", 2)
  assert ours.tokenizer_2_dir == tokenizers["tokenizer_2"]


@pytest.fixture(scope="module")
def imported_base(sdxl_files, tmp_path_factory):
  """`convert import` of the base single file: the pretrained directory."""
  folder, path, _ = sdxl_files["base"]
  out = str(tmp_path_factory.mktemp("imported") / "sdxl")
  assert convert_main(["import", "--src", path, "--out", out, "--num_head_channels", str(HEAD_CHANNELS),
                       "--tokenizer", os.path.join(folder, "tokenizer"),
                       "--tokenizer_2", os.path.join(folder, "tokenizer_2")]) == 0
  return out


def test_imported_single_file_samples_as_diffusers_from_single_file(sdxl_files, imported_base, tmp_path):
  """sample.py's compiled function on the imported directory against
  StableDiffusionXLPipeline.from_single_file (DDIM, guidance, non-square, micro-conditioning)."""
  folder, path, _ = sdxl_files["base"]
  x_T = np.random.default_rng(5).normal(size=(2, HEIGHT // 2, WIDTH // 2, 4)).astype(np.float32)
  np.save(tmp_path / "latents.npy", x_T)
  request = SampleRequest(out=str(tmp_path / "out"), pretrained=imported_base, prompts=tuple(PROMPTS),
                          guidance_scale=5.0, steps=3, timestep_spacing="leading", steps_offset=1, height=HEIGHT,
                          width=WIDTH, latents=str(tmp_path / "latents.npy"), original_size=(40, 32),
                          crops_coords_top_left=(2, 3), batch_size=2)
  info = read_model(request)
  mesh = sampling_mesh(jax.devices()[:DEVICES])
  plan = make_plan(request, info, sharding.data_parallel_size(mesh))
  ldm, params, ae_params = info.load(mesh, True)
  fn, _ = make_sample_fn(ldm, request, plan, mesh)
  images, _ = fn(params, ae_params, plan.cond, plan.null, np.arange(2, dtype=np.int32), np.int32(0),
                 jax.random.PRNGKey(0), None, None, plan.x_T)
  ours = np.asarray(images) / 2 + 0.5

  reference_pipe = diffusers.StableDiffusionXLPipeline.from_single_file(path, config=folder, local_files_only=True,
                                                                        add_watermarker=False)
  assert isinstance(reference_pipe.scheduler, diffusers.DDIMScheduler)
  with torch.no_grad():
    reference = reference_pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=3, guidance_scale=5.0,
                               latents=nchw(x_T), original_size=(40, 32), crops_coords_top_left=(2, 3),
                               output_type="np").images
  assert reference.std() > 0.05
  np.testing.assert_allclose(ours, reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["base", "refiner"])
def test_single_file_import_then_export_loads_in_diffusers(sdxl_files, imported_base, tmp_path, name):
  """sgm file → `convert import` → `convert export --src` → the diffusers pipeline, weights unchanged."""
  folder, path, pipe = sdxl_files[name]
  imported = imported_base
  if name == "refiner":
    imported = str(tmp_path / "refiner")
    assert convert_main(["import", "--src", path, "--out", imported, "--num_head_channels", str(HEAD_CHANNELS),
                         "--tokenizer_2", os.path.join(folder, "tokenizer_2")]) == 0
  exported = str(tmp_path / "exported")
  assert convert_main(["export", "--src", imported, "--format", "diffusers", "--out", exported]) == 0
  with open(os.path.join(exported, "model_index.json")) as f:
    index = json.load(f)
  cls = diffusers.StableDiffusionXLPipeline if name == "base" else diffusers.StableDiffusionXLImg2ImgPipeline
  assert (index["_class_name"], index["force_zeros_for_empty_prompt"]) == (cls.__name__, name == "base")
  reloaded = cls.from_pretrained(exported, add_watermarker=False)
  for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
    if getattr(pipe, component) is not None:
      _assert_same_state(state_numpy(getattr(reloaded, component)), state_numpy(getattr(pipe, component)), component)
  assert reloaded.vae.config.scaling_factor == 0.13025
  assert reloaded.tokenizer_2.pad_token == "!"


def test_mismatching_sdxl_files_name_the_file_and_the_keys(sdxl_files, tmp_path):
  folder, path, _ = sdxl_files["base"]
  state = dict(read_safetensors(path))
  bad = str(tmp_path / "bad.safetensors")

  broken = dict(state)
  del broken["conditioner.embedders.1.model.ln_final.bias"]
  broken["conditioner.embedders.1.model.transformer.resblocks.0.attn.out_proj.weight"] = np.zeros((128, 64), np.float32)
  broken["conditioner.embedders.1.model.visual.proj"] = np.zeros((4, 4), np.float32)
  write_safetensors(bad, broken)
  with pytest.raises(WeightMismatchError, match=r"1 missing, 1 unexpected, 1 mis-shaped") as error:
    read_source(bad, num_head_channels=HEAD_CHANNELS)
  message = str(error.value)
  assert f"text_encoder_2 (conditioner.embedders.1.model.*) of {bad}" in message
  assert "final_layer_norm/bias [128]" in message
  assert "visual.proj [4, 4]" in message
  assert "encoder.layers.0.self_attn.out_proj.weight [128, 64]" in message

  broken = dict(state)
  broken["model.diffusion_model.label_emb.0.2.weight"] = np.zeros((128, 127), np.float32)
  del broken["model.diffusion_model.output_blocks.0.1.transformer_blocks.1.attn1.to_q.weight"]
  write_safetensors(bad, broken)
  with pytest.raises(WeightMismatchError, match=r"1 missing, 0 unexpected, 1 mis-shaped") as error:
    read_source(bad, num_head_channels=HEAD_CHANNELS)
  message = str(error.value)
  assert f"U-Net (model.diffusion_model.*) of {bad}" in message
  assert "add_embedding.linear_2.weight [128, 127] → add_embedding/linear_2/kernel" in message
  assert "up_blocks_0/attentions_0/transformer_blocks_1/attn1/to_q/kernel [64, 64]" in message

  # A tensor the architecture is read from.
  broken = {k: v for k, v in state.items() if k != "conditioner.embedders.1.model.text_projection"}
  write_safetensors(bad, broken)
  with pytest.raises(WeightMismatchError, match=r"conditioner\.embedders\.1\.model\.text_projection \(the "
                     r"architecture is read from it\)") as error:
    read_source(bad)
  assert bad in str(error.value)

  # The U-Net's add_embedding does not fit the pooled width and 6 time ids.
  broken = dict(state, **{"model.diffusion_model.label_emb.0.0.weight": np.zeros((128, 25 + 6 * 8), np.float32)})
  write_safetensors(bad, broken)
  with pytest.raises(ValueError, match=rf"U-Net \(model\.diffusion_model\.\*\) of {bad}: .*label_emb\.0\.0 takes "
                     r"73 features, which is not the 24 of the pooled text embedding \+ 6 time ids"):
    read_source(bad)

  # A file cut short.
  with open(path, "rb") as f:
    head = f.read(4096)
  with open(bad, "wb") as f:
    f.write(head)
  with pytest.raises(ValueError, match=rf"{bad}: not a safetensors file"):
    read_source(bad)


def test_convert_import_flags_are_checked(sdxl_files, tmp_path, capsys):
  folder, path, _ = sdxl_files["base"]
  _, refiner_path, _ = sdxl_files["refiner"]
  for argv, expected in (
      (["--src", refiner_path, "--tokenizer", os.path.join(folder, "tokenizer")],
       f"--tokenizer: {refiner_path} has no text encoder for it (an SDXL refiner: its one encoder, bigG, takes "
       "--tokenizer_2)"),
      (["--src", path, "--tokenizer_2", str(tmp_path / "nowhere")],
       f"--tokenizer_2: {tmp_path / 'nowhere'} is not a folder"),
      (["--src", folder, "--tokenizer_2", os.path.join(folder, "tokenizer_2")],
       "--tokenizer_2: apply to single-file checkpoints")):
    assert convert_main(["import", "--out", str(tmp_path / "out")] + argv) != 0
    assert expected in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "out")
