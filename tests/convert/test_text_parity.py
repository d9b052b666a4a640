"""transformers CLIPTextModel and BertModel → ldm_jax text encoders: same hidden states (f32, 1e-4), and back."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from ldm_jax.convert import write_diffusers  # noqa: E402
from ldm_jax.load import load_pretrained, read_source  # noqa: E402
from ldm_jax.models.clip import CLIPTextEncoder  # noqa: E402
from tests.convert.reference import state_numpy  # noqa: E402

TOL = 1e-4


def _tokens(vocab_size, length, seed=0):
  return np.random.default_rng(seed).integers(0, vocab_size, (2, length)).astype(np.int32)


def test_clip_last_and_penultimate_layer_match_transformers(transformers_models):
  folder, clip = transformers_models["clip"]
  modules, params, configs = load_pretrained(folder)
  model = modules["text_encoder"]
  assert isinstance(model, CLIPTextEncoder)
  assert (configs["text_encoder"].depth, configs["text_encoder"].activation) == (3, "quick_gelu")

  tokens = _tokens(model.vocab_size, 16)
  tokens[1, :9] = tokens[0, :9]  # a shared prefix: causal attention gives it the same hidden states
  penultimate = model.clone(skip_last_layers=1)  # SD 2.x: layer −2, then the final LayerNorm
  last, second = jax.jit(lambda p, t: (model.apply({"params": p}, t), penultimate.apply({"params": p}, t)))(
      params["text_encoder"], tokens)
  with torch.no_grad():
    reference = clip(torch.from_numpy(tokens).long(), output_hidden_states=True)
    final_norm = getattr(clip, "text_model", clip).final_layer_norm  # transformers 4 nests it in text_model
    reference_second = final_norm(reference.hidden_states[-2])
  np.testing.assert_allclose(last, reference.last_hidden_state.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(second, reference_second.numpy(), atol=TOL, rtol=0)
  assert np.abs(np.asarray(last) - np.asarray(second)).max() > 0.1
  np.testing.assert_allclose(last[0, :9], last[1, :9], atol=1e-6)
  assert np.abs(np.asarray(last[0, 9:] - last[1, 9:])).max() > 1e-2


def test_bert_matches_transformers_with_and_without_padding_mask(transformers_models):
  folder, bert = transformers_models["bert"]
  modules, params, _ = load_pretrained(folder)
  model = modules["text_encoder"]
  tokens = _tokens(model.vocab_size, 12, seed=1)
  tokens[:, 0] = 2
  tokens[1, 7:] = 0  # padding
  masked = model.clone(pad_id=0)
  plain, with_mask = jax.jit(lambda p, t: (model.apply({"params": p}, t), masked.apply({"params": p}, t)))(
      params["text_encoder"], tokens)
  with torch.no_grad():
    reference = bert(torch.from_numpy(tokens).long()).last_hidden_state.numpy()
    reference_masked = bert(torch.from_numpy(tokens).long(),
                            attention_mask=torch.from_numpy(tokens != 0).long()).last_hidden_state.numpy()
  np.testing.assert_allclose(plain, reference, atol=TOL, rtol=0)
  np.testing.assert_allclose(with_mask[1, :7], reference_masked[1, :7], atol=TOL, rtol=0)
  np.testing.assert_allclose(with_mask[0], reference_masked[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("name, cls", [("clip", "CLIPTextModel"), ("bert", "BertModel")])
def test_text_encoder_export_loads_in_transformers(transformers_models, tmp_path, name, cls):
  folder, reference = transformers_models[name]
  out = str(tmp_path / name)
  write_diffusers(out, read_source(folder))
  reloaded = getattr(transformers, cls).from_pretrained(out)
  theirs = state_numpy(reference)
  ours = state_numpy(reloaded)
  for key, value in theirs.items():
    if "pooler" in key:  # not part of a conditioner: transformers draws it afresh
      continue
    np.testing.assert_array_equal(ours[key], value, err_msg=key)
