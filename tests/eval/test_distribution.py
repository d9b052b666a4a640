import numpy as np
import pytest
import scipy.linalg

from ldm_jax.eval.distribution import (frechet_distance, gaussian_stats, inception_score, kid,
                                       precision_recall, trace_sqrt_product)


def random_cov(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d


def test_fd_of_a_set_with_itself_is_zero():
  features = np.random.default_rng(0).normal(size=(300, 16))
  mu, sigma = gaussian_stats(features)
  assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_fd_between_gaussians_has_the_closed_form():
  # Diagonal covariances commute: d² = ‖μ₁ − μ₂‖² + Σ (√a − √b)².
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.0])
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
  expected = 1 + 4 + 0 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 0.5) ** 2
  assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
  # 1-D: (μ₁ − μ₂)² + (σ₁ − σ₂)².
  assert frechet_distance([3.0], [[4.0]], [0.0], [[1.0]]) == pytest.approx(9 + 1, rel=1e-12)


def test_fd_agrees_with_the_scipy_sqrtm_formula_on_full_covariances():
  rng = np.random.default_rng(1)
  s1, s2 = random_cov(rng, 20), random_cov(rng, 20)
  mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
  assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-9)


def test_fd_is_finite_and_exact_for_singular_covariances():
  # Fewer samples than dimensions give rank-deficient Σ, where sqrtm needs pytorch-fid's offset
  # (and is then off by ~√offset per null direction). With Σᵢ = AᵢAᵢᵀ/d the exact answer is
  # tr((Σ₁Σ₂)^½) = Σ singular values of A₁ᵀA₂ / d.
  rng = np.random.default_rng(2)
  a1, a2 = rng.normal(size=(30, 5)), rng.normal(size=(30, 7))
  s1, s2 = a1 @ a1.T / 30, a2 @ a2.T / 30
  exact = np.trace(s1 + s2) - 2 * np.sum(np.linalg.svd(a1.T @ a2 / 30, compute_uv=False))
  value = frechet_distance(np.zeros(30), s1, np.zeros(30), s2)
  assert value == pytest.approx(exact, rel=1e-9)
  assert trace_sqrt_product(s1, s1) == pytest.approx(np.trace(s1), rel=1e-9)


def test_fd_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="shapes"):
    frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def mmd2_by_definition(x, y):
  k = lambda a, b: (a @ b / x.shape[1] + 1) ** 3
  m = len(x)
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
  return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd():
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(12, 4)), rng.normal(0.5, 1.0, size=(12, 4))
  mean, std = kid(x, y, subsets=1, subset_size=12)  # one subset = the whole sets, permuted
  assert mean == pytest.approx(mmd2_by_definition(x, y), rel=1e-10)
  assert std == 0.0


def test_kid_is_unbiased_on_identical_distributions_and_grows_with_a_shift():
  rng = np.random.default_rng(4)
  estimates, shifted = [], []
  for seed in range(20):
    x, y = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    estimates.append(kid(x, y, subsets=5, subset_size=100, seed=seed)[0])
    shifted.append(kid(x, y + 0.5, subsets=5, subset_size=100, seed=seed)[0])
  # The biased (V-statistic) estimate would be > 0 on every draw; the unbiased one scatters around 0.
  assert min(estimates) < 0 < max(estimates)
  assert abs(np.mean(estimates)) < 3 * np.std(estimates) / np.sqrt(len(estimates))
  assert np.mean(shifted) > 10 * np.std(estimates)
  x = rng.normal(size=(200, 8))
  assert kid(x, x + 1.0, 10, 100)[0] > kid(x, x + 0.5, 10, 100)[0] > 0


def test_kid_needs_subset_size_samples():
  with pytest.raises(ValueError, match="subset_size=50 needs at least that many samples"):
    kid(np.zeros((40, 3)), np.zeros((60, 3)), subset_size=50)


def test_precision_recall_identical_and_disjoint_sets():
  rng = np.random.default_rng(5)
  real = rng.normal(size=(100, 5))
  assert precision_recall(real, real.copy(), k=3) == (1.0, 1.0)
  assert precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)


def test_precision_recall_separate_fidelity_from_coverage():
  rng = np.random.default_rng(6)
  real = rng.normal(size=(400, 2))
  # Fakes collapsed onto a small part of the real distribution: faithful, but not covering it.
  collapsed = rng.normal(scale=0.2, size=(400, 2))
  precision, recall = precision_recall(real, collapsed, k=3)
  assert precision > 0.9 and recall < 0.5
  # Blocks of rows give the same answer as one block.
  assert precision_recall(real, collapsed, k=3, block=37) == (precision, recall)


def test_precision_recall_needs_more_than_k_samples():
  with pytest.raises(ValueError, match="k=3 needs more than 3 samples"):
    precision_recall(np.zeros((10, 2)), np.zeros((3, 2)), k=3)


def test_inception_score_of_uniform_and_of_confident_distinct_classes():
  assert inception_score(np.zeros((50, 7)), splits=5)[0] == pytest.approx(1.0)
  # 10 classes, each predicted with certainty, equally often: IS = 10.
  confident = np.tile(np.eye(10) * 100.0, (5, 1))
  mean, std = inception_score(confident, splits=1)
  assert mean == pytest.approx(10.0, rel=1e-6) and std == 0.0
  # All samples confidently one class: no diversity, IS = 1.
  assert inception_score(np.tile(np.eye(10)[:1] * 100.0, (20, 1)), splits=2)[0] == pytest.approx(1.0)


def test_inception_score_needs_a_sample_per_split():
  with pytest.raises(ValueError, match="cannot form 10 splits"):
    inception_score(np.zeros((5, 3)), splits=10)
