"""Data: record sources (shapes, idx, folder, tfds) and the grain input pipeline.

    cfg = ldm_jax.config.sections.default_data_config()   # the `data` config section
    validate_data_config(cfg)              # ValueError naming the bad `data.*` key
    it = make_loader(cfg, cfg.train_split, batch_size=64, seed=0)
    batch = next(it)                       # {'image' [B, S, S, C] in [-1, 1], 'label', 'caption'}
    state = it.get_state()                 # JSON-serialisable; it.set_state(state) resumes
"""

from ldm_jax.data.config import validate_data_config
from ldm_jax.data.pipeline import host_batch_size, make_loader
from ldm_jax.data.sources import SOURCES, captions, class_captions, make_source, num_classes

__all__ = [
    'SOURCES', 'captions', 'class_captions', 'host_batch_size', 'make_loader',
    'make_source', 'num_classes', 'validate_data_config',
]
