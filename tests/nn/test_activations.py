"""`gelu` (the erf form) against float64 GELU, torch's `F.gelu` and `jax.nn.gelu`'s erfc form."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.nn.activations import gelu

_X = np.linspace(-12.0, 12.0, 200_001).astype(np.float32)


def _cdf(x):
  """Φ(x) in float64."""
  return 0.5 * np.array([math.erfc(-v / math.sqrt(2.0)) for v in np.asarray(x, np.float64)])


def _exact(x):
  return np.asarray(x, np.float64) * _cdf(x)


def test_gelu_is_exact_gelu_to_float32_rounding():
  got, want = np.asarray(gelu(jnp.asarray(_X))), _exact(_X)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=0, atol=1.5e-6)
  # relative accuracy where 1 + erf(x/√2) loses few digits to cancellation (x > -2: 1 + erf > 0.045)
  mask = _X > -2.0
  np.testing.assert_allclose(got[mask], want[mask], rtol=1e-5, atol=1e-7)


def test_gelu_matches_torch_and_jax_erfc_form():
  torch = pytest.importorskip("torch")
  want = torch.nn.functional.gelu(torch.from_numpy(_X)).numpy()
  got = np.asarray(gelu(jnp.asarray(_X)))
  np.testing.assert_allclose(got, want, rtol=0, atol=1.5e-6)
  np.testing.assert_allclose(got, np.asarray(jax.nn.gelu(jnp.asarray(_X), approximate=False)), rtol=0, atol=1.5e-6)


def test_gelu_gradient_is_the_exact_derivative():
  x = jnp.asarray(_X[::50])
  got = np.asarray(jax.vmap(jax.grad(gelu))(x))
  x64 = np.asarray(x, np.float64)
  phi = np.exp(-0.5 * x64**2) / math.sqrt(2.0 * math.pi)
  np.testing.assert_allclose(got, _cdf(x64) + x64 * phi, rtol=0, atol=2e-6)


def test_gelu_keeps_bfloat16():
  x = jnp.asarray(_X[::1000], jnp.bfloat16)
  got = gelu(x)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), _exact(np.asarray(x, np.float32)), rtol=2e-2, atol=2e-2)
