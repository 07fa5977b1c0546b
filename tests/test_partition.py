"""Tests for scorebook.partition against the closed-form log Z of unnormalised Gaussians."""
from __future__ import annotations

import math

import pytest
import torch

from scorebook.densities import Gaussian
from scorebook.partition import (
    ZEstimate,
    gaussian_log_partition,
    grid_log_partition,
    importance_log_partition,
    mc_log_partition,
)


def gaussian_f(cov: torch.Tensor, mean: torch.Tensor | None = None):
    """f(x) = -1/2 (x - m)^T cov^{-1} (x - m): an unnormalised Gaussian, (B, D) -> (B,)."""
    prec = torch.linalg.inv(cov)
    m = torch.zeros(cov.shape[0], dtype=torch.float64) if mean is None else mean

    def f(x):
        z = x - m
        return -0.5 * ((z @ prec) * z).sum(dim=1)

    return f


def test_gaussian_log_partition_closed_form():
    cov = torch.tensor([[2.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    expected = math.log(2 * math.pi) + 0.5 * math.log(2.0 * 0.5 - 0.3 ** 2)
    assert gaussian_log_partition(cov) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_grid_trapezoid_exact_in_low_dim(dim):
    # A smooth integrand that has decayed at the box edge: the trapezoid rule converges
    # faster than any power of h, so 61 nodes on [-10, 10] per axis (7 std from the mean)
    # already give ~1e-10.
    cov = torch.diag(torch.linspace(0.6, 1.4, dim, dtype=torch.float64) ** 2)
    cov[0, -1] = cov[-1, 0] = 0.2 if dim > 1 else cov[0, 0]
    f = gaussian_f(cov, mean=torch.full((dim,), 0.3, dtype=torch.float64))
    got = grid_log_partition(f, dim, lim=10.0, n_per_axis=61, rule="trapezoid", chunk_size=5000)
    assert float(got) == pytest.approx(gaussian_log_partition(cov), abs=1e-8)


def test_grid_midpoint_and_chunking_agree():
    f = gaussian_f(torch.eye(2, dtype=torch.float64))
    a = grid_log_partition(f, 2, lim=(-7.0, 7.0), n_per_axis=60, rule="midpoint", chunk_size=7)
    b = grid_log_partition(f, 2, lim=7.0, n_per_axis=60, rule="midpoint", chunk_size=10 ** 6)
    assert float(a) == pytest.approx(float(b), abs=1e-12)
    assert float(a) == pytest.approx(math.log(2 * math.pi), abs=1e-8)


def test_grid_is_differentiable_in_parameters():
    # f = -x^2 / (2 s^2): log Z = log(s sqrt(2 pi)), d log Z / d s = 1 / s.
    s = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    logz = grid_log_partition(lambda x: -0.5 * (x[:, 0] / s) ** 2, 1, lim=12.0, n_per_axis=801)
    logz.backward()
    assert float(s.grad) == pytest.approx(1 / 1.3, rel=1e-8)


def test_mc_uniform_box_within_its_error():
    # Uniform box [-L, L]^D estimates the truncated integral (sqrt(2 pi) erf(L / sqrt 2))^D.
    dim, lim, n = 3, 4.0, 200_000
    f = gaussian_f(torch.eye(dim, dtype=torch.float64))
    truth = dim * math.log(math.sqrt(2 * math.pi) * math.erf(lim / math.sqrt(2)))
    g = torch.Generator().manual_seed(0)
    est = mc_log_partition(f, dim, n, lim=lim, generator=g, batch_size=30_000)
    assert isinstance(est, ZEstimate) and est.n == n
    # exact relative variance per sample: (2L)^D * int e^{2f} / Z_box^2 - 1
    rel_var = ((2 * lim) * math.sqrt(math.pi) * math.erf(lim)
               / (2 * math.pi * math.erf(lim / math.sqrt(2)) ** 2)) ** dim - 1
    rel_se = math.sqrt(rel_var / n)
    assert est.rel_se == pytest.approx(rel_se, rel=0.1)   # the self-reported error is right here
    assert abs(math.exp(est.log_z - truth) - 1) < 4 * rel_se  # 4 standard errors


def test_importance_sampling_within_its_error():
    # p ~ exp(f) = N(0, I) unnormalised; proposal N(0, s^2 I) with s = 1.3.
    # Relative variance per sample: (s^2 / sqrt(2 s^2 - 1))^D - 1.
    dim, s, n = 5, 1.3, 100_000
    f = gaussian_f(torch.eye(dim, dtype=torch.float64))
    q = Gaussian(torch.zeros(dim), std=s)
    est = importance_log_partition(f, q, n, generator=torch.Generator().manual_seed(1))
    rel_se = math.sqrt(((s ** 2 / math.sqrt(2 * s ** 2 - 1)) ** dim - 1) / n)
    truth = gaussian_log_partition(torch.eye(dim, dtype=torch.float64))
    assert abs(math.exp(est.log_z - truth) - 1) < 4 * rel_se
    assert 0 < est.ess <= n


def test_importance_with_exact_proposal_has_zero_variance():
    # q proportional to exp(f): every weight equals Z, so the estimate is exact and ESS = n.
    cov = torch.tensor([[1.5, 0.4], [0.4, 0.8]], dtype=torch.float64)
    q = Gaussian(torch.zeros(2), cov)
    est = importance_log_partition(gaussian_f(cov), q, 1000, generator=torch.Generator().manual_seed(2))
    assert est.log_z == pytest.approx(gaussian_log_partition(cov), abs=1e-10)
    assert est.ess == pytest.approx(1000, rel=1e-9)
    assert est.rel_se < 1e-6


def test_bad_input_raises():
    f = gaussian_f(torch.eye(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="dim"):
        grid_log_partition(f, 0, 3.0, 10)
    with pytest.raises(ValueError, match="n_per_axis"):
        grid_log_partition(f, 2, 3.0, 1)
    with pytest.raises(ValueError, match="rule"):
        grid_log_partition(f, 2, 3.0, 10, rule="simpson")
    with pytest.raises(ValueError, match="lim"):
        grid_log_partition(f, 2, (3.0, -3.0), 10)
    with pytest.raises(ValueError, match="shape"):
        grid_log_partition(lambda x: x, 2, 3.0, 10)  # returns (B, D), not (B,)
    with pytest.raises(ValueError, match="n must be"):
        mc_log_partition(f, 2, 1, 3.0)
    with pytest.raises(ValueError, match="proposal"):
        importance_log_partition(f, object(), 100)
    with pytest.raises(ValueError, match="cov"):
        gaussian_log_partition(torch.tensor([[1.0, 2.0], [2.0, 1.0]]))
