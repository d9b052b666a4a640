"""Test-wide setup: 8 simulated CPU devices so that meshes are exercised on one machine."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
