import jax
import ml_collections
import numpy as np
import pytest

from ldm_jax.train import sharding


def cfg(**kw):
  return ml_collections.ConfigDict(kw)


@pytest.mark.parametrize("mesh_cfg, expected", [
    (dict(data=-1, fsdp=1), (8, 1)),
    (dict(data=2, fsdp=-1), (2, 4)),
    (dict(data=4, fsdp=2), (4, 2)),
])
def test_mesh_shape_resolves_minus_one(mesh_cfg, expected):
  assert sharding.mesh_shape(cfg(**mesh_cfg), 8) == expected


@pytest.mark.parametrize("mesh_cfg, key", [
    (dict(data=3, fsdp=-1), "mesh.fsdp"),
    (dict(data=4, fsdp=4), "mesh"),
    (dict(data=-1, fsdp=-1), "mesh"),
    (dict(data=0, fsdp=1), "mesh.data"),
])
def test_mesh_shape_errors_name_the_key(mesh_cfg, key):
  with pytest.raises(ValueError, match=key):
    sharding.mesh_shape(cfg(**mesh_cfg), 8)


def test_shard_batch_splits_the_batch_over_all_devices():
  mesh = sharding.make_mesh(cfg(data=-1, fsdp=1))
  batch = {"image": np.arange(16 * 2, dtype=np.float32).reshape(16, 2), "caption": np.array(["a"] * 16)}
  sharded = sharding.shard_batch(batch, mesh)
  assert set(sharded) == {"image"}  # strings stay on the host
  image = sharded["image"]
  assert len(image.addressable_shards) == 8
  assert {s.data.shape for s in image.addressable_shards} == {(2, 2)}
  np.testing.assert_array_equal(np.asarray(image), batch["image"])


def test_check_batch_size_names_the_key():
  mesh = sharding.make_mesh(cfg(data=-1, fsdp=1))
  sharding.check_batch_size(16, mesh)
  with pytest.raises(ValueError, match="train.batch_size"):
    sharding.check_batch_size(12, mesh)
