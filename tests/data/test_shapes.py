"""The synthetic shapes source: determinism, and captions that describe what is drawn."""

import time

import numpy as np
import pytest

from ldm_jax.data import shapes

PALETTE = {**shapes.COLORS, **shapes.BACKGROUNDS}


def _nearest_colour_names(image):
  """[H, W] array of the palette colour name nearest to each pixel."""
  names = list(PALETTE)
  rgb = np.array([PALETTE[n] for n in names], np.float32)
  dist = np.linalg.norm(image[:, :, None, :].astype(np.float32) - rgb, axis=-1)
  return np.array(names)[dist.argmin(-1)]


def _parse(caption):
  """Caption → (background, [(size, colour, kind), ...], relation or None)."""
  body, background = caption.removesuffix(' background').split(' on a ')
  relation = next((r for r in shapes.RELATIONS if f' {r} ' in body), None)
  phrases = body.split(f' {relation} ') if relation else [body]
  return background, [tuple(p.split(' ', 1)[1].split(' ', 2)) for p in phrases], relation


@pytest.fixture(scope='module')
def source():
  return shapes.ShapesSource('train', num_examples=300, image_size=48)


def test_lengths_and_index_range():
  assert len(shapes.ShapesSource('train', num_examples=300, image_size=8)) == 300
  test = shapes.ShapesSource('test', num_examples=300, image_size=8)
  assert len(test) == 30
  with pytest.raises(IndexError):
    test[30]
  with pytest.raises(ValueError, match='data.train_split'):
    shapes.ShapesSource('validation', num_examples=10, image_size=8)


def test_deterministic_per_index_and_split(source):
  again = shapes.ShapesSource('train', num_examples=300, image_size=48)
  test = shapes.ShapesSource('test', num_examples=300, image_size=48)
  for i in range(5):
    a, b = source[i], again[i]
    np.testing.assert_array_equal(a['image'], b['image'])
    assert (a['label'], a['caption']) == (b['label'], b['caption'])
    assert a['image'].shape == (48, 48, 3) and a['image'].dtype == np.uint8
    assert a['label'].dtype == np.int32
    assert not np.array_equal(a['image'], source[i + 1]['image'])
    assert not np.array_equal(a['image'], test[i]['image'])
  assert len({source.caption(i) for i in range(50)}) > 40


def test_caption_method_matches_record(source):
  for i in range(20):
    assert source.caption(i) == source[i]['caption']


def test_label_is_kind_of_first_shape(source):
  labels = set()
  for i in range(60):
    record = source[i]
    _, described, _ = _parse(record['caption'])
    assert record['label'] == shapes.KINDS.index(described[0][2])
    labels.add(int(record['label']))
  assert labels == set(range(len(shapes.KINDS)))


def test_single_shape_colours_and_background_match_caption(source):
  checked = 0
  for i in range(80):
    record = source[i]
    background, described, relation = _parse(record['caption'])
    if relation:
      continue
    names = _nearest_colour_names(record['image'])
    values, counts = np.unique(names, return_counts=True)
    assert values[counts.argmax()] == background  # shapes cover < 20% of the image
    shape_counts = {v: c for v, c in zip(values, counts) if v in shapes.COLORS}
    assert max(shape_counts, key=shape_counts.get) == described[0][1], record['caption']
    checked += 1
  assert checked > 20


def test_kind_matches_fill_of_bounding_box():
  """Area of the shape over its bounding box: square ≈ 1, circle ≈ π/4, triangle, diamond ≈ ½."""
  source = shapes.ShapesSource('train', num_examples=300, image_size=128)
  expected = {'square': (0.9, 1.0), 'circle': (0.72, 0.85), 'triangle': (0.4, 0.6),
              'diamond': (0.4, 0.6)}
  seen = set()
  for i in range(120):
    record = source[i]
    background, described, relation = _parse(record['caption'])
    kind = described[0][2]
    if relation or kind not in expected:
      continue
    mask = np.linalg.norm(record['image'] - np.float32(shapes.BACKGROUNDS[background]), axis=-1) > 60
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    low, high = expected[kind]
    assert low <= mask.sum() / box <= high, (i, record['caption'], mask.sum() / box)
    seen.add(kind)
  assert seen == set(expected)


def test_relation_word_matches_positions(source):
  checked = 0
  for i in range(120):
    record = source[i]
    _, described, relation = _parse(record['caption'])
    if not relation or described[0][1] == described[1][1]:
      continue
    names = _nearest_colour_names(record['image'])
    (y1, x1), (y2, x2) = (np.argwhere(names == colour).mean(0) for _, colour, _ in described)
    assert {'above': y1 < y2, 'below': y1 > y2, 'to the left of': x1 < x2,
            'to the right of': x1 > x2}[relation], record['caption']
    checked += 1
  assert checked > 20


def test_fast_enough_for_on_the_fly_training():
  source = shapes.ShapesSource('train', num_examples=1000, image_size=32)
  start = time.perf_counter()
  for i in range(300):
    source[i]
  assert 300 / (time.perf_counter() - start) > 300  # images per second, with a wide margin


def test_quadrant_captions_name_what_is_drawn():
  """Every attribute of a 'quadrants' caption is the image's: colour and kind of the only shape,
  its quadrant (all its pixels inside it) and the background."""
  source = shapes.ShapesSource('train', num_examples=200, image_size=64, layout='quadrants')
  seen = {name: set() for name in ('kind', 'colour', 'position', 'background')}
  for i in range(120):
    record = source[i]
    labels = shapes.parse_quadrant_caption(record['caption'])
    assert record['label'] == shapes.KINDS.index(labels['kind'])
    names = _nearest_colour_names(record['image'])
    values, counts = np.unique(names, return_counts=True)
    assert values[counts.argmax()] == labels['background']
    mask = np.linalg.norm(record['image'] - np.float32(shapes.BACKGROUNDS[labels['background']]), axis=-1) > 60
    inside, counts = np.unique(names[mask], return_counts=True)
    assert inside[counts.argmax()] == labels['colour'], record['caption']
    x0, y0, x1, y1 = (int(v * 64) for v in shapes.QUADRANTS[labels['position']])
    assert mask[y0:y1, x0:x1].sum() == mask.sum() > 0, record['caption']
    for name, value in labels.items():
      seen[name].add(value)
  assert seen == {'kind': set(shapes.KINDS), 'colour': set(shapes.COLORS),
                  'position': set(shapes.QUADRANTS), 'background': set(shapes.BACKGROUNDS)}


def test_parse_quadrant_caption_round_trip_and_errors():
  rng = np.random.default_rng(0)
  for _ in range(50):
    scene = shapes.sample_scene(rng, layout='quadrants')
    assert shapes.parse_quadrant_caption(scene['caption']) == shapes.scene_labels(scene)
    again = shapes.quadrant_scene(scene['caption'], rng)
    assert shapes.scene_labels(again) == shapes.scene_labels(scene)
  assert shapes.parse_quadrant_caption('an orange star at the bottom right on a navy background') == {
      'colour': 'orange', 'kind': 'star', 'position': 'bottom right', 'background': 'navy'}
  for bad in ('a red circle on a white background', 'a pink circle at the top left on a white background',
              'a red circle at the middle on a white background'):
    with pytest.raises(ValueError, match='not a shapes quadrant caption'):
      shapes.parse_quadrant_caption(bad)


@pytest.mark.parametrize('layout', shapes.LAYOUTS)
def test_holdout_pairs_never_in_train_split_but_in_test(layout):
  holdout = ('green triangle', 'red star', 'blue cross')
  pairs = lambda source: {f"{s['color']} {s['kind']}" for i in range(len(source))
                          for s in source._scene(i)['shapes']}
  train = pairs(shapes.ShapesSource('train', num_examples=3000, image_size=8, layout=layout, holdout=holdout))
  test = pairs(shapes.ShapesSource('test', num_examples=3000, image_size=8, layout=layout, holdout=holdout))
  assert not train & set(holdout)
  assert len(train) == len(shapes.KINDS) * len(shapes.COLORS) - len(holdout)
  assert set(holdout) <= test
  with pytest.raises(ValueError, match='data.shapes_holdout'):
    shapes.ShapesSource('train', num_examples=10, image_size=8, holdout=('pink circle',))


def test_default_layout_unchanged_by_an_empty_holdout():
  a = shapes.ShapesSource('train', num_examples=50, image_size=16)
  b = shapes.ShapesSource('train', num_examples=50, image_size=16, layout='relations', holdout=())
  assert all(a.caption(i) == b.caption(i) for i in range(50))
