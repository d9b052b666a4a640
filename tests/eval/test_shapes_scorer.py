"""The demo's judge: a shapes classifier that checks images against 'quadrants' prompts."""

import numpy as np
import pytest

from ldm_jax.data import shapes
from ldm_jax.eval import shapes_scorer
from tests.conftest import shared_run

PROMPTS = ["a red circle at the top left on a white background",
           "a blue square at the bottom right on a black background",
           "a yellow star at the top right on a gray background",
           "a purple diamond at the bottom left on a beige background",
           "a cyan cross at the top left on a navy background",
           "a green triangle at the bottom left on a gray background",
           "an orange diamond at the top right on a navy background",
           "a red star at the bottom right on a white background"] * 4


def _swap(prompt, attribute, values):
  """`prompt` with `attribute` replaced by the next value of `values` (always a different one)."""
  labels = shapes.parse_quadrant_caption(prompt)
  labels[attribute] = values[(values.index(labels[attribute]) + 1) % len(values)]
  article = 'an' if labels['colour'][0] in 'aeiou' else 'a'
  return (f"{article} {labels['colour']} {labels['kind']} at the {labels['position']} "
          f"on a {labels['background']} background")


# Colour, quadrant and background are learned in a few dozen steps; kind takes the demo's 400
# (98 % on drawn images of the demo prompts). A short run keeps this test fast, so its kind
# checks are relative: right prompts well above chance and well above wrong ones.
SCORER_STEPS = 150
EASY = ('colour', 'position', 'background')


def _train_and_save(directory):
  shapes_scorer.save_scorer(shapes_scorer.train_scorer(num_steps=SCORER_STEPS, image_size=32, progress=False),
                            directory)


@pytest.fixture(scope='module')
def scorer(tmp_path_factory):
  # Trained once for all test workers; loaded as the demo does on a rerun.
  return shapes_scorer.load_scorer(shared_run(tmp_path_factory, 'shapes_scorer', _train_and_save))


@pytest.fixture(scope='module')
def images():
  rng = np.random.default_rng(1)
  return np.stack([shapes.draw_scene(shapes.quadrant_scene(p, rng), 32) for p in PROMPTS])


def test_drawn_images_of_the_prompts_score_high(scorer, images):
  scores = shapes_scorer.score(scorer, images, PROMPTS)
  assert all(scores[k] >= 0.95 for k in EASY), scores
  assert scores['kind'] >= 0.4, scores  # chance: 1/6


@pytest.mark.parametrize('attribute', list(shapes_scorer.ATTRIBUTES))
def test_a_prompt_that_differs_in_one_attribute_scores_low_on_it_only(scorer, images, attribute):
  right = shapes_scorer.score(scorer, images, PROMPTS)
  wrong = [_swap(p, attribute, list(shapes_scorer.ATTRIBUTES[attribute])) for p in PROMPTS]
  scores = shapes_scorer.score(scorer, images, wrong)
  if attribute == 'kind':
    assert scores['kind'] <= right['kind'] - 0.15, (scores, right)
  else:
    assert scores[attribute] <= 0.05, scores
  assert all(scores[k] == right[k] for k in shapes_scorer.ATTRIBUTES if k != attribute), (scores, right)


def test_recoloured_images_score_low_on_colour(scorer, images):
  """The same shapes repainted red (or blue where red was asked) fail the colour check."""
  rng = np.random.default_rng(1)
  recoloured = []
  for prompt in PROMPTS:
    scene = shapes.quadrant_scene(prompt, rng)
    scene['shapes'][0]['color'] = 'blue' if scene['shapes'][0]['color'] == 'red' else 'red'
    recoloured.append(shapes.draw_scene(scene, 32))
  scores = shapes_scorer.score(scorer, np.stack(recoloured), PROMPTS)
  assert scores['colour'] <= 0.05 and scores['position'] >= 0.95, scores


def test_bad_inputs_are_named(scorer, images):
  with pytest.raises(ValueError, match='2 images but 1 prompts'):
    shapes_scorer.score(scorer, images[:2], PROMPTS[:1])
  with pytest.raises(ValueError, match='not a shapes quadrant caption'):
    shapes_scorer.score(scorer, images[:1], ['a red circle on a white background'])
  with pytest.raises(ValueError, match='32x32'):
    shapes_scorer.score(scorer, images[:, :16, :16], PROMPTS)
  with pytest.raises(FileNotFoundError, match='train a scorer first'):
    shapes_scorer.load_scorer('/nonexistent/scorer')
