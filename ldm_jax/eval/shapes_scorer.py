"""Does a text-to-image sample show what its prompt asks for? A judge for `make demo`.

The judge is a small CNN (`JudgeNet`, one output per attribute value) trained on freshly drawn images of the shapes data set's 'quadrants' layout and their own labels — kind,
colour, position (quadrant) and background, all colour–kind pairs included — never on anything a
diffusion model made. `score` parses each prompt ('a red circle at the top left on a white
background') and reports, per attribute, the fraction of samples whose predicted value is the
prompt's.

    scorer = train_scorer(num_steps=400)
    save_scorer(scorer, 'runs/demo/scorer'); scorer = load_scorer('runs/demo/scorer')
    score(scorer, images_uint8, prompts)   # {'kind': 0.9, 'colour': 1.0, 'position': …, 'background': …}
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import flax.linen as nn

from ldm_jax.data import shapes
from ldm_jax.nn import GroupNorm

ATTRIBUTES = {
    'kind': shapes.KINDS,
    'colour': tuple(shapes.COLORS),
    'position': tuple(shapes.QUADRANTS),
    'background': tuple(shapes.BACKGROUNDS),
}
_SPLITS = np.cumsum([len(v) for v in ATTRIBUTES.values()])[:-1]
_PARAMS_FILE, _INFO_FILE = 'scorer.msgpack', 'scorer.json'


class JudgeNet(nn.Module):
  """Conv-GroupNorm-SiLU pairs per level, 2× max pooling between levels; the last feature map is
  max-pooled over each image quadrant (a shape is a local detail that a global average would
  dilute in the background, and the quadrant is one of the attributes) and averaged over the whole
  image (the background), then Dense → SiLU → Dense to the logits of every attribute value.

  x: [B, S, S, 3] in [-1, 1], S divisible by 2 ** len(widths) → logits [B, num_outputs].
  """
  num_outputs: int
  widths: tuple[int, ...] = (16, 32, 64)

  @nn.compact
  def __call__(self, x):
    h = x.astype(jnp.float32)
    for level, width in enumerate(self.widths):
      if level:
        h = nn.max_pool(h, (2, 2), (2, 2))
      for _ in range(2):
        h = nn.silu(GroupNorm(num_groups=8)(nn.Conv(width, (3, 3))(h)))
    b, height, width, c = h.shape
    quadrants = h.reshape(b, 2, height // 2, 2, width // 2, c).max(axis=(2, 4)).reshape(b, 4 * c)
    features = jnp.concatenate([quadrants, h.mean(axis=(1, 2))], axis=-1)
    return nn.Dense(self.num_outputs)(nn.silu(nn.Dense(2 * self.widths[-1])(features)))


@dataclasses.dataclass(frozen=True)
class Scorer:
  """The judge, its parameters and what it was trained on (`info`: image_size, widths, …)."""
  model: JudgeNet
  params: dict
  info: dict


def _model(widths) -> JudgeNet:
  return JudgeNet(num_outputs=int(sum(len(v) for v in ATTRIBUTES.values())), widths=tuple(widths))


def labelled_batch(rng: np.random.Generator, batch_size: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images [B, S, S, 3] of random 'quadrants' scenes and their labels int32 [B, 4]
  (indices into the values of each attribute of `ATTRIBUTES`, in its order)."""
  images, labels = [], []
  for _ in range(batch_size):
    scene = shapes.sample_scene(rng, layout='quadrants')
    images.append(shapes.draw_scene(scene, image_size))
    labels.append(_indices(shapes.scene_labels(scene)))
  return np.stack(images), np.array(labels, np.int32)


def _indices(labels: dict[str, str]) -> list[int]:
  return [values.index(labels[name]) for name, values in ATTRIBUTES.items()]


def _to_model(images) -> jax.Array:
  return jnp.asarray(images, jnp.float32) / 127.5 - 1.0


def _logits(model, params, x) -> list[jax.Array]:
  return jnp.split(model.apply({'params': params}, x), _SPLITS, axis=-1)


def train_scorer(*, num_steps: int = 400, batch_size: int = 64, image_size: int = 32,
                 widths: tuple[int, ...] = (16, 32, 64), learning_rate: float = 3e-3, noise: float = 0.1,
                 seed: int = 0, progress: bool = True) -> Scorer:
  """Trains the judge from scratch on freshly drawn scenes (a new batch every step).

  `noise`: the std of Gaussian noise added to the training images (in [-1, 1] units, per image a
  random fraction of it), so that the judge does not depend on the perfectly flat colours of drawn
  images that samples do not have.
  """
  model = _model(widths)
  rng = np.random.default_rng(seed)
  optimizer = optax.adamw(optax.cosine_decay_schedule(learning_rate, num_steps))
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, image_size, image_size, 3)))['params']
  opt_state = optimizer.init(params)

  @jax.jit
  def step(params, opt_state, images, labels, key):
    x = _to_model(images)
    x = x + noise * jax.random.uniform(key, (x.shape[0], 1, 1, 1)) * jax.random.normal(key, x.shape)

    def loss_fn(p):
      return sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels[:, i]).mean()
                 for i, logits in enumerate(_logits(model, p, x)))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  key = jax.random.PRNGKey(seed)
  for i in tqdm(range(num_steps), desc='shapes scorer', disable=not progress):
    params, opt_state, _ = step(params, opt_state, *labelled_batch(rng, batch_size, image_size),
                                jax.random.fold_in(key, i))
  info = {'image_size': image_size, 'widths': list(widths), 'num_steps': num_steps, 'batch_size': batch_size,
          'learning_rate': learning_rate, 'noise': noise, 'seed': seed}
  return Scorer(model, params, info)


def save_scorer(scorer: Scorer, directory: str) -> None:
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, _PARAMS_FILE), 'wb') as f:
    f.write(flax.serialization.to_bytes(scorer.params))
  with open(os.path.join(directory, _INFO_FILE), 'w') as f:
    json.dump(scorer.info, f, indent=2)


def is_saved(directory: str) -> bool:
  """Whether `save_scorer` wrote a scorer in `directory`."""
  return all(os.path.exists(os.path.join(directory, name)) for name in (_INFO_FILE, _PARAMS_FILE))


def load_scorer(directory: str) -> Scorer:
  """The scorer `save_scorer` wrote in `directory`; FileNotFoundError naming it when there is none."""
  info_path, params_path = (os.path.join(directory, name) for name in (_INFO_FILE, _PARAMS_FILE))
  if not is_saved(directory):
    raise FileNotFoundError(f'{directory}: no {_INFO_FILE} and {_PARAMS_FILE}; train a scorer first')
  with open(info_path) as f:
    info = json.load(f)
  model = _model(info['widths'])
  size = info['image_size']
  # The parameters' structure only: an initialised template compiled each initialiser (4 s).
  template = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))['params']
  with open(params_path, 'rb') as f:
    params = flax.serialization.from_bytes(template, f.read())
  return Scorer(model, params, info)


def predict(scorer: Scorer, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
  """uint8 images [N, S, S, 3] at the scorer's size → {attribute: predicted value index [N]}."""
  size = scorer.info['image_size']
  if images.ndim != 4 or images.shape[1:] != (size, size, 3):
    raise ValueError(f'shapes scorer: expected RGB images of {size}x{size}, got shape {images.shape}')
  outputs = [_predict(scorer.model, scorer.params, images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
  return {name: np.concatenate([np.asarray(out[a]) for out in outputs])
          for a, name in enumerate(ATTRIBUTES)}


@functools.partial(jax.jit, static_argnums=0)  # compiled once per model and batch shape
def _predict(model: JudgeNet, params, images) -> list[jax.Array]:
  return [jnp.argmax(logits, -1) for logits in _logits(model, params, _to_model(images))]


def correct(scorer: Scorer, images: np.ndarray, prompts) -> dict[str, np.ndarray]:
  """{attribute: bool [N]}: does sample i show the value prompt i names? (`prompts`: N
  'quadrants' captions; ValueError naming one that is not.)"""
  if len(prompts) != len(images):
    raise ValueError(f'shapes scorer: {len(images)} images but {len(prompts)} prompts')
  wanted = np.array([_indices(shapes.parse_quadrant_caption(p)) for p in prompts], np.int32).reshape(-1, 4)
  predicted = predict(scorer, images)
  return {name: predicted[name] == wanted[:, a] for a, name in enumerate(ATTRIBUTES)}


def score(scorer: Scorer, images: np.ndarray, prompts) -> dict[str, float]:
  """{attribute: accuracy} of `images` against their `prompts` (see `correct`)."""
  return {name: float(np.mean(hits)) for name, hits in correct(scorer, images, prompts).items()}
