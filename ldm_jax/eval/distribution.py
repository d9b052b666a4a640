"""Distribution metrics between a set of generated and a set of real images, on their features.

All are pure numpy functions of feature arrays `[N, D]` (from `ldm_jax.eval.features`) and
compute in float64. Which network gave the features decides the metric's name: on the FID
Inception-v3 pool3 features the Fréchet distance is "FID"; on any other extractor it is
reported as FD-<extractor> (e.g. FD-VGG16), never as FID.

- `frechet_distance`: ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½) between Gaussians fitted to the
  two sets (Heusel et al., 2017).
- `kid`: the unbiased MMD² with the cubic polynomial kernel, averaged over random subsets
  (Bińkowski et al., 2018; the estimator and defaults of torch-fidelity).
- `precision_recall`: k-NN manifold precision and recall (Kynkäänniemi et al., 2019).
- `inception_score`: exp E_x KL(p(y|x) ‖ p(y)) over splits (Salimans et al., 2016).
"""

from __future__ import annotations

import numpy as np


def _as_features(x, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name}: expected features [N, D], got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name}: features contain NaN or inf")
  return x


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
  """(μ [D], Σ [D, D]) of features [N, D]: the mean and the unbiased (N − 1) covariance."""
  features = _as_features(features, "gaussian_stats")
  if len(features) < 2:
    raise ValueError(f"gaussian_stats: a covariance needs at least 2 samples, got {len(features)}")
  return features.mean(axis=0), np.cov(features, rowvar=False)


def _psd_eigenvalues_floor(w: np.ndarray) -> np.ndarray:
  """Eigenvalues of a PSD matrix with those below its round-off level (D·ε·λ_max) set to 0:
  their square roots would otherwise add √ε-sized noise per null direction."""
  tol = len(w) * np.finfo(np.float64).eps * max(float(np.max(np.abs(w))), 0.0)
  return np.where(w > tol, w, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric PSD matrix."""
  w, v = np.linalg.eigh(sigma)
  return (v * np.sqrt(_psd_eigenvalues_floor(w))) @ v.T


def trace_sqrt_product(sigma1, sigma2) -> float:
  """tr((Σ₁Σ₂)^½) for symmetric PSD Σ₁, Σ₂.

  Σ₁Σ₂ is not symmetric, so a general matrix square root (scipy.linalg.sqrtm, as pytorch-fid)
  can return complex values, or fail on the near-singular covariances that fewer samples than
  dimensions give; pytorch-fid then retries with 1e-6 added to both diagonals. Instead:
  Σ₁Σ₂ = Σ₁^½ (Σ₁^½ Σ₂ Σ₁^½) Σ₁^-½ is similar to the symmetric PSD M = Σ₁^½ Σ₂ Σ₁^½, so its
  eigenvalues are those of M, real and ≥ 0, and tr((Σ₁Σ₂)^½) = Σᵢ √λᵢ(M). This needs only
  two symmetric eigendecompositions, is real by construction, and is exact for singular Σ
  (no offset). It agrees with the sqrtm route wherever that one succeeds.
  """
  root1 = _psd_sqrt(np.asarray(sigma1, np.float64))
  m = root1 @ np.asarray(sigma2, np.float64) @ root1
  eigenvalues = np.linalg.eigvalsh((m + m.T) / 2)
  return float(np.sum(np.sqrt(_psd_eigenvalues_floor(eigenvalues))))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Fréchet (2-Wasserstein²) distance between N(μ₁, Σ₁) and N(μ₂, Σ₂).

  d² = ‖μ₁ − μ₂‖² + tr(Σ₁) + tr(Σ₂) − 2 tr((Σ₁Σ₂)^½), see `trace_sqrt_product`.

  Args:
    mu1, mu2: [D] means. sigma1, sigma2: [D, D] covariances (e.g. from `gaussian_stats`).
  Returns:
    A float ≥ 0 (up to round-off; tiny negative values are clipped to 0).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"frechet_distance: shapes do not match: mu {mu1.shape}, {mu2.shape}; "
                     f"sigma {sigma1.shape}, {sigma2.shape}")
  diff = mu1 - mu2
  value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
  return float(max(value, 0.0))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD² of two equal-size samples with k(a, b) = (a·b / D + 1)³.

  (Σ_{i≠j} k(xᵢ, xⱼ) + Σ_{i≠j} k(yᵢ, yⱼ)) / (m(m − 1)) − 2 Σ_{i,j} k(xᵢ, yⱼ) / m².
  """
  m, d = x.shape
  k_xx = (x @ x.T / d + 1.0) ** 3
  k_yy = (y @ y.T / d + 1.0) ** 3
  k_xy = (x @ y.T / d + 1.0) ** 3
  within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
  return float(within - 2.0 * k_xy.sum() / (m * m))


def kid(features1, features2, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
  """Kernel Inception Distance: mean and std of the unbiased MMD² over random subsets.

  Each of `subsets` rounds draws `subset_size` rows of each set without replacement (as
  torch-fidelity, whose defaults these are). Being unbiased, the value can be slightly
  negative for identical distributions. Papers often print it ×1000.

  Args:
    features1, features2: [N₁, D], [N₂, D].
  Returns:
    (mean, std) over the subsets.
  Raises:
    ValueError: a set has fewer than `subset_size` rows, or `subset_size` < 2.
  """
  x, y = _as_features(features1, "kid: features1"), _as_features(features2, "kid: features2")
  if x.shape[1] != y.shape[1]:
    raise ValueError(f"kid: feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
  if subset_size < 2 or subsets < 1:
    raise ValueError(f"kid: need subset_size >= 2 and subsets >= 1, got {subset_size}, {subsets}")
  if min(len(x), len(y)) < subset_size:
    raise ValueError(f"kid: subset_size={subset_size} needs at least that many samples in each "
                     f"set, got {len(x)} and {len(y)}; lower the KID subset size or add samples")
  rng = np.random.default_rng(seed)
  values = [_mmd2_unbiased(x[rng.choice(len(x), subset_size, replace=False)],
                           y[rng.choice(len(y), subset_size, replace=False)])
            for _ in range(subsets)]
  return float(np.mean(values)), float(np.std(values))


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """‖aᵢ − bⱼ‖² [len(a), len(b)] via one matmul, clipped at 0 against cancellation."""
  d = np.sum(a * a, axis=1)[:, None] - 2.0 * a @ b.T + np.sum(b * b, axis=1)[None, :]
  return np.maximum(d, 0.0)


def _kth_neighbour_radii(x: np.ndarray, k: int, block: int) -> np.ndarray:
  """Squared distance from each row of x to its k-th nearest other row (itself excluded)."""
  radii = np.empty(len(x))
  for start in range(0, len(x), block):
    d = _squared_distances(x[start:start + block], x)
    # The point itself is at distance 0, the smallest; the k-th neighbour is the (k+1)-th value.
    radii[start:start + block] = np.partition(d, k, axis=1)[:, k]
  return radii


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, block: int) -> float:
  """Fraction of `points` inside at least one ball (centre, radius) — ≤, as the reference."""
  inside = np.zeros(len(points), bool)
  for start in range(0, len(points), block):
    d = _squared_distances(points[start:start + block], centres)
    inside[start:start + block] = np.any(d <= radii[None, :], axis=1)
  return float(inside.mean())


def precision_recall(real, fake, k: int = 3, block: int = 1024) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al., 2019).

  The real manifold is the union of balls around each real feature with radius its distance
  to its k-th nearest real neighbour; likewise for the fake manifold. Precision is the
  fraction of fake samples inside the real manifold (fidelity), recall the fraction of real
  samples inside the fake manifold (coverage). Distances are computed `block` rows at a time,
  so memory is O(block · N).

  Args:
    real, fake: [N_real, D], [N_fake, D] features.
    k: neighbourhood size (3 in the paper).
  Returns:
    (precision, recall), each in [0, 1].
  Raises:
    ValueError: a set has k or fewer samples (no k-th neighbour besides itself).
  """
  real = _as_features(real, "precision_recall: real")
  fake = _as_features(fake, "precision_recall: fake")
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"precision_recall: feature dimensions differ: {real.shape[1]} vs {fake.shape[1]}")
  if k < 1:
    raise ValueError(f"precision_recall: k must be >= 1, got {k}")
  if min(len(real), len(fake)) <= k:
    raise ValueError(f"precision_recall: k={k} needs more than {k} samples in each set, got "
                     f"{len(real)} real and {len(fake)} fake")
  precision = _coverage(fake, real, _kth_neighbour_radii(real, k, block), block)
  recall = _coverage(real, fake, _kth_neighbour_radii(fake, k, block), block)
  return precision, recall


def inception_score(logits, splits: int = 10, seed: int = 0) -> tuple[float, float]:
  """Inception Score exp(E_x KL(p(y|x) ‖ p(y))): mean and std over `splits` equal parts.

  The rows are shuffled with `seed` first (as torch-fidelity), so that samples written in
  class order do not make each split a single class. For the FID Inception network pass its
  bias-free logits (`logits_unbiased`), as the original Inception Score code does.

  Args:
    logits: [N, K] unnormalised class scores.
  Returns:
    (mean, std); 1 when every p(y|x) is the same, K for confident, evenly spread classes.
  """
  logits = _as_features(logits, "inception_score: logits")
  n = len(logits)
  if splits < 1 or n < splits:
    raise ValueError(f"inception_score: {n} samples cannot form {splits} splits")
  logits = logits[np.random.default_rng(seed).permutation(n)]
  log_p = logits - logits.max(axis=1, keepdims=True)
  log_p = log_p - np.log(np.sum(np.exp(log_p), axis=1, keepdims=True))
  scores = []
  for part in np.array_split(log_p, splits):
    p = np.exp(part)
    with np.errstate(divide="ignore"):  # a class no sample gives mass contributes nothing
      log_marginal = np.log(np.mean(p, axis=0))
    kl = np.sum(np.where(p > 0, p * (part - log_marginal[None, :]), 0.0), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))
