"""`shards`: image-text tar shards in the webdataset layout, as img2dataset writes them.

A shard `00000.tar` holds, per sample, members sharing a key (the member name up to its first
dot): `KEY.jpg` | `.jpeg` | `.png` | `.webp` (the image), `KEY.txt` (the caption) and `KEY.json`
(metadata: img2dataset's `original_width` / `original_height`, the caption, ...).

    config.data.source = 'shards'
    config.data.path = '/data/laion/{00000..00099}.tar'   # paths, globs, {a..b} ranges, directories;
                                                           # several separated by commas
    config.data.caption_key = ''          # '' → KEY.txt; else a field of KEY.json ('a/b' nested)
    config.data.label_key = 'label'       # a field of KEY.json; -1 when absent
    config.data.eval_path = ''            # the eval split's shards; '' → data.path

Random access: each tar is indexed once (member offsets and sizes, read from the tar headers
without reading the data) and the index is cached beside it as `00000.tar.index.json` when the
directory is writable; a stale cache (other size or mtime) is rebuilt. Records are read with
`os.pread`, so threads and worker processes share nothing.

Per host: `ShardsSource(..., shard_index=i, shard_count=n)` holds the shards `i::n` (the grain
pipeline passes the JAX process index and count): hosts never open each other's shards, and the
pipeline's shuffle mixes records across all of the host's shards.

Records are `{'image': uint8 [H, W, 1|3], 'label', 'caption', 'original_size': int32 [2] (h, w)}`
— the size before any resizing (from the JSON's `original_height/width` when present, else the
stored image), kept for size micro-conditioning. A member that cannot be read or decoded gives
`{'skip': 'corrupt'}` (logged once, counted by the pipeline), never an error.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
import threading
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from ldm_jax.data.folder import decode_image

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
INDEX_SUFFIX = '.index.json'
INDEX_VERSION = 1
_RANGE = re.compile(r'\{(\d+)\.\.(\d+)\}')
# One sample of the index: key, image extension, then (offset, size) of image, txt and json; -1 when absent.
_FIELDS = ('key', 'ext', 'image_offset', 'image_size', 'txt_offset', 'txt_size', 'json_offset', 'json_size')


def _expand_ranges(pattern: str) -> list[str]:
  """'a{00..02}.tar' → ['a00.tar', 'a01.tar', 'a02.tar'] (webdataset's brace ranges, zero-padded)."""
  match = _RANGE.search(pattern)
  if match is None:
    return [pattern]
  first, last = match.group(1), match.group(2)
  width = len(first) if first.startswith('0') else 0
  out = []
  for n in range(int(first), int(last) + 1):
    out += _expand_ranges(pattern[:match.start()] + str(n).zfill(width) + pattern[match.end():])
  return out


def shard_paths(spec: str, key: str = 'data.path') -> list[str]:
  """The tar files `spec` names: comma-separated paths, globs, `{a..b}` ranges or directories
  (their `*.tar`), sorted and deduplicated. ValueError naming `key` when none exists."""
  if not spec:
    raise ValueError(f"{key}: empty; the shards source reads tar shards, e.g. '/data/laion/{{00000..00099}}.tar'")
  paths = []
  for part in (p.strip() for p in spec.split(',')):
    for pattern in _expand_ranges(os.path.expanduser(part)):
      if os.path.isdir(pattern):
        found = glob.glob(os.path.join(pattern, '*.tar'))
      elif glob.has_magic(pattern):
        found = glob.glob(pattern)
      else:
        found = [pattern] if os.path.isfile(pattern) else []
      if not found:
        raise ValueError(f'{key}: {pattern!r} names no tar shard (no such file, or no *.tar in it)')
      paths += found
  return sorted(set(paths))


def _build_index(path: str) -> list[list]:
  """Samples of one tar in member order, from its headers; a truncated tail is cut off."""
  samples: dict[str, list] = {}
  file_size = os.path.getsize(path)
  try:
    with tarfile.open(path, 'r:') as tar:
      for member in tar:
        if not member.isfile() or member.offset_data + member.size > file_size:
          continue
        directory, base = os.path.split(member.name)
        if base.startswith('.') or '.' not in base:
          continue
        stem, ext = base.split('.', 1)
        ext = ext.lower()
        sample = samples.setdefault(os.path.join(directory, stem),
                                    [os.path.join(directory, stem), '', -1, -1, -1, -1, -1, -1])
        span = [member.offset_data, member.size]
        if ext in IMAGE_EXTENSIONS:
          sample[1], sample[2:4] = ext, span
        elif ext == 'txt':
          sample[4:6] = span
        elif ext == 'json':
          sample[6:8] = span
  except (tarfile.TarError, EOFError, OSError) as e:
    # A truncated or damaged tail: the members read so far stay usable.
    logging.warning('Shard %s is damaged after %d samples (%s); reading those.', path, len(samples), e)
  return [s for s in samples.values() if s[1]]


def index_shard(path: str) -> list[list]:
  """The samples of tar `path` (see `_FIELDS`), from `path + INDEX_SUFFIX` when it is current,
  else built from the tar and cached there when the directory is writable."""
  stat = os.stat(path)
  stamp = {'version': INDEX_VERSION, 'size': stat.st_size, 'mtime_ns': stat.st_mtime_ns}
  cache = path + INDEX_SUFFIX
  try:
    with open(cache, encoding='utf-8') as f:
      saved = json.load(f)
    if all(saved.get(k) == v for k, v in stamp.items()):
      return saved['samples']
  except (OSError, ValueError):
    pass
  samples = _build_index(path)
  tmp = f'{cache}.tmp-{os.getpid()}-{threading.get_ident()}'
  try:
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump({**stamp, 'fields': _FIELDS, 'samples': samples}, f)
    os.replace(tmp, cache)
  except OSError:  # a read-only data directory: the index lives in memory only
    if os.path.exists(tmp):
      os.remove(tmp)
  return samples


def _field(meta: dict, key: str):
  for part in key.split('/'):
    meta = meta[part]
  return meta


class ShardsSource:
  """Random-access source over the samples of the shards `shard_index::shard_count` of `paths`.

  Args:
    paths: tar files (`shard_paths`).
    caption_key: '' reads KEY.txt; otherwise the field of KEY.json ('/' for nested fields).
    label_key: a field of KEY.json holding an int label; records without it have label -1.
    min_size: the output image size; JPEGs are decoded at a reduced scale that keeps both sides
      >= min_size (libjpeg's DCT scaling).
    shard_index, shard_count: this host's share of the shards.
  """

  def __init__(self, paths: list[str], *, caption_key: str = '', label_key: str = '', min_size: int = 0,
               shard_index: int = 0, shard_count: int = 1, key: str = 'data.path'):
    self.paths = list(paths)[shard_index::shard_count]
    if not self.paths:
      raise ValueError(f'{key}: {len(paths)} shard(s) for {shard_count} processes; every process reads whole '
                       'shards, so there must be at least as many shards as processes')
    self._caption_key, self._label_key, self._min_size = caption_key, label_key, min_size
    rows = []
    for shard, path in enumerate(self.paths):
      rows += [[shard] + s[2:] for s in index_shard(path)]
    self._rows = np.asarray(rows, np.int64).reshape(-1, 7)
    if not len(self._rows):
      raise ValueError(f'{key}: the shards {self.paths[:3]}{"…" if len(self.paths) > 3 else ""} hold no '
                       f'images (members ending in {IMAGE_EXTENSIONS})')
    self._fds: dict[int, int] = {}
    self._lock = threading.Lock()
    self._bad: set[int] = set()

  def __getstate__(self):  # grain worker processes get a copy without open files
    state = dict(self.__dict__)
    state.update(_fds={}, _lock=None)
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._rows)

  @property
  def num_skipped(self) -> int:
    """Distinct unreadable samples met so far by this process."""
    return len(self._bad)

  def _read(self, shard: int, offset: int, size: int) -> bytes:
    if offset < 0:
      return b''
    fd = self._fds.get(shard)
    if fd is None:
      with self._lock:
        fd = self._fds.get(shard)
        if fd is None:
          fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
    data = os.pread(fd, size, offset)
    if len(data) != size:
      raise OSError(f'short read: {len(data)} of {size} bytes at offset {offset}')
    return data

  def _meta(self, row) -> dict:
    raw = self._read(int(row[0]), int(row[5]), int(row[6]))
    return json.loads(raw) if raw else {}

  def _caption(self, row, meta: dict) -> str:
    if self._caption_key:
      try:
        value = _field(meta, self._caption_key)
      except (KeyError, TypeError):
        return ''
      return value if isinstance(value, str) else str(value)
    return self._read(int(row[0]), int(row[3]), int(row[4])).decode('utf-8', errors='replace').strip()

  def caption(self, index: int) -> str:
    row = self._rows[index]
    try:
      return self._caption(row, self._meta(row) if self._caption_key else {})
    except (OSError, ValueError):
      return ''

  def __getitem__(self, index: int) -> dict[str, Any]:
    row = self._rows[index]
    try:
      meta = self._meta(row)
      data = self._read(int(row[0]), int(row[1]), int(row[2]))
      image, (height, width) = decode_image(io.BytesIO(data), self._min_size)
      width, height = meta.get('original_width') or width, meta.get('original_height') or height
      label = meta.get(self._label_key, -1) if self._label_key else -1
      return {'image': image, 'label': np.int32(label if isinstance(label, int) else -1),
              'caption': self._caption(row, meta), 'original_size': np.array([height, width], np.int32)}
    except Exception as e:  # pylint: disable=broad-except
      # Broken members make PIL, json and the reads raise many types; one must not stop a long run.
      if index not in self._bad:
        self._bad.add(index)
        logging.warning('Skipping unreadable sample %d of %s: %s: %s', index, self.paths[int(row[0])],
                        type(e).__name__, e)
      return {'skip': 'corrupt'}


def write_shard(path: str, samples: list[dict[str, Any]], *, image_format: str = 'png') -> None:
  """Writes a webdataset tar: per sample {'key', 'image' uint8 [H, W, 1|3], 'caption', 'json' (dict)},
  members KEY.<image_format>, KEY.txt, KEY.json (a small img2dataset-like shard, e.g. for tests)."""
  with tarfile.open(path, 'w') as tar:
    for sample in samples:
      image = sample['image']
      buffer = io.BytesIO()
      Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format=image_format.upper()
                                                                            .replace('JPG', 'JPEG'))
      members = {image_format: buffer.getvalue(), 'txt': sample.get('caption', '').encode('utf-8')}
      if 'json' in sample:
        members['json'] = json.dumps(sample['json']).encode('utf-8')
      for ext, payload in members.items():
        info = tarfile.TarInfo(f"{sample['key']}.{ext}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
