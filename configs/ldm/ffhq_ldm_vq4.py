"""The paper's unconditional FFHQ 256 LDM-VQ-4 (CompVis `ffhq-ldm-vq-4.yaml`, 274M U-Net).

Data: the 70k FFHQ images at 256 px (or larger; resized and center-cropped) in one folder,
optionally split into `train/` and `test/` sub-folders — `--config.data.path=/data/ffhq`.
(TFDS has no FFHQ builder; any prepared TFDS image set works with `data.source=tfds`.)

  python train_autoencoder.py --config configs/autoencoder/vq_f4.py --workdir runs/vq_f4 …
  python train_diffusion.py --config configs/ldm/ffhq_ldm_vq4.py --workdir runs/ffhq_ldm \
      --config.data.path=/data/ffhq

U-Net on the 64×64×3 pre-quantization latents of `vq_f4`: 224 channels × (1, 2, 3, 4), two
ResNet blocks per level, self-attention with 32-channel heads at 32², 16² and 8² (ds 2, 4, 8).
The reference trains with lr = base_learning_rate 2e-6 × batch 42 × 1 GPU = 8.4e-5, the paper's
value (`optim.learning_rate` is this effective rate; it does not follow `train.batch_size`),
constant, AdamW (torch defaults: weight decay 0.01, no clipping), EMA 0.9999, scale_factor 1
(VQ latents unscaled), 635k steps: `celebahq_ldm_vq4.py` with FFHQ's batch, rate and length
(and its `:smoke`).
"""

import os

from ldm_jax.config import common as config_lib


def get_config(arg=None):
  options = config_lib.parse_arg(arg)
  config_lib.check_options(options, {"smoke"}, "ffhq_ldm_vq4")
  config = config_lib.from_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "celebahq_ldm_vq4.py")
                                + (f":{arg}" if arg else ""))
  if "smoke" not in options:
    config.optim.learning_rate = 8.4e-5
    config.train.update(num_steps=635_000, batch_size=42)
  return config
