"""Runs a table of command lines of ONE entry point in this process, as `python ENTRY ARGS` would.

  python tests/cli/runner.py ENTRY ROOT RESULTS.json < cases.json

ENTRY is a script (`train_autoencoder.py`, `sample.py`, …) or a module (`ldm_jax.eval`,
`ldm_jax.convert`, …). cases.json is a list of {"name", "argv"}; each result holds the exit
status, stdout and stderr (file descriptors 1 and 2, so that C++ and absl output count too), the
seconds from the call to the exit, the number and seconds of XLA compilations in between, and the entries
of the tree under ROOT that were added, removed or changed.

Why one process per entry point: the absl entry points define flags of the same names, so they
cannot share a process, and importing jax and the models once instead of once per case keeps the
suite fast. The first line is `--help`: it runs the entry point exactly as Python runs a program
(`runpy`, `__name__ == "__main__"`), which defines its flags and hands its `main` to
`ldm_jax.runtime.cli.run`; the cases then call `cli.run(main, argv)` as that line does.
"""

import hashlib
import json
import os
import runpy
import sys
import tempfile
import time

import jax
from absl import flags

from ldm_jax.runtime import cli

_compilations = []  # seconds of each XLA compilation
jax.monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **kwargs: _compilations.append(seconds) if event.endswith("backend_compile_duration")
    else None)


def snapshot(root: str) -> dict[str, str]:
  """Every file and folder under `root` → its content digest (files) or 'dir'."""
  tree = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames:
      tree[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
    for name in filenames:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        tree[os.path.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
  return tree


class Captured:
  """Redirects file descriptors 1 and 2 to temporary files while active."""

  def __enter__(self):
    sys.stdout.flush()
    sys.stderr.flush()
    self._files = [tempfile.TemporaryFile(mode="w+") for _ in range(2)]
    self._saved = [os.dup(1), os.dup(2)]
    for fd, file in zip((1, 2), self._files):
      os.dup2(file.fileno(), fd)
    return self

  def __exit__(self, *exc):
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, saved in zip((1, 2), self._saved):
      os.dup2(saved, fd)
      os.close(saved)
    self.out, self.err = [(f.seek(0), f.read())[1] for f in self._files]
    for file in self._files:
      file.close()


def _reset_flags():
  """Flags as a new process has them: their defaults, and no `--config.KEY` override flags
  (ml_collections defines one per override it parses)."""
  for name in list(flags.FLAGS):
    if name.startswith("config."):
      delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()


def main():
  entry, root, results_path = sys.argv[1:4]
  cases = json.load(sys.stdin)
  captured_main = []
  run = cli.run

  def recording_run(main_fn, argv=None):
    captured_main.append(main_fn)
    return run(main_fn, argv)

  def call(argv):
    """Exit status of one command line."""
    sys.argv = [entry, *argv]
    try:
      if entry == "ldm_jax.convert":  # argparse: `sys.exit(main())`
        from ldm_jax.convert.__main__ import main as convert_main  # pylint: disable=g-import-not-at-top
        return convert_main(argv)
      if captured_main:
        _reset_flags()
        run(captured_main[0], sys.argv)
      elif entry.endswith(".py"):
        runpy.run_path(entry, run_name="__main__")
      else:
        runpy.run_module(entry, run_name="__main__", alter_sys=True)
    except SystemExit as e:
      return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0

  cli.run = recording_run
  results = []
  for case in [{"name": "--help", "argv": ["--help"]}] + cases:
    before = snapshot(root)
    del _compilations[:]
    with Captured() as output:
      start = time.perf_counter()
      code = call(case["argv"])
      seconds = time.perf_counter() - start
    after = snapshot(root)
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    results.append(dict(name=case["name"], code=code, stdout=output.out, stderr=output.err, seconds=seconds,
                        compilations=len(_compilations), compile_seconds=sum(_compilations), changed=changed))
  with open(results_path, "w") as f:
    json.dump(results, f)


if __name__ == "__main__":
  main()
