"""The notation crosswalk against closed forms: Gaussian conditioning (Tweedie), the exact mixture
oracles of the NCSN and SDE worlds, DDPM's published schedule and its continuous limit.

Tolerances: conversions are a handful of float64 operations on O(1)-O(100) numbers, so they agree
to ~1e-12 relative; we allow 1e-9 (1e-7 where a 2x2 solve at a noise level of 150 enters).
"""
import math

import pytest
import torch

from scorebook.densities import Gaussian, GaussianMixture, oracle_score, song_ermon_mixture
from scorebook.notation import (ddpm_alpha_bars, ddpm_betas, ddpm_betas_from_alpha_bars, ddpm_times, edm_denoiser,
                                edm_sigma, edm_time, eps_from_score, half_log_snr, ncsn_sigmas_to_ve_times,
                                score_from_eps, score_from_v, score_from_x0, sigma_score, time_score,
                                v_from_score, ve_time_of_sigma, vp_alpha_bar, x0_from_score)
from scorebook.sde import SDE, VESDE, VPSDE, SubVPSDE, geometric_sigmas

F64 = torch.float64
SDES = [VESDE(), VESDE(0.1, 10.0), VPSDE(), VPSDE(0.5, 5.0), SubVPSDE()]
MIX = GaussianMixture([[-2.0, 1.0], [1.5, -0.5], [0.5, 2.5]], weights=[0.3, 0.5, 0.2],
                      stds=[[0.5, 1.2], [0.8, 0.3], [1.0, 1.0]])
TIMES = torch.tensor([1e-3, 0.05, 0.2, 0.5, 0.8, 1.0], dtype=F64)


class ExpDecaySDE(SDE):
    """A made-up kernel (a = e^{-t}, std = t): no closed-form inverse in the package, so edm_time bisects."""

    def _drift_coef(self, t):
        return -torch.ones_like(t)

    def _diffusion(self, t):
        return torch.sqrt(2 * t + 2 * t * t)        # v' = 2 f v + g^2 with v = t^2, f = -1

    def _mean_coef(self, t):
        return torch.exp(-t)

    def _std(self, t):
        return t

    @property
    def prior_std(self):
        return 1.0


# ----- noise variables -------------------------------------------------------------------------
def test_edm_sigma_closed_forms():
    t = TIMES
    ve = VESDE(0.01, 50.0)
    torch.testing.assert_close(edm_sigma(ve, t), torch.sqrt((0.01 * 5000.0 ** t) ** 2 - 1e-4))
    vp = VPSDE(0.1, 20.0)
    a2 = torch.exp(-(0.1 * t + 0.5 * 19.9 * t ** 2))
    torch.testing.assert_close(edm_sigma(vp, t), torch.sqrt((1 - a2) / a2))
    torch.testing.assert_close(half_log_snr(vp, t), 0.5 * torch.log(a2 / (1 - a2)))
    assert float(edm_sigma(vp, 0.0)) == 0.0 and math.isinf(float(half_log_snr(vp, 0.0)))


@pytest.mark.parametrize("sde", SDES + [ExpDecaySDE()], ids=repr)
def test_edm_time_inverts_edm_sigma(sde):
    t = torch.cat([torch.zeros(1, dtype=F64), TIMES])
    torch.testing.assert_close(edm_time(sde, edm_sigma(sde, t)), t, rtol=1e-9, atol=1e-12)
    sig = torch.logspace(-3, math.log10(float(edm_sigma(sde, 1.0))), 25, dtype=F64)
    torch.testing.assert_close(edm_sigma(sde, edm_time(sde, sig)), sig, rtol=1e-9, atol=0.0)


def test_edm_time_rejects_noise_beyond_the_sde():
    with pytest.raises(ValueError, match="sigma must lie in"):
        edm_time(VPSDE(), 200.0)             # sigma_EDM(1) = 152 for the default VP SDE
    with pytest.raises(ValueError, match="sigma must lie in"):
        edm_time(VESDE(), -0.1)
    with pytest.raises(ValueError, match="t must lie in"):
        edm_sigma(VESDE(), 1.5)


def test_ncsn_noise_levels_are_the_exact_ve_marginals():
    """p_0 * N(0, sigma^2 I) (the NCSN oracle) is the VE marginal at the time with std(t) = sigma."""
    ve = VESDE(0.01, 50.0)
    sig = geometric_sigmas(50.0, 0.01, 10)[1:]            # sigma_EDM(1) is slightly below sigma_max
    t = ncsn_sigmas_to_ve_times(ve, sig)
    torch.testing.assert_close(ve.marginal_std(t), sig, rtol=1e-12, atol=0.0)
    x = MIX.sample(len(sig), generator=torch.Generator().manual_seed(0)) * 3
    ncsn = oracle_score(MIX)(x, sig)
    ve_score = oracle_score(MIX, ve)(x, t)
    torch.testing.assert_close(ve_score, ncsn, rtol=1e-9, atol=1e-12)


def test_song_et_al_identification_makes_geometric_sigmas_a_uniform_time_grid():
    ve = VESDE(0.01, 50.0)
    sig = geometric_sigmas(50.0, 0.01, 11)
    torch.testing.assert_close(ncsn_sigmas_to_ve_times(ve, sig, exact=False),
                               torch.linspace(1.0, 0.0, 11, dtype=F64), rtol=0, atol=1e-12)
    # the two identifications differ in the noise std by sigma_min^2 / (2 sigma) to leading order; the next
    # term is sigma_min^4 / (8 sigma^3), a relative 0.25 (sigma_min / sigma)^2 <= 0.25 % for sigma >= 10 sigma_min
    big = sig[sig >= 0.1]
    gap = big - ve.marginal_std(ve_time_of_sigma(ve, big))
    torch.testing.assert_close(gap, 0.01 ** 2 / (2 * big), rtol=3e-3, atol=0.0)
    t_song = ve_time_of_sigma(ve, sig[:-1])
    # sigma_max itself is out of reach exactly: std(1) = sqrt(sigma_max^2 - sigma_min^2) < sigma_max
    assert (ncsn_sigmas_to_ve_times(ve, sig[1:-1]) > t_song[1:]).all()
    with pytest.raises(ValueError, match="sigma must lie in"):
        ncsn_sigmas_to_ve_times(ve, sig)
    with pytest.raises(ValueError, match="VESDE"):
        ve_time_of_sigma(VPSDE(), 1.0)


def test_ddpm_betas_are_ho_et_al_schedule():
    torch.testing.assert_close(ddpm_betas(VPSDE(0.1, 20.0), 1000), torch.linspace(1e-4, 0.02, 1000, dtype=F64),
                               rtol=1e-12, atol=0.0)
    b = ddpm_betas(VPSDE(), 200)
    torch.testing.assert_close(ddpm_betas_from_alpha_bars(ddpm_alpha_bars(b)), b, rtol=1e-10, atol=0.0)
    with pytest.raises(ValueError, match="VPSDE"):
        ddpm_betas(VESDE(), 10)
    with pytest.raises(ValueError, match="betas"):
        ddpm_alpha_bars(torch.tensor([0.1, 1.2]))


def test_ddpm_alpha_bar_converges_to_the_continuous_one_at_first_order():
    """log alpha_bar_N = sum log(1 - beta_j) = -sum beta_j - sum beta_j^2 / 2 - ..., and sum beta_j = int_0^1 beta
    exactly for the linear schedule, so the gap is (1 / 2N) int beta^2 + O(1/N^2): first order in 1/N."""
    sde = VPSDE()
    b0, b1 = sde.beta_min, sde.beta_max
    int_b2 = (b1 ** 3 - b0 ** 3) / (3 * (b1 - b0))                       # int_0^1 beta(t)^2 dt
    int_b3 = (b1 ** 4 - b0 ** 4) / (4 * (b1 - b0))
    errs = []
    for n in (250, 500, 1000, 2000):
        gap = torch.log(ddpm_alpha_bars(ddpm_betas(sde, n))) - torch.log(vp_alpha_bar(sde, ddpm_times(n)))
        errs.append(float(gap.abs().max()))
        assert int(gap.abs().argmax()) == n - 1                          # the gap accumulates to the last step
        # the next term of the series, sum beta^3 / 3 ~ int beta^3 / (3 N^2), bounds the remainder
        assert abs(-float(gap[-1]) - int_b2 / (2 * n)) < 1.5 * int_b3 / (3 * n * n)
    ratios = [errs[i] / errs[i + 1] for i in range(3)]
    assert all(1.9 < r < 2.1 for r in ratios), (errs, ratios)
    torch.testing.assert_close(vp_alpha_bar(sde, TIMES), sde.mean_coef(TIMES) ** 2)


# ----- predictions -----------------------------------------------------------------------------
def _gaussian_posterior(mean, cov, x, a, s):
    """E[x0 | x_t] and E[eps | x_t] for x0 ~ N(mean, cov), x_t = a x0 + s eps, by Gaussian conditioning."""
    d = mean.numel()
    k = a * a * cov + s * s * torch.eye(d, dtype=F64)            # Cov(x_t)
    r = torch.linalg.solve(k, (x - a * mean).T).T                # K^{-1} (x - a mu), (B, D)
    return mean + a * r @ cov.T, s * r


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_tweedie_gives_the_gaussian_posterior_means(sde):
    mean = torch.tensor([1.0, -2.0], dtype=F64)
    cov = torch.tensor([[1.5, 0.4], [0.4, 0.6]], dtype=F64)
    score = oracle_score(Gaussian(mean, cov), sde)
    g = torch.Generator().manual_seed(1)
    for t in TIMES[1:]:
        a, s = float(sde.mean_coef(t)), float(sde.marginal_std(t))
        x = a * mean + math.sqrt(a * a * 1.5 + s * s) * torch.randn(64, 2, generator=g, dtype=F64)
        x0_true, eps_true = _gaussian_posterior(mean, cov, x, a, s)
        sc = score(x, float(t))
        torch.testing.assert_close(x0_from_score(sc, x, float(t), sde), x0_true, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(eps_from_score(sc, x, float(t), sde), eps_true, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(v_from_score(sc, x, float(t), sde), a * eps_true - s * x0_true, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("sde", [VESDE(), VPSDE()], ids=repr)
def test_tweedie_gives_the_mixture_posterior_mean(sde):
    """E[x0 | x_t] for a mixture: the responsibility-weighted Gaussian posterior means of its components."""
    t = 0.4
    a, s = float(sde.mean_coef(t)), float(sde.marginal_std(t))
    x = MIX.marginal(sde, t).sample(100, generator=torch.Generator().manual_seed(2))
    resp = MIX.marginal(sde, t).responsibilities(x)                   # (B, K)
    x0_true = sum(resp[:, k:k + 1] * _gaussian_posterior(MIX.means[k], MIX.covs[k], x, a, s)[0]
                  for k in range(MIX.n_components))
    x0 = x0_from_score(oracle_score(MIX, sde)(x, t), x, t, sde)
    torch.testing.assert_close(x0, x0_true, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_prediction_round_trips(sde):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, generator=g, dtype=F64) * 4
    sc = torch.randn(6, 3, generator=g, dtype=F64)
    t = TIMES                                                          # one time per sample
    torch.testing.assert_close(score_from_eps(eps_from_score(sc, x, t, sde), x, t, sde), sc, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(score_from_x0(x0_from_score(sc, x, t, sde), x, t, sde), sc, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(score_from_v(v_from_score(sc, x, t, sde), x, t, sde), sc, rtol=1e-7, atol=1e-7)
    # the predictions decompose x_t: a x0_hat + std eps_hat = x_t
    a, s = sde.mean_coef(t)[:, None], sde.marginal_std(t)[:, None]
    torch.testing.assert_close(a * x0_from_score(sc, x, t, sde) + s * eps_from_score(sc, x, t, sde), x)


def test_vp_velocity_is_the_derivative_along_the_angle():
    """For VP (a = cos phi, std = sin phi), v = d x_t / d phi at fixed x0 and eps (Salimans & Ho 2022)."""
    sde = VPSDE()
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(5, 2, generator=g, dtype=F64), torch.randn(5, 2, generator=g, dtype=F64)
    t = torch.tensor(0.3, dtype=F64, requires_grad=True)
    a, s = sde.mean_coef(t), sde.marginal_std(t)
    phi = torch.atan2(s, a)
    (dphi,) = torch.autograd.grad(phi.sum(), t, retain_graph=True)
    xt = a * x0 + s * eps
    dx = torch.stack([torch.autograd.grad(xt[i, j], t, retain_graph=True)[0] for i in range(5) for j in range(2)])
    a, s = a.detach(), s.detach()
    xt = xt.detach()
    # the exact score of the point-mass posterior is not needed: v from the pair (x0, eps) itself
    v = a * eps - s * x0
    torch.testing.assert_close(dx.reshape(5, 2) / dphi, v, rtol=1e-9, atol=1e-12)
    # and score_from_v inverts it: the score whose eps_hat = eps and x0_hat = x0
    torch.testing.assert_close(score_from_v(v, xt, 0.3, sde), -eps / s, rtol=1e-9, atol=1e-9)


def test_conversions_need_positive_time_and_keep_dtype():
    sde = VPSDE()
    x = torch.randn(4, 2)
    with pytest.raises(ValueError, match="t must be > 0"):
        score_from_eps(x, x, 0.0, sde)
    with pytest.raises(ValueError, match="shape"):
        eps_from_score(x, x, torch.rand(3), sde)
    assert x0_from_score(x, x, 0.3, sde).dtype == torch.float32


# ----- whole score callables -------------------------------------------------------------------
@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_sigma_score_is_the_ncsn_score_and_time_score_inverts_it(sde):
    """p_t(x) = a^-D p_sigma(x / a): the oracle of one world, converted, is the oracle of the other."""
    g = torch.Generator().manual_seed(5)
    sig = torch.logspace(-2, math.log10(min(30.0, float(edm_sigma(sde, 1.0)))), 8, dtype=F64)
    y = MIX.sample(8, generator=g) + sig[:, None] * torch.randn(8, 2, generator=g, dtype=F64)
    torch.testing.assert_close(sigma_score(oracle_score(MIX, sde), sde)(y, sig), oracle_score(MIX)(y, sig),
                               rtol=1e-8, atol=1e-12)
    t = TIMES[:5]
    x = MIX.marginal(sde, 0.5).sample(5, generator=g)
    torch.testing.assert_close(time_score(oracle_score(MIX), sde)(x, t), oracle_score(MIX, sde)(x, t),
                               rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("sde", [VESDE(), VPSDE(), SubVPSDE()], ids=repr)
def test_edm_denoiser_is_the_gaussian_posterior_mean(sde):
    mean = torch.tensor([0.5, 2.0], dtype=F64)
    cov = torch.tensor([[0.7, -0.2], [-0.2, 1.1]], dtype=F64)
    den = edm_denoiser(oracle_score(Gaussian(mean, cov), sde), sde)
    g = torch.Generator().manual_seed(6)
    for sigma in (0.02, 0.5, 3.0, 40.0):
        y = mean + math.sqrt(1 + sigma ** 2) * torch.randn(16, 2, generator=g, dtype=F64)
        x0_true, _ = _gaussian_posterior(mean, cov, y, 1.0, sigma)      # y = x0 + sigma eps
        torch.testing.assert_close(den(y, sigma), x0_true, rtol=1e-7, atol=1e-9)


def test_the_song_ermon_mixture_oracles_agree_across_worlds():
    """The book's running example: the EDM denoiser at sigma equals Tweedie on the NCSN oracle."""
    mix, sde = song_ermon_mixture(), VPSDE()
    y = mix.sample(50, generator=torch.Generator().manual_seed(7)) + 2.0 * torch.randn(50, 2, dtype=F64)
    torch.testing.assert_close(edm_denoiser(oracle_score(mix, sde), sde)(y, 2.0), y + 4.0 * oracle_score(mix)(y, 2.0),
                               rtol=1e-9, atol=1e-10)
