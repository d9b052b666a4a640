"""Multi-host start-up decisions (no processes are connected here; see tests/multihost)."""

import pytest

from ldm_jax.runtime import distributed


def test_one_process_without_flags_or_launcher(monkeypatch):
  for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE", "LDM_JAX_DISTRIBUTED"):
    monkeypatch.delenv(var, raising=False)
  assert distributed.cluster_environment() is None
  assert distributed.initialize() is False
  assert distributed.initialize("localhost:1234", 1, 0) is False  # one process needs no service


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, "slurm"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, "tpu"),
    ({"TPU_WORKER_HOSTNAMES": "t0"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),
    ({"LDM_JAX_DISTRIBUTED": "1"}, "env"),
])
def test_launchers_of_several_processes_are_detected(monkeypatch, env, expected):
  for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE", "LDM_JAX_DISTRIBUTED"):
    monkeypatch.delenv(var, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  assert distributed.cluster_environment() == expected


@pytest.mark.parametrize("args, match", [
    (("localhost:1234", None, 0), "--num_processes: needed with --coordinator_address, --process_id"),
    ((None, 2, None), "--coordinator_address, --process_id: needed"),
    (("localhost:1234", 2, 2), r"--process_id: 2 is not in \[0, --num_processes=2\)"),
])
def test_incomplete_or_wrong_flags_name_the_flag(args, match):
  with pytest.raises(ValueError, match=match):
    distributed.initialize(*args)
