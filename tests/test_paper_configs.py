"""The paper's stage-2 configs (configs/ldm/*) against the reference models they reproduce.

Full configs are resolved and validated against their stage-1 config (`ldm_jax.train.diffusion.setup.resolve_config`
runs every stage-2 check: data, conditioning, U-Net against the latents), and their models are
counted with `jax.eval_shape` (nothing is allocated). The reference counts were obtained by
instantiating CompVis `openaimodel.UNetModel`, x-transformers `TransformerWrapper(Encoder)` and
`ClassEmbedder` with each YAML's parameters on torch's meta device. The text-to-image total,
U-Net + BERT-style encoder with its (unused) logits head, is the paper's 1.45B; the SD 1.x count
is diffusers' (as in tests/models/test_unet.py).
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ldm_jax import data as data_lib
from ldm_jax.data.tokenizer import build_tokenizer
from ldm_jax.models import autoencoder as ae_lib
from ldm_jax.models import conditioning
from ldm_jax.models import unet as unet_lib
from ldm_jax.train.diffusion import setup
from tests.conftest import load_config

# config → (stage-1 config, reference YAML, U-Net parameters of the reference, latent shape)
PAPER = {
    "celebahq_ldm_vq4": ("vq_f4", "celebahq-ldm-vq-4.yaml", 274_056_163, (64, 64, 3)),
    "ffhq_ldm_vq4": ("vq_f4", "ffhq-ldm-vq-4.yaml", 274_056_163, (64, 64, 3)),
    "lsun_churches_ldm_kl8": ("kl_f8", "lsun_churches-ldm-kl-8.yaml", 294_966_916, (32, 32, 4)),
    "cin256_ldm_vq4": ("vq_f4", "cin256-v2.yaml", 400_920_579, (64, 64, 3)),
    "txt2img_ldm_kl8": ("kl_f8", "txt2img-1p4B-eval.yaml", 872_300_484, (32, 32, 4)),
    "sd_v1": ("kl_f8", "stable-diffusion v1-inference.yaml", 859_520_964, (64, 64, 4)),
}
# Trainable conditioner parameters: x-transformers Encoder(dim=1280, depth=32) with token and
# position embeddings (581,994,042 minus the 39,098,682 of the logits head, unused for embeddings);
# ClassEmbedder(1001, 512); for SD the jointly trained CLIP-L-sized stand-in (CLIP's own text
# model has 123,060,480: it adds biases to q, k and v).
CONDITIONER_PARAMS = {"txt2img_ldm_kl8": 542_895_360, "cin256_ldm_vq4": 512_512, "sd_v1": 123_032_832}


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """A labelled folder with train/, val/ and test/ splits: enough for `data.source='folder'` checks."""
  root = tmp_path_factory.mktemp("images")
  for split in ("train", "val", "test"):
    for label in ("n01", "n02"):
      os.makedirs(root / split / label)
      Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(root / split / label / "x.png")
      (root / split / label / "x.txt").write_text("a gray square")
  return str(root)


def _resolved(name, image_folder, arg=""):
  config = load_config(f"configs/ldm/{name}.py{arg}")
  ae_config = load_config(f"configs/autoencoder/{PAPER[name][0]}.py{arg}")
  if not arg:
    config.data.path = image_folder
    ae_config.data.image_size = config.data.image_size  # SD's VAE is recorded at 512 px
  setup.resolve_config(config, ae_config)
  return config, ae_config


class _FixedTokenizer:
  vocab_size, pad_id = 1000, 0

  def __init__(self, max_length):
    self.max_length = max_length


def _random_like(init, *args, **kwargs):
  """Random variables of `init`'s shapes. Shapes come from `jax.eval_shape`: initializing for real
  outside jit would compile every initializer op by op, which costs more than the forward pass;
  the values also make conv_out (zero-initialized, as CompVis) nonzero."""
  shapes = jax.eval_shape(init, jax.random.key(0), *args, **kwargs)
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape), s.dtype), shapes)


def _inputs(config, latent, batch):
  context = None if config.model.context_dim is None else jnp.zeros((batch, 77, config.model.context_dim))
  y = None if config.model.num_classes is None else jnp.zeros((batch,), jnp.int32)
  return jnp.zeros((batch, *latent[:2], config.model.in_channels)), jnp.zeros((batch,)), context, y


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_config_validates_and_has_the_reference_unet(name, image_folder):
  config, ae_config = _resolved(name, image_folder)
  latent = ae_lib.latent_shape(ae_config.model, config.data.image_size)
  assert tuple(latent) == PAPER[name][3]
  unet = unet_lib.make_unet(config.model)
  shapes = jax.eval_shape(unet.init, jax.random.key(0), *_inputs(config, latent, 1))
  assert _count(shapes) == PAPER[name][2], f"{name}: the reference ({PAPER[name][1]}) has {PAPER[name][2]:,}"
  params = shapes["params"]
  # One attention module per ResNet block at the attended levels (down: n, up: n + 1) + the middle one.
  n = config.model.num_res_blocks
  attended = sum(2**level in config.model.attention_resolutions for level in range(len(config.model.channel_mult)))
  num_attention = sum(k.startswith("attentions") for block in params.values() for k in block)
  assert num_attention == (2 * n + 1) * attended + 1
  widths = [params[f"down_blocks_{level}"]["resnets_0"]["conv2"]["kernel"].shape[-1]
            for level in range(len(config.model.channel_mult))]
  assert widths == [config.model.model_channels * mult for mult in config.model.channel_mult]


@pytest.mark.parametrize("name", sorted(CONDITIONER_PARAMS))
def test_trainable_conditioner_has_the_reference_size(name, image_folder):
  config, _ = _resolved(name, image_folder)
  conditioner = conditioning.make_conditioner(config.cond, _FixedTokenizer(config.cond.max_length))
  batch_cond = ({"tokens": jnp.zeros((1, config.cond.max_length), jnp.int32)} if config.cond.kind == "text"
                else {"label": jnp.zeros((1,), jnp.int32)})
  shapes = jax.eval_shape(lambda: conditioner.init(jax.random.key(0), batch_cond, deterministic=True))
  assert _count(shapes) == CONDITIONER_PARAMS[name]
  out = jax.eval_shape(lambda p: conditioner.apply(p, batch_cond, deterministic=True), shapes)
  assert out["context"].shape[-1] == config.model.context_dim


def test_reference_hyperparameters():
  # (betas, loss, scale_factor (0: 1/std), effective learning rate, warm-up, batch) of each reference.
  expected = {
      "celebahq_ldm_vq4": (0.0015, 0.0195, "l2", 1.0, 2e-6 * 48, 0, 48),
      "ffhq_ldm_vq4": (0.0015, 0.0195, "l2", 1.0, 2e-6 * 42, 0, 42),
      "lsun_churches_ldm_kl8": (0.0015, 0.0155, "l1", 0.0, 5e-5, 10_000, 96),
      "cin256_ldm_vq4": (0.0015, 0.0195, "l2", 1.0, 1e-4, 0, 1200),
      "txt2img_ldm_kl8": (0.00085, 0.012, "l2", 0.18215, 1e-4, 0, 680),
      "sd_v1": (0.00085, 0.012, "l2", 0.18215, 1e-4, 10_000, 2048),
  }
  for name, (start, end, loss, scale, lr, warmup, batch) in expected.items():
    c = load_config(f"configs/ldm/{name}.py")
    got = (c.diffusion.linear_start, c.diffusion.linear_end, c.diffusion.loss_type, c.latent.scale_factor,
           c.optim.learning_rate, c.optim.warmup_steps, c.train.batch_size)
    assert got[:4] == (start, end, loss, scale) and got[5:] == (warmup, batch), name
    assert math.isclose(got[4], lr, rel_tol=1e-9), name
    assert c.diffusion.beta_schedule == "scaled_linear"  # CompVis 'linear' = linspace of √β, squared
    assert c.optim.ema_decay == 0.9999
    guided = c.cond.kind != "none"
    assert c.cond.dropout_prob == (0.1 if guided else 0.0), name


def test_paper_configs_need_a_data_path():
  config = load_config("configs/ldm/celebahq_ldm_vq4.py")
  with pytest.raises(ValueError, match="data.path"):
    setup.resolve_config(config, load_config("configs/autoencoder/vq_f4.py"))


@pytest.mark.parametrize("name", sorted(PAPER))
def test_smoke_variant_runs_a_forward_pass(name, image_folder):
  config, ae_config = _resolved(name, image_folder, ":smoke")
  assert config.train.num_steps <= 20 and config.data.image_size <= 32
  assert config.autoencoder.workdir.endswith("_smoke")
  # The smoke model keeps the architecture's kind: conditioning, attention type, resblock options.
  full = load_config(f"configs/ldm/{name}.py")
  for key in ("use_spatial_transformer", "use_scale_shift_norm", "resblock_updown"):
    assert config.model[key] == full.model[key]
  assert config.cond.kind == full.cond.kind and config.cond.class_mode == full.cond.class_mode

  tokenizer = build_tokenizer(config.cond, data_lib.captions(config.data, config.data.train_split))
  conditioner = conditioning.make_conditioner(config.cond, tokenizer)
  batch = {"label": np.array([0, 1]), "caption": np.array(["a red circle", ""])}
  prepared = conditioning.prepare_condition(config.cond, batch, tokenizer)
  batch_cond = {k: jnp.asarray(v) for k, v in prepared.items()}
  cond = conditioner.apply(_random_like(conditioner.init, batch_cond, deterministic=True), batch_cond,
                           deterministic=True)
  latent = ae_lib.latent_shape(ae_config.model, config.data.image_size)
  unet = unet_lib.make_unet(config.model)
  x = jax.random.normal(jax.random.key(1), (2, *latent[:2], config.model.in_channels))
  t = jnp.array([10, 900])
  variables = _random_like(unet.init, x, t, context=cond["context"], y=cond["y"])
  out = unet.apply(variables, x, t, context=cond["context"], y=cond["y"])
  assert out.shape == x.shape[:3] + (latent[-1],)
  assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 0
