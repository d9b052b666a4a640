"""`shapes`: a synthetic captioned dataset of coloured shapes, drawn on the fly.

Two layouts (`data.shapes_layout`):

* 'relations' (the default): one or two flat shapes on a plain background, for
  example "a small red circle above a large blue square on a gray background".
* 'quadrants' (`make demo`): one shape of one size range inside one quadrant,
  named by the caption: "a red circle at the top left on a white background".
  Every attribute of the caption (kind, colour, position, background) is a
  label of the image (`scene_labels`), so a classifier can check samples
  against their prompts (`ldm_jax.eval.shapes_scorer`).

`holdout` (`data.shapes_holdout`, e.g. ('green triangle', 'red star')) names
colour–kind pairs that never occur in the 'train' split: a shape drawn as one
of them is drawn again. The 'test' split keeps them, so a text-to-image model
trained on 'train' can be asked for combinations it has never seen.

* `label` is the kind of the first shape named in the caption, an index into
  `KINDS` (6 classes).
* Sizes are "small" (about a quarter of the image side) or "large" (about
  0.45). With two shapes, the first lies entirely in one half of the image and
  the second in the opposite half, so the relation word ("above", "below",
  "to the left of", "to the right of") holds exactly. Horizontal flips would
  break left/right captions; keep `data.random_flip` off for this source.
* A record is a pure function of (split, index): the split name seeds the
  generator, so 'train' and 'test' hold different images. The 'train' split
  has `num_examples` images, 'test' `max(1, num_examples // 10)`.

Images are drawn at up to 4x the resolution and box-downsampled, which gives
antialiased edges at any `image_size`.
"""

import re
import zlib
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

KINDS = ('circle', 'square', 'triangle', 'diamond', 'star', 'cross')
COLORS = {
    'red': (220, 40, 40),
    'orange': (250, 130, 20),
    'yellow': (240, 220, 40),
    'green': (40, 170, 60),
    'cyan': (40, 200, 220),
    'blue': (40, 70, 220),
    'purple': (140, 60, 190),
}
# Chosen far (RGB distance > 90) from every shape colour so shapes always stand out.
BACKGROUNDS = {
    'white': (255, 255, 255),
    'black': (0, 0, 0),
    'gray': (128, 128, 128),
    'beige': (225, 210, 180),
    'navy': (20, 30, 80),
}
SIZES = {'small': (0.22, 0.28), 'large': (0.40, 0.46)}  # diameter / image side
RELATIONS = ('above', 'below', 'to the left of', 'to the right of')
# 'quadrants' layout: (x0, y0, x1, y1) in unit coordinates, and the diameter range of its shapes.
QUADRANTS = {
    'top left': (0.0, 0.0, 0.5, 0.5),
    'top right': (0.5, 0.0, 1.0, 0.5),
    'bottom left': (0.0, 0.5, 0.5, 1.0),
    'bottom right': (0.5, 0.5, 1.0, 1.0),
}
QUADRANT_DIAMETER = (0.36, 0.46)
LAYOUTS = ('relations', 'quadrants')
_QUADRANT_CAPTION = re.compile(
    rf"an? (?P<colour>{'|'.join(COLORS)}) (?P<kind>{'|'.join(KINDS)}) at the (?P<position>{'|'.join(QUADRANTS)})"
    rf" on an? (?P<background>{'|'.join(BACKGROUNDS)}) background")
SPLITS = ('train', 'test')


def check_holdout(holdout) -> tuple[str, ...]:
  """`holdout` as a tuple of 'colour kind' strings; ValueError naming data.shapes_holdout."""
  pairs = tuple(holdout)
  for pair in pairs:
    colour, _, kind = str(pair).partition(' ')
    if colour not in COLORS or kind not in KINDS:
      raise ValueError(f"data.shapes_holdout: {pair!r} is not 'colour kind' with a colour of "
                       f'{tuple(COLORS)} and a kind of {KINDS}')
  return pairs


def split_length(split: str, num_examples: int) -> int:
  return num_examples if split == 'train' else max(1, num_examples // 10)


class ShapesSource:
  """Random-access source of `{'image': uint8 [S, S, 3], 'label', 'caption'}`."""

  def __init__(self, split: str, *, num_examples: int, image_size: int, layout: str = 'relations',
               holdout=()):
    if split not in SPLITS:
      raise ValueError(
          f"shapes source: unknown split {split!r}, expected one of {SPLITS} "
          '(data.train_split / data.eval_split)')
    if layout not in LAYOUTS:
      raise ValueError(f'data.shapes_layout: unknown {layout!r}, expected one of {LAYOUTS}')
    self.split = split
    self.image_size = image_size
    self.layout = layout
    self.holdout = frozenset(check_holdout(holdout)) if split == 'train' else frozenset()
    self._length = split_length(split, num_examples)
    self._split_seed = zlib.crc32(split.encode())

  def __len__(self) -> int:
    return self._length

  def _scene(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self._length:
      raise IndexError(f'shapes[{self.split}] index {index} out of range [0, {self._length})')
    return sample_scene(np.random.default_rng([self._split_seed, index]), layout=self.layout,
                        holdout=self.holdout)

  def caption(self, index: int) -> str:
    """The caption of record `index`, without drawing it."""
    return self._scene(index)['caption']

  def __getitem__(self, index: int) -> dict[str, Any]:
    scene = self._scene(index)
    return {
        'image': draw_scene(scene, self.image_size),
        'label': np.int32(KINDS.index(scene['shapes'][0]['kind'])),
        'caption': scene['caption'],
    }


def _kind_and_colour(rng: np.random.Generator, holdout: frozenset) -> tuple[str, str]:
  while True:
    kind, colour = str(rng.choice(KINDS)), str(rng.choice(list(COLORS)))
    if f'{colour} {kind}' not in holdout:
      return kind, colour


def _shape(rng: np.random.Generator, box: tuple[float, float, float, float], holdout: frozenset = frozenset(),
           size_range: tuple[float, float] | None = None) -> dict[str, Any]:
  """A random shape that fits inside `box` = (x0, y0, x1, y1) in unit coordinates; a size word
  ('small'/'large') unless `size_range` gives the diameter range."""
  size = None if size_range else str(rng.choice(list(SIZES)))
  radius = rng.uniform(*(size_range or SIZES[size])) / 2
  kind, colour = _kind_and_colour(rng, holdout)
  x0, y0, x1, y1 = box
  return {
      'kind': kind,
      'color': colour,
      'size': size,
      'radius': radius,
      'center': (rng.uniform(x0 + radius, x1 - radius), rng.uniform(y0 + radius, y1 - radius)),
  }


def _article(word: str) -> str:
  return 'an' if word[0] in 'aeiou' else 'a'


def _phrase(shape: dict[str, Any]) -> str:
  return f"a {shape['size']} {shape['color']} {shape['kind']}"


def sample_scene(rng: np.random.Generator, layout: str = 'relations',
                 holdout: frozenset = frozenset()) -> dict[str, Any]:
  """Samples background, shapes and the caption describing them (see the module docstring)."""
  background = str(rng.choice(list(BACKGROUNDS)))
  if layout == 'quadrants':
    position = str(rng.choice(list(QUADRANTS)))
    shape = _shape(rng, QUADRANTS[position], holdout, QUADRANT_DIAMETER)
    return {
        'background': background,
        'shapes': [shape],
        'position': position,
        'caption': f"{_article(shape['color'])} {shape['color']} {shape['kind']} at the {position} "
                   f'on a {background} background',
    }
  if rng.random() < 0.5:
    shapes = [_shape(rng, (0.0, 0.0, 1.0, 1.0), holdout)]
    caption = _phrase(shapes[0])
  else:
    relation = str(rng.choice(RELATIONS))
    top, bottom, left, right = (0, 0, 1, 0.5), (0, 0.5, 1, 1), (0, 0, 0.5, 1), (0.5, 0, 1, 1)
    first_box, second_box = {
        'above': (top, bottom),
        'below': (bottom, top),
        'to the left of': (left, right),
        'to the right of': (right, left),
    }[relation]
    shapes = [_shape(rng, first_box, holdout), _shape(rng, second_box, holdout)]
    caption = f'{_phrase(shapes[0])} {relation} {_phrase(shapes[1])}'
  return {
      'background': background,
      'shapes': shapes,
      'caption': f'{caption} on a {background} background',
  }


def parse_quadrant_caption(caption: str) -> dict[str, str]:
  """{'kind', 'colour', 'position', 'background'} of a 'quadrants' caption (as `sample_scene`
  writes them); ValueError naming the caption when it is not one."""
  match = _QUADRANT_CAPTION.fullmatch(caption.strip().lower())
  if not match:
    raise ValueError(f'{caption!r} is not a shapes quadrant caption such as '
                     "'a red circle at the top left on a white background'")
  return match.groupdict()


def quadrant_scene(caption: str, rng: np.random.Generator) -> dict[str, Any]:
  """A 'quadrants' scene that `caption` describes, size and place within the quadrant drawn from `rng`
  (real images for a prompt, e.g. to check a judge of samples)."""
  labels = parse_quadrant_caption(caption)
  radius = rng.uniform(*QUADRANT_DIAMETER) / 2
  x0, y0, x1, y1 = QUADRANTS[labels['position']]
  shape = {'kind': labels['kind'], 'color': labels['colour'], 'size': None, 'radius': radius,
           'center': (rng.uniform(x0 + radius, x1 - radius), rng.uniform(y0 + radius, y1 - radius))}
  return {'background': labels['background'], 'shapes': [shape], 'position': labels['position'],
          'caption': caption}


def scene_labels(scene: dict[str, Any]) -> dict[str, str]:
  """{'kind', 'colour', 'position', 'background'} of a 'quadrants' scene."""
  shape, = scene['shapes']
  return {'kind': shape['kind'], 'colour': shape['color'], 'position': scene['position'],
          'background': scene['background']}


def _outline(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
  """Polygon vertices of a shape centred at (cx, cy) with circumradius-like size r."""
  def ring(n, radii, phase):
    angles = phase + 2 * np.pi * np.arange(n * len(radii)) / (n * len(radii))
    rs = np.resize(radii, len(angles))
    return list(zip(cx + rs * np.cos(angles), cy + rs * np.sin(angles)))

  if kind == 'square':
    s = 0.85 * r
    return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
  if kind == 'triangle':  # Pointing up; shifted down so its bounding box is centred.
    return [(x, y + 0.25 * r) for x, y in ring(3, [r], -np.pi / 2)]
  if kind == 'diamond':
    return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
  if kind == 'star':
    return ring(5, [r, 0.45 * r], -np.pi / 2)
  if kind == 'cross':
    a, b = 0.3 * r, r
    return [(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy - a), (cx + b, cy - a),
            (cx + b, cy + a), (cx + a, cy + a), (cx + a, cy + b), (cx - a, cy + b),
            (cx - a, cy + a), (cx - b, cy + a), (cx - b, cy - a), (cx - a, cy - a)]
  raise ValueError(f'unknown shape kind {kind!r}')


def draw_scene(scene: dict[str, Any], image_size: int) -> np.ndarray:
  """Renders a scene from `sample_scene` as uint8 [image_size, image_size, 3]."""
  # Supersampling gives antialiased edges; capped so large images stay cheap.
  factor = max(1, min(4, 1024 // image_size))
  side = image_size * factor
  canvas = Image.new('RGB', (side, side), BACKGROUNDS[scene['background']])
  draw = ImageDraw.Draw(canvas)
  for shape in scene['shapes']:
    cx, cy = (c * side for c in shape['center'])
    r = shape['radius'] * side
    color = COLORS[shape['color']]
    if shape['kind'] == 'circle':
      draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    else:
      draw.polygon(_outline(shape['kind'], cx, cy, r), fill=color)
  return np.asarray(canvas.reduce(factor) if factor > 1 else canvas)
