"""LoRA and textual-inversion files between diffusers/peft and ldm_jax: the same outputs (f32, 1e-4), both ways.

The references are peft adapters on tiny random diffusers/transformers models (random non-zero B),
saved with diffusers' own `save_lora_weights`; ldm_jax reads them into adapter sets and applies them
with `apply_lora`. The other way, files written by `save_lora` load in diffusers' `load_lora_weights`.
A textual-inversion file gives, through sample.py's code path, the images of diffusers' pipeline.
diffusers loads text-encoder LoRAs through transformers' `load_adapter`, which needs a peft newer than
the one pinned, so the text-encoder reference is peft's own `set_peft_model_state_dict`.
"""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

from ldm_jax.convert import WeightMismatchError  # noqa: E402
from ldm_jax.load import load_pretrained  # noqa: E402
from ldm_jax.convert.lora import lora_state, read_lora, save_lora  # noqa: E402
from ldm_jax.convert.safetensors_io import read_safetensors, write_safetensors  # noqa: E402
from ldm_jax.convert.textual_inversion import (add_placeholder_tokens, read_learned_embeds,  # noqa: E402
                                               save_learned_embeds, token_embedding)
from ldm_jax.data.tokenizer import load_tokenizer  # noqa: E402
from ldm_jax.models.lora import apply_lora, init_lora, select_targets  # noqa: E402
from ldm_jax.runtime import sharding  # noqa: E402
from ldm_jax.sampling import (SampleRequest, adapters, check_request, make_plan, make_sample_fn,  # noqa: E402
                              read_model, sampling_mesh)
from tests.convert.reference import nchw, nhwc  # noqa: E402

TOL = 1e-4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]  # Linear, 1×1 conv and 3×3 conv adapters


def _randomize_b(module, seed):
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if "lora_B" in name:
        p.copy_(0.1 * torch.randn(p.shape, generator=generator))
  return module


def _unet_inputs(context_dim, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(2, 8, 8, 4)).astype(np.float32), np.array([3, 817], np.int32),
          rng.normal(size=(2, 5, context_dim)).astype(np.float32))


def _torch_unet(unet, x, t, context):
  with torch.no_grad():
    return nhwc(unet(nchw(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(context)).sample)


def _ours(folder):
  modules, params, _ = load_pretrained(folder)
  return modules, params


@pytest.fixture(scope="module")
def peft_unet_lora(diffusers_models, tmp_path_factory):
  """(unet folder, the LoRA file diffusers saved, U-Net output with the LoRA) of unet_sd1 + peft (r=4, α=8)."""
  folder, _ = diffusers_models["unet_sd1"]
  unet = diffusers.UNet2DConditionModel.from_pretrained(folder).eval()
  config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=UNET_TARGETS)
  unet.add_adapter(config)
  _randomize_b(unet, seed=1)
  out = str(tmp_path_factory.mktemp("peft_lora"))
  diffusers.StableDiffusionPipeline.save_lora_weights(
      out, unet_lora_layers=get_peft_model_state_dict(unet), unet_lora_adapter_metadata=config.to_dict())
  x, t, context = _unet_inputs(16)
  with_lora = _torch_unet(unet, x, t, context)
  unet.disable_adapters()
  assert np.abs(with_lora - _torch_unet(unet, x, t, context)).max() > 1e-2  # the LoRA changes the output
  return folder, f"{out}/pytorch_lora_weights.safetensors", with_lora


def _check_unet_with_file(folder, path, reference, scale=1.0):
  modules, params = _ours(folder)
  adapters = read_lora(path, {"unet": params["unet"]})
  x, t, context = _unet_inputs(16)
  out = jax.jit(lambda p: modules["unet"].apply({"params": p}, x, t, context))(
      apply_lora(params["unet"], [adapters["unet"]], [scale]))
  np.testing.assert_allclose(out, reference, atol=TOL, rtol=0)
  return adapters


def test_peft_lora_saved_by_diffusers_gives_the_same_unet_outputs(peft_unet_lora):
  folder, path, reference = peft_unet_lora
  adapters = _check_unet_with_file(folder, path, reference)
  q = adapters["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]
  assert q["down"].shape == (32, 4) and q["up"].shape == (4, 32)
  conv = adapters["unet"]["down_blocks_0"]["resnets_0"]["conv1"]
  assert conv["down"].shape == (3, 3, 32, 4) and conv["up"].shape == (4, 32)


def test_kohya_layout_of_the_same_weights_gives_the_same_outputs(peft_unet_lora, tmp_path):
  folder, path, reference = peft_unet_lora
  kohya = {}
  for key, value in read_safetensors(path).items():  # unet.X.lora_A.weight → lora_unet_X_.lora_down.weight
    module, _, piece = key.removeprefix("unet.").partition(".lora_")
    stem = "lora_unet_" + module.replace(".", "_")
    kohya[f"{stem}.lora_{'down' if piece == 'A.weight' else 'up'}.weight"] = np.array(value)
    kohya[f"{stem}.alpha"] = np.array(8.0, np.float32)  # α = 8 with r = 4: the scale 2 of the metadata
  write_safetensors(str(tmp_path / "kohya.safetensors"), kohya)
  _check_unet_with_file(folder, str(tmp_path / "kohya.safetensors"), reference)
  # Without α, kohya's scale is 1: half the PEFT update.
  write_safetensors(str(tmp_path / "no_alpha.safetensors"), {k: v for k, v in kohya.items() if not k.endswith("alpha")})
  _, params = _ours(folder)
  with_alpha = read_lora(str(tmp_path / "kohya.safetensors"), {"unet": params["unet"]})["unet"]
  without = read_lora(str(tmp_path / "no_alpha.safetensors"), {"unet": params["unet"]})["unet"]
  np.testing.assert_allclose(2 * without["mid_block"]["resnets_0"]["conv1"]["up"],
                             with_alpha["mid_block"]["resnets_0"]["conv1"]["up"], rtol=1e-6)
  # Ours in the kohya layout (α = r, the scale in B) reads back as the same adapters.
  save_lora(str(tmp_path / "ours_kohya.safetensors"), {"unet": with_alpha}, layout="kohya")
  again = read_lora(str(tmp_path / "ours_kohya.safetensors"), {"unet": params["unet"]})["unet"]
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(with_alpha)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_our_lora_loads_in_diffusers_load_lora_weights(sd_pipeline, tmp_path):
  folder, _ = sd_pipeline
  modules, params = _ours(folder)
  patterns = [r".*/(to_q|to_k|to_v|to_out_0)", r".*/proj_in", r".*/resnets_\d+/conv1"]
  lora = init_lora(jax.random.key(0), params["unet"], select_targets(params["unet"], patterns), rank=4)
  lora = jax.tree_util.tree_map_with_path(
      lambda path, a: 0.1 * jax.random.normal(jax.random.key(len(path)), a.shape) if path[-1].key == "up" else a, lora)
  written = save_lora(str(tmp_path), {"unet": lora}, scale=0.5)
  assert written.endswith("pytorch_lora_weights.safetensors")

  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
  pipe.load_lora_weights(str(tmp_path))
  x, t, context = _unet_inputs(128, seed=1)
  reference = _torch_unet(pipe.unet, x, t, context)
  ours = jax.jit(lambda p: modules["unet"].apply({"params": p}, x, t, context))(
      apply_lora(params["unet"], [lora], [0.5]))
  np.testing.assert_allclose(ours, reference, atol=TOL, rtol=0)
  base = jax.jit(lambda p: modules["unet"].apply({"params": p}, x, t, context))(params["unet"])
  assert np.abs(np.asarray(base) - reference).max() > 1e-2
  # The file read back is the adapter with the scale in B.
  again = read_lora(str(tmp_path), {"unet": params["unet"]})["unet"]
  np.testing.assert_allclose(again["mid_block"]["attentions_0"]["proj_in"]["up"],
                             0.5 * np.asarray(lora["mid_block"]["attentions_0"]["proj_in"]["up"]), rtol=1e-6)


def test_text_encoder_lora_matches_peft_both_ways(transformers_models, tmp_path):
  folder, _ = transformers_models["clip"]
  clip = transformers.CLIPTextModel.from_pretrained(folder).eval()
  config = peft.LoraConfig(r=2, lora_alpha=6, init_lora_weights="gaussian",
                           target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"])
  clip = _randomize_b(peft.inject_adapter_in_model(config, clip), seed=3)
  tokens = np.random.default_rng(4).integers(0, 500, (2, 16)).astype(np.int64)
  with torch.no_grad():
    reference = clip(torch.from_numpy(tokens)).last_hidden_state.numpy()
  diffusers.StableDiffusionPipeline.save_lora_weights(
      str(tmp_path / "theirs"), text_encoder_lora_layers=get_peft_model_state_dict(clip),
      text_encoder_lora_adapter_metadata=config.to_dict())

  modules, params = _ours(folder)
  encode = jax.jit(lambda p: modules["text_encoder"].apply({"params": p}, tokens.astype(np.int32)))
  adapters = read_lora(str(tmp_path / "theirs"), {"text_encoder": params["text_encoder"]})
  np.testing.assert_allclose(encode(apply_lora(params["text_encoder"], [adapters["text_encoder"]])), reference,
                             atol=TOL, rtol=0)
  with pytest.raises(WeightMismatchError, match="adapts the text_encoder, which was not given"):
    read_lora(str(tmp_path / "theirs"), {"unet": {}})

  # Ours → the layout diffusers parses (`lora_state_dict`), loaded into a fresh peft model.
  save_lora(str(tmp_path / "ours"), adapters)
  state, _ = diffusers.StableDiffusionPipeline.lora_state_dict(str(tmp_path / "ours"))
  assert all(k.startswith("text_encoder.text_model.encoder.layers.") for k in state)
  fresh = transformers.CLIPTextModel.from_pretrained(folder).eval()
  fresh = peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=2, target_modules=config.target_modules), fresh)
  prefix = "text_encoder." + ("" if hasattr(fresh, "text_model") else "text_model.")
  result = set_peft_model_state_dict(fresh, {k.removeprefix(prefix): v for k, v in state.items()})
  assert not result.unexpected_keys
  with torch.no_grad():
    np.testing.assert_allclose(fresh(torch.from_numpy(tokens)).last_hidden_state.numpy(), reference, atol=TOL, rtol=0)


def test_a_mismatched_file_names_the_key_and_the_file(peft_unet_lora, diffusers_models, tmp_path):
  folder, path, _ = peft_unet_lora
  _, params = _ours(folder)
  state = dict(read_safetensors(path))
  state["unet.mid_block.nothing.to_q.lora_A.weight"] = np.zeros((4, 64), np.float32)
  state["unet.mid_block.nothing.to_q.lora_B.weight"] = np.zeros((64, 4), np.float32)
  key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
  state[key] = np.zeros((4, 31), np.float32)
  del state["unet.mid_block.resnets.0.conv1.lora_B.weight"]
  broken = str(tmp_path / "broken.safetensors")
  write_safetensors(broken, state)
  with pytest.raises(WeightMismatchError) as error:
    read_lora(broken, {"unet": params["unet"]})
  message = str(error.value)
  assert f"LoRA file {broken}" in message and "3 unexpected, 1 mis-shaped" in message
  assert "unet.mid_block.nothing.to_q.lora_A.weight [4, 64] (the unet has no module mid_block.nothing.to_q" in message
  assert "unet.mid_block.resnets.0.conv1.lora_A.weight (its up/B partner is missing)" in message
  assert f"{key} [4, 31]" in message and "needs A [4, 32], B [32, 4]" in message
  # Another U-Net (SD 2.x shapes) does not take this LoRA either.
  _, other = _ours(diffusers_models["unet_sd2"][0])
  with pytest.raises(WeightMismatchError, match="mis-shaped"):
    read_lora(path, {"unet": other["unet"]})
  write_safetensors(str(tmp_path / "other.safetensors"), {"model.diffusion_model.x.weight": np.zeros(2, np.float32)})
  with pytest.raises(ValueError, match="not a LoRA file ldm_jax reads"):
    read_lora(str(tmp_path / "other.safetensors"), {"unet": params["unet"]})
  assert "lora_unet_mid_block_resnets_0_conv1.alpha" in lora_state(
      read_lora(path, {"unet": params["unet"]}), layout="kohya")


def _diffusers_embeddings(pipe, prompt):
  prompt = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)
  ids = pipe.tokenizer(prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                       return_tensors="pt").input_ids
  with torch.no_grad():
    return ids.numpy(), pipe.text_encoder(ids).last_hidden_state.numpy()


def test_textual_inversion_files_match_diffusers_load_textual_inversion(sd_pipeline, tmp_path):
  folder, _ = sd_pipeline
  vectors = np.random.default_rng(5).normal(size=(2, 128)).astype(np.float32)
  safetensors_torch = pytest.importorskip("safetensors.torch")
  theirs = str(tmp_path / "theirs.safetensors")  # what diffusers' textual_inversion.py writes
  safetensors_torch.save_file({"<cat-toy>": torch.from_numpy(vectors)}, theirs)
  ours = save_learned_embeds(str(tmp_path / "ours"), "<cat-toy>", vectors)
  assert ours.endswith("learned_embeds.safetensors")
  prompt = "a <cat-toy> and a dog"

  modules, params = _ours(folder)
  tokenizer = load_tokenizer(f"{folder}/tokenizer")
  for path in (theirs, ours):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(path)
    ids, reference = _diffusers_embeddings(pipe, prompt)
    token, loaded = read_learned_embeds(path)
    assert token == "<cat-toy>"
    tok, text_params, new_ids = add_placeholder_tokens(tokenizer, params["text_encoder"], token, vectors=loaded)
    model = modules["text_encoder"].clone(vocab_size=token_embedding(text_params).shape[0])
    our_ids = tok.tokenize([prompt])
    np.testing.assert_array_equal(our_ids, ids)
    assert set(new_ids) <= set(our_ids[0].tolist()) and len(new_ids) == 2
    np.testing.assert_allclose(model.apply({"params": text_params}, our_ids), reference, atol=TOL, rtol=0)


def test_sampling_with_a_textual_inversion_file_gives_the_diffusers_pipeline_images(sd_pipeline, tmp_path):
  """sample.py --textual_inversion FILE --latents X (the request's steps as `sample_to_dir` takes them:
  placeholders in the tokenizer, rows in the CLIP table, one compiled sampler) against
  StableDiffusionPipeline after `load_textual_inversion(FILE)`, DDIM with guidance from the same
  latents: float images within 1e-4 in [0, 1], for a prompt with the 2-vector token and one without."""
  folder, plain_pipe = sd_pipeline
  safetensors_torch = pytest.importorskip("safetensors.torch")
  vectors = np.random.default_rng(6).normal(size=(2, 128)).astype(np.float32)
  path = str(tmp_path / "learned_embeds.safetensors")  # as diffusers' textual_inversion.py writes it
  safetensors_torch.save_file({"<cat-toy>": torch.from_numpy(vectors)}, path)
  prompts = ["a <cat-toy> and a dog", "a cat"]
  x_T = np.random.default_rng(7).normal(size=(2, 8, 8, 4)).astype(np.float32)
  np.save(tmp_path / "latents.npy", x_T)
  request = SampleRequest(out=str(tmp_path / "out"), pretrained=folder, prompts=tuple(prompts), guidance_scale=4.0,
                          steps=3, timestep_spacing="leading", steps_offset=1, latents=str(tmp_path / "latents.npy"),
                          textual_inversion=(path,), batch_size=2)
  check_request(request)
  adapters.check_files(request)
  info = adapters.add_placeholders(request, read_model(request))
  mesh = sampling_mesh(jax.devices()[:2])
  plan = make_plan(request, info, sharding.data_parallel_size(mesh))
  ldm, params, ae_params = info.load(mesh, True)
  ldm, params = adapters.apply_adapters(request, ldm, params, mesh)
  fn, _ = make_sample_fn(ldm, request, plan, mesh)
  images, _ = fn(params, ae_params, plan.cond, plan.null, np.arange(2, dtype=np.int32), np.int32(0),
                 jax.random.PRNGKey(0), None, None, plan.x_T)
  ours = np.asarray(images) / 2 + 0.5

  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
  pipe.load_textual_inversion(path)
  run = lambda p: p(prompts, height=16, width=16, num_inference_steps=3, guidance_scale=4.0, latents=nchw(x_T),
                    output_type="np").images
  with torch.no_grad():
    reference, without = run(pipe), run(plain_pipe)
  assert reference.std() > 0.05
  np.testing.assert_allclose(ours, reference, atol=TOL, rtol=0)
  assert np.abs(reference[0] - without[0]).max() > 1e-2  # the token's vectors make the first image
  np.testing.assert_allclose(reference[1], without[1], atol=1e-6, rtol=0)  # a prompt without the token: as before


def test_placeholder_rows_from_an_initializer_and_only_they_train(sd_pipeline):
  import optax
  from ldm_jax.convert.textual_inversion import row_mask, set_rows
  folder, _ = sd_pipeline
  modules, params = _ours(folder)
  tokenizer = load_tokenizer(f"{folder}/tokenizer")
  base = params["text_encoder"]
  tok, text_params, ids = add_placeholder_tokens(tokenizer, base, "<shape>", num_vectors=3, initializer_token="cat")
  table = np.asarray(token_embedding(text_params))
  cat = tokenizer.token_id("cat</w>")
  np.testing.assert_array_equal(table[ids], np.repeat(np.asarray(token_embedding(base))[cat][None], 3, 0))
  np.testing.assert_array_equal(table[:len(table) - 3], np.asarray(token_embedding(base)))
  assert tok.tokenize(["<shape>"])[0, 1:4].tolist() == ids
  with pytest.raises(ValueError, match="already in the vocabulary"):
    add_placeholder_tokens(tok, text_params, "<shape>", num_vectors=1, initializer_token="cat")
  with pytest.raises(ValueError, match="initializer_token 'a dog' is 2 tokens"):
    add_placeholder_tokens(tokenizer, base, "<x>", num_vectors=1, initializer_token="a dog")

  model = modules["text_encoder"].clone(vocab_size=table.shape[0])
  tokens = tok.tokenize(["a <shape> on a dog"])
  loss = lambda p: (model.apply({"params": p}, tokens) ** 2).mean()
  # (a) the whole table trains, its updates masked; (b) the rows are the parameter.
  optimizer = optax.adamw(1e-1, weight_decay=0.5)
  mask = row_mask(text_params, ids)
  updates, _ = optimizer.update(jax.grad(loss)(text_params), optimizer.init(text_params), text_params)
  trained = optax.apply_updates(text_params, jax.tree.map(lambda u, m: u * m, updates, mask))
  rows = jax.numpy.asarray(table[ids])
  row_updates, _ = optimizer.update(jax.grad(lambda r: loss(set_rows(text_params, ids, r)))(rows),
                                    optimizer.init(rows), rows)
  trained_rows = set_rows(text_params, ids, optax.apply_updates(rows, row_updates))
  for new in (trained, trained_rows):
    new_table = np.asarray(token_embedding(new))
    others = np.setdiff1d(np.arange(len(table)), ids)
    np.testing.assert_array_equal(new_table[others], table[others])
    assert np.abs(new_table[ids] - table[ids]).min() > 0
    flat_new, flat_old = jax.tree_util.tree_flatten_with_path(new)[0], jax.tree.leaves(text_params)
    for (path, a), b in zip(flat_new, flat_old):
      if "token_embedding" not in str(path):
        np.testing.assert_array_equal(a, b, err_msg=str(path))
