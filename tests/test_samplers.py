"""Samplers driven by exact scores: Langevin bias in closed form, the mixture-weight failure of
plain Langevin and its cure by annealing (Song & Ermon 2019), and the reverse-time samplers.

Tolerances: a fraction from n samples has standard error sqrt(p(1-p)/n); a mean, sqrt(var/n);
a variance estimate, var sqrt(2/n). Every check allows at least 3.5 standard errors (most allow 4 or more).
"""
import math

import pytest
import torch

from scorebook.densities import Gaussian, oracle_score, song_ermon_mixture
from scorebook.samplers import annealed_langevin, euler_maruyama, langevin, predictor_corrector, probability_flow
from scorebook.sde import VESDE, VPSDE, geometric_sigmas

F64 = torch.float64
MIX = song_ermon_mixture()



def heavy_fraction_and_means(x):
    """Fraction of samples whose most responsible component is the heavy one (5, 5), and per-mode means."""
    k = MIX.responsibilities(x).argmax(1)
    return float((k == 1).double().mean()), [x[k == j].mean(0) for j in (0, 1)]


def uniform_box(n, g, half_width=8.0):
    return (2 * torch.rand(n, 2, generator=g, dtype=F64) - 1) * half_width


# ----- Langevin on Gaussians ----------------------------------------------------------------
def test_langevin_2d_gaussian_reaches_mean_and_covariance():
    """On N(m, Sigma) with Sigma = U diag(lam) U^T, ULA is exact in the mean and its stationary covariance is
    U diag(lam / (1 - eps/(2 lam))) U^T (the 1-D bias in each eigen-direction)."""
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=F64)
    mean = torch.tensor([2.0, -1.0], dtype=F64)
    p = Gaussian(mean, cov)
    g = torch.Generator().manual_seed(0)
    n, eps = 4000, 0.05
    # the slowest direction (lam ~ 1.5) relaxes as (1 - eps/lam)^k: 600 steps from x0 = 0 leave e^-20
    x = langevin(oracle_score(p), torch.zeros(n, 2, dtype=F64), eps, 600, generator=g)
    lam, u = torch.linalg.eigh(cov)
    biased = u @ torch.diag(lam / (1 - eps / (2 * lam))) @ u.T
    emp_mean, emp_cov = x.mean(0), torch.cov(x.T)
    assert ((emp_mean - mean).abs() < 4 * torch.sqrt(torch.diagonal(biased) / n)).all()
    # SE of a sample covariance entry: sqrt((C_ij^2 + C_ii C_jj) / n)
    se_cov = torch.sqrt((biased ** 2 + torch.outer(torch.diagonal(biased), torch.diagonal(biased))) / n)
    assert ((emp_cov - biased).abs() < 4 * se_cov).all(), (emp_cov, biased)
    # and the target itself is within the (small, eps/(2 lam) <= 9 %) bias plus 4 SE
    assert ((emp_cov - cov).abs() < 4 * se_cov + (biased - cov).abs()).all()


@pytest.mark.parametrize("eps", [0.2, 0.5])
def test_langevin_1d_stationary_variance_has_the_closed_form_bias(eps):
    """x <- x + eps s(x) + sqrt(2 eps) z on N(0, s^2) is an AR(1) with variance s^2 / (1 - eps/(2 s^2))."""
    s2 = 1.0
    g = torch.Generator().manual_seed(1)
    n = 40_000
    # contraction per step 1 - eps/s^2 <= 0.8: 100 steps forget the start to 0.8^100 ~ 2e-10
    x = langevin(oracle_score(Gaussian([0.0], std=math.sqrt(s2))), torch.zeros(n, 1, dtype=F64), eps, 100, generator=g)
    predicted = s2 / (1 - eps / (2 * s2))
    var = float(x.var())
    se = predicted * math.sqrt(2 / n)
    assert abs(var - predicted) < 4 * se
    # the bias is resolved: it is >= 14 SE by design, and the measured variance is > 4 SE from s^2
    assert predicted - s2 > 14 * se
    assert var - s2 > 4 * se


def test_langevin_one_step_follows_the_update_rule():
    """One step moves x by eps s(x) on average, with Gaussian noise of variance 2 eps per coordinate."""
    g = torch.Generator().manual_seed(2)
    n, eps = 50_000, 0.3
    x0 = torch.tensor([[1.0, -2.0]], dtype=F64).expand(n, 2)
    score = lambda x, t: -x + torch.tensor([0.5, 0.0], dtype=F64)
    step = langevin(score, x0, eps, 1, generator=g) - x0
    drift = eps * score(x0[:1], 0.0)[0]
    assert ((step.mean(0) - drift).abs() < 4 * math.sqrt(2 * eps / n)).all()
    assert ((step.var(0) - 2 * eps).abs() < 4 * 2 * eps * math.sqrt(2 / n)).all()


def test_langevin_trajectory_shape_and_reproducibility():
    score = oracle_score(Gaussian([0.0, 0.0], std=1.0))
    x0 = torch.zeros(5, 2, dtype=F64)
    x, traj = langevin(score, x0, 0.1, 7, generator=torch.Generator().manual_seed(3), return_trajectory=True)
    assert traj.shape == (8, 5, 2) and torch.equal(traj[0], x0) and torch.equal(traj[-1], x)
    again = langevin(score, x0, 0.1, 7, generator=torch.Generator().manual_seed(3))
    assert torch.equal(x, again)
    # annealed: the start, then n_steps_each states per level, then the Tweedie denoising step
    x, traj = annealed_langevin(score, x0, geometric_sigmas(4.0, 1.0, 3), 5, 0.1, denoise=True,
                                generator=torch.Generator().manual_seed(3), return_trajectory=True)
    assert traj.shape == (1 + 3 * 5 + 1, 5, 2) and torch.equal(traj[-1], x)


# ----- the mixture-weight test (Song & Ermon 2019, Sec. 3.2.2 and App. B) -----------------------
N_BOX = 2000  # >= 1280 samples; the heavy fraction, expected ~0.5 here, has SE 0.011: 0.6 is 9 SE away


def test_plain_langevin_misses_the_mixture_weights():
    g = torch.Generator().manual_seed(4)
    x = langevin(oracle_score(MIX), uniform_box(N_BOX, g), 0.1, 1000, generator=g)
    frac, _ = heavy_fraction_and_means(x)
    # modes 14 apart never exchange samples: each point stays in the basin it started in (~ half each)
    assert frac < 0.6, frac


def test_annealed_langevin_recovers_the_mixture_weights():
    g = torch.Generator().manual_seed(5)
    n = 3000  # SE of the heavy fraction sqrt(0.16/3000) = 0.0073: +-0.03 is 4.1 SE
    x = annealed_langevin(oracle_score(MIX), uniform_box(n, g), geometric_sigmas(20.0, 1.0, 10), 100, 0.1,
                          generator=g)
    frac, _ = heavy_fraction_and_means(x)
    assert abs(frac - 0.8) < 0.03, frac


def test_annealed_langevin_rejects_a_non_decreasing_schedule():
    with pytest.raises(ValueError, match="strictly decreasing"):
        annealed_langevin(oracle_score(MIX), torch.zeros(4, 2), torch.tensor([1.0, 2.0, 3.0]), 5, 0.1)


# ----- reverse-time samplers with the oracle --------------------------------------------------
# n = 6000: heavy fraction SE 0.005 (+-0.03 is 6 SE); the light mode holds ~1200 points, so its mean
# has SE 1/sqrt(1200) = 0.029 per coordinate (0.1 is 3.5 SE), the heavy mode's SE is 0.014.
N_REV = 6000


def check_mixture(x):
    frac, means = heavy_fraction_and_means(x)
    assert abs(frac - 0.8) < 0.03, frac
    for got, want in zip(means, MIX.means):
        assert (got - want).abs().max() < 0.1, (got, want)


@pytest.mark.parametrize("sde", [VESDE(), VPSDE()], ids=repr)
def test_euler_maruyama_with_the_oracle_reproduces_the_mixture(sde):
    g = torch.Generator().manual_seed(6)
    x_T = sde.prior_sample((N_REV, 2), generator=g, dtype=F64)
    check_mixture(euler_maruyama(sde, oracle_score(MIX, sde), x_T, 200, generator=g))


@pytest.mark.parametrize("sde", [VESDE(), VPSDE()], ids=repr)
def test_predictor_corrector_with_the_oracle_reproduces_the_mixture(sde):
    g = torch.Generator().manual_seed(7)
    x_T = sde.prior_sample((N_REV, 2), generator=g, dtype=F64)
    check_mixture(predictor_corrector(sde, oracle_score(MIX, sde), x_T, 100, snr=0.16, generator=g))


@pytest.mark.parametrize("sde", [VESDE(), VPSDE()], ids=repr)
def test_probability_flow_with_the_oracle_reproduces_the_mixture(sde):
    """The ODE is deterministic, so it cannot correct a mismatch between the prior and p_T (for the
    default VE, p_T has mean (3, 3) but the prior mean 0). We start from the exact p_T so that the
    check measures the sampler; stochastic samplers above start from the prior."""
    g = torch.Generator().manual_seed(8)
    x_T = MIX.marginal(sde, sde.T).sample(N_REV, generator=g)
    x, nfe = probability_flow(sde, oracle_score(MIX, sde), x_T, return_nfe=True)
    check_mixture(x)
    assert isinstance(nfe, int) and 10 < nfe < 2000


def test_probability_flow_is_deterministic_and_fixed_step_solvers_agree_with_dopri5():
    sde = VPSDE()
    score = oracle_score(MIX, sde)
    x_T = sde.prior_sample((200, 2), generator=torch.Generator().manual_seed(9), dtype=F64)
    ref = probability_flow(sde, score, x_T, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(probability_flow(sde, score, x_T, rtol=1e-7, atol=1e-7), ref)
    heun, nfe = probability_flow(sde, score, x_T, method="heun", n_steps=200, return_nfe=True)
    assert nfe == 400  # two score evaluations per Heun step
    assert (heun - ref).abs().max() < 0.05
    euler, nfe = probability_flow(sde, score, x_T, method="euler", n_steps=200, return_nfe=True)
    assert nfe == 200
    # Heun is second order, Euler first order: Heun is closer to the accurate solution
    assert (heun - ref).abs().mean() < (euler - ref).abs().mean()


def test_reverse_samplers_return_trajectories_and_follow_float32():
    sde = VPSDE()
    score = oracle_score(MIX, sde)
    x_T = sde.prior_sample((10, 2), generator=torch.Generator().manual_seed(10))
    assert x_T.dtype == torch.float32
    for run in (lambda: euler_maruyama(sde, score, x_T, 20, return_trajectory=True),
                lambda: predictor_corrector(sde, score, x_T, 20, return_trajectory=True)):
        x, traj = run()
        assert x.dtype == torch.float32 and traj.shape == (21, 10, 2) and torch.equal(traj[-1], x)
    x = probability_flow(sde, score, x_T, method="euler", n_steps=10)
    assert x.dtype == torch.float32
    x = langevin(oracle_score(MIX), x_T, 0.1, 3)
    assert x.dtype == torch.float32 and x.shape == x_T.shape


def test_samplers_reject_bad_inputs():
    sde = VPSDE()
    bad = lambda x, t: x[:, :1]
    x = torch.zeros(4, 2)
    for call in (lambda: langevin(bad, x, 0.1, 2), lambda: euler_maruyama(sde, bad, x, 2),
                 lambda: predictor_corrector(sde, bad, x, 2),
                 lambda: probability_flow(sde, bad, x, method="euler", n_steps=2),
                 lambda: annealed_langevin(bad, x, [2.0, 1.0], 2, 0.1)):
        with pytest.raises(ValueError, match="shaped like x"):
            call()
    good = oracle_score(MIX)
    with pytest.raises(ValueError, match="step_size must be finite and > 0"):
        langevin(good, x, 0.0, 2)
    with pytest.raises(ValueError, match="n_steps must be a positive integer"):
        euler_maruyama(sde, good, x, 0)
    with pytest.raises(ValueError, match="eps must lie in"):
        euler_maruyama(sde, good, x, 5, eps=1.5)
    with pytest.raises(ValueError, match="unknown method"):
        probability_flow(sde, good, x, method="rk99")
    with pytest.raises(ValueError, match="pass n_steps"):
        probability_flow(sde, good, x, method="euler")


def test_samplers_follow_the_device_of_their_input():
    """Everything runs on default_device() (CUDA or MPS when present, else CPU) and stays there."""
    from scorebook.contract import default_device
    dev = default_device()
    mix = MIX.to(dev)
    sde = VPSDE()
    g = torch.Generator(device=dev).manual_seed(11)
    x_T = sde.prior_sample((64, 2), generator=g)
    assert x_T.device.type == dev.type
    score = oracle_score(mix, sde)
    for x in (euler_maruyama(sde, score, x_T, 25, generator=g), predictor_corrector(sde, score, x_T, 25, generator=g),
              probability_flow(sde, score, x_T, method="heun", n_steps=10),
              langevin(oracle_score(mix), x_T, 0.1, 5, generator=g),
              annealed_langevin(oracle_score(mix), x_T, geometric_sigmas(5.0, 1.0, 3), 5, 0.1, generator=g)):
        assert x.device.type == dev.type and x.dtype == torch.float32 and torch.isfinite(x).all()


@pytest.mark.parametrize("n_steps", [5, 10])
def test_predictor_corrector_on_a_coarse_vp_grid_stays_finite(n_steps):
    """Few-step sampling is a legitimate use (NFE comparisons): the VP corrector's alpha = 1 - beta(t) dt
    must not turn negative when beta_max dt > 1, which would make the Langevin step size negative."""
    sde = VPSDE()
    x_T = sde.prior_sample((256, 2), generator=torch.Generator().manual_seed(12), dtype=F64)
    x = predictor_corrector(sde, oracle_score(MIX, sde), x_T, n_steps, generator=torch.Generator().manual_seed(13))
    assert torch.isfinite(x).all()


# ----- MALA (Roberts & Tweedie 1996): p is exactly stationary for every step size ---------------------
from scorebook.densities import GaussianMixture  # noqa: E402
from scorebook.samplers import mala  # noqa: E402


def test_mala_has_the_exact_stationary_variance_where_ula_is_biased():
    """On N(0, 1) at eps = 0.5, ULA's stationary variance is 1 / (1 - eps/2) = 4/3; MALA's is exactly 1."""
    p = Gaussian([0.0], std=1.0)
    g = torch.Generator().manual_seed(20)
    n, eps = 20_000, 0.5
    x0 = torch.zeros(n, 1, dtype=F64)
    # ULA contracts by 1 - eps = 0.5 per step, MALA's accepted proposal N(x/2, 1) forgets x0 as fast:
    # 200 steps leave nothing of the start (each chain accepts ~90% of its proposals)
    x_mala, acc = mala(oracle_score(p), p.log_prob, x0, eps, 200, generator=g, return_acceptance=True)
    x_ula = langevin(oracle_score(p), x0, eps, 200, generator=g)
    se = math.sqrt(2 / n)                       # SE of a sample variance of N(0, 1): sqrt(2/n)
    assert abs(float(x_mala.var()) - 1.0) < 4 * se, float(x_mala.var())
    assert abs(float(x_ula.var()) - 4 / 3) < 4 * (4 / 3) * se, float(x_ula.var())
    assert abs(float(x_mala.mean())) < 4 / math.sqrt(n)
    assert acc.shape == (n,) and 0.5 < float(acc.mean()) < 1.0


def test_mala_keeps_an_asymmetric_mixture_stationary():
    """Started exactly in p, MALA's chains stay in p (first two moments in closed form), where ULA drifts away.

    An asymmetric target catches a wrong sign or a missing proposal term in the Hastings ratio."""
    p = GaussianMixture([[-1.0], [1.5]], weights=[0.3, 0.7], stds=[0.5, 1.0])
    mean = 0.3 * -1.0 + 0.7 * 1.5
    m2 = 0.3 * (1.0 + 0.25) + 0.7 * (2.25 + 1.0)
    var = m2 - mean ** 2
    g = torch.Generator().manual_seed(21)
    n, eps = 40_000, 0.2
    x0 = p.sample(n, generator=g)                                   # independent chains, each started in p
    x = mala(oracle_score(p), p.log_prob, x0, eps, 30, generator=g)
    x2 = x.squeeze(1) ** 2
    # SE of the mean sqrt(var/n); SE of the second moment sd(x^2)/sqrt(n), sd(x^2) estimated from the draws
    assert abs(float(x.mean()) - mean) < 4 * math.sqrt(var / n)
    assert abs(float(x2.mean()) - m2) < 4 * float(x2.std()) / math.sqrt(n)
    # the unadjusted chain, from the same start, inflates each component's variance by 1/(1 - eps/(2 s^2)):
    # about 0.3 * 0.17 + 0.7 * 0.11 = 0.13 in the second moment, which is 8 SE; we require 4
    x_ula = langevin(oracle_score(p), x0, eps, 30, generator=g)
    assert float((x_ula.squeeze(1) ** 2).mean()) - m2 > 4 * float(x2.std()) / math.sqrt(n)


def test_mala_returns_in_order_and_is_reproducible():
    p = Gaussian([0.0, 0.0], std=1.0)
    x0 = torch.zeros(6, 2, dtype=F64)
    x, acc, traj = mala(oracle_score(p), p.log_prob, x0, 0.3, 9, generator=torch.Generator().manual_seed(22),
                        return_acceptance=True, return_trajectory=True)
    assert traj.shape == (10, 6, 2) and torch.equal(traj[0], x0) and torch.equal(traj[-1], x)
    assert acc.shape == (6,) and ((acc >= 0) & (acc <= 1)).all()
    again = mala(oracle_score(p), p.log_prob, x0, 0.3, 9, generator=torch.Generator().manual_seed(22))
    assert torch.equal(x, again)
    # a proposal into p = 0 is always rejected
    half = lambda x: torch.where(x[:, 0] > 0, -0.5 * x.pow(2).sum(1), torch.full_like(x[:, 0], -math.inf))
    x = mala(lambda x, t: -x, half, torch.ones(500, 2, dtype=F64), 0.5, 20, generator=torch.Generator().manual_seed(23))
    assert (x[:, 0] > 0).all()


def test_mala_rejects_bad_inputs():
    p = Gaussian([0.0, 0.0], std=1.0)
    x0 = torch.zeros(4, 2, dtype=F64)
    with pytest.raises(ValueError, match="one log-density per point"):
        mala(oracle_score(p), lambda x: x, x0, 0.1, 2)
    with pytest.raises(ValueError, match="x0 must start where p > 0"):
        mala(oracle_score(p), lambda x: torch.full((x.shape[0],), -math.inf, dtype=x.dtype), x0, 0.1, 2)
    with pytest.raises(ValueError, match="step_size must be finite and > 0"):
        mala(oracle_score(p), p.log_prob, x0, -0.1, 2)
    with pytest.raises(ValueError, match="shaped like x"):
        mala(lambda x, t: x[:, :1], p.log_prob, x0, 0.1, 2)

# ----- encoding with the probability-flow ODE ------------------------------------------------------
from scorebook.samplers import probability_flow_encode  # noqa: E402


@pytest.mark.parametrize("method,kw,tol", [("dopri5", {}, 1e-5), ("heun", {"n_steps": 400}, 1e-4)])
def test_encoding_a_gaussian_scales_it_by_the_ratio_of_stds(method, kw, tol):
    """For data N(0, v I) the ODE velocity is x V'(t) / (2 V(t)) with V = a^2 v + std^2, so x(t) is
    proportional to sqrt(V(t)): encoding from eps to T multiplies by sqrt(V(T) / V(eps)) exactly."""
    sde, v, eps = VPSDE(), 0.5, 1e-3
    g = torch.Generator().manual_seed(9)
    x = math.sqrt(v) * torch.randn(200, 2, generator=g, dtype=F64)
    V = lambda t: float(sde.mean_coef(t)) ** 2 * v + float(sde.marginal_std(t)) ** 2   # noqa: E731
    z = probability_flow_encode(sde, oracle_score(Gaussian([0.0, 0.0], std=math.sqrt(v)), sde), x, method=method,
                                eps=eps, **kw)
    torch.testing.assert_close(z, x * math.sqrt(V(sde.T) / V(eps)), rtol=tol, atol=tol)


def test_encoding_then_decoding_returns_the_data():
    sde = VPSDE()
    score = oracle_score(MIX, sde)
    x = MIX.sample(300, generator=torch.Generator().manual_seed(10))
    z, nfe = probability_flow_encode(sde, score, x, rtol=1e-7, atol=1e-7, return_nfe=True)
    x_back = probability_flow(sde, score, z, rtol=1e-7, atol=1e-7)
    assert isinstance(nfe, int) and nfe > 10
    assert (x_back - x).norm(dim=1).max() < 1e-3          # two solves at tolerance 1e-7, errors summed over ~100 steps
    assert z.std() == pytest.approx(1.0, abs=0.15)          # the latents look like the prior N(0, I)


def test_probability_flow_encode_rejects_bad_arguments():
    x = torch.zeros(4, 2, dtype=F64)
    score = oracle_score(MIX, VPSDE())
    with pytest.raises(ValueError, match="n_steps"):
        probability_flow_encode(VPSDE(), score, x, method="heun")
    with pytest.raises(ValueError, match="unknown method"):
        probability_flow_encode(VPSDE(), score, x, method="rk99")
    with pytest.raises(ValueError, match="eps"):
        probability_flow_encode(VPSDE(), score, x, eps=0.0)
