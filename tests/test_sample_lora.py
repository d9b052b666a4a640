"""`sample.py --lora FILE[:SCALE]`, `--textual_inversion FILE` and `python -m ldm_jax.convert merge-lora`
on a smoke text-to-image run.

Two random LoRA files (one PEFT, one kohya layout, B ≠ 0) adapt the exported EMA weights of a
two-step `shapes_txt2img:smoke` run. Sampling with both at their scales gives the images of the
model merge-lora writes with the same scales; bad files stop before anything is compiled.
"""

import os
import re

import jax
import numpy as np
import pytest

from ldm_jax import load, sampling
from ldm_jax.convert import lora as lora_files
from ldm_jax.convert import textual_inversion as ti
from ldm_jax.convert.__main__ import main as convert_cli
from ldm_jax.convert.safetensors_io import read_safetensors, write_safetensors
from ldm_jax.data.tokenizer import load_tokenizer
from ldm_jax.models import lora as lora_lib
from tests.test_sample import PROMPT

pytestmark = pytest.mark.extended


def random_lora(unet_params, pattern, seed):
  targets = lora_lib.select_targets(unet_params, [pattern])
  adapter = lora_lib.init_lora(jax.random.PRNGKey(seed), unet_params, targets, rank=2)
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: np.asarray(x) + 0.3 * rng.standard_normal(x.shape).astype(np.float32), adapter)


@pytest.fixture(scope="module")
def lora_setup(smoke_text_run, tmp_path_factory):
  root = tmp_path_factory.mktemp("lora_sampling")
  run = smoke_text_run
  base = str(root / "base")
  assert convert_cli(["export", "--workdir", run, "--format", "safetensors", "--out", base]) == 0
  _, params, _ = load.load_pretrained(base)
  # conv_out too: the U-Net of a few steps is near zero-output, and its last conv makes a LoRA visible.
  attention = random_lora(params["unet"], r".*/attn1/(to_q|to_v)|conv_out", 1)
  cross = random_lora(params["unet"], r".*/attn2/to_k", 2)
  first = lora_files.save_lora(str(root / "attention.safetensors"), {"unet": attention})
  second = lora_files.save_lora(str(root / "cross_kohya.safetensors"), {"unet": cross}, scale=0.5, layout="kohya")
  return dict(root=root, base=base, params=params, files=[(first, 0.7), (second, -1.5)])


def sample(out, **request):
  request = {"prompts": (PROMPT,), **request}
  summary = sampling.sample_to_dir(sampling.SampleRequest(
      out=str(out), num_samples=4, steps=3, batch_size=8, guidance_scale=2.0, **request))
  with np.load(os.path.join(summary["out"], "samples.npz")) as data:
    return data["images"]


def test_lora_at_a_scale_samples_as_the_merged_weights(lora_setup, capsys):
  root, base, files = lora_setup["root"], lora_setup["base"], lora_setup["files"]
  merged = str(root / "merged")
  specs = [f"{path}:{scale}" for path, scale in files]
  assert convert_cli(["merge-lora", "--pretrained", base, "--lora", specs[0], "--lora", specs[1],
                      "--out", merged]) == 0

  # merge-lora wrote W + Σ sᵢ·ΔWᵢ, with the files' own scale (kohya α/r = 0.5 in B) and the flags'.
  _, merged_params, _ = load.load_pretrained(merged)
  adapters = [lora_files.read_lora(path, {"unet": lora_setup["params"]["unet"]})["unet"] for path, _ in files]
  expected = lora_lib.apply_lora(lora_setup["params"]["unet"], adapters, [s for _, s in files])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), merged_params["unet"], expected)
  assert any(np.abs(np.asarray(a) - b).max() > 1e-3 for a, b in zip(
      jax.tree.leaves(merged_params["unet"]), jax.tree.leaves(lora_setup["params"]["unet"])))

  with_lora = sample(root / "with_lora", pretrained=base, lora=tuple(files))
  from_merged = sample(root / "from_merged", pretrained=merged)
  plain = sample(root / "plain", pretrained=base)
  assert np.abs(with_lora.astype(int) - from_merged).max() <= 1
  assert np.abs(with_lora.astype(int) - plain).max() > 10  # the adapters change the images
  # At scale 0 the adapters do nothing.
  zero = sample(root / "zero", pretrained=base, lora=tuple((path, 0.0) for path, _ in files))
  np.testing.assert_array_equal(zero, plain)

  capsys.readouterr()
  assert convert_cli(["merge-lora", "--pretrained", base, "--lora", specs[0], "--out", merged]) == 2
  assert re.search(r"error: --out: .*merged already holds a pretrained model", capsys.readouterr().err)


def test_bad_lora_files_name_the_file_before_compiling(lora_setup, monkeypatch):
  root, base = lora_setup["root"], lora_setup["base"]
  good = lora_files.lora_state({"unet": random_lora(lora_setup["params"]["unet"], r".*/attn1/to_q", 3)})
  renamed = {k.replace("to_q", "to_z"): v for k, v in good.items()}
  write_safetensors(str(root / "no_layer.safetensors"), renamed)
  shapes = {k: (np.concatenate([v, v], axis=0) if "lora_A" in k else v) for k, v in good.items()}
  write_safetensors(str(root / "shapes.safetensors"), shapes)
  assert read_safetensors(str(root / "shapes.safetensors"))

  def no_compile(*args, **kwargs):
    raise AssertionError("compiled before the LoRA file was checked")
  monkeypatch.setattr(sampling.run, "make_sample_fn", no_compile)
  with pytest.raises(ValueError, match=r"(?s)--lora: LoRA file .*no_layer\.safetensors: the weights do not fit .*"
                                       r"has no module .*to_z"):
    sample(root / "bad1", pretrained=base, lora=((str(root / "no_layer.safetensors"), 1.0),))
  with pytest.raises(ValueError, match=r"--lora: LoRA file .*shapes\.safetensors: .*mis-shaped"):
    sample(root / "bad2", pretrained=base, lora=((str(root / "shapes.safetensors"), 1.0),))
  assert not os.path.exists(root / "bad1") and not os.path.exists(root / "bad2")


def test_textual_inversion_token_with_a_words_vector_samples_as_that_word(lora_setup):
  root, base = lora_setup["root"], lora_setup["base"]
  table = ti.token_embedding(lora_setup["params"]["conditioner"]["text_encoder"])
  red = load_tokenizer(os.path.join(base, "tokenizer")).token_id("red")
  path = ti.save_learned_embeds(str(root / "red.safetensors"), "<red>", np.asarray(table)[red])
  with_token = sample(root / "ti", pretrained=base, textual_inversion=(path,),
                      prompts=(PROMPT.replace("red", "<red>"),))
  np.testing.assert_array_equal(with_token, sample(root / "word", pretrained=base))
  loud = ti.save_learned_embeds(str(root / "loud.safetensors"), "<red>", 50 * np.asarray(table)[red])
  assert np.abs(sample(root / "loud", pretrained=base, textual_inversion=(loud,), prompts=(
      PROMPT.replace("red", "<red>"),)).astype(int) - with_token).max() > 0  # the rows are used
  with pytest.raises(ValueError, match=r"--textual_inversion: .*wide\.safetensors: <wide> has vectors \[1, 7\]"):
    sample(root / "bad_ti", pretrained=base, textual_inversion=(ti.save_learned_embeds(
        str(root / "wide.safetensors"), "<wide>", np.zeros((1, 7), np.float32)),))
