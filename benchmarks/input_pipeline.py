"""Input pipeline throughput per host: images/s of (a) tar shards → JPEG decode → resize, crop, flip →
batches, and (b) the on-disk latent cache → decode → batches, with N grain worker processes.

    python benchmarks/input_pipeline.py --workers 0,1,2 --image_size 256 --source_size 384
    python benchmarks/input_pipeline.py --shards '/data/laion/{00000..00009}.tar' --cache_dir /data/laion_cache

Without --shards / --cache_dir it writes synthetic ones first (smooth JPEGs of --source_size px; random
KL moments of the latent shape of --image_size at f = 8, 4 channels, as SD's) in a temporary
directory. The first --warmup batches (worker start-up, first reads) are not timed.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from absl import flags as absl_flags

from array_record.python.array_record_module import ArrayRecordWriter

from ldm_jax.config.sections import default_data_config
from ldm_jax.data import latent_cache, make_loader, shards



def synthetic_shards(directory: str, num_shards: int, per_shard: int, size: int) -> str:
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:size, 0:size] / size
  for k in range(num_shards):
    samples = []
    for j in range(per_shard):
      phase = rng.uniform(0, 6, 3)
      image = 127.5 + 100 * np.sin(6 * xx[..., None] + 4 * yy[..., None] + phase)
      image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
      samples.append({"key": f"{k:05d}{j:04d}", "image": image, "caption": f"synthetic image {j}",
                      "json": {"original_width": size, "original_height": size}})
    shards.write_shard(os.path.join(directory, f"{k:05d}.tar"), samples, image_format="jpg")
  return os.path.join(directory, "*.tar")


def synthetic_cache(directory: str, num_records: int, latent_shape) -> str:
  rng = np.random.default_rng(0)
  writer = ArrayRecordWriter(os.path.join(directory, latent_cache.part_name(0)), "group_size:1")
  h, w, c = latent_shape
  for i in range(num_records):
    writer.write(latent_cache.encode_record({
        "latent_moments": rng.standard_normal((h, w, 2 * c)).astype(np.float32), "caption": f"synthetic image {i}",
        "label": np.int32(-1), "original_size": np.array([512, 512], np.int32)}))
  writer.close()
  with open(os.path.join(directory, latent_cache.MANIFEST), "w") as f:
    json.dump({"format": latent_cache.MANIFEST_FORMAT, "complete": True, "parts": [latent_cache.part_name(0)],
               "num_parts": 1}, f)
  return directory


def measure(iterator, batch_size: int, batches: int, warmup: int) -> float:
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  return batches * batch_size / (time.perf_counter() - start)


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shards", default="")
  parser.add_argument("--cache_dir", default="")
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--source_size", type=int, default=384)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args(argv[1:])
  with tempfile.TemporaryDirectory() as tmp:
    spec = args.shards or synthetic_shards(tmp, 4, 200, args.source_size)
    cache_dir = args.cache_dir
    if not cache_dir:
      os.makedirs(os.path.join(tmp, "cache"))
      cache_dir = synthetic_cache(os.path.join(tmp, "cache"), 800, (args.image_size // 8, args.image_size // 8, 4))
    rows = []
    for workers in (int(w) for w in args.workers.split(",")):
      cfg = default_data_config()
      cfg.update(source="shards", path=spec, image_size=args.image_size, random_crop=True, random_flip=True,
                 num_workers=workers)
      shards_rate = measure(make_loader(cfg, "train", batch_size=args.batch_size, seed=0), args.batch_size,
                            args.batches, args.warmup)
      cache_rate = measure(latent_cache.disk_cache_loader(cache_dir, args.batch_size, 0, num_workers=workers),
                           args.batch_size, args.batches, args.warmup)
      rows.append((workers, shards_rate, cache_rate))
      print(f"workers {workers}: shards {shards_rate:.1f} images/s, latent cache {cache_rate:.1f} images/s",
            flush=True)
  print(f"\n| workers | shards → {args.image_size} px, images/s | latent cache, images/s |\n|---|---|---|")
  for workers, a, b in rows:
    print(f"| {workers} | {a:.1f} | {b:.1f} |")


if __name__ == "__main__":
  absl_flags.FLAGS.mark_as_parsed()  # grain's worker processes need parsed absl flags
  main(sys.argv)
