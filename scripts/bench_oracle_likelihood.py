"""Time the oracle likelihood check of issue 2: probability-flow log-likelihood of the
Song--Ermon mixture with its exact score and exact trace (rtol = atol = 1e-5), against the
analytic log-density. Prints the median wall time and NFE over a few runs.

    python scripts/bench_oracle_likelihood.py [--runs 5] [--n 100] [--sde vp|ve|subvp]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from scorebook.densities import oracle_score, song_ermon_mixture
from scorebook.likelihood import log_likelihood
from scorebook.sde import SubVPSDE, VESDE, VPSDE

SDES = {"vp": VPSDE, "ve": lambda: VESDE(0.01, 50.0), "subvp": SubVPSDE}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--n", type=int, default=100, help="number of points")
    ap.add_argument("--sde", choices=sorted(SDES), default="vp")
    args = ap.parse_args()
    mix, sde = song_ermon_mixture(), SDES[args.sde]()
    x = mix.sample(args.n, generator=torch.Generator().manual_seed(0))
    exact = mix.log_prob(x)
    walls, nfes, errs = [], [], []
    for exact_prior in (False, True):
        walls, nfes, errs = [], [], []
        prior = mix.marginal(sde, sde.T).log_prob if exact_prior else None
        for _ in range(args.runs):
            t0 = time.perf_counter()
            res = log_likelihood(sde, oracle_score(mix, sde), x, trace="exact", rtol=1e-5, atol=1e-5,
                                 prior_log_prob=prior)
            walls.append(time.perf_counter() - t0)
            nfes.append(res.nfe)
            errs.append(float((res.nats - exact).abs().mean()))
        label = "exact p_T" if exact_prior else "default prior p_T = N(0, prior_std^2 I)"
        print(f"{args.sde} ({label}), n={args.n}: median wall {statistics.median(walls):.2f} s "
              f"(runs: {', '.join(f'{w:.2f}' for w in walls)}), NFE {statistics.median(nfes)}, "
              f"mean |log p_ode - log p| = {statistics.median(errs):.2e} nats, "
              f"mean signed error = {float((res.nats - exact).mean()):+.2e} nats")


if __name__ == "__main__":
    main()
