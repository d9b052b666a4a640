"""Aspect-ratio bucketing (SDXL, Podell et al. 2023 §2.3): each batch holds images of one size.

With `data.buckets` = ((height, width), …) each record goes to the bucket whose aspect ratio is
nearest its original one (in log ratio), is resized to cover the bucket and cropped to it (random or
centred, as the square crop), and `BucketBatches` emits a batch whenever one bucket has gathered
`batch_size` records: batches alternate between buckets as the data make them.

The order is a pure function of the record order: records are read in order (with a look-ahead of
threads), and the iterator's state is the next record's position plus the positions of the records
waiting in each bucket, which are read again (preprocessing is seeded by position) when a run
resumes: a resumed iterator yields exactly the batches the uninterrupted one would have.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np


def check_buckets(buckets, key: str = 'data.buckets') -> tuple[tuple[int, int], ...]:
  """The buckets as a tuple of (height, width) int pairs; ValueError naming `key` otherwise."""
  try:
    pairs = tuple((h, w) for h, w in buckets)
  except (TypeError, ValueError):
    raise ValueError(f'{key}: expected ((height, width), …), got {buckets!r}.') from None
  for pair in pairs:
    if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in pair):
      raise ValueError(f'{key}: {pair!r} is not a (height, width) pair of positive integers.')
  if len(set(pairs)) != len(pairs):
    raise ValueError(f'{key}: a bucket is listed twice in {pairs!r}.')
  return pairs


def nearest_bucket(buckets: Sequence[tuple[int, int]], height: int, width: int) -> int:
  """Index of the bucket whose aspect ratio is nearest height / width (in log ratio; the first of ties)."""
  ratio = math.log(height / width)
  return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][0] / buckets[i][1]) - ratio))


class BucketBatches(grain.DatasetIterator):
  """Batches of one bucket each, from `ds` (records preprocessed with their 'bucket', or
  `{'skip': reason}`), in record order; see the module docstring.

  `collate(records)` makes a batch; `skip_reasons` name the 'skipped' counts each record carries
  (the records dropped just before it). With `drop_remainder` False, a finite `ds` ends with the
  buckets' incomplete batches.
  """

  def __init__(self, ds, batch_size: int, num_buckets: int, collate: Callable[[list[dict]], dict],
               skip_reasons: Sequence[str], *, drop_remainder: bool = True):
    super().__init__()
    self._ds, self._batch_size, self._collate = ds, batch_size, collate
    self._reasons, self._drop_remainder = tuple(skip_reasons), drop_remainder
    self._pool = concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1))
    self._lookahead = max(2 * batch_size, 8)
    self._num_buckets = num_buckets
    self._reset(0, [[] for _ in range(num_buckets)], np.zeros(len(self._reasons), np.int32))

  def _reset(self, position: int, waiting: list[list[int]], skipped: np.ndarray) -> None:
    self._position, self._skipped = position, skipped
    self._pending: collections.deque = collections.deque()
    # Records waiting in a bucket are read again; the drops counted before them were reported already.
    none = np.zeros(len(self._reasons), np.int32)
    self._waiting = [[(i, {**self._ds[i], 'skipped': none}) for i in bucket] for bucket in waiting]

  def _read_ahead(self) -> None:
    end = min(self._position + self._lookahead, len(self._ds))
    start = self._position + len(self._pending)
    self._pending.extend(self._pool.submit(self._ds.__getitem__, i) for i in range(start, end))

  def __next__(self) -> dict[str, Any]:
    while True:
      self._read_ahead()
      if not self._pending:
        return self._flush()
      record = self._pending.popleft().result()
      index, self._position = self._position, self._position + 1
      if 'skip' in record:
        self._skipped[self._reasons.index(record['skip'])] += 1
        continue
      record = {**record, 'skipped': self._skipped}
      self._skipped = np.zeros(len(self._reasons), np.int32)
      bucket = self._waiting[record['bucket']]
      bucket.append((index, record))
      if len(bucket) == self._batch_size:
        batch = self._collate([r for _, r in bucket])
        bucket.clear()
        return batch

  def _flush(self) -> dict[str, Any]:
    """The end of a finite `ds`: the incomplete batches, one bucket after the other (or none)."""
    for bucket in self._waiting:
      if bucket and not self._drop_remainder:
        batch = self._collate([r for _, r in bucket])
        bucket.clear()
        return batch
    raise StopIteration

  def get_state(self) -> dict[str, Any]:
    return {'position': self._position, 'waiting': [[i for i, _ in bucket] for bucket in self._waiting],
            'skipped': [int(n) for n in self._skipped]}

  def set_state(self, state: dict[str, Any]) -> None:
    if len(state['waiting']) != self._num_buckets:
      raise ValueError(f"data.buckets: the saved data position has {len(state['waiting'])} buckets, this run "
                       f'{self._num_buckets}; resume with the same data.buckets.')
    self._reset(int(state['position']), [list(map(int, b)) for b in state['waiting']],
                np.asarray(state['skipped'], np.int32))
