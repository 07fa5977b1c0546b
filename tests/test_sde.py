"""Forward SDEs: closed-form kernels, their consistency with (f, g), priors, reverse/ODE drifts.

The perturbation kernel of ``dx = f(t) x dt + g(t) dw`` is ``N(a(t) x0, v(t) I)`` with
``a' = f a, a(0) = 1`` and ``v' = 2 f v + g^2, v(0) = 0`` (Sarkka & Solin, eq. 5.51). We check
a(t) and std(t)^2 against these ODEs by autograd, independently of the formulas in the code.
"""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from scorebook.sde import VESDE, VPSDE, SubVPSDE, check_sigmas, geometric_sigmas

F64 = torch.float64
SDES = [VESDE(), VESDE(0.1, 10.0), VPSDE(), VPSDE(0.5, 5.0), SubVPSDE(), SubVPSDE(0.5, 5.0)]


def drift_coef(sde, t):
    """f(t) with f(x, t) = f(t) x, read from sde.drift at x = 1."""
    return sde.drift(torch.ones(t.shape[0], 1, dtype=F64), t)[:, 0]


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_kernel_solves_the_moment_odes(sde):
    t = torch.linspace(0.02, 1.0, 50, dtype=F64, requires_grad=True)
    a = sde.mean_coef(t)
    v = sde.marginal_std(t) ** 2
    # VE has a(t) = 1, a constant with no graph: its derivative is zero
    da = torch.autograd.grad(a.sum(), t)[0] if a.requires_grad else torch.zeros_like(t)
    (dv,) = torch.autograd.grad(v.sum(), t)
    t = t.detach()
    f = drift_coef(sde, t)
    g2 = sde.diffusion(t) ** 2
    torch.testing.assert_close(da, f * a.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(dv, 2 * f * v.detach() + g2, rtol=1e-9, atol=1e-12)
    # initial conditions: the kernel starts at the data
    assert float(sde.mean_coef(0.0)) == pytest.approx(1.0, abs=1e-15)
    assert float(sde.marginal_std(0.0)) == pytest.approx(0.0, abs=1e-15)


def test_closed_forms_from_the_spec():
    t = torch.tensor([0.0, 0.3, 0.75, 1.0], dtype=F64)
    ve = VESDE(0.01, 50.0)
    sig = 0.01 * (50.0 / 0.01) ** t
    torch.testing.assert_close(ve.marginal_std(t), torch.sqrt(sig ** 2 - 0.01 ** 2))
    torch.testing.assert_close(ve.diffusion(t), sig * math.sqrt(2 * math.log(50.0 / 0.01)))
    torch.testing.assert_close(ve.mean_coef(t), torch.ones(4, dtype=F64))
    vp = VPSDE(0.1, 20.0)
    a = torch.exp(-0.25 * t ** 2 * (20.0 - 0.1) - 0.5 * t * 0.1)
    torch.testing.assert_close(vp.mean_coef(t), a)
    torch.testing.assert_close(vp.marginal_std(t), torch.sqrt(1 - a ** 2))
    torch.testing.assert_close(vp.diffusion(t), torch.sqrt(0.1 + t * 19.9))
    sub = SubVPSDE(0.1, 20.0)
    torch.testing.assert_close(sub.mean_coef(t), a)
    torch.testing.assert_close(sub.marginal_std(t), 1 - a ** 2)


@pytest.mark.parametrize("sde", SDES, ids=repr)
def test_marginal_and_perturb_follow_the_kernel(sde):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, generator=g, dtype=F64)
    noise = torch.randn(6, 3, generator=g, dtype=F64)
    t = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.9, 1.0], dtype=F64)
    mean, std = sde.marginal(x0, t)
    torch.testing.assert_close(mean, sde.mean_coef(t)[:, None] * x0)
    torch.testing.assert_close(std, sde.marginal_std(t))
    torch.testing.assert_close(sde.perturb(x0, t, noise), mean + std[:, None] * noise)


@pytest.mark.parametrize("sde", [VESDE(), VPSDE(), SubVPSDE()], ids=repr)
def test_prior_matches_the_marginal_at_T_and_its_log_density(sde):
    # the prior is N(0, prior_std^2 I); for VE prior_std^2 equals the kernel variance at T exactly,
    # for VP/sub-VP the kernel at T is N(a(1) x0, std(1)^2) with a(1) ~ 7e-3, std(1) ~ 1
    std_T = float(sde.marginal_std(1.0))
    assert abs(sde.prior_std - std_T) < 1e-4
    g = torch.Generator().manual_seed(1)
    z = sde.prior_sample((50_000, 2), generator=g, dtype=F64)
    assert z.shape == (50_000, 2) and z.dtype == F64
    # sample std within 4 standard errors (SE of a std estimate = std / sqrt(2n))
    assert abs(float(z.std()) - sde.prior_std) < 4 * sde.prior_std / math.sqrt(2 * z.numel())
    zz = z[:10]
    ref = stats.norm(0, sde.prior_std).logpdf(zz.numpy()).sum(1)
    np.testing.assert_allclose(sde.prior_log_prob(zz).numpy(), ref, rtol=1e-12)
    # prior_log_prob sums over every non-batch dimension (image-shaped input)
    img = torch.randn(3, 2, 4, 4, dtype=F64)
    ref_img = stats.norm(0, sde.prior_std).logpdf(img.numpy()).reshape(3, -1).sum(1)
    np.testing.assert_allclose(sde.prior_log_prob(img).numpy(), ref_img, rtol=1e-12)


@pytest.mark.parametrize("sde", [VESDE(), VPSDE(), SubVPSDE()], ids=repr)
def test_reverse_and_probability_flow_drifts(sde):
    x = torch.randn(5, 2, dtype=F64)
    t = torch.full((5,), 0.4, dtype=F64)

    def score(y, tt):
        return -2.0 * y + 1.0

    f = sde.drift(x, t)
    g2 = sde.diffusion(t)[:, None] ** 2
    torch.testing.assert_close(sde.reverse_drift(score, x, t), f - g2 * score(x, t))
    torch.testing.assert_close(sde.ode_drift(score, x, t), f - 0.5 * g2 * score(x, t))
    with pytest.raises(ValueError, match="shaped like x"):
        sde.reverse_drift(lambda y, tt: y[:, :1], x, t)


def test_discretize_ve_is_the_exact_smld_step_and_vp_is_euler_maruyama():
    # discretize(x, t, dt) is the forward transition from t - dt to t
    x = torch.randn(4, 2, dtype=F64)
    ve = VESDE()
    f_dt, G = ve.discretize(x, 0.5, 0.01)
    sig = lambda t: 0.01 * (50.0 / 0.01) ** t
    assert torch.equal(f_dt, torch.zeros_like(x))
    torch.testing.assert_close(G, torch.full((4,), math.sqrt(sig(0.5) ** 2 - sig(0.49) ** 2), dtype=F64))
    # summing the exact VE steps reproduces the kernel variance: sum_i G_i^2 = sigma(t)^2 - sigma_min^2
    ts = torch.linspace(0.01, 0.7, 70, dtype=F64)
    g2 = torch.stack([ve.discretize(x[:1], float(t), 0.01)[1] ** 2 for t in ts]).sum()
    assert float(g2) == pytest.approx(float(ve.marginal_std(0.7)) ** 2, rel=1e-9)
    vp = VPSDE()
    f_dt, G = vp.discretize(x, 0.5, 0.01)
    torch.testing.assert_close(f_dt, vp.drift(x, 0.5) * 0.01)
    torch.testing.assert_close(G, vp.diffusion(torch.full((4,), 0.5, dtype=F64)) * 0.1)


def test_dtype_follows_the_input():
    x = torch.randn(3, 2, dtype=torch.float32)
    for sde in (VESDE(), VPSDE(), SubVPSDE()):
        mean, std = sde.marginal(x, 0.3)
        assert sde.drift(x, 0.3).dtype == torch.float32 and mean.dtype == std.dtype == torch.float32
        assert sde.perturb(x, 0.3, torch.randn_like(x)).dtype == torch.float32
        assert sde.prior_sample((3, 2)).dtype == torch.float32
        assert sde.ode_drift(lambda y, t: -y, x, 0.3).dtype == torch.float32


def test_geometric_sigmas():
    s = geometric_sigmas(20.0, 1.0, 10)
    assert s.shape == (10,) and s.dtype == F64
    assert float(s[0]) == pytest.approx(20.0, rel=1e-12) and float(s[-1]) == pytest.approx(1.0, rel=1e-12)
    ratios = s[1:] / s[:-1]
    torch.testing.assert_close(ratios, torch.full((9,), 20.0 ** (-1 / 9), dtype=F64))
    torch.testing.assert_close(check_sigmas(s), s)


# ----- bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("sde", [VESDE(), VPSDE(), SubVPSDE()], ids=repr)
@pytest.mark.parametrize("bad_t", [-0.01, 1.01, float("nan")])
def test_time_outside_the_range_raises(sde, bad_t):
    x = torch.zeros(2, 2)
    for call in (lambda: sde.drift(x, bad_t), lambda: sde.diffusion(bad_t), lambda: sde.mean_coef(bad_t),
                 lambda: sde.marginal_std(bad_t), lambda: sde.marginal(x, bad_t),
                 lambda: sde.ode_drift(lambda y, t: y, x, bad_t)):
        with pytest.raises(ValueError, match=r"t must lie in \[0, 1"):
            call()


def test_bad_sde_parameters_raise():
    with pytest.raises(ValueError, match="sigma_min must be finite and > 0"):
        VESDE(sigma_min=0.0)
    with pytest.raises(ValueError, match="sigma_max must be finite and > 0"):
        VESDE(sigma_max=-1.0)
    with pytest.raises(ValueError, match="sigma_max must exceed sigma_min"):
        VESDE(sigma_min=5.0, sigma_max=1.0)
    with pytest.raises(ValueError, match="beta_min must be finite and > 0"):
        VPSDE(beta_min=-0.1)
    with pytest.raises(ValueError, match="beta_max must be >= beta_min"):
        SubVPSDE(beta_min=2.0, beta_max=1.0)


def test_bad_noise_schedules_raise():
    with pytest.raises(ValueError, match="strictly decreasing"):
        check_sigmas(torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="strictly decreasing"):
        check_sigmas(torch.tensor([3.0, 3.0, 1.0]))
    with pytest.raises(ValueError, match="sigmas must be finite and > 0"):
        check_sigmas(torch.tensor([3.0, 0.0]))
    with pytest.raises(ValueError, match="sigma_min must be finite and > 0"):
        geometric_sigmas(10.0, 0.0, 5)
    with pytest.raises(ValueError, match="sigma_max must exceed sigma_min"):
        geometric_sigmas(1.0, 10.0, 5)


def test_corrector_alpha_is_the_exact_ddpm_alpha():
    """alpha over a step [t - dt, t] is exp(-int beta) for VP and sub-VP: closed form, 1 - beta dt to first order,
    and inside (0, 1] even on a grid so coarse that 1 - beta dt < 0; VE has no shrinkage (alpha = 1)."""
    for sde in (VPSDE(0.1, 20.0), SubVPSDE(0.1, 20.0)):
        t, dt = torch.tensor(0.7, dtype=torch.float64), 0.2
        integral = 0.1 * dt + 0.5 * 19.9 * (0.7 ** 2 - 0.5 ** 2)
        assert sde.corrector_alpha(t, dt) == pytest.approx(math.exp(-integral), rel=1e-12)
        assert 0.0 < sde.corrector_alpha(t, dt) <= 1.0 and 1.0 - float(sde.beta(t)) * dt < 0
        # first order: exp(-int) = 1 - beta dt + O(dt^2), the remainder bounded by (beta^2 + |beta'|) dt^2
        small, beta = 1e-4, float(sde.beta(t))
        gap = abs(sde.corrector_alpha(t, small) - (1 - beta * small))
        assert gap < (beta ** 2 + 19.9) * small ** 2 and gap > 0
    assert VESDE().corrector_alpha(torch.tensor(0.5), 0.1) == 1.0


def test_check_eps_accepts_only_the_open_interval():
    sde = VPSDE()
    assert sde.check_eps(1e-3) == 1e-3
    for bad in (0.0, 1.0, -1e-3, 2.0, "0.1"):
        with pytest.raises(ValueError, match="eps must lie in"):
            sde.check_eps(bad)


# ----- choosing the noise levels (Song & Ermon 2020) ------------------------------------------
from scorebook.sde import max_pairwise_distance, overlap_sigmas, ratio_for_overlap, shell_overlap  # noqa: E402


def test_max_pairwise_distance_of_the_unit_cube_is_its_diagonal():
    corners = torch.cartesian_prod(*[torch.tensor([0.0, 1.0], dtype=F64)] * 5)   # (32, 5) corners of [0, 1]^5
    assert max_pairwise_distance(corners) == pytest.approx(math.sqrt(5.0), rel=1e-12)
    assert max_pairwise_distance(corners, chunk=3) == pytest.approx(math.sqrt(5.0), rel=1e-12)


def test_max_pairwise_distance_matches_brute_force_for_images():
    x = torch.randn(300, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    flat = x.reshape(300, -1)
    brute = max(float((flat[i] - flat[j]).norm()) for i in range(300) for j in range(i + 1, 300))
    assert max_pairwise_distance(x, chunk=7) == pytest.approx(brute, rel=1e-12)
    with pytest.raises(ValueError, match="at least two examples"):
        max_pairwise_distance(x[:1])


@pytest.mark.parametrize("dim", [1, 2, 5, 64, 3072])
def test_shell_overlap_is_the_chi_probability_of_the_band(dim):
    """exact=True against scipy's chi distribution; exact=False against the paper's normal formula."""
    g = np.array([1.0, 1.05, 1.36, 2.0, 7.0])
    lo, hi = np.clip(g * (math.sqrt(dim) - 3 / math.sqrt(2)), 0, None), g * (math.sqrt(dim) + 3 / math.sqrt(2))
    want = stats.chi.cdf(hi, dim) - stats.chi.cdf(lo, dim)
    # torch's regularised incomplete gamma stops its series / continued fraction near 1e-10 (3e-10 seen at
    # D = 64), scipy's is accurate to ~1e-15: 1e-8 is far below any use of an overlap (read to 1e-3)
    np.testing.assert_allclose(shell_overlap(torch.tensor(g), dim).numpy(), want, rtol=0, atol=1e-8)
    a = math.sqrt(2 * dim) * (g - 1)
    paper = stats.norm.cdf(a + 3 * g) - stats.norm.cdf(a - 3 * g)
    np.testing.assert_allclose(shell_overlap(torch.tensor(g), dim, exact=False).numpy(), paper, rtol=1e-10,
                               atol=1e-12)


def test_shell_overlap_by_monte_carlo():
    """The band probability for D = 64 and ratio 1.36, counted on 200 000 Gaussian draws (4 standard errors)."""
    dim, g, n = 64, 1.36, 200_000
    r = torch.randn(n, dim, dtype=F64, generator=torch.Generator().manual_seed(1)).norm(dim=1)
    inside = ((r >= g * (math.sqrt(dim) - 3 / math.sqrt(2))) & (r <= g * (math.sqrt(dim) + 3 / math.sqrt(2))))
    p = float(shell_overlap(g, dim))
    assert abs(inside.double().mean().item() - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_ratio_for_overlap_inverts_the_overlap_and_has_the_large_d_closed_form():
    for dim in (5, 16, 64, 3072):
        g = ratio_for_overlap(dim)
        assert float(shell_overlap(g, dim)) == pytest.approx(0.5, abs=1e-9)
    # normal approximation: when 6g >> 1, Phi(a + 3g) = 1 and the overlap is 1/2 exactly where a = 3g,
    # i.e. g = sqrt(2D) / (sqrt(2D) - 3); the neglected 1 - Phi(6g) is below 1e-9 here
    for dim in (16, 64, 3072):
        assert ratio_for_overlap(dim, exact=False) == pytest.approx(math.sqrt(2 * dim) / (math.sqrt(2 * dim) - 3),
                                                                     rel=1e-9)
    with pytest.raises(ValueError, match="cannot be met"):
        ratio_for_overlap(2)
    with pytest.raises(ValueError, match="overlap must lie in"):
        ratio_for_overlap(64, overlap=1.5)


def test_the_published_schedules_overlap_by_about_a_half():
    """Song & Ermon (2020) use sigma_L = 0.01 and (sigma_1, L) = (50, 232) for CIFAR-10, (90, 500) for CelebA 64x64,
    (140, 788) for LSUN 96x96 and (348, 2311) for FFHQ 256x256; each keeps the overlap just above one half."""
    for s1, n, dim in ((50, 232, 3072), (90, 500, 3 * 64 * 64), (140, 788, 3 * 96 * 96), (348, 2311, 3 * 256 * 256)):
        g = (s1 / 0.01) ** (1 / (n - 1))
        assert 0.5 < float(shell_overlap(g, dim, exact=False)) < 0.6
        assert 0.5 < float(shell_overlap(g, dim)) < 0.6
        fewest = overlap_sigmas(s1, 0.01, dim)
        assert len(fewest) <= n and float(shell_overlap(float(fewest[0] / fewest[1]), dim)) >= 0.5 - 1e-12
        # one level fewer would break the criterion
        g_fewer = (s1 / 0.01) ** (1 / (len(fewest) - 2))
        assert float(shell_overlap(g_fewer, dim)) < 0.5

# ----- from time to noise level ----------------------------------------------------------------
from scorebook.densities import oracle_score, song_ermon_mixture  # noqa: E402
from scorebook.sde import noise_to_time, sigma_score  # noqa: E402


def test_noise_to_time_inverts_the_closed_forms():
    sig = torch.tensor([1e-3, 0.1, 1.0, 10.0, 40.0], dtype=F64)
    vp = VPSDE(0.1, 20.0)
    b = torch.log1p(sig ** 2)                                  # int_0^t beta = log(1 + sigma^2) for VP
    t_vp = (-0.1 + torch.sqrt(0.1 ** 2 + 2 * 19.9 * b)) / 19.9
    torch.testing.assert_close(noise_to_time(vp, sig), t_vp, rtol=1e-12, atol=1e-15)
    ve = VESDE(0.01, 50.0)                                     # sigma^2 = sigma(t)^2 - sigma_min^2
    t_ve = torch.log(torch.sqrt(sig ** 2 + 0.01 ** 2) / 0.01) / math.log(5000.0)
    torch.testing.assert_close(noise_to_time(ve, sig), t_ve, rtol=1e-12, atol=1e-15)
    sub = SubVPSDE()
    t = noise_to_time(sub, sig)
    torch.testing.assert_close(sub.marginal_std(t) / sub.mean_coef(t), sig, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("sde", [VESDE(), VPSDE(), SubVPSDE()], ids=repr)
def test_sigma_score_of_the_time_oracle_is_the_noise_oracle(sde):
    mix = song_ermon_mixture()
    g = torch.Generator().manual_seed(4)
    y = 6.0 * torch.randn(64, 2, generator=g, dtype=F64)
    sig = torch.exp(torch.empty(64, dtype=F64).uniform_(math.log(0.05), math.log(30.0), generator=g))
    got = sigma_score(sde, oracle_score(mix, sde))(y, sig)
    torch.testing.assert_close(got, oracle_score(mix)(y, sig), rtol=1e-8, atol=1e-10)


def test_noise_to_time_rejects_levels_out_of_range():
    with pytest.raises(ValueError, match="at most"):
        noise_to_time(VESDE(0.01, 50.0), 60.0)
    with pytest.raises(ValueError, match="sigma"):
        noise_to_time(VPSDE(), -1.0)
