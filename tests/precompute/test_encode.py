"""The on-disk latent cache: written by parts, resumed after an interruption, read through grain by
hosts, and refused by a run with another autoencoder before anything compiles."""

import json
import logging
import os
import shutil

import jax
import numpy as np
import pytest

from ldm_jax.data import latent_cache
from ldm_jax.data.pipeline import batched
from ldm_jax.load import autoencoder_run, checkpoint_steps, load_autoencoder, restore
from ldm_jax.precompute import encode
from ldm_jax.runtime.checkpoint import Checkpointer
from ldm_jax.train import diffusion
from ldm_jax.train.diffusion import data as diffusion_data
from tests.conftest import load_config
from tests.data.test_shards import make_shards


def cache_config(autoencoder_workdir, shards_dir):
  config = load_config("configs/ldm/shapes_txt2img.py:smoke")
  config.autoencoder.workdir = autoencoder_workdir
  config.latent.cache = False
  config.data.update(source="shards", path=str(shards_dir), image_size=16, min_caption_length=2)
  config.train.batch_size = 4
  return config


def read_part(path):
  source = latent_cache.DiskCacheSource.__new__(latent_cache.DiskCacheSource)
  source.__setstate__({"paths": [path]})
  return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def cache(smoke_autoencoder, tmp_path_factory):
  root = tmp_path_factory.mktemp("cache")
  make_shards(root / "shards", num_shards=3, per_shard=6)
  config = cache_config(smoke_autoencoder, root / "shards")
  manifest = encode.encode_dataset(config, str(root / "out"), batch_size=8)
  return config, root, manifest


def test_parts_hold_the_autoencoders_moments_and_the_manifest_names_what_made_them(cache, smoke_autoencoder):
  config, root, manifest = cache
  assert manifest["complete"] and manifest["num_parts"] == 3 and manifest["num_records"] == 18 - 5  # 'x' captions
  assert manifest["autoencoder"] == os.path.abspath(smoke_autoencoder) and manifest["image_size"] == 16
  assert manifest["latent_shape"] == [8, 8, 3] and manifest["text_encoder"] == ""
  with open(root / "out" / latent_cache.MANIFEST) as f:
    assert json.load(f) == manifest
  records = read_part(str(root / "out" / manifest["parts"][0]))
  assert [r["caption"] for r in records] == [f"sample {n}" for n in (1, 2, 3, 5)]
  np.testing.assert_array_equal(records[0]["original_size"], [161, 80])

  model, _, params = load_autoencoder(smoke_autoencoder)
  batch = next(batched(encode.part_records(config.data, {"shard": str(root / "shards" / "00000.tar")}), config.data, 4))
  posterior = model.apply({"params": params}, batch["image"], method=model.encode)
  for i in range(4):
    assert records[i]["latent_moments"].shape == (8, 8, 6)
    np.testing.assert_allclose(records[i]["latent_moments"][..., :3], posterior.mean[i], atol=1e-4)
    np.testing.assert_allclose(records[i]["latent_moments"][..., 3:], posterior.logvar[i], atol=1e-4)


def test_an_interrupted_job_resumes_with_the_missing_parts(cache, monkeypatch):
  config, root, manifest = cache
  out = root / "interrupted"
  calls = []
  original = encode.Encoder.__call__

  def failing(self, batch):
    calls.append(len(batch["image"]))
    if len(calls) == 2:  # part 0 is one batch; fail inside part 1
      raise KeyboardInterrupt
    return original(self, batch)

  monkeypatch.setattr(encode.Encoder, "__call__", failing)
  with pytest.raises(KeyboardInterrupt):
    encode.encode_dataset(config, str(out), batch_size=8)
  monkeypatch.setattr(encode.Encoder, "__call__", original)
  assert latent_cache.finished_parts(str(out)) == [latent_cache.part_name(0)]
  with pytest.raises(ValueError, match=r"latent.cache_dir: the cache in .* is unfinished \(1 of 3 parts\)"):
    latent_cache.read_manifest(str(out))
  first = os.stat(out / latent_cache.part_name(0)).st_mtime_ns

  resumed = encode.encode_dataset(config, str(out), batch_size=8)
  assert os.stat(out / latent_cache.part_name(0)).st_mtime_ns == first  # not encoded again
  assert {k: v for k, v in resumed.items()} == manifest
  for name in manifest["parts"]:
    for a, b in zip(read_part(str(out / name)), read_part(str(root / "out" / name)), strict=True):
      np.testing.assert_array_equal(a["latent_moments"], b["latent_moments"])
      assert a["caption"] == b["caption"]


def test_loader_is_seeded_host_disjoint_and_resumable(cache, monkeypatch):
  _, root, _ = cache
  out = str(root / "out")
  take = lambda it, n: [next(it) for _ in range(n)]
  first = take(latent_cache.disk_cache_loader(out, 4, seed=2), 5)
  assert set(first[0]) == {"latent_moments", "caption", "label", "original_size", "crop_coords_top_left"}
  assert first[0]["latent_moments"].shape == (4, 8, 8, 6)
  iterator = latent_cache.disk_cache_loader(out, 4, seed=2)
  take(iterator, 2)
  resumed = latent_cache.disk_cache_loader(out, 4, seed=2)
  resumed.set_state(json.loads(json.dumps(iterator.get_state())))
  for a, b in zip(take(resumed, 3), first[2:]):
    np.testing.assert_array_equal(a["latent_moments"], b["latent_moments"])
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  seen = []
  for host in (0, 1):
    monkeypatch.setattr(jax, "process_index", lambda host=host: host)
    seen.append({c for b in take(latent_cache.disk_cache_loader(out, 4, seed=0), 3) for c in b["caption"]})
  assert not seen[0] & seen[1]


def test_a_cache_is_accepted_after_its_autoencoder_workdir_is_moved(cache, smoke_autoencoder, tmp_path):
  """The cache names its autoencoder by content: the same workdir under another path (copied, moved,
  or mounted elsewhere on another host) is the same autoencoder."""
  config, root, manifest = cache
  moved = str(tmp_path / "moved_ae")
  shutil.copytree(smoke_autoencoder, moved)
  config = cache_config(moved, root / "shards")
  config.latent.cache_dir = str(root / "out")
  _, ae_config = autoencoder_run(moved)
  assert diffusion_data.check_disk_cache(config, ae_config) == manifest
  assert manifest["autoencoder"] == os.path.abspath(smoke_autoencoder) != moved  # where it was, for information


def other_autoencoder(smoke_autoencoder, directory):
  """A workdir like `smoke_autoencoder` (its config, its checkpoint step) with other weights."""
  os.makedirs(directory)
  shutil.copy(os.path.join(smoke_autoencoder, "config.json"), directory)
  params = restore(smoke_autoencoder, ("params", "autoencoder"))
  leaves, tree = jax.tree.flatten(params)
  params = jax.tree.unflatten(tree, [leaves[0] + 0.01, *leaves[1:]])
  step = checkpoint_steps(os.path.join(smoke_autoencoder, "checkpoints"))[-1]
  checkpointer = Checkpointer(os.path.join(directory, "checkpoints"), async_save=False, this_process_only=True)
  checkpointer.save(step, {"step": np.asarray(step, np.int32), "params": {"autoencoder": params}}, force=True)
  checkpointer.close()
  return step


def test_a_run_with_another_autoencoder_refuses_the_cache_before_compiling(cache, smoke_autoencoder, tmp_path):
  config, root, _ = cache
  other = str(tmp_path / "other_ae")
  step = other_autoencoder(smoke_autoencoder, other)
  config = cache_config(other, root / "shards")
  config.train.batch_size = 8
  config.latent.cache_dir = str(root / "out")
  digest, made, has = "'[0-9a-f]{64}'", f"autoencoder='{smoke_autoencoder}'", f"autoencoder='{other}'"
  with pytest.raises(ValueError, match=rf"latent.cache_dir: the cache in .* was made with autoencoder_sha256={digest} "
                                       rf"\({made}, autoencoder_step={step}\), but this run has "
                                       rf"autoencoder_sha256={digest} \({has}, autoencoder_step={step}\);"):
    diffusion.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_a_manifest_before_content_digests_is_compared_by_path(cache, smoke_autoencoder, tmp_path, caplog):
  """A version-3 manifest has no autoencoder digest: accepted, with a warning, where its paths match
  (as it was before), refused with the path key where they do not."""
  config, root, manifest = cache
  old = tmp_path / "old_cache"
  old.mkdir()
  with open(old / latent_cache.MANIFEST, "w") as f:
    json.dump({**{k: v for k, v in manifest.items() if k != "autoencoder_sha256"}, "version": 3}, f)
  config = cache_config(smoke_autoencoder, root / "shards")
  config.latent.cache_dir = str(old)
  _, ae_config = autoencoder_run(smoke_autoencoder)
  with caplog.at_level(logging.WARNING):
    assert diffusion_data.check_disk_cache(config, ae_config)["version"] == 3
  assert "names its autoencoder by path" in caplog.text
  moved = str(tmp_path / "moved_ae")
  shutil.copytree(smoke_autoencoder, moved)
  config.autoencoder.workdir = moved
  with pytest.raises(ValueError, match=rf"was made with autoencoder='{os.path.abspath(smoke_autoencoder)}', but "
                                       rf"this run has autoencoder='{moved}' \(its manifest, version 3, names what "
                                       "made it by path"):
    diffusion_data.check_disk_cache(config, ae_config)
