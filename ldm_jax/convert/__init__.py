"""Weight import and export: diffusers folders, CompVis/Stability single files, transformers text encoders.

    from ldm_jax.convert import load_pretrained
    modules, params, configs = load_pretrained('stable-diffusion-v1-5/')   # a local diffusers folder
    eps = modules['unet'].apply({'params': params['unet']}, z_t, t, context)

Command line (`python -m ldm_jax.convert --help`):

    python -m ldm_jax.convert import --src SD_FOLDER_OR_FILE --out PRETRAINED_DIR
    python -m ldm_jax.convert export --workdir RUN --format diffusers|safetensors --out DIR

Modules: `naming` (the torch ↔ flax renaming rule and its mismatch report), `diffusers` (diffusers
configs and folders), `transformers_text` (CLIP/BERT configs), `compvis` (single-file key maps),
`pretrained` (ldm_jax's pretrained directories, `load_pretrained`), `export` (workdirs → files),
`safetensors_io` (file reading and writing), `lora` (diffusers/PEFT and kohya LoRA files),
`textual_inversion` (placeholder tokens and `learned_embeds.safetensors`).
"""

from ldm_jax.convert.export import read_workdir, write_diffusers
from ldm_jax.convert.naming import WeightMismatchError
from ldm_jax.convert.pretrained import Pretrained, load_pretrained, read_source, save_pretrained
