"""Per-device memory of full-size training steps on simulated meshes, from the compiler alone.

  .venv/bin/python benchmarks/memory_training.py --table              # every row below (subprocesses)
  .venv/bin/python benchmarks/memory_training.py --model unet --devices 64 --fsdp --remat --dtype bfloat16
  .venv/bin/python benchmarks/memory_training.py --model sdxl --devices 8 --fsdp --remat --dtype bfloat16
  .venv/bin/python benchmarks/memory_training.py --finetune_table     # SD 1.5: whole U-Net vs LoRA

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
An SDXL row takes over half an hour and ~8 GiB of RAM to compile on the 2-core development machine
(LLVM runs with its expensive passes off, see `main`).
`finetune` is the step of `train_diffusion.py --config configs/finetune/lora.py` on Stable Diffusion
1.5 (`--method lora`: rank-4 adapters of the attention projections, the config's defaults), or of
the same config without its `lora` section (`--method full`: the whole U-Net trains), at 512 px from
images and captions, one image per device. The pretrained model is abstract, configured as
`finetune.apply_pretrained` configures a `convert import` of SD 1.5: `configs/ldm/sd_v1.py`'s U-Net
(859,520,964 parameters, checked), its schedule and scale_factor, the frozen CLIP ViT-L/14 text
encoder (123M) and KL-f8 VAE. The row also reports what trains and what does not (parameter
counts) and the bytes of the train state's pytree (parameters, EMA, AdamW moments): a LoRA run's
frozen base is an input of the step, not part of the state.
Attention is chunked (`--query_chunk_size`);
XLA's CPU compiler makes its own fusion and scheduling choices, so TPU/GPU numbers differ by tens
of percent — read the table for its ratios and orders of magnitude.
"""

import json
import os
import subprocess
import sys

from absl import app, flags

_MODEL = flags.DEFINE_enum("model", "unet", ["unet", "sdxl", "autoencoder", "finetune"], "Which training step.")
_METHOD = flags.DEFINE_enum("method", "lora", ["full", "lora"],
                            "--model finetune: LoRA adapters (configs/finetune/lora.py) or the whole U-Net.")
_DEVICES = flags.DEFINE_integer("devices", 8, "Simulated devices.")
_FSDP = flags.DEFINE_bool("fsdp", False, "Shard parameters and optimizer state over all devices (mesh.fsdp=-1).")
_REMAT = flags.DEFINE_bool("remat", False, "train.remat.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "train.dtype.")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Global batch (0: 256 for the SD U-Net, 1 per device for SDXL and "
                               "fine-tuning, 12 per device for the autoencoder).")
_ACCUM = flags.DEFINE_integer("grad_accum_steps", 1, "train.grad_accum_steps.")
_CHUNK = flags.DEFINE_integer("query_chunk_size", 1024, "Attention query chunk (0: unchunked).")
_TABLE = flags.DEFINE_bool("table", False, "Run the table's rows, each in a subprocess.")
_FINETUNE_TABLE = flags.DEFINE_bool("finetune_table", False, "Run FINETUNE_TABLE's rows, each in a subprocess.")

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
FINETUNE_TABLE = [dict(model="finetune", method="full", devices=8), dict(model="finetune", method="lora", devices=8)]
GIB, MIB = 2**30, 2**20
_CODEGEN_FLAGS = ("--xla_llvm_disable_expensive_passes=true", "--xla_backend_optimization_level=0")
SD1_UNET_PARAMS = 859_520_964  # diffusers' UNet2DConditionModel of stable-diffusion-v1-5
SDXL_BASE_UNET_PARAMS = 2_567_463_684  # diffusers' UNet2DConditionModel of stable-diffusion-xl-base-1.0
# The published text encoders of stable-diffusion-xl-base-1.0 (text_encoder/, text_encoder_2/ config.json); the
# first, CLIP ViT-L/14's text model, is also Stable Diffusion 1.x's text_encoder/.
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
  return _BATCH.value or {"unet": 256, "sdxl": _DEVICES.value, "finetune": _DEVICES.value,
                          "autoencoder": 12 * _DEVICES.value}[_MODEL.value]


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


def finetune_step():
  """(compiled step, sizes) of fine-tuning SD 1.5 at 512 px from images and captions as the trainer
  builds it for configs/finetune/lora.py (`--method lora`) or that config without `lora` (`full`).

  sizes: `params` (what trains: what the step differentiates and has an EMA of), `frozen_params`
  (the rest of the step's weights: text encoder, VAE, and a LoRA run's base), `state_bytes` (the
  train state's pytree: parameters, EMA, AdamW moments, step, rng) and `trainable_bytes`."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from ldm_jax import load
  from ldm_jax.config import autoencoder as ae_defaults
  from ldm_jax.config import common as config_lib
  from ldm_jax.convert import components, transformers_text
  from ldm_jax.diffusion.latent_diffusion import TextEncoderConditioner
  from ldm_jax.models import autoencoder as ae_lib
  from ldm_jax.runtime import checkpoint as ckpt_lib
  from ldm_jax.runtime import sharding
  from ldm_jax.train.diffusion import lora, state as state_lib, step as step_lib

  configs = os.path.join(os.path.dirname(__file__), "..", "configs")
  config = config_lib.from_file(os.path.join(configs, "finetune", "lora.py"))
  if _METHOD.value == "full":
    with config.unlocked():
      del config["lora"]
  # What `finetune.apply_pretrained` sets from a `convert import` of SD 1.5, here without reading it.
  sd = config_lib.from_file(os.path.join(configs, "ldm", "sd_v1.py"))
  text_encoder = transformers_text.clip_config_from_transformers(SDXL_TEXT_ENCODERS["text_encoder"])
  load.set_sections(config, {
      "init": dict(pretrained="(abstract SD 1.5: compile only, nothing is read)"),
      "model": sd.model.to_dict(),
      "diffusion": {k: sd.diffusion[k] for k in load.PRETRAINED_DIFFUSION_KEYS},
      "latent": dict(scale_factor=sd.latent.scale_factor),
      "cond": dict(kind="text", text_encoder="pretrained", max_length=77, vocab_size=49408, dim=768)}, "SD 1.5")
  config.data.update(source="shapes", random_crop=False)  # no files are read; the shapes are what count
  ae_config = ae_defaults.default_config()  # SD's VAE
  ae_config.data.image_size = config.data.image_size
  mesh = _resolved_mesh(config, ae_config)
  rules = sharding.rules_of(config.mesh)
  place = lambda tree, prefix="": ckpt_lib.abstract_like(tree, sharding.tree_sharding(mesh, tree, prefix=prefix,
                                                                                       **rules))
  # As the trainer builds the run (`train_and_evaluate`), on abstract pretrained weights.
  pretrained = {"unet": components.abstract_params("unet", config.model),
                "cond": {lora.TEXT_ENCODER: components.abstract_params("text_encoder", text_encoder)}}
  unet_params = sum(x.size for x in jax.tree.leaves(pretrained["unet"]))
  if unet_params != SD1_UNET_PARAMS:
    raise ValueError(f"configs/ldm/sd_v1.py builds a U-Net of {unet_params:,} parameters, not SD 1.5's "
                     f"{SD1_UNET_PARAMS:,}.")
  # `finetune.make_tuning` places host weights; the same LoRA run here on abstract ones.
  tuning = lora.make_tuning(config, pretrained, place) if "lora" in config else None
  conditioner = TextEncoderConditioner(components.build("text_encoder", text_encoder))
  autoencoder = ae_lib.make_autoencoder(ae_config.model).clone(dtype=jnp.dtype(config.train.dtype))
  ldm = load.build_ldm(config, autoencoder, ae_config, _Tokenizer(), config.latent.scale_factor, for_training=True,
                       conditioner=conditioner)
  frozen_cond = tuning is None and step_lib.is_frozen(conditioner)
  optimizer = state_lib.make_optimizer(config, frozen_cond=frozen_cond)
  builder = state_lib.StateBuilder(config, mesh, ldm.unet, conditioner, ldm.latent_shape,
                                   {"tokens": np.zeros((1, 77), np.int32)}, optimizer,
                                   init_params=tuning.init if tuning else None, frozen_cond=frozen_cond)
  ae_params = place(components.abstract_params("autoencoder", ae_config.model), "autoencoder")
  train_step = step_lib.make_train_step(config, mesh, ldm, optimizer, builder.state_sharding, ae_params, tuning)
  frozen = (ae_params,) if tuning is None else (ae_params, tuning.base)
  batch_sh = sharding.batch_sharding(mesh)
  b, size = config.train.batch_size, config.data.image_size
  batch = {"image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32, sharding=batch_sh),
           "cond/tokens": jax.ShapeDtypeStruct((b, 77), jnp.int32, sharding=batch_sh)}
  compiled = train_step.lower(builder.abstract_state, batch, *frozen).compile()

  state = builder.abstract_state
  trained = {k: state.params[k] for k in state.ema_params}  # what the step differentiates
  untrained = [{k: v for k, v in state.params.items() if k not in state.ema_params}, *frozen]
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  return compiled, dict(params=count(trained), frozen_params=count(untrained), trainable_bytes=nbytes(trained),
                        state_bytes=nbytes(state))


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
  if _MODEL.value == "finetune":
    compiled, sizes = finetune_step()
  else:
    compiled, params = {"unet": unet_step, "sdxl": sdxl_step, "autoencoder": autoencoder_step}[_MODEL.value]()
    sizes = dict(params=sum(x.size for x in jax.tree.leaves(params)))
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
  return dict(model=_MODEL.value, method=_METHOD.value, devices=jax.device_count(), fsdp=_FSDP.value,
              remat=_REMAT.value, dtype=_DTYPE.value, grad_accum_steps=_ACCUM.value, batch_size=_batch_size(),
              **sizes, state_gib=m.argument_size_in_bytes / GIB, output_gib=m.output_size_in_bytes / GIB,
              alias_gib=m.alias_size_in_bytes / GIB, temp_gib=m.temp_size_in_bytes / GIB, peak_gib=peak / GIB,
              compile_s=time.perf_counter() - t0)


def fits(peak_gib: float) -> str:
  # Leave ~10% of the device for the runtime, fragmentation and the input pipeline.
  return " ".join(f"{size}" if peak_gib <= 0.9 * size else "–" for size in (16, 32, 80))


def _run_row(row: dict) -> dict | str:
  """`measure()` of one row in a subprocess with its device count; or the reason it failed."""
  argv = [sys.executable, __file__] + [f"--{k}={v}" if not isinstance(v, bool) else f"--{k}" for k, v in row.items()]
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={row['devices']}")
  out = subprocess.run(argv, env=env, capture_output=True, text=True)
  lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
  if out.returncode or not lines:
    return f"failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}"
  return json.loads(lines[-1])


def _print_table(header: str, rows, format_row) -> None:
  """Prints a markdown table: `header`'s columns, then one line per row run through `_run_row`."""
  print(header)
  print("|---" * header.count("|", 1) + "|")
  for row in rows:
    r = _run_row(row)
    print(f"| {row} | {r} |" if isinstance(r, str) else format_row(r), flush=True)


def table() -> None:
  _print_table(
      "| model | devices | batch/device | FSDP | remat | dtype | accum | state GiB | temp GiB | peak GiB | fits 16/32/80 GiB |",
      TABLE,
      lambda r: (f"| {r['model']} ({r['params'] / 1e6:.0f}M) | {r['devices']} | {r['batch_size'] // r['devices']} | "
                 f"{'yes' if r['fsdp'] else 'no'} | {'yes' if r['remat'] else 'no'} | {r['dtype']} | "
                 f"{r['grad_accum_steps']} | {r['state_gib']:.2f} | {r['temp_gib']:.2f} | {r['peak_gib']:.2f} | "
                 f"{fits(r['peak_gib'])} |"))


def finetune_table() -> None:
  """Whole-U-Net vs LoRA fine-tuning of SD 1.5: what trains, the train state, and one device's step."""
  _print_table(
      "| fine-tuning SD 1.5 | trainable params | frozen params | train state MiB (params + EMA + AdamW) | "
      "state / trainable bytes | arguments GiB | outputs GiB | temp GiB | peak GiB |",
      FINETUNE_TABLE,
      lambda r: (f"| {'LoRA (lora.py)' if r['method'] == 'lora' else 'full U-Net (lora.py without lora)'} | "
                 f"{r['params']:,} | {r['frozen_params']:,} | {r['state_bytes'] / MIB:,.1f} | "
                 f"{r['state_bytes'] / r['trainable_bytes']:.2f} | {r['state_gib']:.2f} | {r['output_gib']:.2f} | "
                 f"{r['temp_gib']:.2f} | {r['peak_gib']:.2f} |"))


def main(argv):
  del argv
  if _TABLE.value:
    table()
    return
  if _FINETUNE_TABLE.value:
    finetune_table()
    return
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_DEVICES.value}")
  # Nothing runs, so LLVM need not optimise the code it generates; the memory analysis comes from
  # XLA's buffer assignment before that (the autoencoder row is the same to the byte either way).
  for flag in _CODEGEN_FLAGS:
    if flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
      os.environ["XLA_FLAGS"] += f" {flag}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  print(json.dumps(measure()))


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
