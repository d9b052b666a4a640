"""Every key of a config with its value and what it means: `python -m ldm_jax.config keys CONFIG`.

  python -m ldm_jax.config keys configs/autoencoder/shapes_kl_f4.py
  python -m ldm_jax.config keys configs/ldm/shapes_txt2img.py:smoke

One line per key, `key = value  # doc`, in the form `--config.KEY=VALUE` takes. A key's doc is the
comment beside its default where ldm_jax defines the section (`def default_data_config():` …
`'image_size': 32,  # output side: …`, or `config.optim = ConfigDict(dict(` in a trainer's
`default_config`); keys defined without a comment show none.
"""

from __future__ import annotations

import os
import re
import sys

from ldm_jax import config as checks
from ldm_jax.config import common as config_lib
from ldm_jax.runtime import cli

PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where a section's defaults start: `config.optim = ml_collections.ConfigDict(…` or `def train_config(`,
# `def default_data_config(`; any other `def` ends it.
_SECTION = re.compile(r"^\s*(?:config\.(\w+)\s*=\s*ml_collections\.ConfigDict\(|def (?:default_)?(\w+?)_config\()")
_DEF = re.compile(r"^\s*def ")
_SECTION_OF_FUNCTION = {"unet": "model"}  # default_unet_config() is stage 2's `model` section
# `name=value,  # doc` or `'name': value,  # doc`.
_DEFAULT_WITH_COMMENT = re.compile(r"""^\s*['"]?(\w+)['"]?\s*[:=]\s*[^#=]+?,?\s+#\s*(.+)$""")


def key_docs(trainer: str) -> dict[str, str]:
  """'section.key' → the comment beside its default, from every module of the package; where two
  modules comment a key (the trainers' `eval.*`), the one of `trainer` (its module path) wins."""
  docs = {}
  for directory, _, names in os.walk(PACKAGE):
    for name in sorted(n for n in names if n.endswith(".py")):
      section = None
      with open(os.path.join(directory, name), encoding="utf-8") as f:
        for line in f:
          start = _SECTION.match(line)
          if start:
            section = start.group(1) or _SECTION_OF_FUNCTION.get(start.group(2), start.group(2))
          elif _DEF.match(line):
            section = None
          elif section and (match := _DEFAULT_WITH_COMMENT.match(line)):
            key, doc = f"{section}.{match.group(1)}", match.group(2).strip()
            if key not in docs or os.path.join(directory, name).endswith(trainer):
              docs[key] = doc
  return docs


def _flat(config, prefix: str = ""):
  for key, value in config.items():
    if hasattr(value, "items"):
      yield from _flat(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def main(argv: list[str]) -> int:
  if len(argv) != 2 or argv[0] != "keys":
    raise ValueError(f"{' '.join(argv) or '(nothing)'}: usage: python -m ldm_jax.config keys CONFIG[:ARG]")
  config = config_lib.from_file(argv[1])
  trainer = {"autoencoder": "autoencoder.py", "diffusion": "diffusion.py"}.get(checks.run_kind(config), "")
  docs = key_docs(os.path.join("config", trainer))
  rows = [(key, repr(value)) for key, value in _flat(config)]
  width = min(max(len(key) + len(value) for key, value in rows) + 3, 56)
  for key, value in rows:
    doc = docs.get(key)
    line = f"{key} = {value}"
    print(f"{line:<{width}}  # {doc}" if doc else line)
  return 0


if __name__ == "__main__":
  verbose = {"--verbose", "--debug"} & set(sys.argv)
  sys.exit(cli.guarded(lambda: main([a for a in sys.argv[1:] if a not in verbose]), bool(verbose)))
