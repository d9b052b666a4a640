"""Two JAX processes × 2 CPU devices (gloo), as two hosts of a pod would run the trainer.

One test, two phases, so that the second reuses the first's compiled programs:
  1. the same `train_autoencoder.py` command on both processes trains an FSDP-sharded model on a
     (data=2, fsdp=2) mesh spanning both, with remat and two accumulated micro-batches per step,
     checkpoints (every process writes its shards and its data position) and evaluates; only
     process 0 writes logs;
  2. both resume from that checkpoint, then process 1 is killed: process 0 must stop with an
     error within the heartbeat timeout instead of waiting in a collective forever.
"""

import json
import os
import signal
import time

import jax
import numpy as np
import pytest

from tests.train.runs import TINY_AE, Run, cpu_env, finalized_steps, free_port, jax_cache, read_state, wait_all, wait_until  # noqa: F401

HEARTBEAT = 10


def start_pair(workdir, tmp_path, env, name, *extra):
  port = free_port()
  return [Run(["train_autoencoder.py", "--workdir", str(workdir), *TINY_AE, "--config.train.batch_size=8",
               "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.train.log_every=3",
               "--config.train.remat=True", "--config.train.grad_accum_steps=2",
               f"--coordinator_address=localhost:{port}", "--num_processes=2", f"--process_id={i}",
               f"--heartbeat_timeout={HEARTBEAT}", *extra], env, str(tmp_path / f"{name}_{i}.log"))
          for i in range(2)]


@pytest.mark.slow
@pytest.mark.extended
def test_two_processes_train_checkpoint_and_stop_when_a_peer_dies(tmp_path, jax_cache):
  env = cpu_env(2, jax_cache)
  workdir = tmp_path / "run"
  runs = start_pair(workdir, tmp_path, env, "train", "--config.train.num_steps=6",
                    "--config.train.checkpoint_every=3", "--config.train.eval_every=6")
  codes = wait_all(runs, 600)
  assert codes == [0, 0], "\n".join(run.output()[-3000:] for run in runs)
  for run in runs:
    assert "process %d of 2, 2 local / 4 global devices" % runs.index(run) in run.output()

  assert finalized_steps(str(workdir)) == [3, 6]
  for step in (3, 6):
    assert sorted(os.listdir(workdir / "checkpoints" / str(step) / "data")) == [
        "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]
  with open(workdir / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if "train/loss" in r] == [3, 6]  # one writer
  assert [r["step"] for r in rows if "eval/psnr" in r] == [6]
  params = read_state(str(workdir), ("params", "autoencoder"), 6)
  first = read_state(str(workdir), ("params", "autoencoder"), 3)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  assert max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(first))) > 0

  # Resume on both processes, then kill process 1 once training is under way again.
  runs = start_pair(workdir, tmp_path, env, "peer", "--config.train.num_steps=100000",
                    "--config.train.checkpoint_every=3", "--config.train.eval_every=100000")
  try:
    wait_until(lambda: max(finalized_steps(str(workdir))) > 6, runs[0], 300, "a checkpoint after the resume")
    runs[1].proc.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    code = runs[0].wait(HEARTBEAT + 90)
    elapsed = time.monotonic() - killed
  finally:
    for run in runs:
      run.kill()
  assert code != 0, runs[0].output()[-3000:]
  assert elapsed < HEARTBEAT + 90
