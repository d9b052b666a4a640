"""Multi-host start-up: `jax.distributed.initialize` from flags or from the cluster environment.

Every entry point (`train_autoencoder.py`, `train_diffusion.py`, `sample.py`) calls
`define_flags()` at import and `initialize_from_flags()` first thing in `main`:

    --coordinator_address=host0:1234 --num_processes=4 --process_id=$RANK   # explicit
    (no flags) under SLURM with more than one task, under Open MPI, on a GKE TPU slice
               (TPU_WORKER_HOSTNAMES), or anywhere with LDM_JAX_DISTRIBUTED=1 (e.g. Cloud TPU
               VMs): `jax.distributed.initialize()` detects coordinator, process count and id.

After that `jax.devices()` lists the devices of all processes, meshes span them, each process
loads its own shard of the data (`jax.process_index()`), process 0 writes logs and images, and
all processes take part in every checkpoint. If a process dies, the coordination service misses
its heartbeats and, after `--heartbeat_timeout` seconds, terminates the others with an error
instead of letting them wait in a collective forever. On CPU devices the persistent compilation
cache is turned off (`compilation_cache.agree_across_processes`): gloo gives the processes 30 s
to meet at each program's first collective, and the cache would let some load a program that
others compile.
"""

from __future__ import annotations

import collections
import os

import jax
from absl import flags, logging
from jax._src import distributed as jax_distributed  # the coordination service client (no public API)
from jax.experimental import multihost_utils

from ldm_jax.runtime import compilation_cache

_FLAGS = {}
_BARRIER_CALLS = collections.Counter()


def define_flags() -> None:
  """Defines --coordinator_address, --num_processes, --process_id and --heartbeat_timeout."""
  if _FLAGS:
    return
  _FLAGS["coordinator_address"] = flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0's coordination service (multi-host runs).")
  _FLAGS["num_processes"] = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
  _FLAGS["process_id"] = flags.DEFINE_integer("process_id", None, "Index of this process, 0 … num_processes − 1.")
  _FLAGS["heartbeat_timeout"] = flags.DEFINE_integer(
      "heartbeat_timeout", 100, "Seconds without a heartbeat after which a process counts as dead and "
      "the others stop with an error.")


def initialize_from_flags() -> bool:
  """`initialize` with the values of the flags from `define_flags`."""
  return initialize(_FLAGS["coordinator_address"].value, _FLAGS["num_processes"].value,
                    _FLAGS["process_id"].value, heartbeat_timeout=_FLAGS["heartbeat_timeout"].value)


def cluster_environment() -> str | None:
  """The multi-process launcher this process runs under ('slurm', 'tpu', 'mpi', 'env'), or None.

  Only launchers that start more than one process count: a single SLURM task or a single TPU
  host runs as one process without `jax.distributed`. LDM_JAX_DISTRIBUTED=1 asks for JAX's own
  detection where no variable tells (Cloud TPU VMs find their peers through the metadata server).
  """
  env = os.environ
  if env.get("LDM_JAX_DISTRIBUTED", "") == "1":
    return "env"
  if env.get("SLURM_JOB_ID") and int(env.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return "tpu"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "mpi"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, heartbeat_timeout: int = 100) -> bool:
  """Connects this process to the others; returns whether the run is multi-process.

  With none of the three arguments and no multi-process launcher in the environment, does
  nothing (one process). Partial arguments are an error naming the missing flag.
  """
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  if any(v is not None for v in given.values()):
    missing = [f"--{k}" for k, v in given.items() if v is None]
    if missing:
      raise ValueError(f"{', '.join(missing)}: needed with "
                       f"{', '.join(f'--{k}' for k, v in given.items() if v is not None)} for a multi-host run.")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id: {process_id} is not in [0, --num_processes={num_processes}).")
    if num_processes == 1:
      return False
    source = "flags"
  else:
    source = cluster_environment()
    if source is None:
      return False
  if heartbeat_timeout < 1:
    raise ValueError(f"--heartbeat_timeout: {heartbeat_timeout} must be at least 1 second.")
  # Cross-process collectives of CPU devices need gloo (the CPU default has none); GPU and TPU
  # clients ignore this option.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout)
  logging.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", source,
               jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
  compilation_cache.agree_across_processes(jax.process_count(), jax.default_backend())
  return True


def barrier(name: str, timeout_s: float = 3600.0) -> None:
  """Waits until every process has reached `barrier(name)`; one process: returns at once.

  Through the coordination service that `initialize` started, not a device collective:
  `multihost_utils.sync_global_devices` is an all-reduce, and between CPU devices gloo gives the
  processes 30 s to meet, so a barrier that some processes reach only after a long job of process
  0's (importing a pretrained model, sampling class images) would fail with DEADLINE_EXCEEDED.
  Here they wait up to `timeout_s`. Each call of a name gets its own barrier (`name:N`, the N-th
  call on every process). Runs launched without `jax.distributed` (no client) use
  `sync_global_devices`.
  """
  if jax.process_count() == 1:
    return
  _BARRIER_CALLS[name] += 1
  client = jax_distributed.global_state.client
  if client is None:
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(f"ldm_jax:{name}:{_BARRIER_CALLS[name]}", timeout_in_ms=int(timeout_s * 1000))
