"""Sample images from a trained latent diffusion run (or a pretrained model).

  python sample.py --workdir runs/fmnist_ldm --out samples/fmnist --class_label all --num_samples 20
  python sample.py --workdir runs/shapes_ldm --out samples/red --prompt "a large red circle on a white background" \
      --num_samples 8 --guidance_scale 3 --steps 50 --sampler dpmpp_2m
  python sample.py --workdir runs/shapes_ldm --out samples/edit --prompt "a blue square" \
      --init_image in.png --strength 0.6            # image-to-image; add --mask m.png (white = repaint) to inpaint
  python sample.py --pretrained exported_or_diffusers_dir --out samples/sd --prompt "…" --height 512 --width 512
  python sample.py --pretrained pretrained/sd15 --out samples/lora --prompt "…" \
      --lora runs/sd15_lora/pytorch_lora_weights.safetensors:0.8 --lora style_kohya.safetensors:0.5 \
      --textual_inversion learned_embeds.safetensors    # adapters and embeddings (ldm_jax.sampling.adapters)
  python sample.py --pretrained sdxl-base-1.0/ --out samples/xl --prompt "…" --height 768 --width 1344 \
      --guidance_scale 5 --timestep_spacing leading --steps_offset 1 --original_size 1024,1024   # SDXL
  python sample.py --pretrained sdxl-base-1.0/ --refiner sdxl-refiner-1.0/ --denoising_end 0.8 --out samples/xlr \
      --prompt "…" --height 1024 --width 1024 --guidance_scale 5 --vae_tiling --vae_tile_size 512   # + refiner

Multi-host: the same command on every host with --coordinator_address=HOST0:PORT --num_processes=N
--process_id=I (nothing to add on TPU pods or under SLURM/Open MPI); the batches are spread over
the devices of all hosts and process 0 writes the outputs.

Writes DIR/grid.png, DIR/images/00000.png …, DIR/samples.npz (`images` uint8 N×H×W×C, `labels`
or `prompts`) and DIR/sampling.json (the settings), all at once at the end. Every flag is checked
against the model before anything is compiled (for --workdir, before any weight is read); a bad
one stops the run with a message naming it and nothing written. See `ldm_jax.sampling`.
"""

from absl import flags, logging

from ldm_jax import sampling
from ldm_jax.config.diffusion import SAMPLERS, SPACINGS
from ldm_jax.convert import lora as lora_files
from ldm_jax.runtime import cli, distributed
from ldm_jax.runtime.logging import setup_logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Stage-2 run directory (train_diffusion.py --workdir).")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "Instead of --workdir: a pretrained directory, diffusers "
                                   "pipeline folder or single-file checkpoint (ldm_jax.load.load_pretrained).")
_OUT = flags.DEFINE_string("out", None, "Output directory; must not exist or be empty.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "Images to make (default: one per prompt of "
                                    "--prompts_file, or one per class with --class_label all).")
_PROMPT = flags.DEFINE_string("prompt", None, "Text prompt (text-conditional models).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "File with one prompt per line, cycled over the samples.")
_CLASS_LABEL = flags.DEFINE_string("class_label", None, "Class index, or 'all' to cycle the classes "
                                   "(class-conditional models).")
_NEGATIVE = flags.DEFINE_string("negative_prompt", None, "Prompt of guidance's unconditional branch (default '').")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 3.0, "Classifier-free guidance scale (1 = no guidance).")
_RESCALE = flags.DEFINE_float("guidance_rescale", 0.0, "Guidance rescale φ in [0, 1] (Lin et al. 2024).")
_INTERVAL = flags.DEFINE_list("guidance_interval", None, "LO,HI: guide only the steps at timesteps LO <= t <= HI "
                              "(Kynkäänniemi et al. 2024); default: every step.")
_STEPS = flags.DEFINE_integer("steps", 50, "Sampler steps.")
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM η (0 = deterministic).")
_SAMPLER = flags.DEFINE_enum("sampler", "ddim", SAMPLERS, "Sampler.")
_SPACING = flags.DEFINE_enum("timestep_spacing", "uniform", SPACINGS, "Timesteps: 'uniform' (CompVis), 'quadratic', "
                             "or diffusers' 'leading' / 'linspace' / 'trailing', as the sampler's diffusers scheduler.")
_OFFSET = flags.DEFINE_integer("steps_offset", 0, "diffusers' steps_offset (1 in Stable Diffusion's scheduler "
                               "configs); moves 'leading' timesteps.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per compiled call, a multiple of the device count.")
_HEIGHT = flags.DEFINE_integer("height", None, "Image height in pixels (default: the training size).")
_WIDTH = flags.DEFINE_integer("width", None, "Image width in pixels (default: the training size).")
_INIT = flags.DEFINE_string("init_image", None, "Image-to-image: start from this image.")
_STRENGTH = flags.DEFINE_float("strength", None, "Image-to-image strength in [0, 1] (default 0.6; 1.0 with --mask).")
_MASK = flags.DEFINE_string("mask", None, "Inpainting mask, the init image's size: white = repaint, black = keep.")
_EMA = flags.DEFINE_bool("use_ema", True, "Use the EMA weights (--nouse_ema: the raw ones).")
_INTERMEDIATES = flags.DEFINE_list("save_intermediates", [], "Step indices whose x0 predictions are drawn "
                                   "in intermediates.png, e.g. 0,10,20.")
_ATTENTION = flags.DEFINE_string("attention", None, "Attention implementation of the U-Net and autoencoder: "
                                 "auto | xla | blocked | cudnn | pallas (default: the model's model.attention).")
_LATENTS = flags.DEFINE_string("latents", None, "A .npy file of initial latents, float32 [N, h, w, c] (NHWC, unit "
                                "variance), instead of noise drawn from --seed (reproduces another framework's run).")
_ORIGINAL_SIZE = flags.DEFINE_list("original_size", None, "SDXL: original image size H,W (default: --height,--width).")
_CROPS = flags.DEFINE_list("crops_coords_top_left", ["0", "0"], "SDXL: crop offsets top,left.")
_TARGET_SIZE = flags.DEFINE_list("target_size", None, "SDXL base: target size H,W (default: --height,--width).")
_AESTHETIC = flags.DEFINE_float("aesthetic_score", 6.0, "SDXL refiner: aesthetic score of the conditional branch.")
_NEG_AESTHETIC = flags.DEFINE_float("negative_aesthetic_score", 2.5, "SDXL refiner: aesthetic score of the "
                                    "unconditional branch.")
_LORA = flags.DEFINE_multi_string("lora", [], "FILE[:SCALE]: a LoRA (diffusers/PEFT or kohya .safetensors, or a "
                                  "folder with pytorch_lora_weights.safetensors) added to the weights with SCALE "
                                  "(default 1); repeat for several.")
_REFINER = flags.DEFINE_string("refiner", None, "SDXL ensemble of experts: a refiner (pretrained directory or "
                                "diffusers folder) that denoises after --denoising_end and decodes.")
_DENOISING_END = flags.DEFINE_float("denoising_end", None, "With --refiner: the fraction of the denoising the "
                                    "model does before the refiner takes over (diffusers' denoising_end, e.g. 0.8).")
_VAE_TILING = flags.DEFINE_bool("vae_tiling", False, "Decode in overlapping, blended tiles (diffusers' "
                                "enable_tiling): large images on small memory.")
_VAE_TILE_SIZE = flags.DEFINE_integer("vae_tile_size", None, "--vae_tiling: tile side in pixels (default: the "
                                      "autoencoder's sample size, as diffusers).")
_VAE_TILE_OVERLAP = flags.DEFINE_float("vae_tile_overlap", 0.25, "--vae_tiling: fraction of a tile shared with "
                                       "its neighbours.")
_TI = flags.DEFINE_multi_string("textual_inversion", [], "A learned_embeds .safetensors whose token the prompts "
                                "may use (pretrained text encoders); repeatable.")
flags.mark_flag_as_required("out")
distributed.define_flags()


def _int(flag: str, value: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"--{flag}: expected an integer, got {value!r}.") from None


def _pair(flag: str, values) -> tuple[int, int] | None:
  if values is None:
    return None
  if len(values) != 2:
    raise ValueError(f"--{flag}: expected two comma-separated integers, got {','.join(values)!r}.")
  return tuple(_int(flag, v) for v in values)


def request_from_flags() -> sampling.SampleRequest:
  """The parsed flags as a request; reads --prompts_file."""
  if _PROMPT.value is not None and _PROMPTS_FILE.value is not None:
    raise ValueError("--prompt / --prompts_file: give one of them.")
  prompts = None
  if _PROMPT.value is not None:
    prompts = (_PROMPT.value,)
  elif _PROMPTS_FILE.value is not None:
    try:
      with open(_PROMPTS_FILE.value) as f:
        prompts = tuple(line.strip() for line in f if line.strip())
    except OSError as e:
      raise FileNotFoundError(f"--prompts_file: cannot read {_PROMPTS_FILE.value} ({e.strerror}).") from e
    if not prompts:
      raise ValueError(f"--prompts_file: {_PROMPTS_FILE.value} has no prompts (one per line).")
  label = _CLASS_LABEL.value
  if label is not None and label != "all":
    label = _int("class_label", label)
  return sampling.SampleRequest(
      out=_OUT.value, workdir=_WORKDIR.value, pretrained=_PRETRAINED.value, num_samples=_NUM_SAMPLES.value,
      prompts=prompts, class_labels=label, negative_prompt=_NEGATIVE.value, guidance_scale=_GUIDANCE.value,
      guidance_rescale=_RESCALE.value, guidance_interval=_pair("guidance_interval", _INTERVAL.value),
      steps=_STEPS.value, eta=_ETA.value, sampler=_SAMPLER.value,
      timestep_spacing=_SPACING.value, steps_offset=_OFFSET.value,
      seed=_SEED.value, batch_size=_BATCH.value, height=_HEIGHT.value, width=_WIDTH.value,
      init_image=_INIT.value, strength=_STRENGTH.value, mask=_MASK.value, use_ema=_EMA.value,
      save_intermediates=tuple(_int("save_intermediates", i) for i in _INTERMEDIATES.value),
      attention=_ATTENTION.value, latents=_LATENTS.value,
      original_size=_pair("original_size", _ORIGINAL_SIZE.value),
      crops_coords_top_left=_pair("crops_coords_top_left", _CROPS.value), target_size=_pair("target_size", _TARGET_SIZE.value),
      aesthetic_score=_AESTHETIC.value, negative_aesthetic_score=_NEG_AESTHETIC.value,
      lora=tuple(lora_files.parse_lora_spec(v) for v in _LORA.value), textual_inversion=tuple(_TI.value),
      refiner=_REFINER.value, denoising_end=_DENOISING_END.value, vae_tiling=_VAE_TILING.value,
      vae_tile_size=_VAE_TILE_SIZE.value, vae_tile_overlap=_VAE_TILE_OVERLAP.value)


def main(argv):
  del argv
  setup_logging()
  distributed.initialize_from_flags()
  summary = sampling.sample_to_dir(request_from_flags())
  logging.info("Done: %s", summary)


if __name__ == "__main__":
  cli.run(main)
