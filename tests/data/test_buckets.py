"""Aspect-ratio bucketing: each batch one bucket, each image in the bucket nearest its aspect ratio,
every record once per epoch, exact resume (threads, worker processes, two processes agreeing on
each step's bucket), and SDXL's bucket list."""

import json

import numpy as np
import pytest
from PIL import Image

from ldm_jax.config.sections import SDXL_BUCKETS, aspect_buckets, default_data_config
from ldm_jax.data import make_loader, validate_data_config
from ldm_jax.data.buckets import nearest_bucket
from tests.train.runs import Run, cpu_env, free_port, jax_cache  # noqa: F401

BUCKETS = ((16, 16), (16, 24), (24, 16))
# name → (height, width): ratios near 1, 1.5 and 2/3, and one between (nearer 1.5).
SIZES = {f"{i:02d}": hw for i, hw in enumerate([(20, 20), (32, 48), (45, 30), (33, 31), (40, 56), (60, 40), (18, 27),
                                               (30, 30), (36, 60), (50, 33), (16, 16), (22, 34)])}


def write_images(directory, sizes=SIZES):
  rng = np.random.default_rng(0)
  for name, (h, w) in sizes.items():
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(directory / f"{name}.png")
    (directory / f"{name}.txt").write_text(name)


@pytest.fixture
def cfg(tmp_path):
  write_images(tmp_path)
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


def test_sdxl_buckets_are_the_papers_and_contain_the_rule():
  assert len(SDXL_BUCKETS) == len(set(SDXL_BUCKETS)) == 40
  assert SDXL_BUCKETS[0] == (512, 2048) and SDXL_BUCKETS[20] == (1024, 1024) and SDXL_BUCKETS[-1] == (2048, 512)
  assert all(h % 64 == 0 and w % 64 == 0 and 0.9 * 2**20 <= h * w <= 2**20 for h, w in SDXL_BUCKETS)
  ratios = [h / w for h, w in SDXL_BUCKETS]
  assert ratios == sorted(ratios) and ratios[0] == 0.25 and ratios[-1] == 4.0
  buckets = aspect_buckets(1024)
  assert set(buckets) <= set(SDXL_BUCKETS) and len(buckets) == 17
  assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024 ** 2 for h, w in buckets)
  assert all((w, h) in buckets for h, w in buckets)


# Reads `STEPS` batches of 2 records per process with buckets, checkpointing the iterator after batch
# 3 (a restored reader continues from there), and saves each batch's captions and shape.
SCRIPT = r"""
import json, os, sys
from absl import app

def main(argv):
  images, out, process_id, port, resume, num_workers = argv[1:]
  import jax
  from ldm_jax.runtime import distributed
  distributed.initialize(f"localhost:{port}", 2, int(process_id))
  import numpy as np
  from ldm_jax.config.sections import default_data_config
  from ldm_jax.data import make_loader
  cfg = default_data_config()
  cfg.update(source="folder", path=images, image_size=16, random_crop=True, random_flip=True,
             num_workers=int(num_workers))
  cfg.buckets = ((16, 16), (16, 24), (24, 16))
  loader = make_loader(cfg, "train", batch_size=4, seed=5, buckets=True)
  state_file = os.path.join(out, "state.json")
  if resume == "1":
    with open(state_file) as f:
      loader.set_state(json.load(f))
  rows = []
  for step in range(4 if resume == "1" else 1, 9):
    batch = next(loader)
    rows.append({"step": step, "shape": list(batch["image"].shape), "captions": [str(c) for c in batch["caption"]],
                 "sum": float(batch["image"].astype(np.float64).sum())})
    if step == 3 and resume == "0":
      with open(state_file, "w") as f:
        json.dump(loader.get_state(), f)
  with open(os.path.join(out, f"batches_{resume}.json"), "w") as f:
    json.dump(rows, f)

app.run(main)
"""


@pytest.mark.slow
def test_two_processes_agree_on_each_bucket_and_resume_exactly(tmp_path, jax_cache):
  """Two processes (gloo), each reading its half of 24 images (two per batch each): at every step
  both emit the same bucket, each image in its nearest bucket, each process its own images; a
  reader restored from batch 3's state yields batches 4…8 again exactly, process 1 through a grain
  worker process."""
  images = tmp_path / "images"
  images.mkdir()
  sizes = {**SIZES, **{f"{int(k) + 12:02d}": (w, h) for k, (h, w) in SIZES.items()}}  # and their transposes
  write_images(images, sizes)
  env = cpu_env(1, jax_cache)

  def pair(resume, num_workers):
    port = free_port()
    outs = [tmp_path / f"p{i}" for i in range(2)]
    runs = []
    for i, out in enumerate(outs):
      out.mkdir(exist_ok=True)
      runs.append(Run(["-c", SCRIPT, str(images), str(out), str(i), str(port), resume, str(num_workers[i])], env,
                      str(tmp_path / f"p{i}_{resume}.log")))
    for run in runs:
      assert run.wait(300) == 0, "\n".join(r.output()[-3000:] for r in runs)
    return [json.loads((out / f"batches_{resume}.json").read_text()) for out in outs]

  first = pair("0", (0, 0))
  for a, b in zip(*first, strict=True):
    assert a["shape"] == b["shape"], (a, b)  # one global batch of one bucket
    for caption in a["captions"] + b["captions"]:
      assert tuple(a["shape"][1:3]) == BUCKETS[nearest_bucket(BUCKETS, *sizes[caption])]
  assert {tuple(r["shape"][1:3]) for r in first[0]} == set(BUCKETS)
  assert {c for r in first[0] for c in r["captions"]}.isdisjoint({c for r in first[1] for c in r["captions"]})
  resumed = pair("1", (0, 1))
  for rows, again in zip(first, resumed, strict=True):
    assert again == rows[3:]
