"""Per-device memory of full-size training steps on simulated meshes, from the compiler alone.

  .venv/bin/python benchmarks/memory_training.py --table              # every row below (subprocesses)
  .venv/bin/python benchmarks/memory_training.py --model unet --devices 64 --fsdp --remat --dtype bfloat16
  .venv/bin/python benchmarks/memory_training.py --model sdxl --devices 8 --fsdp --remat --dtype bfloat16

Nothing runs: the real trainer step (`Stage2.train_step` / `Stage1.train_step`) is lowered with
abstract, sharded arguments on `--devices` simulated CPU devices and compiled, and XLA's
`memory_analysis()` of one device's program is reported:

  state    arguments: parameters, optimizer state, EMA (and the batch), as placed by `mesh.rules`;
  temp     activations and temporaries of the step (what remat, bf16 and accumulation shrink);
  peak     arguments + outputs − donated aliases + temp, the device memory the step needs.

Models: `unet` is Stable Diffusion 1.5's U-Net (860M parameters, 64×64×4 latents = 512 px, context
[B, 77, 768]) trained with AdamW and an EMA on cached latents; a 1-layer 768-wide text encoder
stands in for the frozen CLIP text encoder (which adds 123M frozen parameters, 0.5 GB in float32
when replicated). `autoencoder` is the KL-f8 autoencoder at 256 px with LPIPS and the PatchGAN
discriminator (the step after `loss.disc_start`).

`sdxl` is the step `configs/ldm/sdxl_base.py` fine-tunes SDXL base with, its `model.*` the published
U-Net (2,567,463,684 parameters, checked here; `tests/convert/test_sdxl.py` checks the config file
against diffusers' config) at 1024 px (128×128×4 latents), one image per device by default as
diffusers' `train_text_to_image_sdxl.py` examples (`--train_batch_size=1`), AdamW + the state's EMA.
Built without a pretrained directory: the two frozen text encoders are SDXL's (CLIP ViT-L, 123M
parameters, and OpenCLIP bigG with projection, 695M, from their published transformers configs)
with abstract weights. They are not a stand-in here: the row is fine-tuning from images, where every
step encodes the 1024-px images with the frozen VAE encoder and the captions with both encoders
(forward only, no gradients, no optimizer state, no EMA; their weights sit once in the state's
parameters, 3.0 GiB in float32 when replicated). Training from a precomputed `latent.cache_dir` (latents,
both contexts, pooled embedding, sizes and crops) runs neither in the step.
On the 2-core development machine one SDXL row did not finish compiling in 25 minutes (~6 GiB of RAM,
in XLA's HLO passes and LLVM); give it a larger machine or more time.
Attention is chunked (`--query_chunk_size`);
XLA's CPU compiler makes its own fusion and scheduling choices, so TPU/GPU numbers differ by tens
of percent — read the table for its ratios and orders of magnitude.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

_MODEL = flags.DEFINE_enum("model", "unet", ["unet", "sdxl", "autoencoder"], "Which training step.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Simulated devices.")
_FSDP = flags.DEFINE_bool("fsdp", False, "Shard parameters and optimizer state over all devices (mesh.fsdp=-1).")
_REMAT = flags.DEFINE_bool("remat", False, "train.remat.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "train.dtype.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch (0: 256 for the SD U-Net, 1 per device for SDXL, 12 per device for the autoencoder).")
_ACCUM = flags.DEFINE_integer("grad_accum_steps", 1, "train.grad_accum_steps.")
_CHUNK = flags.DEFINE_integer("query_chunk_size", 1024, "Attention query chunk (0: unchunked).")
_TABLE = flags.DEFINE_bool("table", False, "Run the table's rows, each in a subprocess.")

TABLE = [
    dict(model="unet", devices=8),
    dict(model="unet", devices=8, remat=True),
    dict(model="unet", devices=8, remat=True, dtype="bfloat16"),
    dict(model="unet", devices=8, fsdp=True),
    dict(model="unet", devices=8, fsdp=True, remat=True, dtype="bfloat16"),
    dict(model="unet", devices=8, remat=True, dtype="bfloat16", grad_accum_steps=4),
    dict(model="unet", devices=64),
    dict(model="unet", devices=64, remat=True, dtype="bfloat16"),
    dict(model="unet", devices=64, fsdp=True),
    dict(model="unet", devices=64, fsdp=True, remat=True, dtype="bfloat16"),
    dict(model="sdxl", devices=8),
    dict(model="sdxl", devices=8, fsdp=True),
    dict(model="sdxl", devices=8, fsdp=True, remat=True, dtype="bfloat16"),
    dict(model="sdxl", devices=64),
    dict(model="sdxl", devices=64, fsdp=True),
    dict(model="sdxl", devices=64, fsdp=True, remat=True, dtype="bfloat16"),
    dict(model="autoencoder", devices=8),
    dict(model="autoencoder", devices=8, remat=True, dtype="bfloat16"),
    dict(model="autoencoder", devices=8, fsdp=True),
    dict(model="autoencoder", devices=64, fsdp=True, remat=True, dtype="bfloat16"),
]
GIB = 2**30
SDXL_BASE_UNET_PARAMS = 2_567_463_684  # diffusers' UNet2DConditionModel of stable-diffusion-xl-base-1.0
# The published text encoders of stable-diffusion-xl-base-1.0 (text_encoder/, text_encoder_2/ config.json).
SDXL_TEXT_ENCODERS = {
    "text_encoder": dict(model_type="clip_text_model", architectures=["CLIPTextModel"], vocab_size=49408,
                         max_position_embeddings=77, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                         intermediate_size=3072, hidden_act="quick_gelu", eos_token_id=2),
    "text_encoder_2": dict(model_type="clip_text_model", architectures=["CLIPTextModelWithProjection"],
                           vocab_size=49408, max_position_embeddings=77, hidden_size=1280, num_hidden_layers=32,
                           num_attention_heads=20, intermediate_size=5120, hidden_act="gelu", projection_dim=1280,
                           eos_token_id=2),
}


class _Tokenizer:
  """Shapes only: the step is compiled, never run."""
  vocab_size, pad_id, max_length = 1000, 0, 77

  def tokenize(self, texts):
    import numpy as np
    return np.zeros((len(texts), self.max_length), np.int32)


def _batch_size() -> int:
  return _BATCH.value or {"unet": 256, "sdxl": _DEVICES.value, "autoencoder": 12 * _DEVICES.value}[_MODEL.value]


def _mesh_config(config):
  config.mesh.update(data=1, fsdp=-1) if _FSDP.value else config.mesh.update(data=-1, fsdp=1)
  config.train.update(dtype=_DTYPE.value, remat=_REMAT.value, grad_accum_steps=_ACCUM.value)


def unet_step():
  """(compiled step, abstract state) of SD 1.5 U-Net training on cached 64×64×4 latents."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ldm_jax import load
  from ldm_jax.config import autoencoder as ae_defaults
  from ldm_jax.config import diffusion as ldm_defaults
  from ldm_jax.models import autoencoder as ae_lib
  from ldm_jax.runtime import sharding
  from ldm_jax.train.diffusion import state as state_lib, step as step_lib

  ae_config = ae_defaults.default_config()
  ae_config.data.image_size = 512
  config = ldm_defaults.default_config()
  config.data.image_size = 512
  config.latent.cache = True
  config.cond.update(kind="text", dim=768, depth=1, num_heads=12, head_dim=64, vocab_size=1000, max_length=77)
  mesh = _resolved_mesh(config, ae_config)
  ldm = load.build_ldm(config, ae_lib.make_autoencoder(ae_config.model), ae_config, _Tokenizer(), 1.0,
                       for_training=True)
  optimizer = state_lib.make_optimizer(config)
  builder = state_lib.StateBuilder(config, mesh, ldm.unet, ldm.conditioner, ldm.latent_shape,
                                   {"tokens": np.zeros((1, 77), np.int32)}, optimizer)
  train_step = step_lib.make_train_step(config, mesh, ldm, optimizer, builder.state_sharding, {})
  batch_sh = sharding.batch_sharding(mesh)
  b = config.train.batch_size
  batch = {"latent_moments": jax.ShapeDtypeStruct((b, 64, 64, 8), jnp.float32, sharding=batch_sh),
           "cond/tokens": jax.ShapeDtypeStruct((b, 77), jnp.int32, sharding=batch_sh)}
  return train_step.lower(builder.abstract_state, batch, {}).compile(), builder.abstract_state.params


def _resolved_mesh(config, ae_config):
  """The flags' attention chunk, batch size and mesh applied to the stage-2 `config`, resolved; its mesh."""
  from ldm_jax.runtime import sharding
  from ldm_jax.train.diffusion import setup

  config.model.query_chunk_size = _CHUNK.value or None
  config.train.batch_size = _batch_size()
  _mesh_config(config)
  setup.resolve_config(config, ae_config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.train.batch_size, mesh, grad_accum_steps=config.train.grad_accum_steps)
  return mesh


def sdxl_step():
  """(compiled step, abstract U-Net params) of SDXL base fine-tuning at 1024 px, images and captions
  encoded in the step by the frozen VAE and text encoders, as `configs/ldm/sdxl_base.py` trains."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ldm_jax import load
  from ldm_jax.config import autoencoder as ae_defaults
  from ldm_jax.config import common as config_lib
  from ldm_jax.convert import components, pretrained as pretrained_lib, transformers_text
  from ldm_jax.diffusion.latent_diffusion import TextEncoderConditioner
  from ldm_jax.models import autoencoder as ae_lib
  from ldm_jax.models.clip import make_clip_text_encoder
  from ldm_jax.runtime import checkpoint as ckpt_lib
  from ldm_jax.runtime import sharding
  from ldm_jax.train.diffusion import state as state_lib, step as step_lib

  config = config_lib.from_file(os.path.join(os.path.dirname(__file__), "..", "configs", "ldm", "sdxl_base.py"))
  config.init.pretrained = "(abstract SDXL base: compile only, nothing is read)"
  config.data.update(source="shapes", random_crop=False)  # no files are read; the shapes are what count
  config.latent.scale_factor = 0.13025
  ae_config = ae_defaults.default_config()  # SDXL's VAE has SD's KL-f8 architecture
  ae_config.data.image_size = config.data.image_size
  mesh = _resolved_mesh(config, ae_config)
  # The encoders as `convert import` configures an SDXL base: penultimate hidden states, no final norm.
  encoders = {name: transformers_text.clip_config_from_transformers(cfg) for name, cfg in SDXL_TEXT_ENCODERS.items()}
  encoders["unet"] = config.model.to_dict()
  pretrained_lib.sdxl_conditioning(encoders, {"force_zeros_for_empty_prompt": True})
  assert (encoders["cond"]["null_text"], encoders["cond"]["micro_conditioning"]) == (
      config.cond.null_text, config.cond.micro_conditioning), encoders["cond"]
  conditioner = TextEncoderConditioner(make_clip_text_encoder(encoders["text_encoder"]),
                                       make_clip_text_encoder(encoders["text_encoder_2"]))
  autoencoder = ae_lib.make_autoencoder(ae_config.model).clone(dtype=jnp.dtype(config.train.dtype))
  ldm = load.build_ldm(config, autoencoder, ae_config, _Tokenizer(), config.latent.scale_factor, for_training=True,
                       conditioner=conditioner, tokenizer_2=_Tokenizer())
  optimizer = state_lib.make_optimizer(config, frozen_cond=True)
  b, size = config.train.batch_size, config.data.image_size
  example = {"tokens": np.zeros((1, 77), np.int32), "tokens_2": np.zeros((1, 77), np.int32),
             "text_scale": np.ones((1,), np.float32), "time_ids": np.zeros((1, 6), np.float32)}
  builder = state_lib.StateBuilder(config, mesh, ldm.unet, conditioner, ldm.latent_shape, example, optimizer,
                                   frozen_cond=True)
  unet_params = sum(x.size for x in jax.tree.leaves(builder.abstract_state.params["unet"]))
  if unet_params != SDXL_BASE_UNET_PARAMS:
    raise ValueError(f"configs/ldm/sdxl_base.py builds a U-Net of {unet_params:,} parameters, not SDXL base's "
                     f"{SDXL_BASE_UNET_PARAMS:,}.")
  ae_params = components.abstract_params("autoencoder", ae_config.model)  # placed as the trainer places it
  ae_params = ckpt_lib.abstract_like(ae_params, sharding.tree_sharding(mesh, ae_params, prefix="autoencoder",
                                                                       **sharding.rules_of(config.mesh)))
  train_step = step_lib.make_train_step(config, mesh, ldm, optimizer, builder.state_sharding, ae_params)
  batch_sh = sharding.batch_sharding(mesh)
  batch = {"image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32, sharding=batch_sh),
           **{f"cond/{k}": jax.ShapeDtypeStruct((b,) + v.shape[1:], v.dtype, sharding=batch_sh)
              for k, v in example.items()}}
  return train_step.lower(builder.abstract_state, batch, ae_params).compile(), builder.abstract_state.params["unet"]


def autoencoder_step():
  """(compiled step, abstract params) of KL-f8 training at 256 px with LPIPS and the GAN."""
  import jax
  import jax.numpy as jnp
  from ldm_jax.config import common as config_lib
  from ldm_jax.runtime import sharding
  from ldm_jax.train import autoencoder

  config = config_lib.from_file(os.path.join(os.path.dirname(__file__), "..", "configs", "autoencoder", "kl_f8.py"))
  config.data.update(source="shapes", random_crop=False)  # no files are read; the shapes are what count
  config.model.query_chunk_size = _CHUNK.value or None
  config.train.batch_size = _batch_size()
  _mesh_config(config)
  autoencoder.validate_config(config)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.train.batch_size, mesh, grad_accum_steps=config.train.grad_accum_steps)
  stage = autoencoder.Stage1(config, mesh)
  batch = {"image": jax.ShapeDtypeStruct((config.train.batch_size, 256, 256, 3), jnp.float32,
                                         sharding=sharding.batch_sharding(mesh))}
  return stage.train_step[True].lower(stage.abstract_state, batch).compile(), stage.abstract_state.params


def measure() -> dict:
  import time
  import jax
  t0 = time.perf_counter()
  compiled, params = {"unet": unet_step, "sdxl": sdxl_step, "autoencoder": autoencoder_step}[_MODEL.value]()
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  return dict(model=_MODEL.value, devices=jax.device_count(), fsdp=_FSDP.value, remat=_REMAT.value,
              dtype=_DTYPE.value, grad_accum_steps=_ACCUM.value, batch_size=_batch_size(),
              params=sum(x.size for x in jax.tree.leaves(params)),
              state_gib=m.argument_size_in_bytes / GIB, temp_gib=m.temp_size_in_bytes / GIB, peak_gib=peak / GIB,
              compile_s=time.perf_counter() - t0)


def fits(peak_gib: float) -> str:
  # Leave ~10% of the device for the runtime, fragmentation and the input pipeline.
  return " ".join(f"{size}" if peak_gib <= 0.9 * size else "–" for size in (16, 32, 80))


def table() -> None:
  print("| model | devices | batch/device | FSDP | remat | dtype | accum | state GiB | temp GiB | peak GiB | fits 16/32/80 GiB |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for row in TABLE:
    argv = [sys.executable, __file__] + [f"--{k}={v}" if not isinstance(v, bool) else f"--{k}" for k, v in row.items()]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={row['devices']}")
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
      print(f"| {row} | failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode} |")
      continue
    r = json.loads(lines[-1])
    print(f"| {r['model']} ({r['params'] / 1e6:.0f}M) | {r['devices']} | {r['batch_size'] // r['devices']} | "
          f"{'yes' if r['fsdp'] else 'no'} | {'yes' if r['remat'] else 'no'} | {r['dtype']} | {r['grad_accum_steps']} | "
          f"{r['state_gib']:.2f} | {r['temp_gib']:.2f} | {r['peak_gib']:.2f} | {fits(r['peak_gib'])} |", flush=True)


def main(argv):
  del argv
  if _TABLE.value:
    table()
    return
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_DEVICES.value}")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  print(json.dumps(measure()))


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
