"""Class-conditional LDM on Fashion-MNIST, on the latents (8×8×4) of `fmnist_kl_f4`.

  python train_autoencoder.py --config configs/autoencoder/fmnist_kl_f4.py --workdir runs/fmnist_ae
  python train_diffusion.py --config configs/ldm/fmnist_class_cond.py --workdir runs/fmnist_ldm
Labels enter through a class embedding added to the time embedding; 10% are dropped to the null
class so that samples can use classifier-free guidance (sampled at scale 4 on the steps t <= 400);
the network predicts v on a schedule whose last step is pure noise.
Latents are cached (encoded once).
"""

from ldm_jax.config import common as config_lib
from ldm_jax.config import diffusion


def get_config(arg=None):
  options = config_lib.parse_arg(arg)
  config_lib.check_options(options, {"smoke"}, "fmnist_class_cond")
  config = diffusion.default_config()
  config.autoencoder.workdir = "runs/fmnist_ae"
  config.data.update(source="idx", path="/usr/share/datasets/fashion-mnist", image_size=32, channels=1)
  config.cond.update(kind="class", num_classes=10, class_mode="embedding", dropout_prob=0.1)
  config.model.update(model_channels=64, channel_mult=(1, 2), num_res_blocks=2, attention_resolutions=(2,),
                      num_head_channels=32, context_dim=None)
  config.latent.cache = True
  config.optim.update(learning_rate=3e-4, warmup_steps=200, ema_decay=0.999)
  # v-prediction on a zero-terminal-SNR schedule (Lin et al. 2024), sampled with guidance 4 on the
  # steps t <= 400 only: class accuracy at the real images' level and their brightness (README,
  # "Fashion-MNIST class-conditional LDM, measured").
  config.diffusion.update(zero_terminal_snr=True, parameterization="v")
  config.sample.update(sampler="ddim", num_steps=50, guidance_scale=4.0, guidance_interval=(0, 400), num_images=20)
  config.train.update(num_steps=3_000, batch_size=64, log_every=100, checkpoint_every=1_000,
                      image_every=1_000, eval_every=1_000)
  if "smoke" in options:
    diffusion.apply_smoke(config)
  return config
