"""diffusers AutoencoderKL, VQModel and UNet2DConditionModel → ldm_jax: same outputs (f32, 1e-4), and back.

Each tiny random diffusers model is saved with `save_pretrained`, read with `load_pretrained`,
run in JAX and in PyTorch on the same inputs; the export writes a folder that diffusers'
`from_pretrained` loads into a model with the original's exact weights.
"""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from ldm_jax.convert import WeightMismatchError, write_diffusers  # noqa: E402
from ldm_jax.load import load_pretrained, read_source  # noqa: E402
from ldm_jax.convert.__main__ import main as cli  # noqa: E402
from tests.convert.reference import nchw, nhwc, state_numpy  # noqa: E402

TOL = 1e-4


def _apply(module, method=None):
  return jax.jit(lambda params, *args: module.apply({"params": params}, *args, method=method))


def _assert_same_state(folder, cls, reference):
  reloaded = cls.from_pretrained(folder)
  ours, theirs = state_numpy(reloaded), state_numpy(reference)
  assert sorted(ours) == sorted(theirs)
  for key in ours:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
  return reloaded


def test_autoencoder_kl_matches_diffusers(diffusers_models, tmp_path):
  folder, vae = diffusers_models["vae"]
  modules, params, configs = load_pretrained(folder)
  model = modules["autoencoder"]
  assert configs["latent"].scale_factor == 0.5
  assert (configs["autoencoder"].kind, configs["autoencoder"].ch, tuple(configs["autoencoder"].ch_mult),
          tuple(configs["autoencoder"].attn_resolutions)) == ("kl", 32, (1, 2), (8,))

  x = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  posterior = _apply(model, "encode")(params["autoencoder"], x)
  with torch.no_grad():
    reference = vae.encode(nchw(x)).latent_dist
  np.testing.assert_allclose(posterior.mean, nhwc(reference.mean), atol=TOL, rtol=0)
  np.testing.assert_allclose(posterior.logvar, nhwc(reference.logvar), atol=TOL, rtol=0)

  z = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype(np.float32)
  decoded = _apply(model, "decode")(params["autoencoder"], z)
  with torch.no_grad():
    np.testing.assert_allclose(decoded, nhwc(vae.decode(nchw(z)).sample), atol=TOL, rtol=0)

  out = str(tmp_path / "exported")
  write_diffusers(out, read_source(folder))
  reloaded = _assert_same_state(out, diffusers.AutoencoderKL, vae)
  assert reloaded.config.scaling_factor == 0.5
  with torch.no_grad():
    np.testing.assert_allclose(decoded, nhwc(reloaded.decode(nchw(z)).sample), atol=TOL, rtol=0)


def test_vq_model_matches_diffusers(diffusers_models, tmp_path):
  folder, vq = diffusers_models["vq"]
  modules, params, configs = load_pretrained(folder)
  model = modules["autoencoder"]
  assert (configs["autoencoder"].kind, configs["autoencoder"].n_embed, configs["autoencoder"].embed_dim) == ("vq", 16, 3)

  x = np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  h = _apply(model, "encode")(params["autoencoder"], x)
  with torch.no_grad():
    reference = vq.encode(nchw(x)).latents
  np.testing.assert_allclose(h, nhwc(reference), atol=TOL, rtol=0)
  decoded = _apply(model, "decode")(params["autoencoder"], h)  # quantizes, as diffusers' decode
  with torch.no_grad():
    np.testing.assert_allclose(decoded, nhwc(vq.decode(reference).sample), atol=TOL, rtol=0)

  out = str(tmp_path / "exported")
  assert cli(["export", "--src", folder, "--format", "diffusers", "--out", out]) == 0
  _assert_same_state(out, diffusers.VQModel, vq)


@pytest.mark.parametrize("name, expected", [
    ("unet_sd1", dict(num_heads=2, num_head_channels=-1, use_linear_projection=False, attention_resolutions=(1,),
                      context_dim=16)),
    ("unet_sd2", dict(num_head_channels=64, use_linear_projection=True, attention_resolutions=(1, 2),
                      context_dim=24)),
])
def test_unet_matches_diffusers(diffusers_models, tmp_path, name, expected):
  folder, unet = diffusers_models[name]
  modules, params, configs = load_pretrained(folder)
  for key, value in expected.items():
    assert configs["unet"][key] == value, key

  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  t = np.array([3, 817], np.int32)
  context = rng.normal(size=(2, 5, expected["context_dim"])).astype(np.float32)
  out = _apply(modules["unet"])(params["unet"], x, t, context)
  with torch.no_grad():
    reference = unet(nchw(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(context)).sample
  np.testing.assert_allclose(out, nhwc(reference), atol=TOL, rtol=0)
  assert np.abs(nhwc(reference)).max() > 0.1  # the comparison is not between near-zero outputs

  exported = str(tmp_path / "exported")
  write_diffusers(exported, read_source(folder))
  _assert_same_state(exported, diffusers.UNet2DConditionModel, unet)


def test_mismatched_weights_are_listed_in_one_error(diffusers_models, tmp_path):
  folder, _ = diffusers_models["unet_sd1"]
  from ldm_jax.convert.safetensors_io import read_safetensors, write_safetensors
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "config.json").write_text(open(f"{folder}/config.json").read())
  state = dict(read_safetensors(f"{folder}/diffusion_pytorch_model.safetensors"))
  del state["conv_in.bias"]
  state["mid_block.extra.weight"] = np.zeros((2, 2), np.float32)
  state["conv_out.weight"] = np.zeros((4, 32, 1, 1), np.float32)
  write_safetensors(str(broken / "diffusion_pytorch_model.safetensors"), state)
  with pytest.raises(WeightMismatchError) as error:
    load_pretrained(str(broken))
  message = str(error.value)
  assert "1 missing, 1 unexpected, 1 mis-shaped" in message
  assert "conv_in/bias [32]" in message
  assert "mid_block.extra.weight [2, 2]" in message
  assert "conv_out.weight [4, 32, 1, 1] → conv_out/kernel: the model needs [3, 3, 32, 4]" in message
