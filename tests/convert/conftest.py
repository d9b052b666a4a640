"""Tiny random reference models (diffusers, transformers), saved once per session to local folders.

Nothing is downloaded: every model is built from a config with random weights (`reference.perturb`).
torch, diffusers and transformers are imported inside the fixtures, so tests that need none of
them run without them.
"""

import pytest

from tests.convert.reference import (BERT, CLIP, UNET_SD1, UNET_SD2, UNET_SMALL, VAE_KL, VAE_VQ,
                                     clip_tokenizer_vocab, perturb)


@pytest.fixture(scope="session")
def diffusers_models(tmp_path_factory):
  """name → (folder, torch model) for 'vae', 'vq', 'unet_sd1', 'unet_sd2', 'unet_small'."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp("diffusers")
  models = {"vae": diffusers.AutoencoderKL(**VAE_KL), "vq": diffusers.VQModel(**VAE_VQ),
            "unet_sd1": diffusers.UNet2DConditionModel(**UNET_SD1),
            "unet_sd2": diffusers.UNet2DConditionModel(**UNET_SD2),
            "unet_small": diffusers.UNet2DConditionModel(**UNET_SMALL)}
  out = {}
  for i, (name, model) in enumerate(models.items()):
    perturb(model, seed=i)
    model.save_pretrained(str(root / name))
    out[name] = (str(root / name), model)
  return out


@pytest.fixture(scope="session")
def transformers_models(tmp_path_factory):
  """name → (folder, torch model) for 'clip' (with a saved CLIP tokenizer in 'clip_tokenizer') and 'bert'."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp("transformers")
  vocab, merges = clip_tokenizer_vocab()
  tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CLIP["max_position_embeddings"])
  tokenizer.save_pretrained(str(root / "clip_tokenizer"))
  clip = perturb(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
      pad_token_id=vocab["<|endoftext|>"], **CLIP)), seed=10)
  bert = perturb(transformers.BertModel(transformers.BertConfig(**BERT)), seed=11)
  out = {"clip_tokenizer": (str(root / "clip_tokenizer"), tokenizer)}
  for name, model in (("clip", clip), ("bert", bert)):
    model.save_pretrained(str(root / name))
    out[name] = (str(root / name), model)
  return out




@pytest.fixture(scope="session")
def sd_pipeline(diffusers_models, transformers_models, tmp_path_factory):
  """(folder, StableDiffusionPipeline) of a tiny SD 1.x-layout pipeline: 16 px images, 8×8×4 latents."""
  diffusers = pytest.importorskip("diffusers")
  pipe = diffusers.StableDiffusionPipeline(
      vae=diffusers_models["vae"][1], text_encoder=transformers_models["clip"][1],
      tokenizer=transformers_models["clip_tokenizer"][1], unet=diffusers_models["unet_small"][1],
      scheduler=diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1),
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  folder = str(tmp_path_factory.mktemp("sd_pipeline"))
  pipe.save_pretrained(folder)
  return folder, pipe


@pytest.fixture(scope="session")
def sdxl_pipeline(tmp_path_factory):
  """(folder, StableDiffusionXLPipeline) of the tiny random SDXL base (`tests.convert.sdxl_tiny`), DDIM scheduler."""
  from tests.convert import sdxl_tiny  # pylint: disable=g-import-not-at-top
  pipe = sdxl_tiny.build_pipeline()
  folder = str(tmp_path_factory.mktemp("sdxl_pipeline"))
  pipe.save_pretrained(folder)
  return folder, pipe
