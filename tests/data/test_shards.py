"""Webdataset tar shards: index (cached beside the shard), records, per-host shards, filters, corrupt
members, determinism and exact resume."""

import io
import json
import os
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image

from ldm_jax.config.sections import default_data_config
from ldm_jax.data import make_loader, make_source, validate_data_config
from ldm_jax.data import shards
from ldm_jax.data.pipeline import SKIP_REASONS


def _image(seed, height, width):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_shards(root, num_shards=3, per_shard=6):
  """Shards `root/0000{k}.tar` of `per_shard` PNGs each, 8×8 except every sixth sample (24×8: aspect 3),
  caption 'sample N' in .txt and 'json caption N' in .json; returns {key: (image, caption)}."""
  root.mkdir(parents=True, exist_ok=True)
  truth = {}
  for k in range(num_shards):
    samples = []
    for j in range(per_shard):
      n = k * per_shard + j
      image = _image(n, 24 if n % 6 == 5 else 8, 8)
      caption = f'sample {n}' if n % 4 else 'x'  # every fourth caption is one character
      meta = {'caption': f'json caption {n}', 'original_width': 80, 'original_height': 160 + n, 'label': n % 3}
      samples.append({'key': f'{n:06d}', 'image': image, 'caption': caption, 'json': meta})
      truth[f'{n:06d}'] = (image, caption)
    shards.write_shard(str(root / f'{k:05d}.tar'), samples)
  return truth


def _cfg(path, **overrides):
  cfg = default_data_config()
  cfg.update(source='shards', path=str(path), image_size=8, eval_path='')
  cfg.update(overrides)
  return cfg


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_paths_globs_ranges_and_directories(tmp_path):
  make_shards(tmp_path)
  names = [str(tmp_path / f'{k:05d}.tar') for k in range(3)]
  assert shards.shard_paths(str(tmp_path)) == names
  assert shards.shard_paths(str(tmp_path / '*.tar')) == names
  assert shards.shard_paths(str(tmp_path / '{00001..00002}.tar')) == names[1:]
  assert shards.shard_paths(f'{names[2]}, {names[0]}') == [names[0], names[2]]
  with pytest.raises(ValueError, match=r"data.eval_path: '.*/00006.tar' names no tar shard"):
    shards.shard_paths(str(tmp_path / '{00006..00007}.tar'), 'data.eval_path')


def test_records_index_cache_and_json_fields(tmp_path):
  truth = make_shards(tmp_path)
  source = make_source(_cfg(tmp_path), 'train')
  assert len(source) == 18
  record = source[7]
  image, caption = truth['000007']
  np.testing.assert_array_equal(record['image'], image)
  assert record['caption'] == caption == source.caption(7)
  np.testing.assert_array_equal(record['original_size'], [167, 80])  # the JSON's original size
  assert record['label'] == 1

  # The index is cached beside each shard and reused while the shard is unchanged.
  cache = str(tmp_path / '00001.tar') + shards.INDEX_SUFFIX
  with open(cache) as f:
    saved = json.load(f)
  assert [s[0] for s in saved['samples']] == [f'{n:06d}' for n in range(6, 12)]
  saved['samples'] = saved['samples'][:2]
  with open(cache, 'w') as f:
    json.dump(saved, f)
  assert len(shards.index_shard(str(tmp_path / '00001.tar'))) == 2  # current stamp: used as it is
  os.utime(tmp_path / '00001.tar', ns=(1, 1))
  assert len(shards.index_shard(str(tmp_path / '00001.tar'))) == 6  # stale: rebuilt

  from_json = make_source(_cfg(tmp_path, caption_key='caption', label_key=''), 'train')
  assert from_json.caption(7) == from_json[7]['caption'] == 'json caption 7' and from_json[7]['label'] == -1


def test_read_only_directory_keeps_the_index_in_memory(tmp_path):
  make_shards(tmp_path, num_shards=1)
  os.chmod(tmp_path, 0o555)
  try:
    if os.access(tmp_path, os.W_OK):
      pytest.skip('running as root: directories are always writable')
    assert len(make_source(_cfg(tmp_path), 'train')) == 6
    assert not any(n.endswith(shards.INDEX_SUFFIX) for n in os.listdir(tmp_path))
  finally:
    os.chmod(tmp_path, 0o755)


def test_corrupt_member_and_truncated_shard_are_skipped_and_counted(tmp_path):
  root = tmp_path / 'shards'
  make_shards(root, num_shards=2, per_shard=4)
  # Shard 0: sample 000001's image is a truncated JPEG. Shard 1: the file ends inside its last sample.
  jpeg = io.BytesIO()
  Image.fromarray(_image(1, 64, 64)).save(jpeg, format='JPEG')
  with tarfile.open(root / '00000.tar', 'a') as tar:
    info = tarfile.TarInfo('000099.jpg')
    data = jpeg.getvalue()[:200]
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))
  with tarfile.open(root / '00001.tar') as tar:
    last_image = [m for m in tar.getmembers() if m.name.endswith('.png')][-1]
  with open(root / '00001.tar', 'r+b') as f:
    f.truncate(last_image.offset_data + 10)
  cfg = _cfg(root)
  validate_data_config(cfg)
  source = make_source(cfg, 'train')
  assert len(source) == 4 + 1 + 3  # the truncated tail's sample is not indexed
  assert source[4] == {'skip': 'corrupt'} and source.num_skipped == 1

  batches = list(make_loader(cfg, 'train', batch_size=1, seed=0, shuffle=False, num_epochs=1))
  assert len(batches) == 7
  assert sum(b['skipped'][:, SKIP_REASONS.index('corrupt')].sum() for b in batches) == 1


def test_filters_drop_and_count_by_reason(tmp_path):
  make_shards(tmp_path)
  cfg = _cfg(tmp_path, max_aspect_ratio=2.5, min_caption_length=2, min_side=0)
  # original sizes come from the JSON (80 × 160+n: aspect ≤ 2.2); the 24×8 images are not seen
  batches = list(make_loader(cfg, 'train', batch_size=1, seed=0, shuffle=False, num_epochs=1))
  skipped = dict(zip(SKIP_REASONS, np.concatenate([b['skipped'] for b in batches]).sum(axis=0)))
  assert skipped == {'corrupt': 0, 'min_side': 0, 'aspect_ratio': 0, 'caption_length': 5}
  assert all(len(c) > 1 for b in batches for c in b['caption']) and len(batches) == 13

  cfg = _cfg(tmp_path, min_side=100)  # 80 px wide originals are all too small
  with pytest.raises(StopIteration):
    next(make_loader(cfg, 'train', batch_size=1, seed=0, num_epochs=1))


def test_hosts_read_whole_disjoint_shards(tmp_path, monkeypatch):
  make_shards(tmp_path)
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  seen = []
  for host in (0, 1):
    monkeypatch.setattr(jax, 'process_index', lambda host=host: host)
    batches = make_loader(_cfg(tmp_path), 'train', batch_size=2, seed=0, num_epochs=1)
    seen.append(sorted(c for b in batches for c in b['caption']))
  caption = lambda n: f'sample {n}' if n % 4 else 'x'
  assert seen[0] == sorted(caption(n) for n in list(range(6)) + list(range(12, 18)))  # shards 0 and 2
  assert seen[1] == sorted(caption(n) for n in range(6, 12))  # shard 1
  monkeypatch.setattr(jax, 'process_count', lambda: 4)
  monkeypatch.setattr(jax, 'process_index', lambda: 3)
  with pytest.raises(ValueError, match=r'data.path: 3 shard\(s\) for 4 processes'):
    make_loader(_cfg(tmp_path), 'train', batch_size=4, seed=0)


def test_shuffle_mixes_shards_is_seeded_and_resumes_exactly(tmp_path):
  make_shards(tmp_path)
  cfg = _cfg(tmp_path, random_flip=True)
  first = _take(make_loader(cfg, 'train', batch_size=6, seed=5), 5)
  again = _take(make_loader(cfg, 'train', batch_size=6, seed=5), 5)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
  # One batch of 6 draws from more than one shard (shard k holds samples 6k..6k+5).
  shard_of = lambda c: 0 if c == 'x' else int(c.split()[1]) // 6
  assert len({shard_of(c) for c in first[0]['caption'] if c != 'x'}) > 1
  iterator = make_loader(cfg, 'train', batch_size=6, seed=5)
  _take(iterator, 2)
  state = json.loads(json.dumps(iterator.get_state()))
  resumed = make_loader(cfg, 'train', batch_size=6, seed=5)
  resumed.set_state(state)
  for a, b in zip(_take(resumed, 3), first[2:]):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['original_size'], b['original_size'])
