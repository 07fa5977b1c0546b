"""Fast samplers against closed forms.

For Gaussian data N(mu, s^2 I) the probability-flow ODE in EDM's variables, dy/dsigma = sigma (y - mu) /
(s^2 + sigma^2), has the exact solution y(sigma) - mu = sqrt((s^2 + sigma^2) / (s^2 + sigma_0^2)) (y_0 - mu).
So each deterministic solver's global error is known exactly, and its order is the slope of log error
against log step count. For the stochastic samplers every step is affine in y plus Gaussian noise, so the
mean and variance of their output follow an exact scalar recursion, written out below from the papers'
update rules.

Tolerances: orders are fitted over a factor 8 in step count in the asymptotic range and allowed +-0.25
(a wrong order is off by 1); moments allow 4.5 standard errors (SE of a mean sqrt(v/n), of a variance
v sqrt(2/n)).
"""
import math

import numpy as np
import pytest
import torch

from scorebook.densities import Gaussian, GaussianMixture, oracle_score, song_ermon_mixture
from scorebook.notation import edm_sigma, edm_time
from scorebook.solvers import (SAMPLERS, NFECounter, ddim, dpm_solver_pp_2m, edm_heun, edm_stochastic,
                               sigma_steps)
from scorebook.sde import VESDE, VPSDE, SubVPSDE

F64 = torch.float64
MU, S = torch.tensor([1.0, -0.5], dtype=F64), 0.5
SDES = [VPSDE(), VESDE(), SubVPSDE()]


def exact_endpoint(sde, x_T, sigma_end, mu=MU, s=S):
    """The probability-flow ODE from x_T at time T to the time with EDM noise sigma_end, for N(mu, s^2 I) data."""
    s0 = float(edm_sigma(sde, sde.T))
    y0 = x_T / float(sde.mean_coef(sde.T))
    y = mu + math.sqrt((s * s + sigma_end ** 2) / (s * s + s0 ** 2)) * (y0 - mu)
    return float(sde.mean_coef(edm_time(sde, sigma_end))) * y


def x_T_batch(sde, n=16, seed=0):
    return sde.prior_sample((n, 2), generator=torch.Generator().manual_seed(seed), dtype=F64)


def fitted_order(errors, steps):
    return -np.polyfit(np.log(steps), np.log(errors), 1)[0]


# ----- grids -----------------------------------------------------------------------------------
def test_sigma_steps_follow_their_definitions():
    sde = VPSDE()
    s_max, s_min = float(edm_sigma(sde, 1.0)), float(edm_sigma(sde, 1e-3))
    edm = sigma_steps(sde, 10, "edm", rho=7.0)
    i = torch.arange(10, dtype=F64)
    karras = (s_max ** (1 / 7) + i / 9 * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7        # Karras et al. eq. 5
    torch.testing.assert_close(edm[:-1], karras, rtol=1e-12, atol=0.0)
    assert edm[-1] == 0 and len(edm) == 11
    t = edm_time(sde, sigma_steps(sde, 10, "time", denoise=False))
    torch.testing.assert_close(t, torch.linspace(1.0, 1e-3, 10, dtype=F64), rtol=1e-10, atol=1e-12)
    lam = -torch.log(sigma_steps(sde, 10, "logsnr", denoise=False))
    torch.testing.assert_close(lam[1:] - lam[:-1], torch.full((9,), float(lam[1] - lam[0]), dtype=F64))
    with pytest.raises(ValueError, match="schedule"):
        sigma_steps(sde, 10, "cosine")
    with pytest.raises(ValueError, match="n must be"):
        sigma_steps(sde, 0)


# ----- convergence order of the deterministic solvers -----------------------------------------
SOLVERS = {
    "edm_heun": (lambda sde, sc, x, sig: edm_heun(sde, sc, x, sig), 2),
    "dpm_solver_pp_2m": (lambda sde, sc, x, sig: dpm_solver_pp_2m(sde, sc, x, sig), 2),
    "ddim": (lambda sde, sc, x, sig: ddim(sde, sc, x, sig), 1),
}


@pytest.mark.parametrize("sde", SDES, ids=repr)
@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("schedule", ["edm", "logsnr"])
def test_global_error_falls_at_the_theoretical_order(sde, name, schedule):
    solve, order = SOLVERS[name]
    score = oracle_score(Gaussian(MU, std=S), sde)
    x_T = x_T_batch(sde)
    steps = [16, 32, 64, 128]
    errors = []
    for n in steps:
        sig = sigma_steps(sde, n + 1, schedule, denoise=False)                  # n steps
        x = solve(sde, score, x_T, sig)
        errors.append(float((x - exact_endpoint(sde, x_T, float(sig[-1]))).norm(dim=1).max()))
    assert abs(fitted_order(errors, steps) - order) < 0.25, (errors, fitted_order(errors, steps))


def test_a_final_zero_level_is_the_tweedie_denoising_step():
    """With a grid ending in 0, the output is the Gaussian posterior mean E[x0 | y] at the last positive level."""
    sde = VPSDE()
    score = oracle_score(Gaussian(MU, std=S), sde)
    x_T = x_T_batch(sde)
    sig = sigma_steps(sde, 12)
    s_min = float(sig[-2])
    for solve, _ in SOLVERS.values():
        y_min = solve(sde, score, x_T, sig[:-1]) / float(sde.mean_coef(edm_time(sde, s_min)))
        posterior_mean = MU + S ** 2 / (S ** 2 + s_min ** 2) * (y_min - MU)
        torch.testing.assert_close(solve(sde, score, x_T, sig), posterior_mean, rtol=1e-10, atol=1e-12)


# ----- DDIM, Euler and DPM-Solver++ ------------------------------------------------------------
@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_ddim_is_euler_in_its_own_parameterisation(sde):
    """DDIM with eta = 0 is Euler's method on dy/dsigma = eps_hat(y, sigma), written here from scratch."""
    mix = GaussianMixture([[-2.0, 0.0], [2.0, 1.0]], weights=[0.3, 0.7], stds=[0.5, 1.0])
    score = oracle_score(mix, sde)
    x_T = x_T_batch(sde, 64, seed=1)
    sig = sigma_steps(sde, 7, "time")
    y = x_T / float(sde.mean_coef(sde.T))
    for s_cur, s_next in zip(sig[:-1].tolist(), sig[1:].tolist()):
        t = edm_time(sde, s_cur)
        a = float(sde.mean_coef(t))
        eps_hat = -s_cur * a * score(a * y, float(t))                            # -sigma * s_sigma(y)
        y = y + (s_next - s_cur) * eps_hat
    torch.testing.assert_close(ddim(sde, score, x_T, sig), y, rtol=1e-10, atol=1e-10)


def test_dpm_solver_pp_first_step_is_ddim():
    """The first-order data-prediction exponential integrator (DPM-Solver++(1)) is DDIM (Lu et al. 2022b, sec. 4)."""
    sde = VPSDE()
    score = oracle_score(song_ermon_mixture(), sde)
    x_T = x_T_batch(sde, 64, seed=2)
    sig = torch.tensor([float(edm_sigma(sde, 1.0)), 3.0], dtype=F64)
    torch.testing.assert_close(dpm_solver_pp_2m(sde, score, x_T, sig), ddim(sde, score, x_T, sig),
                               rtol=1e-10, atol=1e-10)


def test_ddim_is_exact_for_a_point_mass():
    """For data at a single point mu, eps_hat = (y - mu) / sigma is constant along the ODE path, so Euler in
    (y, sigma) -- DDIM -- is exact in one step (Song, Meng & Ermon 2021; Karras et al. 2022, sec. 3)."""
    sde, s = VPSDE(), 1e-6
    score = oracle_score(Gaussian(MU, std=s), sde)
    x_T = x_T_batch(sde)
    sig = torch.tensor([float(edm_sigma(sde, 1.0)), 0.5], dtype=F64)
    exact = exact_endpoint(sde, x_T, 0.5, s=s)
    torch.testing.assert_close(ddim(sde, score, x_T, sig), exact, rtol=0, atol=1e-9)


# ----- stochastic samplers: exact moment recursions ---------------------------------------------
def ddim_moments(sig, eta, mu, s, m, v):
    """Mean and variance of y = x / a after DDIM(eta) on N(mu, s^2) data, from eq. 12 step by step."""
    for sc, sn in zip(sig[:-1], sig[1:]):
        k = s * s / (s * s + sc * sc)                       # x0_hat - mu = k (y - mu)
        c = eta * sn * math.sqrt(1 - (sn / sc) ** 2)        # noise std in y-units
        # y' = x0_hat + sqrt(sn^2 - c^2) eps_hat + c z, eps_hat = (y - x0_hat) / sc
        g = k + math.sqrt(max(sn * sn - c * c, 0.0)) * (1 - k) / sc
        m, v = mu + g * (m - mu), g * g * v + c * c
    return m, v


def edm_moments(sig, churn, s_tmin, s_tmax, s_noise, s_max, mu, s, m, v):
    """Mean and variance of y after EDM's Algorithm 2 on N(mu, s^2) data (eps_hat = sigma (y - mu) / (s^2 + sigma^2))."""
    n = len(sig) - 1
    for sc, sn in zip(sig[:-1], sig[1:]):
        gamma = min(churn / n, math.sqrt(2) - 1) if s_tmin <= sc <= s_tmax else 0.0
        sh = min(sc * (1 + gamma), s_max)
        v = v + (sh * sh - sc * sc) * s_noise ** 2
        k1 = 1 + (sn - sh) * sh / (s * s + sh * sh)                              # Euler
        k = k1 if sn == 0 else 1 + (sn - sh) * 0.5 * (sh / (s * s + sh * sh) + sn * k1 / (s * s + sn * sn))
        m, v = mu + k * (m - mu), k * k * v
    return m, v


def _exact_start(sde, mu, s, n, seed):
    """x_T drawn from the exact p_T of N(mu, s^2) data; and the mean and variance of y_T = x_T / a(T)."""
    a, std = float(sde.mean_coef(1.0)), float(sde.marginal_std(1.0))
    g = torch.Generator().manual_seed(seed)
    x_T = a * mu + math.sqrt(a * a * s * s + std * std) * torch.randn(n, 1, generator=g, dtype=F64)
    return x_T, g, mu, s * s + float(edm_sigma(sde, 1.0)) ** 2


def _assert_moments(x, m, v):
    n = x.shape[0]
    assert abs(float(x.mean()) - m) < 4.5 * math.sqrt(v / n), (float(x.mean()), m)
    assert abs(float(x.var()) - v) < 4.5 * v * math.sqrt(2 / n), (float(x.var()), v)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=repr)
@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta_matches_its_exact_moment_recursion(sde, eta):
    mu, s = 1.0, 0.5
    x_T, g, m0, v0 = _exact_start(sde, mu, s, 100_000, seed=3)
    sig = sigma_steps(sde, 12, "time")
    x = ddim(sde, oracle_score(Gaussian([mu], std=s), sde), x_T, sig, eta=eta, generator=g)
    _assert_moments(x, *ddim_moments(sig.tolist(), eta, mu, s, mu, v0))


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=repr)
def test_edm_stochastic_matches_its_exact_moment_recursion(sde):
    mu, s = 1.0, 0.5
    x_T, g, m0, v0 = _exact_start(sde, mu, s, 100_000, seed=4)
    sig = sigma_steps(sde, 8)
    kw = dict(s_churn=40.0, s_tmin=0.05, s_tmax=50.0, s_noise=1.0)
    x = edm_stochastic(sde, oracle_score(Gaussian([mu], std=s), sde), x_T, sig, generator=g, **kw)
    s_max = float(edm_sigma(sde, 1.0))
    _assert_moments(x, *edm_moments(sig.tolist(), kw["s_churn"], kw["s_tmin"], kw["s_tmax"], kw["s_noise"], s_max,
                                    mu, s, mu, v0))


def test_stochastic_samplers_converge_to_the_data_distribution():
    """From the exact p_T, the recursions' output variance tends to s^2: DDIM(eta=1) at first order
    (plugging x0_hat into the posterior), EDM's churn at second order (exact noise, Heun steps)."""
    sde, mu, s = VPSDE(), 1.0, 0.5
    v0 = s * s + float(edm_sigma(sde, 1.0)) ** 2
    s_max = float(edm_sigma(sde, 1.0))
    ddim_err, edm_err = [], []
    for n in (50, 100, 200, 400):
        _, v = ddim_moments(sigma_steps(sde, n, "time").tolist(), 1.0, mu, s, mu, v0)
        ddim_err.append(abs(v - s * s))
        _, v = edm_moments(sigma_steps(sde, n).tolist(), 40.0, 0.05, 50.0, 1.0, s_max, mu, s, mu, v0)
        edm_err.append(abs(v - s * s))
    assert abs(fitted_order(ddim_err, [50, 100, 200, 400]) - 1) < 0.25, ddim_err
    assert fitted_order(edm_err, [50, 100, 200, 400]) > 1.75, edm_err


def test_edm_stochastic_without_churn_is_edm_heun():
    sde = VESDE()
    score = oracle_score(song_ermon_mixture(), sde)
    x_T = x_T_batch(sde, 32, seed=5)
    sig = sigma_steps(sde, 9)
    torch.testing.assert_close(edm_stochastic(sde, score, x_T, sig, s_churn=0.0), edm_heun(sde, score, x_T, sig),
                               rtol=0, atol=0)


# ----- the registry ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_registered_sampler_keeps_its_budget_and_samples_the_mixture(name):
    """From the exact p_T with 100 score evaluations, each sampler's heavy-mode share is 0.8 within 4.5 SE."""
    sde, mix = VPSDE(), song_ermon_mixture()
    n = 4000
    g = torch.Generator().manual_seed(6)
    x_T = mix.marginal(sde, 1.0).sample(n, generator=g)
    counter = NFECounter(oracle_score(mix, sde))
    x = SAMPLERS[name](sde, counter, x_T, 100, generator=g)
    assert x.shape == x_T.shape and x.dtype == x_T.dtype
    assert 99 <= counter.nfe <= 100, counter.nfe
    heavy = float((mix.responsibilities(x).argmax(1) == 1).double().mean())
    assert abs(heavy - 0.8) < 4.5 * math.sqrt(0.16 / n), heavy


def test_bad_arguments_fail_with_clear_errors():
    sde = VPSDE()
    score = oracle_score(song_ermon_mixture(), sde)
    x = x_T_batch(sde)
    with pytest.raises(ValueError, match="strictly decreasing"):
        ddim(sde, score, x, torch.tensor([1.0, 2.0], dtype=F64))
    with pytest.raises(ValueError, match="exceeds sigma_EDM"):
        edm_heun(sde, score, x, torch.tensor([500.0, 1.0], dtype=F64))
    with pytest.raises(ValueError, match="eta"):
        ddim(sde, score, x, sigma_steps(sde, 3), eta=1.5)
    with pytest.raises(ValueError, match="s_churn"):
        edm_stochastic(sde, score, x, sigma_steps(sde, 3), s_churn=-1.0)
    with pytest.raises(ValueError, match="nfe"):
        SAMPLERS["pc"](sde, score, x, 1)
    with pytest.raises(ValueError, match="x_T"):
        edm_heun(sde, score, x[0], sigma_steps(sde, 3))
