"""Guidance and posterior sampling against the exact conditional and posterior mixtures.

The references are closed forms from :mod:`scorebook.densities`: the conditional mixture given a
label, the posterior mixture given ``y = A x + n``, and their scores at every t through
``oracle_score``. The likelihood scores are computed by a different route (autograd of the exact
classifier and of the exact ``p_t(y | x_t)``), so agreement is a real check of Bayes' rule for scores.

Tolerances: float64 scores of size <= ~100 agree to rounding (1e-8 allows for the logsumexp and
solve chains); a sample mean has standard error sqrt(var / n), a variance var sqrt(2 / n), and every
statistical check allows at least 4 standard errors.
"""
import math

import pytest
import torch

from scorebook.densities import (Gaussian, GaussianMixture, conditional_mixture, oracle_classifier,
                                 oracle_measurement_log_likelihood, oracle_score, posterior_mixture,
                                 sample_labelled)
from scorebook.guidance import (ConditionalScoreMLP, NoisyClassifier, cfg_loss, classifier_free_guidance,
                                classifier_guidance, conditional_score, dps_likelihood_score, dps_sampler,
                                likelihood_score, noisy_classifier_loss, replacement_sampler, tweedie_denoiser)
from scorebook.samplers import euler_maruyama
from scorebook.sde import VESDE, VPSDE
from scorebook.train import TrainConfig, train

F64 = torch.float64
MIX = GaussianMixture([[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5], [0.5, -2.0]], weights=[0.2, 0.3, 0.35, 0.15],
                      stds=[[0.6, 0.4], [0.5, 0.5], [0.7, 0.5], [0.4, 0.6]])
CLASSES = [0, 1, 1, 2]          # class 1 has two components
TIMES = (0.01, 0.1, 0.4, 0.8, 1.0)


def points(n=64, seed=0):
    return 3.0 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ----- Bayes' rule for scores with exact pieces ---------------------------------------------------
@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=repr)
@pytest.mark.parametrize("label", [0, 1, 2])
def test_classifier_guidance_with_the_exact_classifier_is_the_exact_conditional_score(sde, label):
    guided = classifier_guidance(oracle_score(MIX, sde), oracle_classifier(MIX, sde, CLASSES), label, scale=1.0)
    exact = oracle_score(conditional_mixture(MIX, label, CLASSES), sde)
    x = points()
    for t in TIMES:
        torch.testing.assert_close(guided(x, t), exact(x, t), rtol=1e-8, atol=1e-8)


def test_classifier_guidance_in_the_sigma_world_and_per_sample_labels_and_times():
    """Without an SDE t is sigma; labels and times may differ per sample."""
    x = points(30, 1)
    labels = torch.arange(30) % 3
    t = torch.linspace(0.05, 2.0, 30, dtype=F64)
    guided = classifier_guidance(oracle_score(MIX), oracle_classifier(MIX, None, CLASSES), labels)(x, t)
    for c in range(3):
        ref = oracle_score(conditional_mixture(MIX, c, CLASSES))(x, t)
        torch.testing.assert_close(guided[labels == c], ref[labels == c], rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=repr)
def test_guidance_with_the_exact_measurement_likelihood_is_the_exact_posterior_score(sde):
    A = torch.tensor([[1.0, 0.0]], dtype=F64)
    for y, s in ((0.3, 0.2), (-1.5, 0.5), (2.0, 1.0)):
        lik = likelihood_score(oracle_measurement_log_likelihood(MIX, A, [y], s, sde))
        guided = conditional_score(oracle_score(MIX, sde), lik)
        exact = oracle_score(posterior_mixture(MIX, A, [y], s), sde)
        x = points(40, 2)
        for t in TIMES:
            torch.testing.assert_close(guided(x, t), exact(x, t), rtol=1e-8, atol=1e-8)


def test_guidance_scale_interpolates_and_zero_ignores_the_label():
    sde = VPSDE()
    clf = oracle_classifier(MIX, sde, CLASSES)
    uncond, x, t = oracle_score(MIX, sde), points(20, 3), 0.3
    torch.testing.assert_close(classifier_guidance(uncond, clf, 0, 0.0)(x, t), uncond(x, t))
    lik = classifier_guidance(uncond, clf, 0, 1.0)(x, t) - uncond(x, t)
    torch.testing.assert_close(classifier_guidance(uncond, clf, 0, 3.0)(x, t), uncond(x, t) + 3.0 * lik)
    # one batch can sweep w: a (B,) scale acts per sample
    w = torch.linspace(0.0, 4.0, 20, dtype=F64)
    torch.testing.assert_close(classifier_guidance(uncond, clf, 0, w)(x, t), uncond(x, t) + w[:, None] * lik)
    with pytest.raises(ValueError, match="scale"):
        classifier_guidance(uncond, clf, 0, -1.0)
    with pytest.raises(ValueError, match="per-sample scale must have shape"):
        classifier_guidance(uncond, clf, 0, w[:5])(x, t)


def test_classifier_free_guidance_with_exact_scores_is_classifier_guidance():
    """s_u + w (s_c - s_u) with exact conditional scores equals s_u + w grad log p_t(y | x) for every w."""
    sde = VPSDE()
    cond = [oracle_score(conditional_mixture(MIX, c, CLASSES), sde) for c in range(3)]
    uncond = oracle_score(MIX, sde)

    def exact_model(x, t, y=None):
        if y is None:
            return uncond(x, t)
        return torch.stack([cond[int(c)](x[i:i + 1], t) for i, c in enumerate(y)]).reshape(x.shape)

    x = points(12, 4)
    for w in (0.0, 1.0, 2.5):
        for label in range(3):
            cfg = classifier_free_guidance(exact_model, label, w)(x, 0.2)
            cg = classifier_guidance(uncond, oracle_classifier(MIX, sde, CLASSES), label, w)(x, 0.2)
            torch.testing.assert_close(cfg, cg, rtol=1e-8, atol=1e-8)


# ----- Tweedie and DPS -------------------------------------------------------------------------
def gaussian_posterior_mean_gain(gauss, a, std):
    """E[x_0 | x_t] = mu + K (x_t - a mu), K = a Sigma (a^2 Sigma + std^2 I)^-1, for x_0 ~ N(mu, Sigma)."""
    cov = gauss.cov
    K = a * cov @ torch.linalg.inv(a * a * cov + std ** 2 * torch.eye(cov.shape[0], dtype=F64))
    return K


def test_tweedie_denoiser_is_the_gaussian_posterior_mean():
    gauss = Gaussian([1.0, -0.5], [[0.8, 0.3], [0.3, 0.5]])
    sde = VPSDE()
    den = tweedie_denoiser(sde, oracle_score(gauss, sde))
    x = points(20, 5)
    for t in TIMES:
        a, std = float(sde.mean_coef(t)), float(sde.marginal_std(t))
        K = gaussian_posterior_mean_gain(gauss, a, std)
        want = gauss.mean + (x - a * gauss.mean) @ K.T
        torch.testing.assert_close(den(x, t), want, rtol=1e-8, atol=1e-8)


def test_dps_likelihood_score_is_the_gradient_of_the_plug_in_gaussian():
    """For a Gaussian prior, x0_hat = mu + K (x - a mu) is affine, so DPS's score is K^T A^T (y - A x0_hat) / s^2;
    it tends to the exact likelihood score as t -> 0 and is larger (over-confident) at large t."""
    gauss = Gaussian([1.0, -0.5], [[0.8, 0.3], [0.3, 0.5]])
    sde = VPSDE()
    A = torch.tensor([[1.0, 1.0]], dtype=F64)
    y, s = torch.tensor([0.4], dtype=F64), 0.3
    dps = dps_likelihood_score(sde, oracle_score(gauss, sde), A, y, s)
    exact = likelihood_score(oracle_measurement_log_likelihood(gauss, A, y, s, sde))
    x = points(20, 6)
    for t in TIMES:
        a, std = float(sde.mean_coef(t)), float(sde.marginal_std(t))
        K = gaussian_posterior_mean_gain(gauss, a, std)
        x0_hat = gauss.mean + (x - a * gauss.mean) @ K.T
        want = ((y - x0_hat @ A.T) @ A @ K) / s ** 2
        torch.testing.assert_close(dps(x, t), want, rtol=1e-8, atol=1e-8)
    near0 = (dps(x, 1e-4) - exact(x, 1e-4)).norm() / exact(x, 1e-4).norm()
    assert near0 < 1e-2, near0
    late = dps(x, 0.5).norm() / exact(x, 0.5).norm()
    assert late > 1.5, late


# ----- the posterior samplers ---------------------------------------------------------------------
def test_replacement_is_exact_for_independent_coordinates_and_noise_free_measurements():
    """Prior N(mu, diag): x_2 is independent of x_1, so replacing x_1 leaves p(x_2) untouched, and the final
    x_1 is a(eps) y + std(eps) z. n = 4000: mean SE sqrt(0.5/4000) = 0.011, variance SE 0.5 sqrt(2/4000) = 0.011."""
    gauss = Gaussian([0.5, -1.0], std=[1.2, math.sqrt(0.5)])
    sde = VPSDE()
    g = torch.Generator().manual_seed(7)
    A = torch.tensor([[1.0, 0.0]], dtype=F64)
    x_T = sde.prior_sample((4000, 2), generator=g, dtype=F64)
    eps = 1e-3
    x = replacement_sampler(sde, oracle_score(gauss, sde), x_T, A, torch.tensor([0.8], dtype=F64), 300,
                            eps=eps, generator=g)
    a, std = float(sde.mean_coef(eps)), float(sde.marginal_std(eps))
    assert (x[:, 0] - a * 0.8).abs().max() < 5 * std, (x[:, 0] - a * 0.8).abs().max()
    m, v = float(x[:, 1].mean()), float(x[:, 1].var())
    assert abs(m + 1.0) < 0.05, m       # 4.5 SE, plus the O(dt) Euler bias (< 0.005 at 300 steps here)
    assert abs(v - 0.5) < 0.05, v


def test_replacement_projects_onto_the_measurement_for_a_general_operator():
    sde = VPSDE()
    g = torch.Generator().manual_seed(8)
    A = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]], dtype=F64)
    y = torch.tensor([0.3, -0.2], dtype=F64)
    gauss = Gaussian([0.0, 0.0, 0.0], std=1.0)
    x = replacement_sampler(sde, oracle_score(gauss, sde), sde.prior_sample((50, 3), generator=g, dtype=F64), A, y,
                            20, eps=1e-3, generator=g)
    a, std = float(sde.mean_coef(1e-3)), float(sde.marginal_std(1e-3))
    resid = x @ A.T - a * y                              # = std * A z exactly
    assert resid.abs().max() < 5 * std * float(A.norm(dim=1).max()), resid.abs().max()


def test_posterior_samplers_on_a_gaussian_noise_free_limit_and_dps_bias():
    """1-D prior N(0, 1), y = x + n with s = 0.5: the exact posterior is N(0.8 y, 0.2). Euler-Maruyama with the
    exact posterior score lands on it (4 SE); DPS, which drops Var(x_0 | x_t) from p_t(y | x_t), does not
    (its posterior variance is checked to be off by more than 10 SE), and the replacement method, which treats
    y as noise-free, returns x = y."""
    sde = VPSDE()
    prior = Gaussian([0.0], std=1.0)
    A, y, s = torch.tensor([[1.0]], dtype=F64), torch.tensor([1.0], dtype=F64), 0.5
    post = posterior_mixture(prior, A, y, s)
    assert torch.allclose(post.means[0], torch.tensor([0.8], dtype=F64)) and abs(float(post.covs[0]) - 0.2) < 1e-12
    n = 4000
    se_m, se_v = math.sqrt(0.2 / n), 0.2 * math.sqrt(2 / n)
    g = torch.Generator().manual_seed(9)
    x_T = sde.prior_sample((n, 1), generator=g, dtype=F64)
    exact = euler_maruyama(sde, oracle_score(post, sde), x_T, 200, generator=g)
    assert abs(float(exact.mean()) - 0.8) < 4 * se_m + 0.005 and abs(float(exact.var()) - 0.2) < 4 * se_v + 0.005
    dps = dps_sampler(sde, oracle_score(prior, sde), x_T, A, y, s, 200, generator=g)
    assert abs(float(dps.var()) - 0.2) > 10 * se_v, float(dps.var())
    rep = replacement_sampler(sde, oracle_score(prior, sde), x_T, A, y, 200, generator=g)
    a, std = float(sde.mean_coef(1e-3)), float(sde.marginal_std(1e-3))
    assert float((rep - a * 1.0).abs().max()) < 5 * std        # x = a(eps) y + std(eps) z: y as if noise-free


# ----- learned pieces --------------------------------------------------------------------------
def test_conditional_mlp_null_label_and_shapes():
    net = ConditionalScoreMLP(2, n_classes=3, hidden=16, n_layers=1, scale=VPSDE())
    x = points(5, 10).float()
    # the label embedding starts at zero: every label gives the unconditional output at initialisation
    torch.testing.assert_close(net(x, 0.5, 1), net(x, 0.5))
    with torch.no_grad():
        net.label_embed.weight.normal_()
    out = net(x, 0.5, torch.tensor([0, 1, 2, 0, 1]))
    assert out.shape == x.shape and not torch.allclose(out, net(x, 0.5))
    torch.testing.assert_close(out[0], net(x[:1], 0.5, 0)[0])    # per-sample labels
    with pytest.raises(ValueError, match="labels must lie"):
        net(x, 0.5, 4)
    with pytest.raises(ValueError, match="n_classes"):
        ConditionalScoreMLP(2, n_classes=0)
    with pytest.raises(ValueError, match="data_var needs scale"):
        ConditionalScoreMLP(2, n_classes=2, data_var=1.0)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=repr)
def test_conditional_mlp_gaussian_term_is_the_exact_score_of_a_gaussian(sde):
    """With the last layer zeroed the network adds nothing, and data_var=v leaves the exact score of N(0, v I)."""
    net = ConditionalScoreMLP(3, n_classes=2, hidden=16, n_layers=1, scale=sde, data_var=0.7).double()
    with torch.no_grad():
        net.out[-1].weight.zero_()
        net.out[-1].bias.zero_()
    x = torch.randn(10, 3, generator=torch.Generator().manual_seed(15), dtype=F64)
    exact = oracle_score(Gaussian([0.0, 0.0, 0.0], std=math.sqrt(0.7)), sde)
    for t in TIMES:
        torch.testing.assert_close(net(x, t, 1), exact(x, t), rtol=1e-10, atol=1e-10)


def test_cfg_training_learns_the_conditional_and_unconditional_scores():
    """A short run of cfg_loss on the labelled mixture: the learned conditional scores are far closer to the
    exact conditional scores than to the unconditional one, and the null label learns the unconditional score.
    Errors are relative mean squared errors over points from p_t(x | y) at t = 0.3 (a well-trained 2-D net
    reaches a few percent; 0.15 leaves room for an 800-step run)."""
    sde = VPSDE()
    x, y = sample_labelled(MIX, 6000, generator=torch.Generator().manual_seed(11), classes=CLASSES)
    data = torch.cat([x, y[:, None].to(F64)], 1).float()
    net = ConditionalScoreMLP(2, n_classes=3, hidden=64, n_layers=2, scale=sde)
    res = train(net, lambda m, b: cfg_loss(m, b, sde, p_uncond=0.2), data,
                TrainConfig(steps=800, batch_size=256, lr=3e-3, warmup_steps=50, progress=False, device="cpu"))
    model = res.ema_model
    t, g = 0.3, torch.Generator().manual_seed(12)
    with torch.no_grad():
        for c in range(3):
            cond = conditional_mixture(MIX, c, CLASSES)
            pts = cond.marginal(sde, t).sample(2000, generator=g)
            truth = oracle_score(cond, sde)(pts, t)
            learned = model(pts.float(), t, c).double()
            rel = float(((learned - truth) ** 2).sum(1).mean() / (truth ** 2).sum(1).mean())
            rel_uncond = float(((oracle_score(MIX, sde)(pts, t) - truth) ** 2).sum(1).mean()
                               / (truth ** 2).sum(1).mean())
            assert rel < 0.15 and rel < 0.5 * rel_uncond, (c, rel, rel_uncond)
        pts = MIX.marginal(sde, t).sample(2000, generator=g)
        truth = oracle_score(MIX, sde)(pts, t)
        rel = float(((model(pts.float(), t).double() - truth) ** 2).sum(1).mean() / (truth ** 2).sum(1).mean())
        assert rel < 0.15, rel


def test_noisy_classifier_learns_the_exact_classifier():
    """Cross-entropy on noisy points converges to the exact p_t(y | x_t): after a short run the mean KL from the
    exact class posterior, over points of p_t, is small (0.05 nats; a constant classifier scores ~0.5)."""
    sde = VPSDE()
    x, y = sample_labelled(MIX, 6000, generator=torch.Generator().manual_seed(13), classes=CLASSES)
    data = torch.cat([x, y[:, None].to(F64)], 1).float()
    clf = NoisyClassifier(2, 3, hidden=64)
    res = train(clf, lambda m, b: noisy_classifier_loss(m, b, sde), data,
                TrainConfig(steps=800, batch_size=256, lr=3e-3, warmup_steps=50, progress=False, device="cpu"))
    exact = oracle_classifier(MIX, sde, CLASSES)
    g = torch.Generator().manual_seed(14)
    with torch.no_grad():
        for t in (0.05, 0.4):
            pts = MIX.marginal(sde, t).sample(3000, generator=g)
            lp = exact(pts, t)
            lq = torch.log_softmax(res.ema_model(pts.float(), t), 1).double()
            kl = float((lp.exp() * (lp - lq)).sum(1).mean())
            assert kl < 0.05, (t, kl)


def test_guidance_rejects_bad_inputs():
    sde = VPSDE()
    with pytest.raises(ValueError, match="labelled batch"):
        cfg_loss(ConditionalScoreMLP(2, 3), torch.zeros(4, 1), sde)
    with pytest.raises(ValueError, match="integer labels"):
        cfg_loss(ConditionalScoreMLP(2, 3), torch.tensor([[0.0, 0.0, 0.5]]), sde)
    x = torch.zeros(3, 2, dtype=F64)
    with pytest.raises(ValueError, match="A must have D = 2"):
        replacement_sampler(sde, oracle_score(MIX, sde), x, torch.ones(1, 3, dtype=F64), torch.zeros(1), 5)
    with pytest.raises(ValueError, match="y must be"):
        replacement_sampler(sde, oracle_score(MIX, sde), x, torch.ones(1, 2, dtype=F64), torch.zeros(2), 5)
    with pytest.raises(ValueError, match="noise_std"):
        dps_likelihood_score(sde, oracle_score(MIX, sde), torch.ones(1, 2, dtype=F64), torch.zeros(1), 0.0)
    with pytest.raises(ValueError, match="label must be"):
        classifier_guidance(oracle_score(MIX, sde), oracle_classifier(MIX, sde), -1)(x, 0.5)
