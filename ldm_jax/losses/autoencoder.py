"""Stage-1 objectives: reconstruction + LPIPS + (KL | codebook) + PatchGAN with adaptive weight.

The terms follow the reference losses of latent-diffusion (`LPIPSWithDiscriminator`, KL
autoencoders) and taming-transformers (`VQLPIPSWithDiscriminator`, VQ autoencoders). With
x the input, x̃ the reconstruction, D the discriminator and E the last decoder layer:

    autoencoder step:  L = nll + reg + λ · disc_factor · g_loss
      KL:  nll = kl_nll_loss(...) = Σ_{pixels} (|x - x̃| + w_p·LPIPS) / e^{logvar} + logvar, / B
           (|x - x̃| becomes (x - x̃)² with loss.pixel_loss 'l2')
           reg = kl_weight · mean_B posterior.kl()   (the KL is summed per example by the model's
                 DiagonalGaussian, then averaged over the batch)
      VQ:  nll = vq_nll_loss(...) = mean(|x - x̃| + w_p·LPIPS),  reg = codebook_weight · codebook loss
      g_loss = generator_loss(D(x̃)),  λ = adaptive_weight(∇_E nll, ∇_E g_loss, disc_weight)
    discriminator step:  disc_factor · discriminator_loss(D(x), D(x̃))

The GAN terms are off until step `loss.disc_start`: the trainer compiles a step without them.
The trainer computes nll and g_loss separately so that it can take both gradients w.r.t. the
decoder's last layer (jax.vjp) for λ; everything here is a pure function of arrays.
"""

import jax
import jax.numpy as jnp

from ldm_jax import config as checks
from ldm_jax.models.discriminator import NORMS


def validate_loss_config(cfg):
  """Raises ValueError naming the offending `loss.*` key, before anything is compiled."""
  _check_kind(cfg.disc_loss)
  if cfg.pixel_loss not in PIXEL_LOSSES:
    raise ValueError(f"loss.pixel_loss: {cfg.pixel_loss!r} is not one of {PIXEL_LOSSES}.")
  if cfg.disc_norm not in NORMS:
    raise ValueError(f"loss.disc_norm: {cfg.disc_norm!r} is not one of {NORMS}.")
  for key, minimum in (("disc_start", 0), ("disc_num_layers", 1), ("disc_ndf", 1)):
    checks.check_number(f"loss.{key}", cfg[key], integer=True, ge=minimum)
  for key in ("disc_weight", "disc_factor", "kl_weight", "perceptual_weight", "codebook_weight"):
    checks.check_number(f"loss.{key}", cfg[key], ge=0)
  checks.check_number("loss.logvar_init", cfg.logvar_init)
  if not isinstance(cfg.learn_logvar, bool):
    raise ValueError(f"loss.learn_logvar: expected true or false, got {cfg.learn_logvar!r}.")


def hinge_d_loss(logits_real, logits_fake):
  """Hinge discriminator loss ½(mean relu(1 - D(x)) + mean relu(1 + D(x̃))); logits any shape."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real, logits_fake):
  """Logistic (non-saturating GAN) discriminator loss, ½ of the binary cross-entropy on real/fake."""
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


_D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def _check_kind(kind):
  if kind not in _D_LOSSES:
    raise ValueError(f"loss.disc_loss: {kind!r} is not one of {sorted(_D_LOSSES)}.")


def discriminator_loss(logits_real, logits_fake, kind="hinge"):
  """Discriminator loss of the given kind ('hinge' | 'vanilla'); logits [B, h, w, 1] -> scalar."""
  _check_kind(kind)
  return _D_LOSSES[kind](logits_real.astype(jnp.float32), logits_fake.astype(jnp.float32))


def generator_loss(logits_fake, kind="hinge"):
  """Adversarial loss of the autoencoder; logits [B, h, w, 1] -> scalar.

  'hinge': -mean D(x̃), as the reference uses for both of its discriminator losses.
  'vanilla': mean softplus(-D(x̃)), the non-saturating loss that matches the logistic
  discriminator (the reference uses -mean D(x̃) here too; pass 'hinge' to reproduce that).
  """
  _check_kind(kind)
  logits_fake = logits_fake.astype(jnp.float32)
  if kind == "hinge":
    return -jnp.mean(logits_fake)
  return jnp.mean(jax.nn.softplus(-logits_fake))


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(tree)))


def adaptive_weight(nll_grads, g_grads, disc_weight):
  """GAN weight λ that balances the two gradients at the decoder's last layer (VQGAN, eq. 7).

  λ = disc_weight · clip(‖∇ nll‖ / (‖∇ g_loss‖ + 1e-4), 0, 1e4), with no gradient through λ.

  Args:
    nll_grads, g_grads: gradients of nll and g_loss w.r.t. the last decoder layer's
      weights (an array or a pytree of arrays; the norm is over all of their entries).
    disc_weight: loss.disc_weight.
  Returns:
    scalar float32.
  """
  ratio = _global_norm(nll_grads) / (_global_norm(g_grads) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4)) * disc_weight


# loss.pixel_loss: the per-pixel distance of the reconstruction term.
PIXEL_LOSSES = ("l1", "l2")


def _reconstruction_loss(x, x_rec, p_loss, perceptual_weight, pixel_loss="l1"):
  """|x - x̃| (or (x - x̃)² for 'l2') + w_p·LPIPS per pixel: [B, H, W, C] images, [B] LPIPS -> [B, H, W, C]."""
  x, x_rec = x.astype(jnp.float32), x_rec.astype(jnp.float32)
  distance = jnp.abs(x - x_rec) if pixel_loss == "l1" else jnp.square(x - x_rec)
  return distance + perceptual_weight * p_loss.astype(jnp.float32)[:, None, None, None]


def kl_nll_loss(x, x_rec, logvar, p_loss, perceptual_weight=1.0, pixel_loss="l1"):
  """Negative log-likelihood of the KL autoencoder under a Laplace-like likelihood with one
  learned scale: Σ_{h,w,c} (rec / e^{logvar} + logvar), averaged over the batch.

  The LPIPS distance of each image is added to every one of its pixels (the reference's
  broadcasting), so it weighs H·W·C times in the sum.

  Args:
    x, x_rec: [B, H, W, C] input and reconstruction in [-1, 1].
    logvar: scalar log-variance (loss.logvar_init, or a trained parameter).
    p_loss: [B] `lpips(params, x, x_rec)`; zeros when perceptual_weight is 0.
    perceptual_weight: loss.perceptual_weight.
    pixel_loss: loss.pixel_loss, 'l1' (the reference) or 'l2' (a Gaussian likelihood instead).
  Returns:
    (nll, rec_mean): the scalar NLL to minimise, and the mean reconstruction loss per pixel
    (distance + w_p·LPIPS) to log.
  """
  rec = _reconstruction_loss(x, x_rec, p_loss, perceptual_weight, pixel_loss)
  nll = jnp.sum(rec / jnp.exp(logvar) + logvar) / x.shape[0]
  return nll, jnp.mean(rec)


def vq_nll_loss(x, x_rec, p_loss, perceptual_weight=1.0, pixel_loss="l1"):
  """Reconstruction objective of the VQ autoencoder: mean over all pixels of |x - x̃| + w_p·LPIPS
  ((x - x̃)² with `pixel_loss` 'l2').

  Args:
    x, x_rec: [B, H, W, C] input and reconstruction in [-1, 1].
    p_loss: [B] `lpips(params, x, x_rec)`; zeros when perceptual_weight is 0.
    perceptual_weight: loss.perceptual_weight.
  Returns:
    scalar; it is both the nll for `adaptive_weight` and the logged rec loss.
  """
  return jnp.mean(_reconstruction_loss(x, x_rec, p_loss, perceptual_weight, pixel_loss))
