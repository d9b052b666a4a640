"""Jobs that prepare data for training once: `python -m ldm_jax.precompute` (the latent cache)."""
