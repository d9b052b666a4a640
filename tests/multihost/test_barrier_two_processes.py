"""`distributed.barrier` across two JAX processes × 2 CPU devices (gloo) when one arrives 40 s late:
the coordination service waits; a device collective (`sync_global_devices`) between CPU devices
would give up after gloo's 30 s."""

import pytest

from tests.train.runs import Run, cpu_env, free_port, wait_all

PROGRAM = """
import os, sys, time
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ldm_jax.runtime import distributed
distributed.initialize(f"localhost:{sys.argv[1]}", 2, int(sys.argv[2]))
marker = sys.argv[3]
for round_ in range(2):  # the same name twice: each call is a barrier of its own
  if jax.process_index() == 1:
    time.sleep(40 if round_ == 0 else 1)
    open(f"{marker}.{round_}", "w").close()
  distributed.barrier("late_process")
  assert os.path.exists(f"{marker}.{round_}"), "passed the barrier before process 1 reached it"
mesh = Mesh(np.array(jax.devices()), ("data",))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), np.full((2, 3), jax.process_index() + 1.0))
total = jax.jit(lambda x: x.sum(0), out_shardings=NamedSharding(mesh, P()))(x)
print("SUM", np.asarray(total.addressable_data(0)).tolist())
"""


@pytest.mark.extended
def test_a_process_40_s_late_meets_the_others_at_the_barrier(tmp_path):
  env = cpu_env(2, str(tmp_path / "jax_cache"))
  port = free_port()
  marker = str(tmp_path / "arrived")
  runs = [Run(["-c", PROGRAM, str(port), str(i), marker], env, str(tmp_path / f"run{i}.log")) for i in range(2)]
  assert wait_all(runs, 300) == [0, 0], "\n".join(run.output()[-3000:] for run in runs)
  for run in runs:
    assert "SUM [6.0, 6.0, 6.0]" in run.output()
