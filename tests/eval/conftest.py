"""A toy extractor (pixels of an 4×4 thumbnail as features) so that tests of the statistics
cache and of the metric plumbing run in milliseconds, without a real network."""

import jax.numpy as jnp
import pytest

from ldm_jax.eval.features import Extractor


def toy_apply(params, x):
  features = x.reshape(x.shape[0], -1) / 255.0 * params["scale"]
  return {"features": features, "logits": features[:, :5]}


def make_toy_extractor(identity="toy-v1", kind="toy"):
  return Extractor(spec="toy", kind=kind, tag="toy", identity=identity, input_size=4, channels=3,
                   params={"scale": jnp.ones(())}, apply=toy_apply, has_logits=True)


@pytest.fixture
def toy_extractor():
  return make_toy_extractor()


@pytest.fixture(name="make_toy_extractor")
def make_toy_extractor_fixture():
  return make_toy_extractor
