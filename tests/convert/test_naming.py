"""The torch ↔ flax renaming rule, the mismatch report and safetensors files (no torch needed)."""

import json
import struct

import jax
import ml_dtypes
import numpy as np
import pytest

from ldm_jax.convert import naming
from ldm_jax.convert.safetensors_io import (flatten_params, read_safetensors, read_safetensors_metadata,
                                            read_weights, unflatten_params, write_safetensors)

EXPECTED = {
    "conv_in": {"kernel": jax.ShapeDtypeStruct((3, 3, 2, 4), np.float32), "bias": jax.ShapeDtypeStruct((4,), np.float32)},
    "time_embedding": {"linear_1": {"kernel": jax.ShapeDtypeStruct((4, 8), np.float32),
                                    "bias": jax.ShapeDtypeStruct((8,), np.float32)}},
    "down_blocks_0": {"attentions_1": {"to_out_0": {"kernel": jax.ShapeDtypeStruct((4, 4), np.float32)},
                                       "proj_in": {"kernel": jax.ShapeDtypeStruct((1, 1, 4, 6), np.float32)},
                                       "norm": {"scale": jax.ShapeDtypeStruct((4,), np.float32),
                                                "bias": jax.ShapeDtypeStruct((4,), np.float32)}}},
    "class_embedding": {"embedding": jax.ShapeDtypeStruct((3, 8), np.float32)},
    "quantize": {"embedding": jax.ShapeDtypeStruct((5, 2), np.float32)},
}


def _torch_state(rng):
  return {
      "conv_in.weight": rng.normal(size=(4, 2, 3, 3)).astype(np.float32),
      "conv_in.bias": rng.normal(size=(4,)).astype(np.float32),
      "time_embedding.linear_1.weight": rng.normal(size=(8, 4)).astype(np.float32),
      "time_embedding.linear_1.bias": rng.normal(size=(8,)).astype(np.float32),
      "down_blocks.0.attentions.1.to_out.0.weight": rng.normal(size=(4, 4, 1, 1)).astype(np.float32),  # 1×1 conv
      "down_blocks.0.attentions.1.proj_in.weight": rng.normal(size=(6, 4)).astype(np.float32),  # a Linear
      "down_blocks.0.attentions.1.norm.gamma": rng.normal(size=(4,)).astype(np.float16),
      "down_blocks.0.attentions.1.norm.beta": rng.normal(size=(4,)).astype(np.float32),
      "class_embedding.weight": rng.normal(size=(3, 8)).astype(np.float32),
      "quantize.embedding.weight": rng.normal(size=(5, 2)).astype(np.float32),
  }


def test_torch_names_and_layouts_map_to_flax_and_back():
  state = _torch_state(np.random.default_rng(0))
  params = naming.torch_to_flax(state, EXPECTED, what="test")
  np.testing.assert_array_equal(params["conv_in"]["kernel"], state["conv_in.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["time_embedding"]["linear_1"]["kernel"], state["time_embedding.linear_1.weight"].T)
  attn = params["down_blocks_0"]["attentions_1"]
  np.testing.assert_array_equal(attn["to_out_0"]["kernel"], state["down_blocks.0.attentions.1.to_out.0.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(attn["proj_in"]["kernel"][0, 0], state["down_blocks.0.attentions.1.proj_in.weight"].T)
  assert attn["norm"]["scale"].dtype == np.float32
  np.testing.assert_array_equal(params["quantize"]["embedding"], state["quantize.embedding.weight"])

  back = naming.flax_to_torch(params, overrides={"quantize/embedding": "quantize.embedding.weight"})
  assert set(back) == {k.replace("gamma", "weight").replace("beta", "bias") for k in state}
  np.testing.assert_array_equal(back["conv_in.weight"], state["conv_in.weight"])
  np.testing.assert_array_equal(back["time_embedding.linear_1.weight"], state["time_embedding.linear_1.weight"])
  assert back["down_blocks.0.attentions.1.proj_in.weight"].shape == (6, 4, 1, 1)  # flax holds a 1×1 conv


def test_every_mismatch_is_reported_at_once():
  state = _torch_state(np.random.default_rng(0))
  del state["conv_in.bias"]
  state["conv_in.extra"] = np.zeros(1, np.float32)
  state["mid_block.resnets.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
  state["class_embedding.weight"] = np.zeros((4, 8), np.float32)
  with pytest.raises(naming.WeightMismatchError) as error:
    naming.torch_to_flax(state, EXPECTED, what="my checkpoint")
  e = error.value
  assert (len(e.missing), len(e.unexpected), len(e.misshaped)) == (1, 2, 1)
  assert str(e).startswith("my checkpoint: the weights do not fit the model (1 missing, 2 unexpected, 1 mis-shaped)")
  assert "conv_in/bias [4]" in e.missing[0]
  assert "class_embedding.weight [4, 8] → class_embedding/embedding: the model needs [3, 8]" in e.misshaped[0]


def test_rename_skips_and_redirects_keys():
  state = {"model.x.conv_in.weight": np.zeros((4, 2, 3, 3), np.float32), "model.x.conv_in.bias": np.zeros(4, np.float32),
           "loss.discriminator.weight": np.zeros(3, np.float32)}
  expected = {"conv_in": EXPECTED["conv_in"]}
  rename = lambda k: k.removeprefix("model.x.") if k.startswith("model.x.") else None
  assert naming.torch_to_flax(state, expected, what="t", rename=rename)["conv_in"]["kernel"].shape == (3, 3, 2, 4)


def test_module_names():
  assert naming.torch_module_to_flax("down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj") == \
      "down_blocks_0/attentions_1/transformer_blocks_0/ff/net_0/proj"
  assert naming.flax_module_to_torch("time_embedding/linear_2") == "time_embedding.linear_2"
  assert naming.flax_module_to_torch("encoder/layers_11/self_attn/q_proj") == "encoder.layers.11.self_attn.q_proj"


def test_safetensors_round_trip_with_bfloat16_and_shards(tmp_path):
  tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1.5, -2], ml_dtypes.bfloat16),
             "c": np.array([1, 2, 3], np.int64), "d": np.zeros((0, 4), np.float16)}
  path = str(tmp_path / "one.safetensors")
  write_safetensors(path, tensors, metadata={"format": "pt"})
  with open(path, "rb") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    assert length % 8 == 0 and json.loads(f.read(length))["b"]["dtype"] == "BF16"
  loaded = read_weights(path)
  assert read_safetensors_metadata(path) == {"format": "pt"}
  for key, value in tensors.items():
    assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape
    np.testing.assert_array_equal(loaded[key].astype(np.float64), value.astype(np.float64))

  write_safetensors(str(tmp_path / "s1.safetensors"), {"a": tensors["a"]})
  write_safetensors(str(tmp_path / "s2.safetensors"), {"c": tensors["c"]})
  index = tmp_path / "model.safetensors.index.json"
  index.write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "c": "s2.safetensors"}}))
  assert sorted(read_safetensors(str(index))) == ["a", "c"]


def test_safetensors_agrees_with_the_reference_library(tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  tensors = {"x": np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32), "y": np.arange(4, dtype=np.int32)}
  ours, theirs = str(tmp_path / "ours.safetensors"), str(tmp_path / "theirs.safetensors")
  write_safetensors(ours, tensors)
  safetensors_numpy.save_file(tensors, theirs)
  for key, value in safetensors_numpy.load_file(ours).items():
    np.testing.assert_array_equal(value, tensors[key])
  for key, value in read_safetensors(theirs).items():
    np.testing.assert_array_equal(value, tensors[key])


def test_flatten_round_trip():
  tree = {"a": {"b": np.ones(2), "c": {"d": np.zeros(1)}}}
  flat = flatten_params(tree)
  assert sorted(flat) == ["a/b", "a/c/d"]
  jax.tree.map(np.testing.assert_array_equal, unflatten_params(flat), tree)


def test_bad_files_are_named(tmp_path):
  path = tmp_path / "bad.safetensors"
  path.write_bytes(b"\xff" * 16)
  with pytest.raises(ValueError, match="bad.safetensors: not a safetensors file"):
    read_safetensors(str(path))
  with pytest.raises(ValueError, match="unknown weight file type"):
    (tmp_path / "w.npz").write_bytes(b"")
    read_weights(str(tmp_path / "w.npz"))


def test_compvis_yaml_config_fills_what_the_weights_do_not_tell(tmp_path):
  from ldm_jax.convert.single_file import options_from_yaml
  path = tmp_path / "v2-inference-v.yaml"
  path.write_text("""
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    timesteps: 1000
    scale_factor: 0.18215
    unet_config:
      params:
        num_head_channels: 64
        use_linear_in_transformer: True
    first_stage_config:
      params:
        ddconfig:
          resolution: 256
""")
  assert options_from_yaml(str(path)) == dict(
      num_heads=-1, num_head_channels=64, resolution=256, parameterization="v", scale_factor=0.18215,
      diffusion=dict(beta_schedule="scaled_linear", num_timesteps=1000, linear_start=0.00085, linear_end=0.012))
