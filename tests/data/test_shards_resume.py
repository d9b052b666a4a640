"""Kill -9 mid-shard, resume from the checkpoint: the same batches, with grain worker processes.

A subprocess reads shards with `data.num_workers=2` and saves its iterator position with the
trainers' `Checkpointer` every 3 batches, writing each batch it draws to a file; one run kills
itself with SIGKILL after batch 7 (inside a shard: 18 records, 4 per batch), the same command then
resumes from checkpoint 6. Every batch equals the uninterrupted run's.
"""

import os
import signal

import numpy as np
import pytest

from tests.data.test_shards import make_shards
from tests.train.runs import Run, cpu_env, jax_cache  # noqa: F401

SCRIPT = r"""
import os, signal, sys
import jax, jax.numpy as jnp, numpy as np
from absl import app
from ldm_jax.config.sections import default_data_config
from ldm_jax.data import make_loader
from ldm_jax.runtime.checkpoint import Checkpointer

def main(argv):
  shards, ckpt_dir, out, kill_after, num_batches = argv[1], argv[2], argv[3], int(argv[4]), int(argv[5])
  cfg = default_data_config()
  cfg.update(source='shards', path=shards, image_size=8, random_crop=True, random_flip=True, num_workers=2)
  it = make_loader(cfg, 'train', batch_size=4, seed=11)
  ckpt = Checkpointer(ckpt_dir, async_save=False)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  state = ckpt.restore({'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=device)}, it)
  start = 0 if state is None else int(state['step'])
  for step in range(start + 1, num_batches + 1):
    batch = next(it)
    np.savez(os.path.join(out, f'{step}.npz'), image=batch['image'], caption=batch['caption'])
    if step % 3 == 0:
      ckpt.save(step, {'step': jnp.int32(step)}, it)
    if step == kill_after:
      os.kill(os.getpid(), signal.SIGKILL)
  ckpt.close()

app.run(main)
"""


@pytest.mark.slow
def test_killed_reader_resumes_to_the_same_batches(tmp_path, jax_cache):
  make_shards(tmp_path / 'shards')
  env = cpu_env(1, jax_cache)

  def run(name, kill_after, ckpt):
    out = tmp_path / name
    out.mkdir()
    proc = Run(['-c', SCRIPT, str(tmp_path / 'shards'), str(tmp_path / ckpt), str(out), str(kill_after), '12'],
               env, str(tmp_path / f'{name}.log'))
    return proc.wait(300), out, proc

  code, reference, proc = run('reference', 0, 'ckpt_reference')
  assert code == 0, proc.output()[-3000:]
  code, killed, proc = run('killed', 7, 'ckpt')
  assert code == -signal.SIGKILL, proc.output()[-3000:]
  code, resumed, proc = run('resumed', 0, 'ckpt')
  assert code == 0, proc.output()[-3000:]
  assert sorted(os.listdir(killed)) == sorted(f'{s}.npz' for s in range(1, 8))
  assert sorted(os.listdir(resumed)) == sorted(f'{s}.npz' for s in range(7, 13))  # from checkpoint 6

  def same(a, b):
    a, b = np.load(a), np.load(b)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['caption'], b['caption'])

  for step in range(1, 8):
    same(killed / f'{step}.npz', reference / f'{step}.npz')
  for step in range(7, 13):
    same(resumed / f'{step}.npz', reference / f'{step}.npz')
