"""Text-to-image LDM on the built-in shapes, on the latents (8×8×4) of `shapes_kl_f4z4`: the demo's model.

  python train_autoencoder.py --config configs/autoencoder/shapes_kl_f4z4.py --workdir runs/shapes_ae
  python train_diffusion.py --config configs/ldm/shapes_txt2img.py --workdir runs/shapes_ldm
As the paper's text-to-image LDM: a transformer text encoder trained from scratch with the U-Net
(here 2 layers of width 128), its WordPiece tokenizer trained on the training captions, and
cross-attention at both latent resolutions (8, 4). 10% of captions are dropped to "" for guidance.

The data are the shapes 'quadrants' layout (one shape, named kind, colour, quadrant and background:
"a red circle at the top left on a white background"), without the colour–kind pairs of `HOLDOUT`,
so that `PROMPTS` can ask for combinations the model has never seen (the last three).
"""

from ldm_jax.config import common as config_lib
from ldm_jax.config import diffusion

# As in configs/autoencoder/shapes_kl_f4z4.py (tests/test_configs.py checks that they agree).
HOLDOUT = ("green triangle", "red star", "orange diamond", "blue cross", "purple circle", "cyan square")
PROMPTS = ("a red circle at the top left on a white background",
           "a blue square at the bottom right on a black background",
           "a yellow star at the top right on a gray background",
           "a purple diamond at the bottom left on a beige background",
           "a cyan cross at the top left on a navy background",
           "a green triangle at the bottom left on a gray background",   # held out
           "a red star at the bottom right on a white background",        # held out
           "an orange diamond at the top right on a navy background")     # held out


def get_config(arg=None):
  options = config_lib.parse_arg(arg)
  config_lib.check_options(options, {"smoke"}, "shapes_txt2img")
  config = diffusion.default_config()
  config.autoencoder.workdir = "runs/shapes_ae"
  config.data.update(source="shapes", image_size=32, channels=3, num_examples=10_000, shapes_layout="quadrants",
                     shapes_holdout=HOLDOUT)
  # The text encoder's mean token also goes to the U-Net's time embedding (`cond.pooled`, Imagen's
  # pooled embedding): with cross-attention alone the backgrounds of 600-step samples were at chance.
  config.cond.update(kind="text", dropout_prob=0.1, vocab_size=512, max_length=16, dim=128, depth=2,
                     num_heads=4, head_dim=32, pooled=True)
  # 64 channels × (1, 2) on the 8×8 latents, attention at both levels: the kind of a shape is drawn
  # at 8×8 (without attention there, or at 32 channels, kinds were learned more slowly per second).
  config.model.update(model_channels=64, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(1, 2),
                      num_head_channels=32, context_dim=128, addition_embed_type="text", addition_embed_dim=128)
  # v-prediction: the ε-prediction models of this budget drew latents 4.5× too large (their error
  # at the first, noisiest steps is amplified by 1/√ᾱ_t), decoded as noise; v-prediction samples
  # put every shape in its quadrant (notes_demo.md).
  config.diffusion.parameterization = "v"
  # SD3's logit-normal timesteps, centred below the middle (t ≈ 380): fewer updates on the
  # nearly pure-noise steps, more where colour and kind are decided (colour 73 → 99 % on the
  # f = 2 model of the same budget; notes_demo.md).
  config.diffusion.update(timestep_sampling="logit_normal", timestep_logit_mean=-0.5)
  config.latent.cache = True
  # Adam β2 = 0.99 (the default 0.999 averages squared gradients over ~1000 steps, most of this run):
  # kinds drawn 68 → 77 % for the demo prompts, 75 → 88 % for random ones, same latents
  # (notes_demo.md, 2026-12-05 evening).
  config.optim.update(learning_rate=1e-3, warmup_steps=100, schedule="cosine", b2=0.99, ema_decay=0.995)
  config.sample.update(sampler="ddim", num_steps=50, guidance_scale=3.0, num_images=len(PROMPTS), prompts=PROMPTS)
  config.train.update(num_steps=1100, batch_size=32, log_every=100, checkpoint_every=1100,
                      image_every=1100, eval_every=1100)
  if "smoke" in options:
    diffusion.apply_smoke(config)
  return config
