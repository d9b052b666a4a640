"""Two JAX processes × 2 CPU devices (gloo) with the persistent compilation cache asked for: both
compile every program, run after run, so that they reach its first collective together.

With the cache on, JAX writes entries from process 0 only and CPU cache keys differ by process: a
second run's process 0 would load the program while process 1 compiles it, and process 0 would
wait at the program's first collective for the gloo context, which gives up after 30 s
(`ldm_jax.runtime.compilation_cache`)."""

import os

import pytest

from tests.train.runs import Run, cpu_env, free_port, wait_all

PROGRAM = """
import logging, sys
logging.basicConfig(level=logging.WARNING)
logging.getLogger("jax._src.compiler").setLevel(logging.DEBUG)
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ldm_jax.runtime import compilation_cache, distributed
compilation_cache.enable()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
distributed.initialize(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]))
mesh = Mesh(np.array(jax.devices()), ("data",))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), np.full((2, 3), jax.process_index() + 1.0))
total = jax.jit(lambda x: x.sum(0), out_shardings=NamedSharding(mesh, P()))(x)
print("SUM", np.asarray(total.addressable_data(0)).tolist(), "CACHE", jax.config.jax_enable_compilation_cache)
"""


@pytest.mark.extended
def test_processes_on_cpu_devices_compile_alike_with_the_cache_asked_for(tmp_path):
  cache = tmp_path / "jax_cache"
  env = {k: v for k, v in cpu_env(2, str(cache)).items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["LDM_JAX_COMPILATION_CACHE"] = str(cache)
  for attempt in range(2):  # the second run is the resume that found process 0's entries
    port = free_port()
    runs = [Run(["-c", PROGRAM, str(port), str(i)], env, str(tmp_path / f"run{attempt}_{i}.log")) for i in range(2)]
    assert wait_all(runs, 300) == [0, 0], "\n".join(run.output()[-3000:] for run in runs)
    for run in runs:
      assert "SUM [6.0, 6.0, 6.0] CACHE False" in run.output()
      assert "Persistent compilation cache hit" not in run.output()
  assert not cache.exists() or not any(name.startswith("jit_") for name in os.listdir(cache))
