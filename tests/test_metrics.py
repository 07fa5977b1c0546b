"""Sample-quality and score-error metrics against closed forms."""
import math

import pytest
import torch

from scorebook.densities import Gaussian, oracle_score, song_ermon_mixture
from scorebook.metrics import fisher_divergence, mmd, mode_fractions, sliced_wasserstein

F64 = torch.float64
MIX = song_ermon_mixture()



def test_mmd_is_zero_for_the_same_distribution_and_positive_for_a_shift():
    g = torch.Generator().manual_seed(0)
    n = 400
    draw = lambda shift=0.0: torch.randn(n, 2, generator=g, dtype=F64) + torch.tensor([shift, 0.0], dtype=F64)
    # the spread of the unbiased MMD^2 under the null, from 20 independent pairs of samples
    null = torch.stack([mmd(draw(), draw()) for _ in range(20)])
    null_sd = float(null.std())
    assert abs(float(null.mean())) < 4 * null_sd / math.sqrt(20)   # unbiased: zero mean under the null
    same = float(mmd(draw(), draw()))
    shifted = float(mmd(draw(), draw(1.0)))
    assert abs(same) < 4 * null_sd
    assert shifted > 10 * null_sd and shifted > 0
    # a larger shift gives a larger discrepancy
    assert float(mmd(draw(), draw(2.0))) > shifted


def test_sliced_wasserstein_of_shifted_samples_is_the_1d_shift():
    """In 1-D every unit direction is +-1, so SW1 between x and x + delta is exactly |delta|."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 1, generator=g, dtype=F64)
    for delta in (0.5, -2.0):
        torch.testing.assert_close(sliced_wasserstein(x, x + delta, generator=g), torch.tensor(abs(delta), dtype=F64))
    # independent samples of N(0,1) and N(mu, 1): W1 = |mu|, up to the O(1/sqrt(n)) empirical error (~0.02)
    y = torch.randn(4000, 1, generator=g, dtype=F64) + 1.5
    assert abs(float(sliced_wasserstein(x, y, generator=g)) - 1.5) < 0.08   # unequal sizes: quantile path
    assert float(sliced_wasserstein(x, torch.randn(3000, 1, generator=g, dtype=F64), generator=g)) < 0.08


@pytest.mark.parametrize("d,mean_abs_cos", [(2, 2 / math.pi), (3, 0.5)])
def test_sliced_wasserstein_averages_the_projected_shift_over_directions(d, mean_abs_cos):
    """For y = x + delta, SW1 = E_theta |theta . delta| = |delta| E|theta_1|, with E|theta_1| = 2/pi in 2-D, 1/2 in 3-D."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(500, d, generator=g, dtype=F64)
    delta = torch.zeros(d, dtype=F64)
    delta[0] = 3.0
    p = 4000
    sw = float(sliced_wasserstein(x, x + delta, n_projections=p, generator=g))
    # Monte Carlo over directions: SE = |delta| sd(|theta_1|) / sqrt(P), sd(|theta_1|) = sqrt(1/d - E|theta_1|^2)
    se = 3.0 * math.sqrt(1 / d - mean_abs_cos ** 2) / math.sqrt(p)
    assert abs(sw - 3.0 * mean_abs_cos) < 4 * se


def test_mode_fractions_recover_the_mixture_weights():
    n = 10_000
    x = MIX.sample(n, generator=torch.Generator().manual_seed(3))
    frac = mode_fractions(x, MIX)
    assert frac.shape == (2,) and float(frac.sum()) == pytest.approx(1.0)
    se = math.sqrt(0.2 * 0.8 / n)
    assert abs(float(frac[1]) - 0.8) < 4 * se
    pts = torch.tensor([[5.0, 5.0], [-5.0, -5.0], [4.0, 6.0]], dtype=F64)
    torch.testing.assert_close(mode_fractions(pts, MIX), torch.tensor([1 / 3, 2 / 3], dtype=F64))


def test_fisher_divergence_is_zero_for_the_exact_score_and_the_squared_offset_otherwise():
    x = MIX.sample(500, generator=torch.Generator().manual_seed(4))
    assert float(fisher_divergence(oracle_score(MIX), MIX, x)) == 0.0
    c = torch.tensor([0.3, -0.4], dtype=F64)
    offset = lambda y, t: MIX.score(y) + c
    assert float(fisher_divergence(offset, MIX, x)) == pytest.approx(0.25, rel=1e-12)
    # at noise level sigma the oracle is exact for the perturbed density, not for the clean one
    assert float(fisher_divergence(oracle_score(MIX), MIX.perturb(2.0), x, t=2.0)) == pytest.approx(0.0, abs=1e-20)
    assert float(fisher_divergence(oracle_score(MIX), MIX, x, t=2.0)) > 0.1


def test_metrics_reject_bad_inputs():
    x = torch.randn(10, 2)
    with pytest.raises(ValueError, match="same D"):
        mmd(x, torch.randn(10, 3))
    with pytest.raises(ValueError, match="bandwidths must be positive"):
        mmd(x, x, bandwidths=(1.0, 0.0))
    with pytest.raises(ValueError, match="n_projections must be a positive integer"):
        sliced_wasserstein(x, x, n_projections=0)
    with pytest.raises(ValueError, match="shaped like x"):
        fisher_divergence(lambda y, t: y[:, :1], Gaussian([0.0, 0.0], std=1.0), x)


# ----- crossings between two cores ------------------------------------------------------------
from scorebook.metrics import count_crossings, mean_crossing_time  # noqa: E402


def test_count_crossings_on_a_path_with_known_crossings():
    # cores A = {x <= -1}, B = {x >= 1}; the excursion to 0.5 and back to B is not a crossing
    path = torch.tensor([-2.0, 0.0, 2.0, 0.5, 2.0, -2.0, -1.0, 0.0, 0.3, 1.0], dtype=F64)
    #                      A    gap   B    gap   B     A     A    gap  gap   B   -> A>B, B>A, A>B
    assert count_crossings(path, -1.0, 1.0).tolist() == [3]
    # several chains at once, (T, N); a chain starting in the gap takes the core on its side of the midpoint
    chains = torch.stack([path, torch.tensor([0.5, 0.0, -2.0] + [-2.0] * 7, dtype=F64),
                          torch.tensor([-0.5, 0.0, -2.0] + [-2.0] * 7, dtype=F64),
                          torch.zeros(10, dtype=F64)], dim=1)
    assert count_crossings(chains, -1.0, 1.0).tolist() == [3, 1, 0, 0]
    tau, n = mean_crossing_time(chains, -1.0, 1.0, dt=0.5)
    assert n == 4 and tau == 4 * 9 * 0.5 / 4
    assert mean_crossing_time(torch.zeros(5, 3), -1.0, 1.0) == (math.inf, 0)


def test_mean_crossing_time_of_a_two_state_chain_is_one_over_the_flip_rate():
    """A chain that jumps between -1 and +1 with probability q per step crosses Binomial(N (T-1), q) times,
    so the mean time between crossings is 1/q."""
    g = torch.Generator().manual_seed(4)
    t_len, n, q = 2001, 50, 0.02
    flips = (torch.rand(t_len - 1, n, generator=g) < q).long()
    start = torch.where(torch.rand(n, generator=g) < 0.5, 1, -1)
    sign = start * (-1) ** torch.cat([torch.zeros(1, n, dtype=torch.long), flips.cumsum(0)])   # (T, N)
    tau, count = mean_crossing_time(sign.double(), -0.5, 0.5, dt=1.0)
    trials = n * (t_len - 1)
    assert count == int(flips.sum())                                 # every flip is a crossing, nothing else
    assert abs(count - q * trials) < 4 * math.sqrt(trials * q * (1 - q))
    assert abs(tau - 1 / q) < 4 * (1 / q) * math.sqrt((1 - q) / (trials * q))   # delta method on trials / count


def test_crossing_helpers_reject_bad_inputs():
    with pytest.raises(ValueError, match="low < high"):
        count_crossings(torch.zeros(5), 1.0, -1.0)
    with pytest.raises(ValueError, match="shaped \\(T,\\) or \\(T, N\\)"):
        count_crossings(torch.zeros(2, 3, 4), -1.0, 1.0)
    with pytest.raises(ValueError, match="NaN"):
        count_crossings(torch.tensor([0.0, float("nan")]), -1.0, 1.0)
    with pytest.raises(ValueError, match="dt must be"):
        mean_crossing_time(torch.zeros(5), -1.0, 1.0, dt=0.0)
