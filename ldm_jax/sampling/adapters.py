"""LoRA files (`--lora FILE[:SCALE]`) and textual-inversion embeddings (`--textual_inversion FILE`) at sampling.

    info = add_placeholders(request, info)                 # before the plan tokenizes the prompts
    ldm, params = apply_adapters(request, ldm, params)     # after the weights are placed, before compiling

LoRA adapters (diffusers/PEFT or kohya layout, U-Net and text encoder) are added to the weights,
W + Σᵢ sᵢ·ΔWᵢ (`ldm_jax.models.lora.apply_lora`), so the compiled sampler is the plain one.
Each textual-inversion file adds its token (n vectors: `tok`, `tok_1`, …) to the tokenizer and
its rows to the text encoder's token-embedding table. Every error names the flag and the file.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from ldm_jax.convert import lora as lora_files
from ldm_jax.convert import textual_inversion as ti
from ldm_jax.diffusion.latent_diffusion import LatentDiffusion, TextEncoderConditioner
from ldm_jax.models import lora as lora_lib
from ldm_jax.runtime import sharding
from ldm_jax.sampling.model import ModelInfo
from ldm_jax.sampling.request import SampleRequest


def check_files(request: SampleRequest) -> None:
  """The files of `--lora` / `--textual_inversion` exist (FileNotFoundError naming the flag and path)."""
  for path, _ in request.lora:
    if not os.path.isfile(lora_files.lora_file(path)):
      raise FileNotFoundError(f"--lora: {lora_files.lora_file(path)} is not a file (a LoRA .safetensors, or a "
                              f"folder holding {lora_files.WEIGHTS_NAME}).")
  for path in request.textual_inversion:
    target = os.path.join(path, ti.WEIGHTS_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(target):
      raise FileNotFoundError(f"--textual_inversion: {target} is not a file (a learned_embeds .safetensors).")


def _embeddings(request: SampleRequest) -> list[tuple[str, str, np.ndarray]]:
  out = []
  for path in request.textual_inversion:
    try:
      token, vectors = ti.read_learned_embeds(path)
    except ValueError as e:
      raise ValueError(f"--textual_inversion: {e}") from None
    out.append((path, token, vectors))
  return out


def add_placeholders(request: SampleRequest, info: ModelInfo) -> ModelInfo:
  """`info` with the tokens of `--textual_inversion` files added to its tokenizer (their rows come
  with `apply_adapters`); ValueError naming the file when the model or the vectors do not fit."""
  if not request.textual_inversion:
    return info
  if info.kind != "text" or info.tokenizer is None or info.tokenizer_2 is not None:
    raise ValueError(f"--textual_inversion: {request.textual_inversion[0]}: embeddings are rows of a text "
                     f"encoder's token table (SD 1.x / 2.x, or our text-to-image models); {info.source} conditions "
                     f"on {info.kind!r}{' with two text encoders' if info.tokenizer_2 is not None else ''}.")
  tokenizer = info.tokenizer
  for path, token, vectors in _embeddings(request):
    if vectors.shape[1] != int(info.cond_cfg.dim):
      raise ValueError(f"--textual_inversion: {path}: {token} has vectors [{vectors.shape[0]}, {vectors.shape[1]}]; "
                       f"the text encoder of {info.source} embeds tokens in {info.cond_cfg.dim} dimensions.")
    try:
      tokenizer = tokenizer.add_tokens(ti.placeholder_names(token, vectors.shape[0]))
    except ValueError as e:
      raise ValueError(f"--textual_inversion: {path}: {e}") from None
  return dataclasses.replace(info, tokenizer=tokenizer)


def apply_adapters(request: SampleRequest, ldm: LatentDiffusion, params: dict,
                   mesh: jax.sharding.Mesh) -> tuple[LatentDiffusion, dict]:
  """(ldm, params {'unet', 'cond'} replicated on `mesh`) with the `--textual_inversion` rows and
  `--lora` adapters of `request` in the weights; ValueError naming the file when one does not fit."""
  if not request.lora and not request.textual_inversion:
    return ldm, params
  if request.textual_inversion:
    text = params["cond"]["text_encoder"]
    tokenizer = ldm.tokenizer
    for path, token, vectors in _embeddings(request):
      tokenizer, text, _ = ti.add_placeholder_tokens(tokenizer, text, token, vectors=vectors)
    rows = int(ti.token_embedding(text).shape[0])
    conditioner = (TextEncoderConditioner(ldm.conditioner.text_encoder.clone(vocab_size=rows))
                   if isinstance(ldm.conditioner, TextEncoderConditioner) else ldm.conditioner.clone(vocab_size=rows))
    params = {**params, "cond": {**params["cond"], "text_encoder": text}}
    ldm = dataclasses.replace(ldm, tokenizer=tokenizer, conditioner=conditioner)
  if request.lora:
    models = {"unet": params["unet"]}
    if "text_encoder" in params["cond"]:
      models["text_encoder"] = params["cond"]["text_encoder"]
    adapters, scales = [], []
    for path, scale in request.lora:
      try:
        read = lora_files.read_lora(path, models)
      except ValueError as e:
        raise ValueError(f"--lora: {e}") from None
      adapters.append({"unet": read.get("unet", {}), "cond": {"text_encoder": read["text_encoder"]}}
                      if "text_encoder" in read else {"unet": read.get("unet", {})})
      scales.append(scale)
    params = jax.jit(lora_lib.apply_lora)(params, adapters, np.asarray(scales, np.float32))
  return ldm, jax.device_put(params, sharding.replicated(mesh))
