"""LoRA fine-tuning (`lora.*` in the config): the state trains adapters, the base model stays outside it.

With a `lora` section the run's `state.params` (and EMA, and AdamW's moments) are adapter sets
that mirror the model's parameters, `{'unet': {…: {module: {'down': A, 'up': B}}}, 'cond': …}`
(`ldm_jax.models.lora`), and the base weights {'unet', 'cond'} of `init.pretrained` are a frozen
input of the step, placed on the mesh by `mesh.rules` like the autoencoder. The step differentiates
`loss(apply_lora(base, [adapters], [α/r]))` with respect to the adapters only, so the optimizer
state holds nothing else and the base is never written. Checkpoints hold the adapters, and every
checkpoint also writes `workdir/pytorch_lora_weights.safetensors` (diffusers/PEFT layout, α/r
multiplied into B) from the EMA adapters — equal to the trained ones with `optim.ema_decay=0`, the
LoRA configs' setting.

Text-encoder adapters (`lora.text_encoder_targets`) need a pretrained text encoder
(`cond.text_encoder='pretrained'`): the file's `text_encoder.…` keys name its modules.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import ml_collections

from ldm_jax.config import lora as lora_config
from ldm_jax.convert import lora as lora_files
from ldm_jax.models import lora as lora_lib

TEXT_ENCODER = "text_encoder"  # the pretrained text encoder's key in the conditioner's parameters


@dataclasses.dataclass(frozen=True, eq=False)
class LoraTuning:
  """What a LoRA run trains and how it composes with the frozen base.

  base: {'unet', 'cond'} parameters on the mesh (never updated); targets: 'unet' / 'cond' →
  adapted module paths; rank r; scale α/r.
  """
  base: dict
  targets: dict
  rank: int
  scale: float

  @property
  def trains_text_encoder(self) -> bool:
    return bool(self.targets.get("cond"))

  def init(self, rng: jax.Array) -> dict:
    """Fresh adapters (B = 0): the composed model starts as the base exactly."""
    return {component: lora_lib.init_lora(jax.random.fold_in(rng, i), self.base[component], modules, self.rank)
            for i, (component, modules) in enumerate(sorted(self.targets.items())) if modules}

  def compose(self, adapters: dict, base: dict) -> dict:
    """{'unet', 'cond'} = base + (α/r)·A·B on every adapted kernel (jit-able; `base` is `self.base`
    passed in as an argument, so that it is not baked into the compiled function as a constant)."""
    return lora_lib.apply_lora(base, [adapters], [self.scale])

  def save(self, workdir: str, adapters: dict) -> str:
    """Writes `workdir/pytorch_lora_weights.safetensors` from host adapters; returns its path."""
    files = {"unet": adapters["unet"]} if "unet" in adapters else {}
    if "cond" in adapters:
      files["text_encoder"] = adapters["cond"][TEXT_ENCODER]
    return lora_files.save_lora(os.path.join(workdir, lora_files.WEIGHTS_NAME), files, scale=self.scale)


def check_config(config: ml_collections.ConfigDict) -> None:
  """The `lora` section's values, and `init.pretrained` set (ValueError naming the key); nothing is read."""
  lora_config.check_lora_config(config.lora)
  if not config.init.pretrained:
    raise ValueError("lora: adapters are trained on a base model; set init.pretrained to a pretrained directory "
                     "(python -m ldm_jax.convert import) or a stage-2 workdir.")


def make_tuning(config: ml_collections.ConfigDict, base: dict, place) -> LoraTuning:
  """The LoRA run of `config` on `base` (host {'unet', 'cond'} of `init.pretrained`); `place(tree)`
  puts a host tree on the mesh. Errors name the key: `lora.*` values, a target regex that matches
  no module, text-encoder targets without a pretrained text encoder, LoRA without
  `init.pretrained` (`check_config`)."""
  check_config(config)
  targets = {"unet": lora_lib.select_targets(
      base["unet"], lora_config.target_patterns(config.lora.unet_targets, "unet", "lora.unet_targets"),
      key="lora.unet_targets")}
  text_patterns = lora_config.target_patterns(config.lora.text_encoder_targets, "text_encoder",
                                              "lora.text_encoder_targets")
  if text_patterns:
    if TEXT_ENCODER not in base["cond"] or len(base["cond"]) != 1:
      raise ValueError("lora.text_encoder_targets: adapters of a text encoder need the pretrained text encoder of "
                       "init.pretrained (cond.text_encoder='pretrained'); this model's conditioner is "
                       f"{config.cond.text_encoder!r}. Set lora.text_encoder_targets=().")
    modules = lora_lib.select_targets(base["cond"][TEXT_ENCODER], text_patterns, key="lora.text_encoder_targets")
    targets["cond"] = [f"{TEXT_ENCODER}/{m}" for m in modules]
  return LoraTuning(base=place(base), targets=targets, rank=int(config.lora.rank),
                    scale=lora_config.lora_scale(config.lora))
