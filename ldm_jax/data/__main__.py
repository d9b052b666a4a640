"""`python -m ldm_jax.data write-shards`: a data source's split as webdataset tar shards.

    python -m ldm_jax.data write-shards --config configs/ldm/fmnist_txt2img.py --source idx \
        --path /usr/share/datasets/fashion-mnist --out data/fmnist_shards --per_shard 10000

Reads `data.*` of the config, with --source / --path / --split overriding it, and writes
`OUT/00000.tar` … with KEY.png (the image as stored), KEY.txt (the caption) and KEY.json
({'label', 'original_width', 'original_height'}): the layout img2dataset writes, for trying the
shards source and the precompute job on a small set.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from ldm_jax.data import make_source, shards

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config whose data.* section names the source.")
_SOURCE = flags.DEFINE_string("source", None, "Overrides data.source.")
_PATH = flags.DEFINE_string("path", None, "Overrides data.path.")
_SPLIT = flags.DEFINE_string("split", "train", "The split to write.")
_OUT = flags.DEFINE_string("out", None, "Directory of the shards.")
_PER_SHARD = flags.DEFINE_integer("per_shard", 10_000, "Samples per shard.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Write only the first N records (0: all).")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
  if argv[1:] != ["write-shards"]:
    raise app.UsageError("usage: python -m ldm_jax.data write-shards --config … --out DIR")
  data_cfg = _CONFIG.value.data
  if _SOURCE.value:
    data_cfg.source = _SOURCE.value
  if _PATH.value:
    data_cfg.path = _PATH.value
  source = make_source(data_cfg, _SPLIT.value)
  total = min(len(source), _LIMIT.value or len(source))
  os.makedirs(_OUT.value, exist_ok=True)
  for k, start in enumerate(range(0, total, _PER_SHARD.value)):
    samples = []
    for i in range(start, min(start + _PER_SHARD.value, total)):
      record = source[i]
      height, width = record["image"].shape[:2]
      samples.append({"key": f"{i:09d}", "image": record["image"], "caption": record["caption"],
                      "json": {"label": int(record["label"]), "original_width": width, "original_height": height}})
    shards.write_shard(os.path.join(_OUT.value, f"{k:05d}.tar"), samples)
  print(f"{total} records in {-(-total // _PER_SHARD.value)} shards in {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
