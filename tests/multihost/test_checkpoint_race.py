"""Two JAX processes save one checkpoint (state + each one's data position) after process 0 has saved
another checkpoint alone, as the import of a pretrained model does (`Checkpointer(this_process_only=True)`),
while process 0 is slow to create the step's directories: process 1 must wait for them.

Orbax's background directory creation let the other processes wait on a signal keyed by their own
count of orbax saves; the lone save put process 0 one ahead, so process 1 did not wait and its data
position failed with ENOENT in the temporary directory (seen once in the two-process SDXL test under load).

Run as a module, this file is one of the two processes: `python -m tests.multihost.test_checkpoint_race
PORT PROCESS_ID DIRECTORY`.
"""

import os
import sys

import pytest

from tests.train.runs import Run, cpu_env, free_port, jax_cache  # noqa: F401

DELAY_SECS = 3.0


@pytest.mark.slow
@pytest.mark.extended
def test_data_positions_are_written_after_a_lone_save_of_process_0(tmp_path, jax_cache):
  env = cpu_env(1, jax_cache)
  port = free_port()
  runs = [Run(["-m", "tests.multihost.test_checkpoint_race", str(port), str(i), str(tmp_path)], env,
              str(tmp_path / f"process_{i}.log")) for i in range(2)]
  try:  # process 1 first: when it fails, process 0 would wait for it in a collective
    assert runs[1].wait(120) == 0, runs[1].output()[-3000:]
    assert runs[0].wait(120) == 0, runs[0].output()[-3000:]
  finally:
    for run in runs:
      run.kill()
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["4"]
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints" / "4" / "data")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]


def _process(port: str, process_id: int, directory: str) -> None:
  import asyncio

  import grain
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  from orbax.checkpoint._src.path import atomicity

  from ldm_jax.runtime import distributed
  from ldm_jax.runtime.checkpoint import Checkpointer

  distributed.initialize(f"localhost:{port}", 2, process_id, heartbeat_timeout=10)  # a peer's crash ends both
  if process_id == 0:
    alone = Checkpointer(os.path.join(directory, "pretrained", "checkpoints"), async_save=False, this_process_only=True)
    alone.save(0, {"x": np.zeros(3, np.float32)}, force=True)
    alone.close()
    create = atomicity.AtomicRenameTemporaryPath.create

    async def slow_create(self):  # a loaded machine: process 0 makes the directories late
      await asyncio.sleep(DELAY_SECS)
      return await create(self)

    atomicity.AtomicRenameTemporaryPath.create = slow_create
  multihost_utils.sync_global_devices("test_checkpoint_race:start")
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  next(iterator)
  checkpointer = Checkpointer(os.path.join(directory, "run", "checkpoints"))
  checkpointer.save(4, {"w": np.arange(4, dtype=np.float32)}, iterator)
  checkpointer.close()


if __name__ == "__main__":
  _process(sys.argv[1], int(sys.argv[2]), sys.argv[3])
