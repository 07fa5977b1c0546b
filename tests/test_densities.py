"""Exact densities: closed-form scores, noise-perturbed and SDE-marginal mixtures, the oracle score.

References: autograd of ``log_prob`` for the score, scipy for log-densities and entropy,
Monte Carlo (noise added to samples; the forward SDE simulated by small Euler-Maruyama
steps) for ``perturb`` and ``marginal``, compared with scipy's Kolmogorov-Smirnov test on
1-D projections (a projected Gaussian mixture is a 1-D Gaussian mixture with a known CDF).
"""
import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

from scorebook.densities import (TOY_NAMES, Gaussian, GaussianMixture, make_toy, oracle_score,
                                 song_ermon_mixture)
from scorebook.sde import VESDE, VPSDE, SubVPSDE

F64 = torch.float64



def random_mixture(d, k, g, form="full"):
    """A random K-component mixture in D dims; covariances A A^T + 0.3 I (well conditioned)."""
    means = 3.0 * torch.randn(k, d, generator=g, dtype=F64)
    w = torch.rand(k, generator=g, dtype=F64) + 0.2
    w = w / w.sum()
    if form == "full":
        a = torch.randn(k, d, d, generator=g, dtype=F64)
        covs = a @ a.transpose(-1, -2) + 0.3 * torch.eye(d, dtype=F64)
    elif form == "diag":
        return GaussianMixture(means, weights=w, stds=0.5 + torch.rand(k, d, generator=g, dtype=F64))  # diagonal
    else:
        return GaussianMixture(means, weights=w, stds=0.5 + torch.rand(k, generator=g, dtype=F64))     # isotropic
    return GaussianMixture(means, covs, w)


def scipy_log_prob(gm, x):
    """Reference log-density from scipy.stats.multivariate_normal."""
    x = x.numpy()
    comps = [math.log(float(w)) + stats.multivariate_normal(m.numpy(), c.numpy()).logpdf(x).reshape(-1)
             for w, m, c in zip(gm.weights, gm.means, gm.covs)]
    return logsumexp(np.stack(comps, 0), axis=0)


def mixture_mean_cov(gm):
    w = gm.weights
    mean = (w[:, None] * gm.means).sum(0)
    second = (w[:, None, None] * (gm.covs + gm.means[:, :, None] * gm.means[:, None, :])).sum(0)
    return mean, second - mean[:, None] * mean[None, :]


def projected_cdf(gm, v):
    """CDF of v^T X for X ~ gm: a 1-D mixture with means v^T mu_k and variances v^T Sigma_k v."""
    m = (gm.means @ v).numpy()
    s = torch.sqrt(torch.einsum("d,kde,e->k", v, gm.covs, v)).numpy()
    w = gm.weights.numpy()
    return lambda y: (w[None] * stats.norm.cdf((np.asarray(y)[:, None] - m[None]) / s[None])).sum(1)


def ks_pvalues(samples, gm, n_dirs, g):
    """KS p-values of the samples' projections on random unit directions against the mixture."""
    out = []
    for _ in range(n_dirs):
        v = torch.randn(gm.dim, generator=g, dtype=F64)
        v = v / v.norm()
        out.append(stats.kstest((samples @ v).numpy(), projected_cdf(gm, v)).pvalue)
    return np.array(out)


# ----- score = grad log p --------------------------------------------------------------------
@pytest.mark.parametrize("d", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("form", ["full", "diag", "iso"])
def test_closed_form_score_equals_autograd_of_log_prob(d, form):
    g = torch.Generator().manual_seed(100 * d + len(form))
    for k in (1, 3):
        gm = random_mixture(d, k, g, form)
        # points from the mixture and points far out in the tails
        x = torch.cat([gm.sample(64, generator=g), 8.0 * torch.randn(16, d, generator=g, dtype=F64)])
        x.requires_grad_(True)
        (auto,) = torch.autograd.grad(gm.log_prob(x).sum(), x)
        closed = gm.score(x.detach())
        torch.testing.assert_close(closed, auto, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("d", [1, 3, 5])
def test_log_prob_matches_scipy(d):
    g = torch.Generator().manual_seed(d)
    gm = random_mixture(d, 3, g)
    x = torch.cat([gm.sample(50, generator=g), 5.0 * torch.randn(10, d, generator=g, dtype=F64)])
    np.testing.assert_allclose(gm.log_prob(x).numpy(), scipy_log_prob(gm, x), rtol=1e-10, atol=1e-10)


def test_std_forms_scalar_isotropic_diagonal_agree_with_full_covs():
    means = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=F64)
    full = torch.stack([torch.diag(torch.tensor([0.25, 0.25])), torch.diag(torch.tensor([0.25, 0.25]))]).double()
    ref = GaussianMixture(means, full, [0.3, 0.7])
    for stds in (0.5, [0.5, 0.5], [[0.5, 0.5], [0.5, 0.5]]):
        torch.testing.assert_close(GaussianMixture(means, weights=[0.3, 0.7], stds=stds).covs, ref.covs)
    gd = Gaussian([1.0, 2.0], std=[0.5, 2.0])        # diagonal stds
    torch.testing.assert_close(gd.cov, torch.diag(torch.tensor([0.25, 4.0], dtype=F64)))
    gi = Gaussian([1.0, 2.0], std=3.0)               # isotropic std
    torch.testing.assert_close(gi.cov, 9.0 * torch.eye(2, dtype=F64))
    assert gi.mean.tolist() == [1.0, 2.0] and gi.dim == 2
    default = GaussianMixture(means)                 # neither given: unit stds
    torch.testing.assert_close(default.covs, torch.eye(2, dtype=F64).expand(2, 2, 2))


def test_covs_is_always_a_covariance_and_stds_always_a_std():
    """The meaning of a number never depends on its shape: a scalar or vector covs is refused, not read as a std."""
    for bad in (0.8, [0.5, 0.5], [[0.5, 0.5], [0.5, 0.5]]):
        with pytest.raises(ValueError, match="covs must be full covariance matrices.*stds="):
            GaussianMixture([[0.0, 1.0], [2.0, -1.0]], bad)
    with pytest.raises(ValueError, match="cov must be a \\(1, 1\\) covariance matrix.*std="):
        Gaussian([0.0], 0.8)
    with pytest.raises(ValueError, match="not both"):
        GaussianMixture([[0.0]], [[[1.0]]], stds=1.0)
    with pytest.raises(ValueError, match="not both"):
        Gaussian([0.0], [[1.0]], std=1.0)
    # a 1-D Gaussian with variance 0.64 two ways
    torch.testing.assert_close(Gaussian([0.0], [[0.64]]).cov, Gaussian([0.0], std=0.8).cov)


def test_gaussian_entropy_matches_scipy():
    cov = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.0, 0.3], [0.0, 0.3, 0.5]], dtype=F64)
    gauss = Gaussian(torch.zeros(3), cov)
    assert abs(gauss.entropy() - stats.multivariate_normal(np.zeros(3), cov.numpy()).entropy()) < 1e-12


def test_sample_moments_match_the_mixture():
    g = torch.Generator().manual_seed(7)
    gm = random_mixture(3, 3, g)
    n = 40_000
    x = gm.sample(n, generator=g)
    assert x.shape == (n, 3) and x.dtype == F64
    mean, cov = mixture_mean_cov(gm)
    # standard error of a sample mean: sqrt(var / n); allow 4 standard errors per coordinate
    se = torch.sqrt(torch.diagonal(cov) / n)
    assert ((x.mean(0) - mean).abs() < 4 * se).all()
    assert (ks_pvalues(x, gm, 4, g) > 1e-3).all()


def test_responsibilities_are_the_posterior_over_components():
    g = torch.Generator().manual_seed(3)
    gm = random_mixture(2, 3, g)
    x = gm.sample(20, generator=g)
    r = gm.responsibilities(x)
    comp = np.stack([math.log(float(w)) + stats.multivariate_normal(m.numpy(), c.numpy()).logpdf(x.numpy())
                     for w, m, c in zip(gm.weights, gm.means, gm.covs)], 1)
    ref = np.exp(comp - logsumexp(comp, axis=1, keepdims=True))
    np.testing.assert_allclose(r.numpy(), ref, rtol=1e-9, atol=1e-12)


# ----- perturb(sigma) and marginal(sde, t) against Monte Carlo ----------------------------------
@pytest.mark.parametrize("sigma", [0.7, 2.0])
def test_perturb_matches_samples_with_noise_added(sigma):
    g = torch.Generator().manual_seed(11)
    gm = random_mixture(2, 3, g)
    n = 20_000
    noisy = gm.sample(n, generator=g) + sigma * torch.randn(n, 2, generator=g, dtype=F64)
    target = gm.perturb(sigma)
    # a KS test at n=20000 detects a CDF gap of ~0.012; p > 1e-3 on every direction
    assert (ks_pvalues(noisy, target, 4, torch.Generator().manual_seed(1)) > 1e-3).all()
    # negative control: the same test rejects the mixture perturbed with twice the noise level
    wrong = gm.perturb(2.0 * sigma)
    assert ks_pvalues(noisy, wrong, 4, torch.Generator().manual_seed(1)).min() < 1e-6
    mean, cov = mixture_mean_cov(target)
    assert ((noisy.mean(0) - mean).abs() < 4 * torch.sqrt(torch.diagonal(cov) / n)).all()


def forward_euler_maruyama(sde, x0, t_end, n_steps, g):
    """Simulate dx = f dt + g dw from t=0 to t_end with n_steps small Euler-Maruyama steps.

    All three SDEs have a drift linear in x, so f(x, t) = f(1, t) * x: the drift is read
    once per step from ``sde.drift`` at the unit vector (cheap), then applied to the batch.
    """
    x, dt = x0.clone(), t_end / n_steps
    unit = torch.ones(1, x.shape[1], dtype=F64)
    for i in range(n_steps):
        t = i * dt
        f_coef = sde.drift(unit, t)                                      # (1, D)
        x = x + f_coef * x * dt + sde.diffusion(t) * math.sqrt(dt) * torch.randn(x.shape, generator=g, dtype=F64)
    return x


@pytest.mark.parametrize("sde,t_end", [(VESDE(0.05, 5.0), 0.6), (VPSDE(), 0.3), (SubVPSDE(), 0.3), (VPSDE(), 1.0)])
def test_marginal_matches_forward_sde_simulation(sde, t_end):
    g = torch.Generator().manual_seed(21)
    gm = random_mixture(2, 3, g)
    n = 10_000
    # Euler-Maruyama with dt = 1/1000: its variance bias is O(beta dt / 4) <= 0.5 % for VP, far
    # below what the KS test can see at n = 10000 (CDF gap ~ 0.017)
    xt = forward_euler_maruyama(sde, gm.sample(n, generator=g), t_end, int(1000 * t_end), g)
    target = gm.marginal(sde, t_end)
    assert (ks_pvalues(xt, target, 4, torch.Generator().manual_seed(2)) > 1e-3).all()
    mean, cov = mixture_mean_cov(target)
    assert ((xt.mean(0) - mean).abs() < 4 * torch.sqrt(torch.diagonal(cov) / n)).all()
    # negative control: the un-noised data mixture is rejected
    if t_end < 1.0:
        assert ks_pvalues(xt, gm, 4, torch.Generator().manual_seed(2)).min() < 1e-6


def test_marginal_closed_form_parameters():
    gm = random_mixture(3, 2, torch.Generator().manual_seed(5))
    for sde in (VESDE(), VPSDE(), SubVPSDE()):
        t = 0.37
        a, s = float(sde.mean_coef(t)), float(sde.marginal_std(t))
        m = gm.marginal(sde, t)
        torch.testing.assert_close(m.means, a * gm.means)
        torch.testing.assert_close(m.covs, a * a * gm.covs + s * s * torch.eye(3, dtype=F64))
        torch.testing.assert_close(m.weights, gm.weights)
    # under VE (a = 1) the marginal is the data perturbed by the kernel std
    ve = VESDE()
    torch.testing.assert_close(gm.marginal(ve, 0.5).covs, gm.perturb(float(ve.marginal_std(0.5))).covs)


# ----- the oracle --------------------------------------------------------------------------
def test_oracle_without_sde_is_the_perturbed_score_per_sample():
    g = torch.Generator().manual_seed(8)
    gm = random_mixture(2, 3, g)
    x = gm.sample(6, generator=g)
    sig = torch.tensor([0.0, 0.1, 0.5, 1.0, 3.0, 10.0], dtype=F64)
    out = oracle_score(gm)(x, sig)
    for i in range(6):
        torch.testing.assert_close(out[i], gm.perturb(float(sig[i])).score(x[i:i + 1])[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(oracle_score(gm)(x, 0.0), gm.score(x))


@pytest.mark.parametrize("sde", [VESDE(), VPSDE(), SubVPSDE()])
def test_oracle_with_sde_is_the_marginal_score_per_sample(sde):
    g = torch.Generator().manual_seed(9)
    gm = random_mixture(2, 2, g)
    x = gm.sample(5, generator=g)
    t = torch.tensor([1e-3, 0.1, 0.4, 0.8, 1.0], dtype=F64)
    out = oracle_score(gm, sde)(x, t)
    for i in range(5):
        torch.testing.assert_close(out[i], gm.marginal(sde, float(t[i])).score(x[i:i + 1])[0],
                                   rtol=1e-10, atol=1e-12)


def test_oracle_score_equals_autograd_of_the_marginal_log_density():
    gm = random_mixture(3, 2, torch.Generator().manual_seed(4))
    sde = VPSDE()
    x = torch.randn(10, 3, dtype=F64, requires_grad=True)
    (auto,) = torch.autograd.grad(gm.marginal(sde, 0.2).log_prob(x).sum(), x)
    torch.testing.assert_close(oracle_score(gm, sde)(x.detach(), 0.2), auto, rtol=1e-8, atol=1e-8)


def test_float32_in_float32_out():
    gm = song_ermon_mixture()
    x = torch.randn(8, 2, dtype=torch.float32)
    for out in (gm.log_prob(x), gm.score(x), gm.responsibilities(x), oracle_score(gm)(x, 1.0),
                oracle_score(gm, VPSDE())(x, 0.5)):
        assert out.dtype == torch.float32 and out.device == x.device
    torch.testing.assert_close(gm.score(x), gm.score(x.double()).float())


def test_song_ermon_mixture_parameters():
    gm = song_ermon_mixture()
    torch.testing.assert_close(gm.weights, torch.tensor([0.2, 0.8], dtype=F64))
    torch.testing.assert_close(gm.means, torch.tensor([[-5.0, -5.0], [5.0, 5.0]], dtype=F64))
    torch.testing.assert_close(gm.covs, torch.eye(2, dtype=F64).expand(2, 2, 2))


@pytest.mark.parametrize("name", ["swiss_roll", "moons", "circles", "8gaussians", "checkerboard", "pinwheel"])
def test_make_toy_shapes_and_reproducibility(name):
    assert name in TOY_NAMES
    a = make_toy(name, 500, generator=torch.Generator().manual_seed(0))
    b = make_toy(name, 500, generator=torch.Generator().manual_seed(0))
    assert a.shape == (500, 2) and a.dtype == F64 and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert 0.2 < float(a.std()) < 5.0  # a spread-out 2-D cloud, neither collapsed nor exploded


def test_make_toy_circles_have_radii_one_and_two():
    x = make_toy("circles", 4000, generator=torch.Generator().manual_seed(1))
    r = x.norm(dim=1)
    # half the points on each circle (radii 1 and 2), noise std 0.08
    assert abs(float((r > 1.5).double().mean()) - 0.5) < 0.01
    assert abs(float(r[r > 1.5].mean()) - 2.0) < 0.02 and abs(float(r[r < 1.5].mean()) - 1.0) < 0.02


# ----- bad input ---------------------------------------------------------------------------
def test_bad_weights_raise():
    with pytest.raises(ValueError, match="weights must be non-negative"):
        GaussianMixture([[0.0], [1.0]], weights=[1.5, -0.5])
    with pytest.raises(ValueError, match="weights must sum to 1"):
        GaussianMixture([[0.0], [1.0]], weights=[0.5, 0.6])
    with pytest.raises(ValueError, match="weights must have shape"):
        GaussianMixture([[0.0], [1.0]], weights=[1.0])
    with pytest.raises(ValueError, match="at least one component"):
        GaussianMixture(torch.zeros(0, 2))


def test_non_positive_definite_covariance_raises():
    with pytest.raises(ValueError, match="not positive definite"):
        Gaussian([0.0, 0.0], [[1.0, 2.0], [2.0, 1.0]])
    with pytest.raises(ValueError, match="symmetric"):
        Gaussian([0.0, 0.0], [[1.0, 0.5], [0.0, 1.0]])
    with pytest.raises(ValueError, match="stds must be finite and > 0"):
        GaussianMixture([[0.0], [1.0]], stds=[1.0, 0.0])
    with pytest.raises(ValueError, match="stds must be finite and > 0"):
        Gaussian([0.0], std=-1.0)


def test_nan_input_and_nan_noise_level_raise():
    gm = song_ermon_mixture()
    x = torch.zeros(3, 2, dtype=F64)
    x[1, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains 1 NaN"):
        gm.log_prob(x)
    with pytest.raises(ValueError, match="x contains 1 NaN"):
        oracle_score(gm)(x, 0.5)
    with pytest.raises(ValueError, match="x contains 1 NaN"):
        oracle_score(gm, VPSDE())(x, 0.5)
    with pytest.raises(ValueError, match="noise level or time t contains"):
        oracle_score(gm)(torch.zeros(3, 2, dtype=F64), float("nan"))
    with pytest.raises(ValueError, match="t"):
        oracle_score(gm, VPSDE())(torch.zeros(3, 2, dtype=F64), float("nan"))


def test_bad_sigma_t_and_x_raise():
    gm = song_ermon_mixture()
    with pytest.raises(ValueError, match="sigma"):
        gm.perturb(-0.1)
    with pytest.raises(ValueError, match="sigma"):
        gm.perturb(float("nan"))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1"):
        gm.marginal(VPSDE(), 1.5)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1"):
        oracle_score(gm, VESDE())(torch.zeros(3, 2), -0.1)
    with pytest.raises(ValueError, match="sigma"):
        oracle_score(gm)(torch.zeros(3, 2), -1.0)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        gm.score(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="unknown toy"):
        make_toy("spiral_galaxy", 10)


def test_densities_follow_the_device_of_their_input():
    from scorebook.contract import default_device
    dev = default_device()
    gm = song_ermon_mixture().to(dev)
    assert gm.device.type == dev.type
    x = torch.randn(16, 2, device=dev)
    for out in (gm.log_prob(x), gm.score(x), oracle_score(gm)(x, 0.5), oracle_score(gm, VESDE())(x, 0.5)):
        assert out.device.type == dev.type and out.dtype == torch.float32
    s = gm.sample(8, generator=torch.Generator(device=dev).manual_seed(0))
    assert s.device.type == dev.type and s.dtype == F64
    torch.testing.assert_close(gm.score(x).cpu(), song_ermon_mixture().score(x.cpu()))


# ----- conditioning on a label and on a noisy linear measurement (chapter 15) -----------------
from scorebook.densities import (conditional_mixture, oracle_classifier, oracle_measurement_log_likelihood,
                                 posterior_mixture, sample_labelled)


def _gauss_logpdf(x, mean, cov):
    return stats.multivariate_normal(np.asarray(mean), np.asarray(cov)).logpdf(np.asarray(x))


def test_conditional_mixture_is_bayes_rule_over_the_components_of_a_class():
    g = torch.Generator().manual_seed(151)
    gm = random_mixture(3, 5, g)
    classes = [0, 1, 0, 2, 1]
    x = torch.cat([gm.sample(40, generator=g), 4.0 * torch.randn(10, 3, generator=g, dtype=F64)])
    for c in range(3):
        members = [k for k, ck in enumerate(classes) if ck == c]
        w_c = float(gm.weights[members].sum())                                       # p(y = c)
        # p(x, y = c) = sum over the class's components of w_k N_k(x), by scipy
        joint = logsumexp(np.stack([math.log(float(gm.weights[k])) + _gauss_logpdf(x, gm.means[k], gm.covs[k])
                                    for k in members]), axis=0)
        cond = conditional_mixture(gm, c, classes)
        np.testing.assert_allclose(cond.log_prob(x).numpy(), joint - math.log(w_c), rtol=1e-10, atol=1e-10)
    # the default: component k is class k, and the conditional is that single Gaussian
    single = conditional_mixture(gm, 3)
    np.testing.assert_allclose(single.log_prob(x).numpy(), _gauss_logpdf(x, gm.means[3], gm.covs[3]),
                               rtol=1e-10, atol=1e-10)


def test_sample_labelled_draws_the_joint_law():
    """Label frequencies are the class weights (binomial SE, 4.5 SE allowed) and x | y is p(x | y)
    (KS on random projections; with 4 directions x 3 classes the smallest p-value is compared with 1e-3)."""
    g = torch.Generator().manual_seed(152)
    gm = random_mixture(2, 4, g)
    classes = [0, 1, 1, 2]
    n = 20_000
    x, y = sample_labelled(gm, n, generator=g, classes=classes)
    assert x.shape == (n, 2) and y.shape == (n,) and y.dtype == torch.int64
    prior = torch.tensor([float(gm.weights[0]), float(gm.weights[1] + gm.weights[2]), float(gm.weights[3])])
    freq = torch.bincount(y, minlength=3).double() / n
    se = torch.sqrt(prior * (1 - prior) / n)
    assert ((freq - prior).abs() < 4.5 * se).all(), (freq, prior)
    pvals = np.concatenate([ks_pvalues(x[y == c], conditional_mixture(gm, c, classes), 4, g) for c in range(3)])
    assert pvals.min() > 1e-3, pvals


@pytest.mark.parametrize("sde", [None, VPSDE(), VESDE()], ids=repr)
def test_oracle_classifier_is_bayes_rule_at_every_time(sde):
    """log p_t(c | x) = log sum_{k in c} w_k N(x; a mu_k, a^2 Sigma_k + std^2 I) - log p_t(x), by scipy."""
    g = torch.Generator().manual_seed(153)
    gm = random_mixture(2, 4, g)
    classes = [1, 0, 1, 2]
    clf = oracle_classifier(gm, sde, classes)
    x = 3.0 * torch.randn(30, 2, generator=g, dtype=F64)
    for t in (0.0, 0.05, 0.3, 0.9):
        a = 1.0 if sde is None else float(sde.mean_coef(t))
        std = t if sde is None else float(sde.marginal_std(t))
        comps = np.stack([math.log(float(w)) + _gauss_logpdf(x, a * m.numpy(), a * a * c.numpy() + std ** 2 * np.eye(2))
                          for w, m, c in zip(gm.weights, gm.means, gm.covs)])    # (K, B)
        log_px = logsumexp(comps, axis=0)
        want = np.stack([logsumexp(comps[[k for k in range(4) if classes[k] == c]], axis=0) - log_px
                         for c in range(3)], axis=1)                              # (B, C)
        np.testing.assert_allclose(clf(x, t).numpy(), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("d,m", [(2, 1), (3, 2)])
def test_posterior_mixture_matches_bayes_rule_in_information_form(d, m):
    """Independent route: posterior precision Sigma^-1 + A^T A / s^2, mean from the information vector,
    weights from scipy's evidence N(y; A mu_k, A Sigma_k A^T + s^2 I)."""
    g = torch.Generator().manual_seed(154 + d)
    gm = random_mixture(d, 3, g)
    A = torch.randn(m, d, generator=g, dtype=F64)
    s = 0.4
    y = A @ gm.means[1] + 0.5 * torch.randn(m, generator=g, dtype=F64)
    post = posterior_mixture(gm, A, y, s)
    log_w = []
    for k in range(3):
        prec = torch.linalg.inv(gm.covs[k]) + A.T @ A / s ** 2
        cov = torch.linalg.inv(prec)
        mean = cov @ (torch.linalg.solve(gm.covs[k], gm.means[k]) + A.T @ y / s ** 2)
        torch.testing.assert_close(post.means[k], mean, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(post.covs[k], cov, rtol=1e-9, atol=1e-10)
        log_w.append(math.log(float(gm.weights[k]))
                     + _gauss_logpdf(y, A @ gm.means[k], A @ gm.covs[k] @ A.T + s ** 2 * torch.eye(m, dtype=F64)))
    want_w = np.exp(np.array(log_w) - logsumexp(log_w))
    np.testing.assert_allclose(post.weights.numpy(), want_w, rtol=1e-9, atol=1e-12)


def test_posterior_mixture_matches_bayes_rule_by_quadrature_in_2d():
    """p(x | y) = p(x) N(y; A x, s^2) / p(y) with p(y) and each component's posterior mass integrated on a
    grid (trapezoid rule on a box 9 prior standard deviations wide: truncation and quadrature errors are
    far below the 1e-7 allowed)."""
    gm = GaussianMixture([[0.0, -2.0], [0.0, 2.0], [2.5, 0.0]], weights=[0.3, 0.5, 0.2], stds=[0.5, 0.7, 0.6])
    A = torch.tensor([[1.0, 0.4]], dtype=F64)
    y, s = torch.tensor([0.7], dtype=F64), 0.3
    xs = torch.linspace(-7.0, 9.5, 601, dtype=F64)          # spacing 0.0275: >= 10 points per std everywhere
    X, Y = torch.meshgrid(xs, xs, indexing="ij")
    pts = torch.stack([X.reshape(-1), Y.reshape(-1)], 1)
    h = float(xs[1] - xs[0])
    wq = torch.full((601,), h, dtype=F64)
    wq[0] = wq[-1] = h / 2
    w2 = (wq[:, None] * wq[None, :]).reshape(-1)
    log_lik = -0.5 * ((y - pts @ A.T) ** 2).sum(1) / s ** 2 - 0.5 * math.log(2 * math.pi * s ** 2)
    comp = torch.stack([math.log(float(w)) + torch.from_numpy(_gauss_logpdf(pts, m, c))
                        for w, m, c in zip(gm.weights, gm.means, gm.covs)], 1) + log_lik[:, None]   # (N, K)
    mass = (w2[:, None] * comp.exp()).sum(0)                                  # (K,) int w_k N_k N(y; Ax) dx
    evidence = float(mass.sum())
    post = posterior_mixture(gm, A, y, s)
    np.testing.assert_allclose(post.weights.numpy(), (mass / evidence).numpy(), rtol=1e-7, atol=1e-10)
    sub = pts[:: 997]
    want = gm.log_prob(sub) + (-0.5 * ((y - sub @ A.T) ** 2).sum(1) / s ** 2
                               - 0.5 * math.log(2 * math.pi * s ** 2)) - math.log(evidence)
    np.testing.assert_allclose(post.log_prob(sub).numpy(), want.numpy(), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("sde", [None, VPSDE(), VESDE()], ids=repr)
def test_oracle_measurement_likelihood_is_bayes_rule_at_every_time(sde):
    """log p_t(y | x_t) = log p_t(x_t | y) + log p(y) - log p_t(x_t), with p_t(. | y) the marginal of the
    posterior mixture and p(y) the evidence from scipy; at t = 0 it is log N(y; A x, s^2 I)."""
    g = torch.Generator().manual_seed(156)
    gm = random_mixture(3, 3, g)
    A = torch.randn(2, 3, generator=g, dtype=F64)
    s = 0.5
    y = A @ gm.means[0] + 0.3 * torch.randn(2, generator=g, dtype=F64)
    post = posterior_mixture(gm, A, y, s)
    log_ev = logsumexp([math.log(float(w)) + _gauss_logpdf(y, A @ m, A @ c @ A.T + s ** 2 * torch.eye(2, dtype=F64))
                        for w, m, c in zip(gm.weights, gm.means, gm.covs)])
    ll = oracle_measurement_log_likelihood(gm, A, y, s, sde)
    x = torch.cat([gm.sample(20, generator=g), 3.0 * torch.randn(10, 3, generator=g, dtype=F64)])
    for t in (0.02, 0.2, 0.7, 1.0):
        p_t = post.perturb(t) if sde is None else post.marginal(sde, t)
        q_t = gm.perturb(t) if sde is None else gm.marginal(sde, t)
        want = p_t.log_prob(x) + log_ev - q_t.log_prob(x)
        np.testing.assert_allclose(ll(x, t).numpy(), want.numpy(), rtol=1e-9, atol=1e-9)
    at0 = _gauss_logpdf((y[None] - x @ A.T).numpy(), np.zeros(2), s ** 2 * np.eye(2))
    np.testing.assert_allclose(ll(x, 0.0).numpy(), at0, rtol=1e-10, atol=1e-10)


def test_conditioning_rejects_bad_arguments():
    gm = GaussianMixture([[0.0, 0.0], [3.0, 0.0]])
    with pytest.raises(ValueError, match="classes must hold one"):
        conditional_mixture(gm, 0, classes=[0, 1, 2])
    with pytest.raises(ValueError, match="no component has class"):
        conditional_mixture(gm, 0, classes=[0, 2])
    with pytest.raises(ValueError, match="label must be an integer class"):
        conditional_mixture(gm, 2)
    with pytest.raises(ValueError, match="zero prior weight"):
        conditional_mixture(GaussianMixture([[0.0], [1.0]], weights=[1.0, 0.0]), 1)
    with pytest.raises(ValueError, match="noise_std must be a finite number > 0"):
        posterior_mixture(gm, [[1.0, 0.0]], [0.0], 0.0)
    with pytest.raises(ValueError, match="A must be an \\(M, 2\\) matrix"):
        posterior_mixture(gm, [[1.0, 0.0, 0.0]], [0.0], 0.1)
    with pytest.raises(ValueError, match="y must hold M = 1"):
        oracle_measurement_log_likelihood(gm, [[1.0, 0.0]], [0.0, 1.0], 0.1)
    with pytest.raises(TypeError):
        oracle_classifier("not a mixture")


# ----- entropies and cross-entropies ------------------------------------------------------------
from scorebook.densities import gaussian_cross_entropy, mixture_entropy  # noqa: E402


def test_gaussian_cross_entropy_is_entropy_plus_kl_for_a_gaussian():
    """For p = N(m, S) and q = N(c, s^2 I): E_p[-log q] = H(p) + KL(p || q), both closed form (scipy for H)."""
    cov = torch.tensor([[1.5, 0.4], [0.4, 0.7]], dtype=F64)
    p = Gaussian([1.0, -2.0], cov)
    c, s = torch.tensor([0.5, 0.5], dtype=F64), 1.7
    h = stats.multivariate_normal(mean=[1.0, -2.0], cov=cov.numpy()).entropy()
    kl = 0.5 * (float(torch.trace(cov)) / s ** 2 + float(((p.mean - c) ** 2).sum()) / s ** 2 - 2
                + 2 * math.log(s ** 2) - math.log(float(torch.det(cov))))
    assert gaussian_cross_entropy(p, c, s) == pytest.approx(h + kl, rel=1e-12)


def test_gaussian_cross_entropy_of_a_mixture_matches_monte_carlo():
    gm = random_mixture(2, 3, torch.Generator().manual_seed(11))
    x = gm.sample(200_000, generator=torch.Generator().manual_seed(12))
    neg_log_q = 0.5 * 2 * math.log(2 * math.pi * 2.0 ** 2) + ((x - 1.0) ** 2).sum(1) / (2 * 2.0 ** 2)
    se = float(neg_log_q.std()) / math.sqrt(len(x))
    assert abs(gaussian_cross_entropy(gm, 1.0, 2.0) - float(neg_log_q.mean())) < 5 * se


@pytest.mark.parametrize("d", [1, 2])
def test_mixture_entropy_of_one_gaussian_is_its_closed_form(d):
    cov = torch.tensor([[0.3]], dtype=F64) if d == 1 else torch.tensor([[2.0, 0.9], [0.9, 0.6]], dtype=F64)
    g = Gaussian(torch.ones(d, dtype=F64), cov)
    assert mixture_entropy(g) == pytest.approx(g.entropy(), abs=1e-10)


def test_mixture_entropy_of_separated_components_adds_the_entropy_of_the_weights():
    """Components 40 standard deviations apart overlap by e^-200: H = H(w) + sum_k w_k H(N_k) to rounding."""
    w = torch.tensor([0.2, 0.5, 0.3], dtype=F64)
    gm = GaussianMixture([[-20.0, 0.0], [20.0, 0.0], [0.0, 40.0]], weights=w, stds=[0.5, 1.0, 0.7])
    h_k = torch.tensor([Gaussian([0.0, 0.0], std=s).entropy() for s in (0.5, 1.0, 0.7)], dtype=F64)
    expected = float(-(w * w.log()).sum() + (w * h_k).sum())
    assert mixture_entropy(gm) == pytest.approx(expected, abs=1e-9)


def test_mixture_entropy_of_overlapping_components_matches_monte_carlo():
    gm = random_mixture(2, 3, torch.Generator().manual_seed(13), form="iso")
    x = gm.sample(200_000, generator=torch.Generator().manual_seed(14))
    nlp = -gm.log_prob(x)
    se = float(nlp.std()) / math.sqrt(len(x))
    assert abs(mixture_entropy(gm) - float(nlp.mean())) < 5 * se


def test_entropy_helpers_reject_bad_input():
    with pytest.raises(ValueError, match="1 or 2 dimensions"):
        mixture_entropy(Gaussian(torch.zeros(3, dtype=F64)))
    with pytest.raises(ValueError, match="max_points"):
        mixture_entropy(GaussianMixture([[-100.0], [100.0]], stds=0.01))
    with pytest.raises(ValueError, match="std"):
        gaussian_cross_entropy(song_ermon_mixture(), 0.0, 0.0)
    with pytest.raises(ValueError, match="mean"):
        gaussian_cross_entropy(song_ermon_mixture(), [0.0, 0.0, 0.0], 1.0)
    with pytest.raises(TypeError):
        mixture_entropy("not a mixture")
