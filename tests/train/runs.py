"""Helpers for tests that run the entry points as subprocesses (kill, SIGTERM, several processes).

Every subprocess runs on simulated CPU devices with a persistent compilation cache shared by the
test session, so that only the first run of a configuration pays for compiling it.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A stage-1 run small enough for seconds per run once compiled: one level, no GAN, 2 devices.
TINY_AE = ["--config", "configs/autoencoder/shapes_kl_f4.py:smoke", "--config.loss.disc_weight=0",
           "--config.model.ch_mult=(1,)", "--config.train.eval_batches=1", "--config.mesh.fsdp_min_size=0"]


@pytest.fixture(scope="session")
def jax_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def cpu_env(num_devices: int, cache_dir: str) -> dict:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} --xla_backend_optimization_level=0",
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1",
             PYTHONPATH=os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p))
  return env


class Run:
  """One subprocess with its output in `log` (read it with `.output()`)."""

  def __init__(self, argv: list[str], env: dict, log: str):
    self.log = log
    self._file = open(log, "w")
    self.proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=self._file,
                                 stderr=subprocess.STDOUT)

  def output(self) -> str:
    with open(self.log) as f:
      return f.read()

  def wait(self, timeout: float) -> int:
    try:
      return self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"timed out after {timeout} s: {self.proc.args}\n{self.output()[-4000:]}")
    finally:
      self._file.close()

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGKILL)
      self.proc.wait()


def wait_all(runs: list[Run], timeout: float) -> list[int]:
  """Exit codes of `runs`, waited for in order; any still running afterwards is killed."""
  try:
    return [run.wait(timeout) for run in runs]
  finally:
    for run in runs:
      run.kill()


def finalized_steps(workdir: str) -> list[int]:
  """Checkpoint steps that orbax has committed (temporary directories are not digits)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def wait_until(condition, run: Run, timeout: float, what: str) -> None:
  """Polls `condition()` every 20 ms; fails if `run` exits first or the time runs out."""
  deadline = time.monotonic() + timeout
  while not condition():
    if run.proc.poll() is not None:
      pytest.fail(f"the run exited ({run.proc.returncode}) before {what}:\n{run.output()[-4000:]}")
    if time.monotonic() > deadline:
      run.kill()
      pytest.fail(f"timed out waiting for {what}:\n{run.output()[-4000:]}")
    time.sleep(0.02)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def read_state(workdir: str, keys: tuple[str, ...], step: int | None = None):
  """A subtree of a checkpoint of `workdir`, as numpy arrays."""
  from ldm_jax.runtime import checkpoint as ckpt_lib
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    value = ckpt.restore_subtree(keys, jax.sharding.SingleDeviceSharding(jax.devices()[0]), step=step)
  finally:
    ckpt.close()
  return jax.device_get(value)
