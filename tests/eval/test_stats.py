import os

import numpy as np
import pytest

from ldm_jax.config.sections import default_data_config
from ldm_jax.eval import features, stats


def shapes_config():
  cfg = default_data_config()
  cfg.update(source="shapes", image_size=16, num_examples=60)
  return cfg


@pytest.fixture
def counted_extract(monkeypatch):
  calls = []
  real = features.extract

  def counting(*args, **kwargs):
    calls.append(len(args[1]))
    return real(*args, **kwargs)

  monkeypatch.setattr(features, "extract", counting)
  return calls


def test_reference_stats_are_computed_once_then_read_from_the_cache(tmp_path, toy_extractor, counted_extract):
  cfg = shapes_config()
  first = stats.reference_stats(cfg, "train", 40, toy_extractor, cache_dir=str(tmp_path), progress=False)
  assert counted_extract == [40]
  (path,) = tmp_path.iterdir()
  assert path.name.startswith("toy-train-40-")
  mtime = os.stat(path).st_mtime_ns
  images = stats.reference_images(cfg, "train", 40)
  expected = features.to_extractor_input(images, 4, 3).reshape(40, -1) / 255.0
  np.testing.assert_allclose(first.features, expected, rtol=1e-6)
  np.testing.assert_allclose(first.mu, first.features.mean(0), rtol=1e-6)

  again = stats.reference_stats(cfg, "train", 40, toy_extractor, cache_dir=str(tmp_path), progress=False)
  assert counted_extract == [40]  # not recomputed
  assert os.stat(path).st_mtime_ns == mtime
  np.testing.assert_array_equal(again.sigma, first.sigma)
  assert again.meta == first.meta and again.meta["image_size"] == [16, 16]

  # Order and augmentation keys do not change the reference images, hence reuse the cache.
  cfg.random_flip, cfg.num_workers = True, 2
  stats.reference_stats(cfg, "train", 40, toy_extractor, cache_dir=str(tmp_path), progress=False)
  assert counted_extract == [40]


def test_any_change_of_protocol_extractor_or_data_recomputes(tmp_path, toy_extractor, counted_extract,
                                                             monkeypatch, make_toy_extractor):
  cfg = shapes_config()
  run = lambda c, ex, n=40, split="train": stats.reference_stats(c, split, n, ex, cache_dir=str(tmp_path),
                                                                   progress=False)
  run(cfg, toy_extractor)
  monkeypatch.setattr(features, "PROTOCOL_VERSION", features.PROTOCOL_VERSION + 1)
  run(cfg, toy_extractor)
  run(cfg, make_toy_extractor(identity="toy-v2"))  # other weights
  run(cfg, toy_extractor, n=30)
  run(cfg, toy_extractor, split="test")
  cfg.image_size = 8
  run(cfg, toy_extractor)
  assert counted_extract == [40, 40, 40, 30, 6, 40]  # the shapes test split holds 6 images
  assert len(list(tmp_path.iterdir())) == 6


def test_a_stats_file_from_another_protocol_is_refused(tmp_path, toy_extractor, monkeypatch,
                                                       make_toy_extractor):
  ref = stats.reference_stats(shapes_config(), "train", 20, toy_extractor, cache_dir=str(tmp_path),
                              progress=False)
  path = str(tmp_path / "ref.npz")
  ref.save(path)
  assert stats.load_stats(path, toy_extractor).meta == ref.meta
  with pytest.raises(ValueError, match="another protocol or extractor"):
    stats.load_stats(path, make_toy_extractor(identity="toy-v2"))
  monkeypatch.setattr(features, "PROTOCOL_VERSION", features.PROTOCOL_VERSION + 1)
  with pytest.raises(ValueError, match="another protocol or extractor"):
    stats.load_stats(path, toy_extractor)
  np.savez(tmp_path / "foreign.npz", mu=ref.mu, sigma=ref.sigma)
  with pytest.raises(ValueError, match="not a ldm_jax reference statistics file"):
    stats.load_stats(str(tmp_path / "foreign.npz"), toy_extractor)
