"""Log-likelihoods through the probability-flow ODE, divergence estimators, dequantization."""
import math

import pytest
import torch

from scorebook.densities import Gaussian, oracle_score, song_ermon_mixture
from scorebook.likelihood import (LikelihoodResult, dequantize, discrete_bpd, exact_divergence,
                                  hutchinson_divergence, log_likelihood)
from scorebook.sde import VESDE, VPSDE, SubVPSDE

F64 = torch.float64
MIX = song_ermon_mixture()



@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=repr)
def test_oracle_likelihood_matches_the_analytic_log_density(sde):
    """With the exact score, the exact trace and rtol = atol = 1e-5, the ODE likelihood equals log p(x).

    The end point uses the exact marginal p_T of the mixture (known in closed form), so what is
    measured is the ODE and trace computation, not the prior mismatch. With the default prior
    N(0, prior_std^2 I) the per-sample error would be log prior(x_T) - log p_T(x_T): ~0.02 nats
    (VP) and ~0.07 nats (VE, sigma_max = 50) on average for this mixture, a property of p_T, not of the solver.
    """
    x = MIX.sample(100, generator=torch.Generator().manual_seed(0))
    res = log_likelihood(sde, oracle_score(MIX, sde), x, trace="exact", rtol=1e-5, atol=1e-5,
                         prior_log_prob=MIX.marginal(sde, sde.T).log_prob)
    assert isinstance(res, LikelihoodResult) and res.nats.shape == (100,)
    err = res.nats - MIX.log_prob(x)
    assert float(err.abs().mean()) < 1e-3, float(err.abs().mean())
    assert isinstance(res.nfe, int) and res.nfe > 0
    torch.testing.assert_close(res.bpd, -res.nats / (2 * math.log(2.0)))


def test_likelihood_of_a_gaussian_under_the_default_prior_of_subvp():
    """N(0, I) data under sub-VP: p_T = N(0, (a^2 + (1 - a^2)^2) I) = N(0, (1 - a^2 (1 - a^2)) I) with
    a(1)^2 ~ 4e-5, so the default prior N(0, I) is right to ~1e-4 nats; compare with the analytic density."""
    sde = SubVPSDE()
    p = Gaussian(torch.zeros(3), std=1.0)
    x = p.sample(50, generator=torch.Generator().manual_seed(1))
    res = log_likelihood(sde, oracle_score(p, sde), x)
    assert float((res.nats - p.log_prob(x)).abs().mean()) < 1e-3


def test_hutchinson_divergence_is_unbiased():
    """Mean over many probes of e^T J e equals tr J, within 3 standard errors, for both probe laws."""
    g = torch.Generator().manual_seed(2)
    d = 4
    W = torch.randn(d, d, generator=g, dtype=F64)
    fn = lambda x: torch.tanh(x @ W.T) * 2.0 + 0.3 * x ** 2                # a non-linear field
    x0 = torch.randn(3, d, generator=g, dtype=F64)
    exact, out = exact_divergence(fn, x0)
    ref = 2.0 * ((1 - torch.tanh(x0 @ W.T) ** 2) * torch.diagonal(W)).sum(1) + 0.6 * x0.sum(1)
    torch.testing.assert_close(exact, ref, rtol=1e-12, atol=1e-12)          # exact trace: closed form
    torch.testing.assert_close(out, fn(x0))
    r = 8000
    xr = x0.repeat_interleave(r, dim=0)                                      # (3 r, D): r copies of each point
    for probes in (torch.randn(1, 3 * r, d, generator=g, dtype=F64),
                   torch.randint(0, 2, (1, 3 * r, d), generator=g).to(F64) * 2 - 1):
        est, _ = hutchinson_divergence(fn, xr, probes)
        est = est.reshape(3, r)
        se = est.std(1) / math.sqrt(r)
        assert ((est.mean(1) - exact).abs() < 3 * se).all()
        assert (se < 0.15).all()  # the check resolves the trace (of order 1-5 here) to better than 0.5
    # averaging M probes inside one call reduces the spread by sqrt(M)
    many = torch.randn(16, 3 * r, d, generator=g, dtype=F64)
    est16, _ = hutchinson_divergence(fn, xr, many)
    one, _ = hutchinson_divergence(fn, xr, many[:1])
    ratio = float(est16.reshape(3, r).std(1).mean() / one.reshape(3, r).std(1).mean())
    assert 0.2 < ratio < 0.3  # 1/sqrt(16) = 0.25


def test_hutchinson_likelihood_is_unbiased_against_the_exact_trace():
    sde = VPSDE()
    x = MIX.sample(200, generator=torch.Generator().manual_seed(3))
    prior = MIX.marginal(sde, sde.T).log_prob
    exact = log_likelihood(sde, oracle_score(MIX, sde), x, rtol=1e-4, atol=1e-4, prior_log_prob=prior).nats
    hutch = log_likelihood(sde, oracle_score(MIX, sde), x, trace="hutchinson", n_probes=1, rtol=1e-4, atol=1e-4,
                           prior_log_prob=prior, generator=torch.Generator().manual_seed(4)).nats
    diff = hutch - exact
    assert abs(float(diff.mean())) < 3 * float(diff.std()) / math.sqrt(200)
    assert float(diff.std()) > 0  # the probes are random: the estimate is not the exact trace


def test_likelihood_rejects_bad_arguments():
    sde = VPSDE()
    x = torch.zeros(4, 2)
    s = oracle_score(MIX, sde)
    with pytest.raises(ValueError, match="trace must be 'exact' or 'hutchinson'"):
        log_likelihood(sde, s, x, trace="approx")
    with pytest.raises(ValueError, match="eps must lie in"):
        log_likelihood(sde, s, x, eps=0.0)
    with pytest.raises(ValueError, match="rtol must be finite and > 0"):
        log_likelihood(sde, s, x, rtol=0.0)
    with pytest.raises(ValueError, match="n_probes must be a positive integer"):
        log_likelihood(sde, s, x, trace="hutchinson", n_probes=0)
    with pytest.raises(ValueError, match="shaped like x"):
        log_likelihood(sde, lambda y, t: y[:, :1], x)


# ----- dequantization ---------------------------------------------------------------------------
def test_dequantize_lands_in_the_right_bin_uniformly():
    g = torch.Generator().manual_seed(5)
    k = 256
    x = torch.randint(0, k, (20_000, 3), generator=g)
    y = dequantize(x, k, generator=g)
    assert ((y >= 0) & (y < 1)).all()
    assert torch.equal(torch.floor(y * k).long(), x)
    u = (y * k - x).reshape(-1)
    # U(0, 1): mean 1/2, variance 1/12; 4 standard errors
    n = u.numel()
    assert abs(float(u.mean()) - 0.5) < 4 * math.sqrt(1 / 12 / n)
    assert abs(float(u.var()) - 1 / 12) < 4 * math.sqrt(1 / 180 / n)
    with pytest.raises(ValueError, match="data must lie in"):
        dequantize(torch.tensor([[0, 256]]), 256)
    with pytest.raises(ValueError, match="n_levels must be an integer >= 2"):
        dequantize(torch.tensor([[0, 1]]), 1)


def test_discrete_bpd_of_the_uniform_density_is_log2_levels():
    """The uniform density on [0,1)^D (log p = 0) gives every 8-bit image exactly 8 bits per dimension;
    the same density stretched to [-1, 1)^D (log p = -D log 2, scale = 2) gives the same 8 bits."""
    d = 12
    torch.testing.assert_close(discrete_bpd(torch.zeros(5, dtype=F64), d, 256), torch.full((5,), 8.0, dtype=F64))
    torch.testing.assert_close(discrete_bpd(torch.full((5,), -d * math.log(2.0), dtype=F64), d, 256, scale=2.0),
                               torch.full((5,), 8.0, dtype=F64))


from scorebook.likelihood import prior_kl  # noqa: E402


@pytest.mark.parametrize("sde", [VPSDE(0.1, 5.0), VPSDE(), VESDE(0.01, 10.0), SubVPSDE(0.1, 3.0)], ids=repr)
def test_prior_kl_of_gaussian_data_is_the_gaussian_kl(sde):
    """Data N(m, v I) in 2-D: p_T = N(a m, (a^2 v + std^2) I), and KL to N(0, s^2 I) is closed form."""
    m, v = torch.tensor([2.0, -1.0], dtype=F64), 0.3
    a, std, s2 = float(sde.mean_coef(sde.T)), float(sde.marginal_std(sde.T)), sde.prior_std ** 2
    var = a * a * v + std * std
    expected = 0.5 * 2 * (var / s2 - 1 + math.log(s2 / var)) + 0.5 * float((a * m).pow(2).sum()) / s2
    assert prior_kl(Gaussian(m, std=math.sqrt(v)), sde) == pytest.approx(expected, rel=1e-8, abs=1e-13)


def test_prior_kl_of_the_mixture_matches_monte_carlo_and_shrinks_with_beta_max():
    """KL(p_T || prior) = E_{p_T}[log p_T - log prior], estimated from exact samples of p_T (5 SE)."""
    for sde in (VPSDE(0.1, 5.0), VESDE(0.01, 20.0)):
        p_T = MIX.marginal(sde, sde.T)
        z = p_T.sample(200_000, generator=torch.Generator().manual_seed(3))
        r = p_T.log_prob(z) - sde.prior_log_prob(z)
        assert abs(prior_kl(MIX, sde) - float(r.mean())) < 5 * float(r.std()) / math.sqrt(len(z))
    kls = [prior_kl(MIX, VPSDE(0.1, b)) for b in (5.0, 10.0, 20.0)]
    assert kls[0] > kls[1] > kls[2] > 0
