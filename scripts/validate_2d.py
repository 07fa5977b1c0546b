"""Issue 3, "What must be shown", 2-D: a ScoreMLP trained on song_ermon_mixture() in <= 60 s of CPU time.

Prints: training CPU/wall time, the predictor-corrector heavy-mode fraction (target 0.80 +- 0.03),
and the probability-flow NLL of fresh mixture samples next to the mixture's entropy (Monte Carlo
of -log_prob; target: within 0.05 nats).

    /tmp/venv/bin/python scripts/validate_2d.py [--cpu-budget 55] [--threads 1]
"""
from __future__ import annotations

import argparse
import functools
import math
import time

import torch

from scorebook.data import TensorData
from scorebook.densities import song_ermon_mixture
from scorebook.losses import sde_loss
from scorebook.nets import ScoreMLP
from scorebook.samplers import predictor_corrector
from scorebook.sde import VPSDE
from scorebook.train import TrainConfig, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-budget", type=float, default=55.0, help="seconds of process CPU time for training")
    ap.add_argument("--steps", type=int, default=6000, help="upper bound on steps (the CPU budget usually stops first)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-nll", type=int, default=2000, help="fresh mixture samples for the NLL")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    mix = song_ermon_mixture()
    sde = VPSDE()
    g = torch.Generator().manual_seed(args.seed)
    x_train = mix.sample(50_000, generator=g).float()  # (N, 2)
    torch.manual_seed(args.seed)
    model = ScoreMLP(2, hidden=128, n_layers=3, scale=sde)
    loss = functools.partial(sde_loss, sde=sde)
    cfg = TrainConfig(steps=args.steps, batch_size=512, lr=2e-3, warmup_steps=100, ema_decay=0.999,
                      seed=args.seed, device="cpu", progress=False)

    c0, w0 = time.process_time(), time.perf_counter()
    res = train(model, loss, TensorData(x_train), cfg,
                callback=lambda step, value: time.process_time() - c0 > args.cpu_budget)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    print(f"training: {res.step} steps, CPU {cpu:.1f} s, wall {wall:.1f} s, {args.threads} thread(s); "
          f"final loss (mean of last 200) {sum(res.losses[-200:]) / len(res.losses[-200:]):.4f}")
    score = res.ema_model

    # predictor-corrector sampling: heavy-mode fraction
    gs = torch.Generator().manual_seed(args.seed + 1)
    t0 = time.perf_counter()
    with torch.no_grad():
        x_T = sde.prior_sample((5000, 2), generator=gs)
        xs = predictor_corrector(sde, score, x_T, n_steps=500, snr=0.16, generator=gs, progress=False)
    heavy = (mix.responsibilities(xs.double()).argmax(1) == 1).double().mean().item()
    se = math.sqrt(0.8 * 0.2 / xs.shape[0])
    print(f"PC sampler (500 steps, snr 0.16, 5000 samples, {time.perf_counter() - t0:.1f} s): heavy-mode fraction "
          f"{heavy:.4f} (target 0.80 +- 0.03; binomial s.e. {se:.4f})")

    # probability-flow NLL of fresh samples vs the entropy by Monte Carlo
    from scorebook.likelihood import log_likelihood

    ge = torch.Generator().manual_seed(args.seed + 2)
    big = mix.sample(400_000, generator=ge)
    nlp = -mix.log_prob(big)
    H, H_se = nlp.mean().item(), (nlp.std() / math.sqrt(big.shape[0])).item()
    x_test = mix.sample(args.n_nll, generator=ge).float()
    t0 = time.perf_counter()
    ll = log_likelihood(sde, score, x_test, trace="exact", rtol=1e-5, atol=1e-5)
    nll = -ll.nats.double()
    nll_mean, nll_se = nll.mean().item(), (nll.std() / math.sqrt(nll.numel())).item()
    true_mean = -mix.log_prob(x_test.double()).mean().item()
    print(f"entropy (MC, 400k samples): {H:.4f} +- {H_se:.4f} nats")
    print(f"PF-ODE NLL on {args.n_nll} fresh samples: {nll_mean:.4f} +- {nll_se:.4f} nats "
          f"(exact -log p on the same samples {true_mean:.4f}; model - exact = {nll_mean - true_mean:+.4f}); "
          f"NFE {ll.nfe}, {time.perf_counter() - t0:.1f} s")
    print(f"|NLL - entropy| = {abs(nll_mean - H):.4f} nats (target < 0.05)")


if __name__ == "__main__":
    main()
