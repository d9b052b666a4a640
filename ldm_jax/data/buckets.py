"""Aspect-ratio bucketing (SDXL, Podell et al. 2023 §2.3): each batch holds images of one size.

With `data.buckets` = ((height, width), …) each record goes to the bucket whose aspect ratio is
nearest its original one (in log ratio), is resized to cover the bucket and cropped to it (random or
centred, as the square crop), and waits there. `BucketBatches` reads the records in order, a batch's
worth at a time, and emits a batch of the bucket that holds a batch on every process (the fullest
such bucket, the first of ties): batches alternate between buckets as the data fill them, and all
processes of a multi-host run emit the same bucket at every step (their per-host batches make one
global array), agreed on by an all-gather of the waiting counts in the training process.

The order is a pure function of the record order: records are read in order (by threads, or by
`data.num_workers` grain worker processes), and the iterator's state is the next record's position
plus the positions of the records waiting in each bucket, which are read again (preprocessing is
seeded by position) when a run resumes: a resumed iterator yields exactly the batches the
uninterrupted one would have, on every process.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
import os
from collections.abc import Callable, Iterator, Sequence
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


def one_process(counts: np.ndarray) -> np.ndarray:
  """`BucketBatches`' all-gather on a single process: [1, …]."""
  return counts[None]


class BucketBatches(grain.DatasetIterator):
  """Batches of one bucket each, from `ds` (records preprocessed with their 'bucket', or
  `{'skip': reason}`), in record order; see the module docstring.

  `collate(records)` makes a batch; `skip_reasons` name the 'skipped' counts each record carries
  (the records dropped just before it). `num_workers` > 0 reads through grain worker processes.
  `gather(counts)` stacks every process's int vector ([num_processes, n]; `one_process` for one).
  With `drop_remainder` False, a finite `ds` ends with the buckets' incomplete batches (which
  differ between processes).
  """

  def __init__(self, ds: grain.MapDataset, batch_size: int, num_buckets: int,
               collate: Callable[[list[dict]], dict], skip_reasons: Sequence[str], *, drop_remainder: bool = True,
               num_workers: int = 0, gather: Callable[[np.ndarray], np.ndarray] = one_process):
    super().__init__()
    self._ds, self._batch_size, self._collate = ds, batch_size, collate
    self._reasons, self._drop_remainder = tuple(skip_reasons), drop_remainder
    self._num_buckets, self._num_workers, self._gather = num_buckets, num_workers, gather
    self._pool = None if num_workers else concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1))
    self._lookahead = max(2 * batch_size, 8)
    self._reset(0, [[] for _ in range(num_buckets)], np.zeros(len(self._reasons), np.int32))

  def _reset(self, position: int, waiting: list[list[int]], skipped: np.ndarray) -> None:
    self._position, self._skipped = position, skipped
    self._stream, self._exhausted = None, False  # the records from `position` on, opened when first read
    # Records waiting in a bucket are read again; the drops counted before them were reported already.
    none = np.zeros(len(self._reasons), np.int32)
    self._waiting = [[(i, {**self._ds[i], 'skipped': none}) for i in bucket] for bucket in waiting]

  def _records(self, start: int) -> Iterator[dict[str, Any]]:
    """The records of `ds` from `start` on, in order."""
    if self._num_workers:
      yield from self._ds[start:].to_iter_dataset().mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self._num_workers))
      return
    pending, following = collections.deque(), start
    while True:
      while len(pending) < self._lookahead and following < len(self._ds):
        pending.append(self._pool.submit(self._ds.__getitem__, following))
        following += 1
      if not pending:
        return
      yield pending.popleft().result()

  def _read(self, count: int) -> None:
    """Reads up to `count` records into their buckets (fewer at the end of a finite `ds`)."""
    if self._stream is None:
      self._stream = self._records(self._position)
    for _ in range(count):
      record = next(self._stream, None)
      if record is None:
        self._exhausted = True
        return
      index, self._position = self._position, self._position + 1
      if 'skip' in record:
        self._skipped[self._reasons.index(record['skip'])] += 1
        continue
      record = {**record, 'skipped': self._skipped}
      self._skipped = np.zeros(len(self._reasons), np.int32)
      self._waiting[record['bucket']].append((index, record))

  def __next__(self) -> dict[str, Any]:
    while True:
      counts = np.array([len(bucket) for bucket in self._waiting] + [self._exhausted], np.int32)
      every = np.asarray(self._gather(counts))  # [processes, buckets + 1]
      ready = every[:, :-1].min(axis=0)  # what every process holds, per bucket
      if ready.max() >= self._batch_size:
        bucket = self._waiting[int(np.argmax(ready))]
        batch = self._collate([record for _, record in bucket[:self._batch_size]])
        del bucket[:self._batch_size]
        return batch
      if every[:, -1].all():
        return self._flush()
      self._read(self._batch_size)

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
