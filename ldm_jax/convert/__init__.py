"""File formats ↔ in-memory `Pretrained` bundles: diffusers folders, CompVis/Stability single files,
transformers text encoders, and ldm_jax's own pretrained directories.

    from ldm_jax.load import load_pretrained, read_workdir     # reading models: ldm_jax.load
    from ldm_jax.convert import save_pretrained, write_diffusers
    write_diffusers('exported/', read_workdir('runs/ldm'))

Command line (`python -m ldm_jax.convert --help`):

    python -m ldm_jax.convert import --src SD_FOLDER_OR_FILE --out PRETRAINED_DIR
    python -m ldm_jax.convert export --workdir RUN --format diffusers|safetensors --out DIR

Modules: `naming` (the torch ↔ flax renaming rule and its mismatch report), `diffusers_format`
(diffusers configs and folders), `transformers_text` (CLIP/BERT configs), `single_file` (CompVis /
Stability single files: SD 1.x, 2.x, SDXL) with its key maps `compvis` (U-Net, first stage, BERTEmbedder)
and `single_file_text` (CLIP, OpenCLIP, SDXL's conditioner), `pretrained` (the `Pretrained` bundle, ldm_jax's pretrained directories, reading diffusers
folders), `export` (bundles → diffusers folders), `components` (building each component),
`safetensors_io` (file reading and writing), `lora` (diffusers/PEFT and kohya LoRA
files), `textual_inversion` (placeholder tokens and `learned_embeds.safetensors`).
"""

from ldm_jax.convert.export import write_diffusers
from ldm_jax.convert.naming import WeightMismatchError
from ldm_jax.convert.pretrained import Pretrained, save_pretrained
