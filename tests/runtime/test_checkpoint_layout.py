"""A train state whose layout changed: stage 2 no longer keeps an EMA of frozen text encoders
(`ema_params.cond`), and the trainer restores checkpoints that still hold one."""

import jax
import numpy as np
import pytest

from ldm_jax.runtime.checkpoint import Checkpointer
from ldm_jax.train.diffusion.state import DiffusionState, ema_weights


def _state(ema):
  return DiffusionState(step=np.int32(3), params={"unet": np.ones(3, np.float32), "cond": np.full(2, 2.0, np.float32)},
                        ema_params=ema, opt_state=(np.zeros(3, np.float32),), rng=np.zeros(2, np.uint32),
                        scale_factor=np.float32(0.5))


def test_an_older_checkpoint_with_the_ema_of_frozen_encoders_restores_into_the_state_without_it(tmp_path):
  directory = str(tmp_path / "checkpoints")
  older = Checkpointer(directory)
  older.save(1, _state({"unet": np.full(3, 5.0, np.float32), "cond": np.full(2, 2.0, np.float32)}))
  older.close()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=device),
                          _state({"unet": np.zeros(3, np.float32)}))
  checkpointer = Checkpointer(directory)
  try:
    with pytest.raises(ValueError, match=r"ema_params\.cond"):  # any other layout change names the path
      checkpointer.restore(abstract)
    state = checkpointer.restore(abstract, unread=(("ema_params", "cond"),))
    assert set(state.ema_params) == {"unet"}
    np.testing.assert_array_equal(state.ema_params["unet"], np.full(3, 5.0))
    weights = ema_weights(state)  # what sampling uses: the EMA U-Net, the frozen encoder from params
    np.testing.assert_array_equal(weights["unet"], np.full(3, 5.0))
    np.testing.assert_array_equal(weights["cond"], np.full(2, 2.0))
    # The run goes on in the new layout, and the same call restores it.
    checkpointer.save(2, state)
    checkpointer.wait()
    state = checkpointer.restore(abstract, unread=(("ema_params", "cond"),))
    assert int(state.step) == 3 and set(state.ema_params) == {"unet"}
  finally:
    checkpointer.close()
