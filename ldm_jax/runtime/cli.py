"""How every command-line entry point reports bad input: one line on stderr and exit status 2.

    error: <key or path>: <what is wrong and what would be right>

Bad input is what the user gave: a flag, a config key, a file or a folder. The library raises
`ValueError` / `OSError` (and `EOFError` for truncated files) with messages that start with the
key or path; this module turns them into that line. `--verbose` (alias `--debug`) prints the
full traceback first. Any other exception is a bug and keeps Python's traceback.

`run(main)` also turns on the persistent compilation cache (`ldm_jax.runtime.compilation_cache`).

`run(main)` replaces `absl.app.run(main)` for the absl entry points (train_*.py, sample.py,
`python -m ldm_jax.eval`, `python -m ldm_jax.eval.classifier`); `guarded(fn, verbose)` serves
argparse ones (`python -m ldm_jax.convert`).
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from absl import app, flags

from ldm_jax.runtime import compilation_cache, host_memory

EXIT_BAD_INPUT = 2
INPUT_ERRORS = (ValueError, OSError, EOFError, app.UsageError)

_VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, print the full traceback before its one-line summary.")
flags.DEFINE_alias("debug", "verbose")


def error_line(error: BaseException | str) -> str:
  """`error: <message>` on one line (the message's whitespace, newlines included, collapsed)."""
  return "error: " + " ".join(str(error).split())


def fail(error: BaseException | str, verbose: bool = False) -> int:
  """Prints the error line (after the traceback of the exception being handled, when `verbose`);
  returns the exit status."""
  if verbose:
    traceback.print_exc()
  print(error_line(error), file=sys.stderr, flush=True)
  return EXIT_BAD_INPUT


def guarded(fn: Callable[[], int | None], verbose: bool) -> int:
  """Runs `fn()`; bad input becomes the error line and status 2. Returns the exit status."""
  try:
    return fn() or 0
  except INPUT_ERRORS as e:
    return fail(e, verbose)


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(fail(e))
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections' errors for a --config.KEY override (unknown key, wrong type), nested and quoted.
    while e.args and isinstance(e.args[0], BaseException):
      e = e.args[0]
    message = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\\", "").replace("'", "")
    names = [arg.split("=")[0] for arg in argv[1:] if arg.startswith("--config.")]
    culprit = next((name for name in names if name.rsplit(".", 1)[-1] in message), "--config")
    what = "not a key of the config" if isinstance(e, (AttributeError, KeyError)) else "cannot be set"
    sys.exit(fail(f"{culprit}: {what} ({message})."))


def _list_library_flags_in_help() -> None:
  # absl's --help lists only the main module's flags; ours are defined in ldm_jax modules
  # (the trainers' --config/--workdir, the multi-host flags, --verbose), so adopt them.
  main_module = sys.argv[0]
  for module, module_flags in flags.FLAGS.flags_by_module_dict().items():
    if module.startswith("ldm_jax"):
      for flag in module_flags:
        flags.FLAGS.register_key_flag_for_module(main_module, flag)


def run(main: Callable[[list[str]], None], argv: list[str] | None = None) -> None:
  """`app.run(main)` with bad flags and bad input reported as one line and exit status 2."""
  _list_library_flags_in_help()
  compilation_cache.enable()

  def main_guarded(args):
    def start():
      host_memory.keep_freed_memory()
      main(args)
    sys.exit(guarded(start, _VERBOSE.value))

  app.run(main_guarded, argv=argv, flags_parser=_parse_flags)
