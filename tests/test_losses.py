"""Score-matching objectives against closed forms and each other.

Monte Carlo checks estimate the standard error from the spread of the loss over independent
chunks of data (the losses return batch means), and allow 4 standard errors.
"""
import math

import pytest
import torch
from scipy import integrate

from scorebook.densities import Gaussian, GaussianMixture, oracle_score
from scorebook.losses import (denoising_score_matching, explicit_score_matching, implicit_score_matching,
                              jacobian_trace, ncsn_loss, sde_loss, sliced_score_matching)
from scorebook.sde import VESDE, VPSDE, SubVPSDE, geometric_sigmas

F64 = torch.float64



def chunk_stats(values):
    """Mean and standard error of a list of i.i.d. chunk estimates."""
    v = torch.stack([torch.as_tensor(x, dtype=F64) for x in values])
    return float(v.mean()), float(v.std() / math.sqrt(len(v)))


def linear_score(A, b):
    return lambda x, t: x @ A.T + b


def tanh_score(W, c):
    """s(x) = c * tanh(W x); Jacobian c diag(1 - tanh^2(Wx)) W, so tr = c sum_i (1 - tanh^2(w_i x)) W_ii."""
    return lambda x, t: c * torch.tanh(x @ W.T)


def mlp_score(d, g):
    """A random two-layer softplus network, a generic non-linear score model."""
    W1 = torch.randn(16, d, generator=g, dtype=F64) / math.sqrt(d)
    W2 = torch.randn(d, 16, generator=g, dtype=F64) / 4.0
    b1 = torch.randn(16, generator=g, dtype=F64)
    return lambda x, t: torch.nn.functional.softplus(x @ W1.T + b1) @ W2.T - 0.5 * x


# ----- explicit and implicit SM, exact trace --------------------------------------------------
def test_explicit_sm_is_half_the_squared_error_and_accepts_a_tensor_target():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 3, generator=g, dtype=F64)
    s = mlp_score(3, g)
    true = Gaussian(torch.zeros(3), std=1.0)
    ref = 0.5 * ((s(x, 0) - true.score(x)) ** 2).sum(1).mean()
    torch.testing.assert_close(explicit_score_matching(s, x, oracle_score(true)), ref)
    torch.testing.assert_close(explicit_score_matching(s, x, true.score(x)), ref)
    assert float(explicit_score_matching(oracle_score(true), x, true.score(x))) == 0.0


def test_jacobian_trace_and_ism_match_closed_forms():
    g = torch.Generator().manual_seed(1)
    d = 4
    x = torch.randn(50, d, generator=g, dtype=F64)
    A, b = torch.randn(d, d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    tr, _ = jacobian_trace(linear_score(A, b), x)
    torch.testing.assert_close(tr, torch.full((50,), float(torch.trace(A)), dtype=F64))
    W = torch.randn(d, d, generator=g, dtype=F64)
    s = tanh_score(W, 1.7)
    tr_ref = 1.7 * ((1 - torch.tanh(x @ W.T) ** 2) * torch.diagonal(W)).sum(1)
    tr, _ = jacobian_trace(s, x)
    torch.testing.assert_close(tr, tr_ref, rtol=1e-12, atol=1e-12)
    ism_ref = (tr_ref + 0.5 * (s(x, 0) ** 2).sum(1)).mean()
    torch.testing.assert_close(implicit_score_matching(s, x), ism_ref, rtol=1e-12, atol=1e-12)


def test_ism_is_differentiable_in_the_model_parameters():
    # ISM is a training loss: its gradient w.r.t. (a, b) of s = a x + b in 1-D is (1 + a E x^2 + b E x, a E x + b)
    x = torch.randn(200, 1, generator=torch.Generator().manual_seed(2), dtype=F64)
    a = torch.tensor(-0.3, dtype=F64, requires_grad=True)
    b = torch.tensor(0.2, dtype=F64, requires_grad=True)
    implicit_score_matching(lambda y, t: a * y + b, x).backward()
    m1, m2 = float(x.mean()), float((x ** 2).mean())
    assert float(a.grad) == pytest.approx(1 + (-0.3) * m2 + 0.2 * m1, rel=1e-10)
    assert float(b.grad) == pytest.approx(-0.3 * m1 + 0.2, rel=1e-10)


def test_hyvarinen_identity_same_constant_for_two_models_on_a_mixture():
    """ESM - ISM = 1/2 E||grad log p||^2 for every model: the difference between two models is zero."""
    g = torch.Generator().manual_seed(3)
    p = GaussianMixture([[-1.5, 0.0], [1.5, 1.0]], [[[1.0, 0.3], [0.3, 0.5]], [[0.6, -0.2], [-0.2, 1.2]]], [0.4, 0.6])
    s1 = mlp_score(2, g)                                                    # a random non-linear model
    s2 = linear_score(-0.2 * torch.eye(2, dtype=F64), torch.tensor([3.0, -3.0], dtype=F64))  # a poor linear one
    true = oracle_score(p)
    c1, c2, cmc, gaps, esm_gaps = [], [], [], [], []
    for _ in range(20):
        x = p.sample(500, generator=g)
        e1, e2 = explicit_score_matching(s1, x, true), explicit_score_matching(s2, x, true)
        d1 = (e1 - implicit_score_matching(s1, x)).detach()
        d2 = (e2 - implicit_score_matching(s2, x)).detach()
        c1.append(d1), c2.append(d2), gaps.append(d1 - d2), esm_gaps.append(e1 - e2)
        cmc.append(0.5 * (p.score(x) ** 2).sum(1).mean())
    gap, gap_se = chunk_stats(gaps)
    assert abs(gap) < 4 * gap_se
    # the check has resolution: the two models' Fisher divergences differ by far more than gap_se
    assert abs(chunk_stats(esm_gaps)[0]) > 10 * gap_se
    # and each difference equals the Monte Carlo value of 1/2 E||grad log p||^2
    for c in (c1, c2):
        diff, diff_se = chunk_stats([a - b for a, b in zip(c, cmc)])
        assert abs(diff) < 4 * diff_se


def test_hyvarinen_constant_is_half_trace_of_precision_for_a_gaussian():
    """For N(mu, Sigma): 1/2 E||Sigma^{-1}(x - mu)||^2 = 1/2 tr(Sigma^{-1}) exactly."""
    g = torch.Generator().manual_seed(4)
    cov = torch.tensor([[2.0, 0.8, 0.1], [0.8, 1.0, -0.3], [0.1, -0.3, 0.5]], dtype=F64)
    p = Gaussian([1.0, -2.0, 0.5], cov)
    const = 0.5 * float(torch.trace(torch.linalg.inv(cov)))
    s1, s2 = mlp_score(3, g), tanh_score(torch.randn(3, 3, generator=g, dtype=F64), 1.0)
    for s in (s1, s2):
        diffs = []
        for _ in range(20):
            x = p.sample(1000, generator=g)
            diffs.append((explicit_score_matching(s, x, oracle_score(p)) - implicit_score_matching(s, x)).detach())
        mean, se = chunk_stats(diffs)
        assert abs(mean - const) < 4 * se, (mean, const, se)


# ----- sliced SM ----------------------------------------------------------------------------
@pytest.mark.parametrize("variance_reduction", [True, False])
def test_sliced_sm_equals_implicit_sm_in_expectation(variance_reduction):
    g = torch.Generator().manual_seed(5)
    s = mlp_score(3, g)
    x = torch.randn(400, 3, generator=g, dtype=F64) * 1.5
    ism = float(implicit_score_matching(s, x).detach())
    vals = [sliced_score_matching(s, x, n_projections=2, variance_reduction=variance_reduction,
                                  generator=g).detach() for _ in range(40)]
    mean, se = chunk_stats(vals)
    assert abs(mean - ism) < 4 * se, (mean, ism, se)
    assert se < 0.05 * abs(ism) + 0.05  # the check has resolution: the SE is small against the loss


def test_sliced_sm_variance_reduction_lowers_the_variance():
    g = torch.Generator().manual_seed(6)
    s = mlp_score(3, g)
    x = torch.randn(200, 3, generator=g, dtype=F64) * 2
    sd = {vr: torch.stack([sliced_score_matching(s, x, 1, vr, generator=g).detach() for _ in range(60)]).std()
          for vr in (True, False)}
    assert sd[True] < sd[False]


def test_sliced_sm_of_a_linear_model_is_exact_with_many_projections():
    # for s = A x + b, v^T A v averaged over M Gaussian projections -> tr(A), SE ~ sqrt(2 tr(A A^T)/ M)
    g = torch.Generator().manual_seed(7)
    A = torch.randn(3, 3, generator=g, dtype=F64)
    x = torch.randn(64, 3, generator=g, dtype=F64)
    s = linear_score(A, torch.zeros(3, dtype=F64))
    ssm = float(sliced_score_matching(s, x, n_projections=400, generator=g).detach())
    ism = float(implicit_score_matching(s, x).detach())
    se = math.sqrt(float(((A + A.T) ** 2).sum()) / 2 / (400 * 64))
    assert abs(ssm - ism) < 4 * se


# ----- denoising SM -------------------------------------------------------------------------
def test_dsm_minimiser_is_the_perturbed_score_on_gaussian_data():
    """Over s(x) = A x + b, DSM at sigma is minimised by the score of N(mu, Sigma + sigma^2 I):
    A* = -(Sigma + sigma^2 I)^{-1}, b* = (Sigma + sigma^2 I)^{-1} mu (Vincent 2011)."""
    sigma = 0.5
    cov = torch.tensor([[1.0, 0.4], [0.4, 0.6]], dtype=F64)
    mu = torch.tensor([1.0, -1.0], dtype=F64)
    x = Gaussian(mu, cov).sample(40_000, generator=torch.Generator().manual_seed(8))
    theta0 = torch.zeros(6, dtype=F64)

    def loss(theta):  # the same noise draw every call: the objective is an exact quadratic in theta
        A, b = theta[:4].reshape(2, 2), theta[4:]
        return denoising_score_matching(linear_score(A, b), x, sigma, generator=torch.Generator().manual_seed(9))

    grad = torch.autograd.functional.jacobian(loss, theta0)
    hess = torch.autograd.functional.hessian(loss, theta0)
    theta = theta0 - torch.linalg.solve(hess, grad)                  # Newton step = exact minimiser
    prec = torch.linalg.inv(cov + sigma ** 2 * torch.eye(2, dtype=F64))
    # regression SE per coefficient ~ resid_std / sqrt(n var(x~)) ~ 1.8 / sqrt(40000 * 0.8) ~ 0.01
    torch.testing.assert_close(theta[:4].reshape(2, 2), -prec, atol=0.05, rtol=0)
    torch.testing.assert_close(theta[4:], prec @ mu, atol=0.05, rtol=0)
    # the oracle (perturbed score) gives a lower DSM than the clean score, on the same noise
    dsm = lambda s: float(denoising_score_matching(s, x, sigma, generator=torch.Generator().manual_seed(9)))
    p = Gaussian(mu, cov)
    assert dsm(oracle_score(p)) < dsm(lambda y, t: p.score(y))


def optimal_dsm_value(cov, sigma):
    """DSM at its minimum on N(mu, Sigma): 1/2 (D / sigma^2 - tr((Sigma + sigma^2 I)^{-1}))."""
    d = cov.shape[0]
    return 0.5 * (d / sigma ** 2 - float(torch.trace(torch.linalg.inv(cov + sigma ** 2 * torch.eye(d, dtype=F64)))))


def test_dsm_value_of_the_oracle_matches_closed_form():
    g = torch.Generator().manual_seed(10)
    cov = torch.tensor([[1.0, 0.4], [0.4, 0.6]], dtype=F64)
    p = Gaussian([1.0, -1.0], cov)
    for sigma in (0.3, 2.0):
        vals = [denoising_score_matching(oracle_score(p), p.sample(2000, generator=g), sigma, generator=g)
                for _ in range(20)]
        mean, se = chunk_stats(vals)
        assert abs(mean - optimal_dsm_value(cov, sigma)) < 4 * se


def test_ncsn_loss_of_the_oracle_matches_closed_form():
    """ncsn_loss = mean over levels of sigma^2 DSM(sigma); at the oracle each term is in closed form."""
    g = torch.Generator().manual_seed(11)
    cov = torch.tensor([[1.0, 0.4], [0.4, 0.6]], dtype=F64)
    p = Gaussian([1.0, -1.0], cov)
    sigmas = geometric_sigmas(5.0, 0.1, 6)
    ref = sum(float(s) ** 2 * optimal_dsm_value(cov, float(s)) for s in sigmas) / len(sigmas)
    vals = [ncsn_loss(oracle_score(p), p.sample(2000, generator=g), sigmas, generator=g) for _ in range(20)]
    mean, se = chunk_stats(vals)
    assert abs(mean - ref) < 4 * se


@pytest.mark.parametrize("sde", [VESDE(0.01, 10.0), VPSDE(), SubVPSDE()], ids=repr)
@pytest.mark.parametrize("likelihood_weighting", [False, True])
def test_sde_loss_of_the_oracle_matches_the_time_integral(sde, likelihood_weighting):
    """At the oracle, E_z 1/2||std s + z||^2 = 1/2 (D - std^2 tr(C_t^{-1})) with C_t = a^2 Sigma + std^2 I;
    the loss averages it over t ~ U(eps, 1), times g^2/std^2 with likelihood weighting."""
    g = torch.Generator().manual_seed(12)
    cov = torch.tensor([[1.0, 0.4], [0.4, 0.6]], dtype=F64)
    p = Gaussian([1.0, -1.0], cov)
    eps = 0.05  # keeps g^2/std^2 bounded so the Monte Carlo variance is finite and small

    def integrand(t):
        tt = torch.tensor([t], dtype=F64)
        a, std, g2 = float(sde.mean_coef(tt)), float(sde.marginal_std(tt)), float(sde.diffusion(tt)) ** 2
        c = a * a * cov + std * std * torch.eye(2, dtype=F64)
        val = 0.5 * (2 - std * std * float(torch.trace(torch.linalg.inv(c))))
        return val * (g2 / std ** 2 if likelihood_weighting else 1.0)

    ref = integrate.quad(integrand, eps, 1.0, limit=200)[0] / (1.0 - eps)
    vals = [sde_loss(oracle_score(p, sde), p.sample(2000, generator=g), sde,
                     likelihood_weighting=likelihood_weighting, eps=eps, generator=g) for _ in range(20)]
    mean, se = chunk_stats(vals)
    assert abs(mean - ref) < 4 * se, (mean, ref, se)


# ----- the seed's 1-D example -----------------------------------------------------------------
MU, S = 1.5, 2.0


def test_seed_1d_example_closed_form_minimiser_of_ism():
    """ISM of s(x) = a x + b on N(mu, s^2) is a + 1/2 E(a x + b)^2, minimised at a = -1/s^2, b = mu/s^2."""
    x = MU + S * torch.randn(40_000, 1, generator=torch.Generator().manual_seed(13), dtype=F64)

    def loss(theta):
        return implicit_score_matching(lambda y, t: theta[0] * y + theta[1], x)

    theta0 = torch.zeros(2, dtype=F64)
    grad = torch.autograd.functional.jacobian(loss, theta0)
    hess = torch.autograd.functional.hessian(loss, theta0)
    a, b = (theta0 - torch.linalg.solve(hess, grad)).tolist()
    _assert_is_the_ism_optimum(a, b, x, rel=1e-10)


def _assert_is_the_ism_optimum(a: float, b: float, x, rel: float) -> None:
    """(a, b) is the ISM minimiser of s(x) = a x + b on the sample x ~ N(MU, S^2), and near the population one."""
    # on the sample the minimiser is exactly (-1/v, m/v) with the sample mean m and (biased) variance v
    m, v = float(x.mean()), float(x.var(unbiased=False))
    assert a == pytest.approx(-1 / v, rel=rel) and b == pytest.approx(m / v, rel=rel)
    # and (-1/v, m/v) -> (-1/s^2, mu/s^2): SE(1/v) = sqrt(2/n)/s^2, SE(m/v) ~ sqrt(1/(n s^2) + 2 mu^2/(n s^4))
    n = x.shape[0]
    assert abs(a + 1 / S ** 2) < 4 * math.sqrt(2 / n) / S ** 2
    assert abs(b - MU / S ** 2) < 4 * math.sqrt(1 / (n * S ** 2) + 2 * MU ** 2 / (n * S ** 4))


def test_seed_1d_example_gradient_descent_on_ism():
    x = MU + S * torch.randn(5000, 1, generator=torch.Generator().manual_seed(14), dtype=F64)
    a = torch.zeros((), dtype=F64, requires_grad=True)
    b = torch.zeros((), dtype=F64, requires_grad=True)
    opt = torch.optim.SGD([a, b], lr=0.25)
    # Hessian [[E x^2, E x], [E x, 1]] has eigenvalues ~0.6 and ~6.7: with lr = 0.25 every error mode
    # contracts by a factor <= 0.85 per step, so 150 steps reach ~1e-11 of the minimiser
    for _ in range(150):
        opt.zero_grad()
        implicit_score_matching(lambda y, t: a * y + b, x).backward()
        opt.step()
    _assert_is_the_ism_optimum(float(a.detach()), float(b.detach()), x, rel=1e-8)


# ----- dtype and bad input ------------------------------------------------------------------
def test_losses_follow_float32():
    x = torch.randn(32, 2)
    p = Gaussian([0.0, 0.0], std=1.0)
    s = oracle_score(p)
    losses = [explicit_score_matching(s, x, s), implicit_score_matching(s, x), sliced_score_matching(s, x),
              denoising_score_matching(s, x, 0.5), ncsn_loss(s, x, geometric_sigmas(2.0, 0.1, 4)),
              sde_loss(oracle_score(p, VPSDE()), x, VPSDE())]
    for loss in losses:
        assert loss.ndim == 0 and loss.dtype == torch.float32 and torch.isfinite(loss)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(8, 2)
    good = lambda y, t: -y
    bad = lambda y, t: y[:, :1]
    for call in (lambda: explicit_score_matching(bad, x, good), lambda: implicit_score_matching(bad, x),
                 lambda: sliced_score_matching(bad, x), lambda: denoising_score_matching(bad, x, 1.0),
                 lambda: ncsn_loss(bad, x, [2.0, 1.0]), lambda: sde_loss(bad, x, VPSDE())):
        with pytest.raises(ValueError, match="shaped like x"):
            call()
    for sigma in (0.0, -1.0):
        with pytest.raises(ValueError, match="sigma must be finite and > 0"):
            denoising_score_matching(good, x, sigma)
    with pytest.raises(ValueError, match="strictly decreasing"):
        ncsn_loss(good, x, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="n_projections must be a positive integer"):
        sliced_score_matching(good, x, n_projections=0)
    with pytest.raises(ValueError, match="eps must lie in"):
        sde_loss(good, x, VPSDE(), eps=0.0)
    with pytest.raises(ValueError, match="true_score must be shaped like x"):
        explicit_score_matching(good, x, torch.zeros(8, 3))


# ----- closed-form score matching for exponential families -----------------------------------
def test_exponential_family_score_matching_of_a_gaussian_is_the_mle():
    # T = (x, x^2): T' = (1, 2x), T'' = (0, 2). Solving -A^{-1} b by hand gives theta = (m/v, -1/(2v))
    # with the sample mean m and the 1/N sample variance v, which is also the MLE (eq. ch3-gauss-mle).
    from scorebook.losses import exponential_family_score_matching
    x = 1.5 + 0.7 * torch.randn(5000, generator=torch.Generator().manual_seed(0), dtype=F64)
    grad_t = torch.stack([torch.ones_like(x), 2 * x], 1)[..., None]          # (N, 2, 1)
    lap_t = torch.stack([torch.zeros_like(x), torch.full_like(x, 2.0)], 1)   # (N, 2)
    theta = exponential_family_score_matching(grad_t, lap_t)
    m, v = x.mean(), x.var(unbiased=False)
    torch.testing.assert_close(theta, torch.stack([m / v, -0.5 / v]), rtol=1e-10, atol=1e-12)


def test_exponential_family_score_matching_minimises_the_implicit_loss():
    # 2-D features T = (x1, x2, x1^2, x2^2, x1 x2, x1^4 + x2^4) on mixture data: the package's ISM loss of
    # the model score s_theta = J_T^T theta has zero gradient in theta at the closed-form estimate
    from scorebook.losses import exponential_family_score_matching
    mix = GaussianMixture([[-1.0, 0.0], [1.0, 0.5]], stds=0.6)
    x = mix.sample(4000, generator=torch.Generator().manual_seed(1))          # (N, 2)
    x1, x2 = x[:, 0], x[:, 1]
    one, zero = torch.ones_like(x1), torch.zeros_like(x1)
    grad_t = torch.stack([torch.stack([one, zero], 1), torch.stack([zero, one], 1),
                          torch.stack([2 * x1, zero], 1), torch.stack([zero, 2 * x2], 1),
                          torch.stack([x2, x1], 1), torch.stack([4 * x1 ** 3, 4 * x2 ** 3], 1)], 1)   # (N, 6, 2)
    lap_t = torch.stack([zero, zero, 2 * one, 2 * one, zero, 12 * (x1 ** 2 + x2 ** 2)], 1)          # (N, 6)
    theta = exponential_family_score_matching(grad_t, lap_t).requires_grad_(True)

    def model(z, t):
        z1, z2 = z[:, 0], z[:, 1]
        s1 = theta[0] + 2 * theta[2] * z1 + theta[4] * z2 + 4 * theta[5] * z1 ** 3
        s2 = theta[1] + 2 * theta[3] * z2 + theta[4] * z1 + 4 * theta[5] * z2 ** 3
        return torch.stack([s1, s2], 1)

    (grad,) = torch.autograd.grad(implicit_score_matching(model, x), theta)
    # the gradient A theta + b vanishes up to rounding in sums of N terms of size up to |A theta| ~ 1e2
    assert grad.abs().max() < 1e-9, grad


def test_exponential_family_score_matching_rejects_bad_input():
    from scorebook.losses import exponential_family_score_matching
    with pytest.raises(ValueError, match="grad_t"):
        exponential_family_score_matching(torch.zeros(5, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="lap_t"):
        exponential_family_score_matching(torch.zeros(5, 2, 1), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="singular"):
        exponential_family_score_matching(torch.zeros(5, 2, 1, dtype=F64), torch.ones(5, 2, dtype=F64))
