"""CompVis / Stability single-file checkpoints: SD 1.x and 2.x layouts and LDM first stages.

The files are made from the tiny diffusers/transformers models by the inverse key maps of
`tests.convert.reference`, which are first checked against diffusers' own CompVis → diffusers
converters. Importing a file must give exactly the parameters that importing the diffusers
folders gives (whose outputs the parity tests compare with PyTorch).
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from diffusers.loaders import single_file_utils  # noqa: E402

from ldm_jax.convert import WeightMismatchError  # noqa: E402
from ldm_jax.convert.__main__ import main as convert_main  # noqa: E402
from ldm_jax.load import load_pretrained, read_source  # noqa: E402
from ldm_jax.convert.safetensors_io import write_safetensors  # noqa: E402
from ldm_jax.diffusion.schedule import beta_schedule  # noqa: E402
from tests.convert.reference import CLIP, clip_to_openclip, perturb, state_numpy, unet_to_ldm, vae_to_ldm  # noqa: E402


def _prefixed(prefix, state):
  return {prefix + k: v for k, v in state.items()}


def _assert_same_params(ours, theirs):
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  jax.tree.map(np.testing.assert_array_equal, ours, theirs)


def _check_inverse_maps_against_diffusers(unet, vq):
  """The test's diffusers → CompVis maps agree with diffusers' CompVis → diffusers converters."""
  ldm = _prefixed("model.diffusion_model.", {k: torch.from_numpy(v) for k, v in
                                             unet_to_ldm(state_numpy(unet), unet.config).items()})
  back = single_file_utils.convert_ldm_unet_checkpoint(ldm, dict(unet.config))
  assert sorted(back) == sorted(state_numpy(unet))
  for key, value in back.items():
    np.testing.assert_array_equal(value.numpy(), state_numpy(unet)[key], err_msg=key)
  ldm = _prefixed("first_stage_model.", {k: torch.from_numpy(v) for k, v in
                                         vae_to_ldm(state_numpy(vq), vq.config).items()})
  back = single_file_utils.convert_ldm_vae_checkpoint(ldm, dict(vq.config))
  expected = {k: v for k, v in state_numpy(vq).items() if k.startswith(("encoder.", "decoder."))}
  assert sorted(k for k in back if k.startswith(("encoder.", "decoder."))) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(back[key].numpy().reshape(value.shape), value, err_msg=key)


def test_sd1_single_file(diffusers_models, transformers_models, tmp_path):
  unet_folder, unet = diffusers_models["unet_sd1"]
  vae_folder, vae = diffusers_models["vae"]
  clip_folder, clip = transformers_models["clip"]
  _check_inverse_maps_against_diffusers(unet, diffusers_models["vq"][1])
  state = {
      **_prefixed("model.diffusion_model.", unet_to_ldm(state_numpy(unet), unet.config)),
      **_prefixed("first_stage_model.", vae_to_ldm(state_numpy(vae), vae.config)),
      **_prefixed("cond_stage_model.transformer.text_model.", state_numpy(clip)),
      "betas": beta_schedule("scaled_linear", 1000, 0.00085, 0.012).astype(np.float32),
      "alphas_cumprod": np.ones(1000, np.float32), "model_ema.decay": np.array(0.9999, np.float32),
      "first_stage_model.loss.logvar": np.zeros((), np.float32),
  }
  path = str(tmp_path / "sd1.safetensors")
  write_safetensors(path, state)
  imported = read_source(path, num_heads=2)
  assert imported.configs["unet"]["num_heads"] == 2
  assert imported.configs["diffusion"] == dict(beta_schedule="scaled_linear", num_timesteps=1000,
                                               linear_start=pytest.approx(0.00085), linear_end=pytest.approx(0.012),
                                               parameterization="eps")
  assert imported.configs["latent"]["scale_factor"] == 0.18215  # SD's, for a 4-channel KL first stage
  assert (imported.configs["text_encoder"]["num_heads"], imported.configs["text_encoder"]["skip_last_layers"]) == (2, 0)
  for component, folder in (("unet", unet_folder), ("autoencoder", vae_folder), ("text_encoder", clip_folder)):
    _assert_same_params(imported.params[component], load_pretrained(folder)[1][component])


def test_sd2_single_file_with_openclip_as_torch_pickle(diffusers_models, tmp_path):
  transformers = pytest.importorskip("transformers")
  unet_folder, unet = diffusers_models["unet_sd2"]
  torch.manual_seed(0)
  openclip = perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=100, bos_token_id=98, eos_token_id=99, **dict(CLIP, hidden_act="gelu"))))
  state = {**_prefixed("model.diffusion_model.", unet_to_ldm(state_numpy(unet), unet.config)),
           **_prefixed("cond_stage_model.model.", clip_to_openclip(state_numpy(openclip)))}
  path = str(tmp_path / "sd2.ckpt")
  torch.save({"state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()},
              "global_step": 7}, path)
  modules, params, configs = load_pretrained(path, parameterization="v")
  assert (configs["unet"].num_head_channels, configs["diffusion"].parameterization) == (64, "v")
  _assert_same_params(params["unet"], load_pretrained(unet_folder)[1]["unet"])

  # SD 2.x conditions on the penultimate layer of OpenCLIP, then the final LayerNorm.
  assert (configs["text_encoder"].activation, configs["text_encoder"].skip_last_layers) == ("gelu", 1)
  tokens = np.random.default_rng(0).integers(0, 100, (2, 16)).astype(np.int32)
  ours = jax.jit(lambda p, t: modules["text_encoder"].apply({"params": p}, t))(params["text_encoder"], tokens)
  with torch.no_grad():
    hidden = openclip(torch.from_numpy(tokens).long(), output_hidden_states=True).hidden_states[-2]
    reference = getattr(openclip, "text_model", openclip).final_layer_norm(hidden).numpy()
  np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_first_stage_checkpoint_without_prefix(diffusers_models, tmp_path):
  folder, vq = diffusers_models["vq"]
  state = vae_to_ldm(state_numpy(vq), vq.config)
  state["loss.discriminator.main.0.weight"] = np.zeros((8, 3, 4, 4), np.float32)
  path = str(tmp_path / "vq_f2.safetensors")
  write_safetensors(path, state)
  imported = read_source(path)
  assert list(imported.params) == ["autoencoder"]
  assert (imported.configs["autoencoder"]["kind"], imported.configs["autoencoder"]["n_embed"]) == ("vq", 16)
  _assert_same_params(imported.params["autoencoder"], load_pretrained(folder)[1]["autoencoder"])

  del state["decoder.conv_out.bias"]
  state["encoder.down.0.block.0.conv1.weight"] = state["encoder.down.0.block.0.conv1.weight"][:16]
  write_safetensors(path, state)
  with pytest.raises(WeightMismatchError, match=r"1 missing, 0 unexpected, 1 mis-shaped") as error:
    read_source(path)
  assert "decoder/conv_out/bias [3]" in str(error.value)
  assert "encoder.down.0.block.0.conv1.weight [16, 32, 3, 3]" in str(error.value)


def test_paper_txt2img_bert_embedder(tmp_path):
  """The paper's text conditioner (CompVis BERTEmbedder, x-transformers names) → a 'text' Conditioner."""
  from ldm_jax.data.tokenizer import train_tokenizer
  from ldm_jax.models.text import TransformerTextEncoder
  encoder = TransformerTextEncoder(vocab_size=40, max_length=8, dim=128, depth=2, num_heads=2, head_dim=64, pad_id=None)
  tokens = np.array([[2, 5, 7, 3, 0, 0, 0, 0]], np.int32)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.2,
                        jax.eval_shape(lambda: encoder.init(jax.random.key(0), tokens))["params"])
  state = {"cond_stage_model.transformer.token_emb.weight": params["token_emb"]["embedding"],
           "cond_stage_model.transformer.pos_emb.emb.weight": params["pos_emb"]["embedding"],
           "cond_stage_model.transformer.norm.weight": params["norm"]["scale"],
           "cond_stage_model.transformer.norm.bias": params["norm"]["bias"]}
  for i in range(2):
    block, prefix = params[f"blocks_{i}"], "cond_stage_model.transformer.attn_layers.layers."
    for j, norm in ((2 * i, "attn_norm"), (2 * i + 1, "ff_norm")):
      state[f"{prefix}{j}.0.weight"], state[f"{prefix}{j}.0.bias"] = block[norm]["scale"], block[norm]["bias"]
    for name in ("to_q", "to_k", "to_v"):
      state[f"{prefix}{2 * i}.1.{name}.weight"] = block["attn"][name]["kernel"].T
    state[f"{prefix}{2 * i}.1.to_out.weight"] = block["attn"]["to_out"]["kernel"].T
    state[f"{prefix}{2 * i}.1.to_out.bias"] = block["attn"]["to_out"]["bias"]
    for ours, theirs in (("net_0", "net.0.0"), ("net_2", "net.2")):
      state[f"{prefix}{2 * i + 1}.1.{theirs}.weight"] = block["ff"][ours]["kernel"].T
      state[f"{prefix}{2 * i + 1}.1.{theirs}.bias"] = block["ff"][ours]["bias"]
  path = str(tmp_path / "txt2img.safetensors")
  write_safetensors(path, state)
  tokenizer = train_tokenizer(["a red circle", "a blue square"], 40, max_length=8)
  tokenizer.save(str(tmp_path / "tokenizer"))

  modules, loaded, configs = load_pretrained(path, tokenizer=str(tmp_path / "tokenizer"))
  assert (configs["cond"].kind, configs["cond"].num_heads, configs["cond"].mask_padding) == ("text", 2, False)
  out = modules["conditioner"].apply({"params": loaded["conditioner"]}, {"tokens": tokens}, deterministic=True)
  np.testing.assert_allclose(out["context"], encoder.apply({"params": params}, tokens), atol=1e-5)


def test_sd1_single_file_imports_and_exports_to_a_diffusers_pipeline(sd_pipeline, transformers_models, tmp_path):
  """A CompVis file → `convert import` → `convert export --src` → StableDiffusionPipeline, weights unchanged."""
  _, pipe = sd_pipeline
  state = {**_prefixed("model.diffusion_model.", unet_to_ldm(state_numpy(pipe.unet), pipe.unet.config)),
           **_prefixed("first_stage_model.", vae_to_ldm(state_numpy(pipe.vae), pipe.vae.config)),
           **_prefixed("cond_stage_model.transformer.text_model.", state_numpy(pipe.text_encoder))}
  path, imported, exported = (str(tmp_path / name) for name in ("sd1.safetensors", "imported", "exported"))
  write_safetensors(path, state)
  assert convert_main(["import", "--src", path, "--out", imported, "--num_heads", "2",
                       "--tokenizer", transformers_models["clip_tokenizer"][0]]) == 0
  assert convert_main(["export", "--src", imported, "--format", "diffusers", "--out", exported]) == 0
  reloaded = diffusers.StableDiffusionPipeline.from_pretrained(exported)
  assert reloaded.vae.config.scaling_factor == 0.18215
  for name in ("unet", "vae", "text_encoder"):
    ours, theirs = state_numpy(getattr(reloaded, name)), state_numpy(getattr(pipe, name))
    assert sorted(ours) == sorted(theirs), name
    for key, value in theirs.items():
      np.testing.assert_array_equal(ours[key], value, err_msg=f"{name}: {key}")
