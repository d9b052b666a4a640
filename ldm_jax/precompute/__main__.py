"""`python -m ldm_jax.precompute --config CONFIG --out DIR`: encode a data set once (see `encode`).

Multi-host: run the same command on every host (`LDM_JAX_DISTRIBUTED=1`, or the
--coordinator_address / --num_processes / --process_id flags, as the trainers take).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from ldm_jax.precompute.encode import encode_dataset
from ldm_jax.runtime import compilation_cache, distributed
from ldm_jax.runtime.logging import setup_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "A stage-2 config (`path.py[:arg]`): its data.*, "
                                          "autoencoder.workdir and text encoder are what is encoded.")
_OUT = flags.DEFINE_string("out", None, "Directory of the cache (latent.cache_dir of the runs that use it).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Images per encoder call on each process; 0: the process's "
                              "share of train.batch_size.")
_PER_PART = flags.DEFINE_integer("records_per_part", 10_000, "Records per part for sources other than shards "
                                 "(shards: one part per tar).")
flags.mark_flags_as_required(["config", "out"])
distributed.define_flags()


def main(argv):
  del argv
  setup_logging()
  compilation_cache.enable()
  distributed.initialize_from_flags()
  manifest = encode_dataset(_CONFIG.value, _OUT.value, batch_size=_BATCH.value,
                            records_per_part=_PER_PART.value)
  logging.info("Cache %s: %d records in %d parts.", _OUT.value, manifest["num_records"], len(manifest["parts"]))


if __name__ == "__main__":
  app.run(main)
