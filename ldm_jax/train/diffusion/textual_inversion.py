"""Textual inversion (Gal et al. 2022; a `textual_inversion` section): new token embeddings, nothing else, train.

The placeholder (`textual_inversion.token`, n = `num_vectors` tokens `tok`, `tok_1`, …) is added
to the run's tokenizer and n rows to the token-embedding table of the model's text encoder (a
pretrained one, or the transformer of one of our text-to-image runs), each
initialised as the row of `initializer_token` (`ldm_jax.convert.textual_inversion`). The run's
`state.params` is `{'rows': [n, dim]}`: the step writes them into the frozen table
(`set_rows`), so every other row, the rest of the text encoder and the U-Net stay bit-identical
and AdamW holds moments of the n rows only. Every training caption is one of
`textual_inversion.prompts` (templates with `{}` for the placeholder, cycled over the examples);
every checkpoint writes `workdir/learned_embeds.safetensors` ({token: [n, dim]}, what diffusers'
`load_textual_inversion` and `sample.py --textual_inversion` read).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax.config import textual_inversion as ti_config_lib
from ldm_jax.convert import textual_inversion as ti
from ldm_jax.diffusion.latent_diffusion import TextEncoderConditioner
from ldm_jax.models.conditioning import Conditioner

TEXT_ENCODER = "text_encoder"  # the text encoder's key in the conditioner's parameters (both kinds)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The section's values and `init.pretrained` set; ValueError naming the key."""
  ti_config_lib.check_ti_config(config.textual_inversion)
  if not config.init.pretrained:
    raise ValueError("textual_inversion: new embeddings are learned for the text encoder of a trained model; set "
                     "init.pretrained.")


@dataclasses.dataclass(frozen=True, eq=False)
class EmbeddingTuning:
  """base: {'unet', 'cond'} on the mesh, the table grown by the placeholder rows; ids: their token
  ids; tokenizer / conditioner: the run's, with the placeholder."""
  base: dict
  ids: tuple[int, ...]
  initial: np.ndarray
  token: str
  prompts: tuple[str, ...]
  tokenizer: Any
  conditioner: Any
  trains_text_encoder: bool = True

  def init(self, rng: jax.Array) -> dict:
    del rng  # the rows start as the initializer's
    return {"rows": jnp.asarray(self.initial)}

  def compose(self, trainable: dict, base: dict) -> dict:
    text = ti.set_rows(base["cond"][TEXT_ENCODER], jnp.asarray(self.ids), trainable["rows"])
    return {"unet": base["unet"], "cond": {**base["cond"], TEXT_ENCODER: text}}

  def captions(self, batch: dict, step: int) -> dict:
    """`batch` with its captions replaced by the templates, cycled over the examples of the run."""
    n = len(next(iter(batch.values())))
    first = step * n
    text = [self.prompts[(first + i) % len(self.prompts)].format(self.token) for i in range(n)]
    return {**batch, "caption": np.array(text)}

  def save(self, workdir: str, trainable: dict) -> str:
    return ti.save_learned_embeds(os.path.join(workdir, ti.WEIGHTS_NAME), self.token, np.asarray(trainable["rows"]))


def make_tuning(config, base: dict, tokenizer, conditioner, place) -> EmbeddingTuning:
  """The textual-inversion run of `config` on the host `base` {'unet', 'cond'}; `place(tree)` puts
  a host tree on the mesh. ValueError naming the key when the model has no pretrained text encoder
  or the token / initializer do not fit its tokenizer."""
  check_config(config)
  cfg = config.textual_inversion
  pretrained = isinstance(conditioner, TextEncoderConditioner) and conditioner.text_encoder_2 is None \
      and conditioner.text_encoder is not None
  if not pretrained and not (isinstance(conditioner, Conditioner) and config.cond.kind == "text"):
    raise ValueError("textual_inversion: the model of init.pretrained has no single text encoder (cond.kind="
                     f"{config.cond.kind!r}); textual inversion learns rows of one (SD 1.x / 2.x, or ours).")
  try:
    tokenizer, text, ids = ti.add_placeholder_tokens(tokenizer, base["cond"][TEXT_ENCODER], cfg.token,
                                                     num_vectors=cfg.num_vectors,
                                                     initializer_token=cfg.initializer_token)
  except ValueError as e:
    raise ValueError(f"textual_inversion: {e}") from None
  text = jax.tree.map(np.asarray, text)
  rows = int(ti.token_embedding(text).shape[0])
  conditioner = (TextEncoderConditioner(conditioner.text_encoder.clone(vocab_size=rows)) if pretrained
                 else conditioner.clone(vocab_size=rows))
  initial = np.asarray(ti.token_embedding(text))[np.asarray(ids)]
  return EmbeddingTuning(base=place({"unet": base["unet"], "cond": {**base["cond"], TEXT_ENCODER: text}}),
                         ids=tuple(ids), initial=initial, token=cfg.token, prompts=tuple(cfg.prompts),
                         tokenizer=tokenizer, conditioner=conditioner)
