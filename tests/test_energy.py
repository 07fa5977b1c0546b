"""Tests for scorebook.energy: every log Z is checked against a closed form or scipy.integrate.quad."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

from scorebook.energy import (
    MLPEnergy,
    double_well_energy,
    log_partition_1d,
    log_partition_2d,
    quadratic_energy,
    sample_1d,
    trapezoid_log_weights,
)


@pytest.mark.parametrize("mu,sigma", [(0.0, 1.0), (2.5, 0.3), (-1.0, 4.0)])
def test_quadratic_log_z_matches_gaussian_normaliser(mu, sigma):
    f = quadratic_energy(mu, sigma)
    log_z = log_partition_1d(f, mu - 12 * sigma, mu + 12 * sigma, n=4001)
    assert log_z.dtype == torch.float64 and log_z.ndim == 0
    assert abs(float(log_z) - math.log(sigma * math.sqrt(2 * math.pi))) < 1e-8


def test_trapezoid_rule_is_second_order_on_a_non_periodic_integrand():
    # int_0^1 e^x dx = e - 1; the endpoint half-weights make the error O(h^2) with constant
    # (b-a) h^2 / 12 * mean(f''), so doubling the intervals divides the error by 4.
    f = lambda x: x[:, 0]
    exact = math.log(math.e - 1)
    errs = [abs(float(log_partition_1d(f, 0.0, 1.0, n=m + 1)) - exact) for m in (50, 100, 200)]
    assert errs[0] / errs[1] == pytest.approx(4.0, rel=0.01)
    assert errs[1] / errs[2] == pytest.approx(4.0, rel=0.01)
    # Euler-Maclaurin: Z_h - Z ~ h^2/12 (f'(1) - f'(0)) = h^2/12 (e - 1) = h^2/12 * Z,
    # so the error in log Z is ~ h^2 / 12
    h = 1 / 200
    assert errs[2] == pytest.approx(h ** 2 / 12, rel=0.01)


def test_trapezoid_weights_sum_to_interval_length():
    x, log_w = trapezoid_log_weights(-2.0, 3.0, 11)
    assert x.shape == (11,) and float(x[0]) == -2.0 and float(x[-1]) == 3.0
    assert float(log_w.exp().sum()) == pytest.approx(5.0, abs=1e-12)


def test_minus_infinity_means_zero_density():
    # uniform on [0, 1] written as f = 0 inside, -inf outside. Each of the two jumps is
    # misplaced by at most half a cell of weight h/2, so |Z - 1| <= h (equality when the
    # jumps sit on nodes, as here; the 1e-9 allows for rounding).
    f = lambda x: torch.where((x[:, 0] >= 0) & (x[:, 0] <= 1), 0.0, -math.inf).to(torch.float64)
    n = 3001
    h = 3.0 / (n - 1)
    z = float(log_partition_1d(f, -1.0, 2.0, n=n).exp())
    assert abs(z - 1.0) <= h * (1 + 1e-9)


def test_log_partition_is_stable_for_huge_energies():
    # exp(1000) overflows float64; log Z must still be 1000 + log(sigma sqrt(2 pi))
    base = quadratic_energy(0.0, 0.5)
    f = lambda x: base(x) + 1000.0
    log_z = log_partition_1d(f, -8, 8, n=2001)
    assert float(log_z) == pytest.approx(1000.0 + math.log(0.5 * math.sqrt(2 * math.pi)), abs=1e-8)


def test_log_z_is_differentiable_in_the_parameters():
    # d log Z / d sigma = 1/sigma, d log Z / d mu = 0 for the Gaussian
    mu = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    sigma = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    log_z = log_partition_1d(quadratic_energy(mu, sigma), -15, 15, n=4001)
    log_z.backward()
    assert float(sigma.grad) == pytest.approx(1 / 1.3, abs=1e-8)
    assert abs(float(mu.grad)) < 1e-8


def test_2d_correlated_gaussian_log_z():
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.5]], dtype=torch.float64)
    prec = torch.linalg.inv(cov)
    mean = torch.tensor([0.5, -0.3], dtype=torch.float64)

    def f(x):
        d = x - mean
        return -0.5 * torch.einsum("ni,ij,nj->n", d, prec, d)

    exact = math.log(2 * math.pi) + 0.5 * math.log(float(torch.linalg.det(cov)))
    assert float(log_partition_2d(f, 10.0, n=301)) == pytest.approx(exact, abs=1e-8)


def test_2d_rectangle_and_diagonal_quadratic():
    f = quadratic_energy([1.0, -2.0], [0.5, 2.0])
    exact = math.log(0.5 * 2.0 * 2 * math.pi)
    lim = ((1.0 - 7.0, 1.0 + 7.0), (-2.0 - 25.0, -2.0 + 25.0))
    assert float(log_partition_2d(f, lim, n=401)) == pytest.approx(exact, abs=1e-8)


@pytest.mark.parametrize("a,b,tilt", [(1.0, 1.0, 0.0), (4.0, 1.2, 0.5), (0.3, 2.0, -1.0)])
def test_double_well_matches_scipy_quad(a, b, tilt):
    f = double_well_energy(a, b, tilt)
    ref, _ = integrate.quad(lambda x: math.exp(-a * (x * x - b * b) ** 2 + tilt * x),
                            -np.inf, np.inf, epsabs=0, epsrel=1e-12, limit=200)
    log_z = log_partition_1d(f, -6.0, 6.0, n=8001)
    assert float(log_z) == pytest.approx(math.log(ref), abs=1e-8)


def test_double_well_shape_and_modes():
    f = double_well_energy(2.0, 1.5)
    x = torch.linspace(-3, 3, 6001, dtype=torch.float64)
    fx = f(x)
    assert fx.shape == (6001,)
    assert torch.equal(f(x[:, None]), fx)
    xmax = x[fx.argmax()].abs()
    assert float(xmax) == pytest.approx(1.5, abs=1e-3)
    # the barrier: f(0) - f(b) = -a b^4
    assert float(f(torch.tensor([0.0])) - f(torch.tensor([1.5]))) == pytest.approx(-2.0 * 1.5 ** 4)


def test_mlp_energy_log_z_within_its_proven_bounds():
    torch.manual_seed(0)
    for dim, lim in ((1, None), (2, 12.0)):
        net = MLPEnergy(dim=dim, hidden=16, depth=2, confine=0.5).double()
        bound = net.output_bound()
        with torch.no_grad():
            if dim == 1:
                log_z = float(log_partition_1d(net, -14, 14, n=4001))
            else:
                log_z = float(log_partition_2d(net, lim, n=241))
        base = dim * 0.5 * math.log(2 * math.pi / 0.5)
        assert base - bound <= log_z <= base + bound
        # and not the trivial bound: Z differs from the pure Gaussian envelope
        assert abs(log_z - base) > 1e-6


def test_mlp_energy_shapes_and_gradients():
    torch.manual_seed(1)
    net = MLPEnergy(dim=1)
    x = torch.randn(7)
    assert net(x).shape == (7,)
    assert torch.allclose(net(x), net(x[:, None]))
    log_z = log_partition_1d(net, -12, 12, n=801, dtype=torch.float32)
    log_z.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    with pytest.raises(ValueError, match="shape"):
        MLPEnergy(dim=2)(torch.randn(5, 3))


@pytest.mark.parametrize("kwargs", [dict(lo=1.0, hi=1.0), dict(lo=2.0, hi=-1.0), dict(lo=0.0, hi=math.inf),
                                    dict(lo=0.0, hi=1.0, n=1), dict(lo=0.0, hi=1.0, n=2.5)])
def test_log_partition_1d_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        log_partition_1d(quadratic_energy(), **kwargs)


def test_bad_energies_and_limits_raise():
    with pytest.raises(ValueError, match="lim"):
        log_partition_2d(quadratic_energy([0.0, 0.0], 1.0), (3.0, -3.0))
    with pytest.raises(ValueError, match="lim"):
        log_partition_2d(quadratic_energy([0.0, 0.0], 1.0), -2.0)
    with pytest.raises(ValueError, match="map"):
        log_partition_1d(lambda x: x.sum()[None], -1, 1)
    with pytest.raises(ValueError, match="NaN"):
        log_partition_1d(lambda x: torch.log(x[:, 0]), -1, 1)
    with pytest.raises(ValueError, match="-inf at every"):
        log_partition_1d(lambda x: torch.full((x.shape[0],), -math.inf, dtype=x.dtype), -1, 1)
    with pytest.raises(ValueError, match="sigma"):
        quadratic_energy(0.0, 0.0)
    with pytest.raises(ValueError, match="sigma"):
        quadratic_energy(0.0, -1.0)
    with pytest.raises(ValueError, match="a must"):
        double_well_energy(a=-1.0)
    with pytest.raises(ValueError, match="confine"):
        MLPEnergy(confine=-1.0)
    with pytest.raises(ValueError, match="x must have shape"):
        quadratic_energy([0.0, 0.0], 1.0)(torch.zeros(4, 3))


def test_box_2d_reads_the_three_forms_and_rejects_empty_boxes():
    from scorebook.energy import box_2d

    assert box_2d(3) == ((-3.0, 3.0), (-3.0, 3.0))
    assert box_2d((-1, 2)) == ((-1.0, 2.0), (-1.0, 2.0))
    assert box_2d(((-1, 2), (0, 5))) == ((-1.0, 2.0), (0.0, 5.0))
    for bad in (0, -1.0, (2, 1), ((0, 1), (3, 3)), "wide", (1, 2, 3)):
        with pytest.raises(ValueError, match="lim"):
            box_2d(bad)


def test_sample_1d_inverts_the_gaussian_cdf():
    # the samples are F^{-1}(u) for the uniforms u the function draws; the piecewise-linear CDF on a
    # grid of spacing h is off by at most h^2/8 max|p'| = 5e-7 here (h = 16/4000, max|p'| = 0.242)
    from scipy.stats import norm
    f = quadratic_energy(0.0, 1.0)
    x = sample_1d(f, 20_000, -8.0, 8.0, n_grid=4001, generator=torch.Generator().manual_seed(0))
    u = torch.rand(20_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert x.shape == (20_000,) and x.dtype == torch.float64
    assert np.abs(norm.cdf(x.numpy()) - u.numpy()).max() < 1e-6


def test_sample_1d_of_the_double_well_matches_its_moments():
    # E[x^2] by quadrature; the sample mean of x^2 within 4 standard errors
    f = double_well_energy(1.0, 1.0, tilt=0.5)
    x = sample_1d(f, 50_000, -5.0, 5.0, generator=torch.Generator().manual_seed(1))
    grid, log_w = trapezoid_log_weights(-5.0, 5.0, 4001)
    w = torch.softmax(f(grid) + log_w, 0)
    m2, m4 = float(w @ grid ** 2), float(w @ grid ** 4)
    se = math.sqrt((m4 - m2 ** 2) / len(x))
    assert abs(float((x ** 2).mean()) - m2) < 4 * se
    assert float(x.min()) >= -5.0 and float(x.max()) <= 5.0


def test_sample_1d_rejects_bad_arguments():
    f = quadratic_energy(0.0, 1.0)
    with pytest.raises(ValueError, match="n"):
        sample_1d(f, 0, -1.0, 1.0)
    with pytest.raises(ValueError, match="lo < hi"):
        sample_1d(f, 5, 1.0, -1.0)
