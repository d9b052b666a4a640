"""Aspect-ratio bucketing: each batch one bucket, each image in the bucket nearest its aspect ratio,
every record once per epoch, exact resume, and SDXL's bucket rule."""

import numpy as np
import pytest
from PIL import Image

from ldm_jax.config.sections import aspect_buckets, default_data_config
from ldm_jax.data import make_loader, validate_data_config
from ldm_jax.data.buckets import nearest_bucket

BUCKETS = ((16, 16), (16, 24), (24, 16))
# name → (height, width): ratios near 1, 1.5 and 2/3, and one between (nearer 1.5).
SIZES = {f"{i:02d}": hw for i, hw in enumerate([(20, 20), (32, 48), (45, 30), (33, 31), (40, 56), (60, 40), (18, 27),
                                               (30, 30), (36, 60), (50, 33), (16, 16), (22, 34)])}


@pytest.fixture
def cfg(tmp_path):
  rng = np.random.default_rng(0)
  for name, (h, w) in SIZES.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / f"{name}.txt").write_text(name)
  cfg = default_data_config()
  cfg.update(source="folder", path=str(tmp_path), image_size=16, random_crop=True, random_flip=True)
  cfg.buckets = BUCKETS
  return cfg


def test_each_batch_is_one_bucket_and_each_image_in_its_nearest(cfg):
  loader = make_loader(cfg, "train", batch_size=2, seed=0, num_epochs=1, drop_remainder=False, buckets=True)
  batches = list(loader)
  names = [str(c) for b in batches for c in b["caption"]]
  assert sorted(names) == sorted(SIZES)  # every record once
  shapes = set()
  for batch in batches:
    height, width = batch["image"].shape[1:3]
    shapes.add((height, width))
    for name, size, (top, left) in zip(batch["caption"], batch["original_size"], batch["crop_coords_top_left"]):
      h, w = SIZES[str(name)]
      np.testing.assert_array_equal(size, (h, w))
      assert BUCKETS[nearest_bucket(BUCKETS, h, w)] == (height, width), name
      scale = max(height / h, width / w)  # resized to cover the bucket
      assert 0 <= top <= max(height, round(h * scale)) - height and 0 <= left <= max(width, round(w * scale)) - width
  assert shapes == set(BUCKETS)
  # Without buckets, the same data are square.
  square = next(make_loader(cfg, "train", batch_size=2, seed=0))
  assert square["image"].shape == (2, 16, 16, 3)


def test_a_restored_iterator_yields_the_same_batches(cfg):
  loader = make_loader(cfg, "train", batch_size=2, seed=3, buckets=True)
  for _ in range(5):
    next(loader)
  state = loader.get_state()
  assert any(state["waiting"])  # some records are waiting in their buckets
  expected = [next(loader) for _ in range(8)]
  resumed = make_loader(cfg, "train", batch_size=2, seed=3, buckets=True)
  resumed.set_state(state)
  for a, b in zip(expected, [next(resumed) for _ in range(8)], strict=True):
    for key in ("image", "caption", "original_size", "crop_coords_top_left"):
      np.testing.assert_array_equal(a[key], b[key])


def test_bad_buckets_name_the_key(cfg):
  for bad in (((16, 0),), (16, 24), ((16, 24), (16, 24))):
    cfg.buckets = bad
    with pytest.raises(ValueError, match=r"data\.buckets"):
      validate_data_config(cfg)
  cfg.buckets, cfg.num_workers = BUCKETS, 2
  with pytest.raises(ValueError, match=r"data\.buckets: .* data\.num_workers"):
    validate_data_config(cfg)


def test_sdxl_rule_buckets():
  buckets = aspect_buckets(1024)
  assert buckets[0] == (512, 2048) and buckets[-1] == (2048, 512) and (1024, 1024) in buckets
  assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024 ** 2 for h, w in buckets)
  assert all((w, h) in buckets for h, w in buckets)
  assert (768, 1344) in buckets and (832, 1216) in buckets  # from the SDXL paper's list
