"""Preemption: SIGTERM asks the run to save the current step and exit cleanly.

Preemptible TPU VMs and cluster schedulers (SLURM, Kubernetes) send SIGTERM some time before they
kill a job. The trainers ask `PreemptionGuard.reached(step)` after every step; once it says yes
they save a checkpoint of that step, wait for it to be on disk, and return.

- One process: a SIGTERM handler sets a flag (the previous handler is restored on exit).
- Several processes: JAX's preemption sync manager (started by `jax.distributed.initialize`)
  catches SIGTERM on any process and agrees with the others on one step at which all of them
  see `reached(step)` — a checkpoint is a collective, so no process may stop alone.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging
from jax.experimental import multihost_utils


class PreemptionGuard:
  """Context manager: `with PreemptionGuard() as guard: … if guard.reached(step): save; break`."""

  def __init__(self):
    self._requested = False
    self._previous = None

  def __enter__(self) -> PreemptionGuard:
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._requested = True

  def reached(self, step: int) -> bool:
    """Whether to save `step` and stop; in multi-process runs all processes agree on the step."""
    if jax.process_count() > 1:
      try:
        reached = multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # the preemption service is disabled (jax_enable_preemption_service)
        return False
    else:
      reached = self._requested
    if reached:
      logging.warning("Preemption (SIGTERM): saving step %d and stopping.", step)
    return reached
