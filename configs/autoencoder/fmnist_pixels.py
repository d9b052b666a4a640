"""No autoencoder (f = 1): stage 2 diffuses Fashion-MNIST's 32×32×1 pixels (the paper's LDM-1).

  python train_autoencoder.py --config configs/autoencoder/fmnist_pixels.py --workdir runs/fmnist_pixels
writes the run's config and an empty checkpoint (nothing to train); any stage-2 config then trains
on the pixels with --config.autoencoder.workdir=runs/fmnist_pixels, e.g. `configs/ldm/fmnist_class_cond.py`
(`benchmarks/compression_tradeoff.py` compares it with f = 2, 4, 8).
"""

from ldm_jax.config import autoencoder
from ldm_jax.config import common as config_lib


def get_config(arg=None):
  options = config_lib.parse_arg(arg)
  config_lib.check_options(options, {"smoke"}, "fmnist_pixels")
  config = autoencoder.default_config()
  config.data.update(source="idx", path="/usr/share/datasets/fashion-mnist", image_size=32, channels=1)
  config.model.update(kind="identity", ch_mult=(1,), embed_dim=1)
  if "smoke" in options:
    autoencoder.apply_smoke(config)
    config.model.update(ch_mult=(1,))
  return config
