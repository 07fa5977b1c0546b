"""The benchmark suite: the quick mode runs whole and its numbers are sane (never absolute times)."""
import json
import math
import os

import pytest
import torch

from scorebook import bench
from scorebook.densities import eight_gaussians_mixture, song_ermon_mixture
from scorebook.solvers import SAMPLERS


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run through the command line (without the peer), shared by the tests below."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("bench") / "results.json"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _numbers(x, path=""):
    """Every number in a JSON document, with its path (booleans are not numbers here)."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _numbers(v, f"{path}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, x


def test_results_file_records_date_machine_versions_and_command(quick):
    for key in ("date", "machine", "command", "versions", "settings", "timings", "results", "summary"):
        assert key in quick
    for key in ("platform", "cpu_count", "torch", "device"):
        assert key in quick["machine"]
    assert quick["mode"] == "quick" and quick["command"].startswith("python -m scorebook.bench --quick")
    assert set(quick["results"]) == {"samplers", "likelihood", "noise_allocation", "digits", "cost", "peer"}
    assert quick["results"]["peer"]["measured"] is False


def test_every_number_is_finite(quick):
    bad = [(p, v) for p, v in _numbers(quick["results"]) if not math.isfinite(v)]
    assert not bad, bad[:5]


def test_every_sampler_and_nfe_is_measured_with_its_spread(quick):
    s = quick["settings"]
    for toy, res in quick["results"]["samplers"].items():
        assert set(res["oracle"]) == set(SAMPLERS)
        for name, row in res["oracle"].items():
            for nfe in s["nfes"]:
                cell = row[str(nfe)]
                if "skipped" in cell:  # only a budget below the sampler's two-evaluation step
                    assert nfe < 2
                    continue
                for m in ("sw", "mmd", "mode_err"):
                    st = cell[m]
                    assert st["n"] == s["repeats"] and st["min"] <= st["median"] <= st["max"]


def test_oracle_samplers_reach_near_the_noise_floor_at_200_nfe(quick):
    """With the exact score, every sampler at 200 NFE is within 3x the true-vs-true sliced Wasserstein at the same
    sample size, and the best one within 2x. (The deterministic samplers keep the VP prior's small mode-weight
    bias, about 1.2x the floor on the Song-Ermon mixture at 300 samples; a broken sampler is many times off.)"""
    for toy, res in quick["results"]["samplers"].items():
        floor = res["floor"]["sw"]["median"]
        sws = {name: row["200"]["sw"]["median"] for name, row in res["oracle"].items()}
        assert min(sws.values()) <= 2 * floor, (toy, sws, floor)
        assert max(sws.values()) <= 3 * floor, (toy, sws, floor)
        # 5 NFE are far from it for some sampler: the check can fail
        assert max(row["5"]["sw"]["median"] for row in res["oracle"].values() if "sw" in row["5"]) > 3 * floor


def test_oracle_nll_error_is_small(quick):
    rows = quick["results"]["likelihood"]["oracle"]
    tight = min((r for r in rows if r["method"] == "dopri5"), key=lambda r: r["rtol"])
    assert tight["mean_abs_err"] < 1e-3, tight
    assert min(r["mean_abs_err"] for r in rows if r["method"] == "rk4") < 1e-3
    for r in rows:
        assert r["nfe"] > 0 and r["mean_abs_err"] <= r["max_abs_err"]


def test_learned_gaps_and_baselines_are_sane(quick):
    lk = quick["results"]["likelihood"]["learned"]
    assert set(lk) == {"uniform", "log_snr"}
    for v in lk.values():
        for mark in v["by_cpu_s"].values():
            assert abs(mark["signed_gap"]["median"]) <= mark["mean_abs_gap"]["median"] + 1e-12
    d = quick["results"]["digits"]
    assert 1.0 < d["gaussian_bpd"] < 6.0 and 1.0 < d["kde_bpd"] < 8.0
    m = d["model"]                              # the shipped digits model, on a few test images
    assert m["measured"] and m["n_test"] == 4 and m["nfe"] > 0
    assert 0.5 < m["bpd"] < d["gaussian_bpd"] + 0.5 and math.isfinite(m["minus_gaussian"])
    c = quick["results"]["cost"]
    assert c["scorebook_train_mlp_2d_preset"]["steps_per_cpu_s"]["median"] > 0
    if not torch.cuda.is_available():
        assert c["gpu"]["measured"] is False and "not measured" in c["gpu"]["why"]


def test_stats_and_quality_against_closed_forms():
    st = bench.stats([3.0, 1.0, 2.0, 4.0])
    assert st["median"] == 2.5 and st["min"] == 1.0 and st["max"] == 4.0 and st["iqr"] == 1.5 and st["n"] == 4
    mix = song_ermon_mixture()
    x = mix.sample(2000, generator=torch.Generator().manual_seed(0))
    q = bench.quality(x, x, mix, 0)
    # identical sets: SW is 0; the unbiased MMD^2 is 2 (S - D) / (n (n - 1)) - 2 S / n^2, with S the kernel sum
    # over all pairs and D = 5 n its diagonal (five bandwidths, k(x, x) = 1 each)
    xd = x.to(torch.float64)
    d2 = torch.cdist(xd, xd).pow(2)
    big_s = float(sum(torch.exp(-d2 / (2 * h * h)).sum() for h in (0.1, 0.3, 1.0, 3.0, 10.0)))
    n = x.shape[0]
    assert q["sw"] == 0.0 and q["mmd"] == pytest.approx(2 * (big_s - 5 * n) / (n * (n - 1)) - 2 * big_s / n ** 2)
    # all samples in the big mode: mode-fraction error = the small mode's weight, 0.2, and its bias -0.2
    far = torch.full((100, 2), 5.0, dtype=torch.float64)
    q = bench.quality(far, x, mix, 0)
    assert q["mode_err"] == pytest.approx(0.2) and q["minor_mode_bias"] == pytest.approx(-0.2)
    assert bench.quality(torch.full((4, 2), float("nan")), x, mix, 0)["finite"] is False
    # the fitted peer sigma_max is the data's diameter: about 2 x 5 sqrt(2) + spread for the Song-Ermon mixture
    fitted = bench._peer_fitted(x)
    assert 14.0 < fitted["sigma_max"] < 25.0 and fitted["sigma_min"] > 0
    assert eight_gaussians_mixture().n_components == 8


def test_settings_and_command_line_refuse_bad_input(tmp_path, capsys):
    with pytest.raises(ValueError, match="train_cpu_s must be the last NLL mark"):
        bench.Settings(**{**bench.asdict(bench.QUICK), "train_cpu_s": 99.0})
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--full"])
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--peer", str(tmp_path / "no_python")])
    assert "not an executable file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--out", str(tmp_path / "missing" / "r.json")])
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--threads", "0"])


PEER = os.environ.get("SCOREBOOK_PEER_PYTHON", "/work/benchenv/bin/python")


@pytest.mark.skipif(not os.path.exists(PEER), reason="no peer environment (set SCOREBOOK_PEER_PYTHON)")
def test_peer_subprocess_trains_on_a_cpu_budget_and_returns_samples(tmp_path):
    v = bench.peer_version(PEER)
    assert "smalldiffusion" in v and "torch" in v
    res = bench.run_peer(PEER, "song_ermon", bench.PEER_README, 0, 0.5, [2, 5], 64, tmp_path, max_steps=3)
    assert res["steps"] == 3 and res["n_params"] > 0
    for nfe in ("2", "5"):
        x = res["samples"][nfe]
        assert x.shape == (64, 2) and torch.isfinite(x).all()
