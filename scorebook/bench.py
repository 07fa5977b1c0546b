"""The benchmark suite: sample quality, likelihood and cost, against exact oracles, baselines and a peer.

    python -m scorebook.bench --quick                       # CI: about a minute, sanity of every number
    python -m scorebook.bench --full --out book/data/bench_results.json
    python -m scorebook.bench --full --peer /work/benchenv/bin/python   # also smalldiffusion, side by side

Every figure is a median over repeats (different seeds) with its spread (min and max, and the
interquartile range); every comparison is a ratio of two numbers measured in the same run, interleaved.
Training budgets are *CPU seconds of this process* (``time.process_time``) on one thread, so a
run shares the machine without its budgets shrinking; throughput is reported per CPU second too.

Sections of the results file (``results``):

* ``samplers``: every sampler (:data:`scorebook.solvers.SAMPLERS`, which includes Euler--Maruyama,
  predictor--corrector and the fixed-step probability-flow ODE of :mod:`scorebook.samplers`) against
  NFE, with the oracle score and with small learned scores, on two mixtures with exact densities;
  sliced Wasserstein, MMD and mode-fraction error next to the true-versus-true noise floor.
* ``noise_allocation``: the ``2d`` preset trained with ``t_sampling="uniform"`` and ``"log_snr"``.
* ``likelihood``: the oracle probability-flow NLL error against solver tolerance and NFE; the
  learned NLL gap against training CPU seconds.
* ``digits``: test bits/dim of a full-covariance Gaussian and a KDE (and of the shipped model if present).
* ``peer``: smalldiffusion in a subprocess (``--peer PYTHON``), its README settings and a fitted sigma range.
* ``cost``: training steps per CPU second for ScoreMLP and ScoreUNet; GPU figures when CUDA is present.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .densities import GaussianMixture, eight_gaussians_mixture, make_toy, oracle_score, song_ermon_mixture
from .losses import sde_loss
from .metrics import mmd, mode_fractions, sliced_wasserstein
from .nets import ScoreMLP, ScoreUNet, count_parameters
from .sde import SDE, VPSDE
from .solvers import SAMPLERS
from .train import EMA

__all__ = ["Settings", "QUICK", "FULL", "run_suite", "summary", "main"]

F64 = torch.float64


# ----- settings ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Settings:
    """Sizes of one run of the suite (``QUICK`` or ``FULL``)."""

    mode: str
    n_samples: int                    # samples per sampler run, and per side of the noise floor
    nfes: tuple[int, ...]             # sampler budgets
    repeats: int                      # seeds per figure
    train_cpu_s: float                # CPU seconds per learned model (the 2d preset)
    nll_marks_s: tuple[float, ...]    # training CPU seconds at which the learned NLL gap is measured
    nll_points: int                   # points for the NLL figures
    rtols: tuple[float, ...]          # dopri5 tolerances for the oracle NLL
    rk4_steps: tuple[int, ...]        # fixed rk4 step counts for the oracle NLL (4 NFE per step)
    train_toys: tuple[str, ...]       # data sets a learned score is trained on (both time samplings)
    alloc_toys: tuple[str, ...]       # data sets of the noise-allocation study (a subset of train_toys)
    peer_toys: tuple[str, ...]        # data sets of the peer comparison (a subset of train_toys)
    peer_nfes: tuple[int, ...]        # sampling NFE of the peer comparison
    cost_steps: int                   # timed training steps per throughput figure
    train_seeds: int = 2              # training seeds per (data set, time sampling): the learned repeats
    kde_max_train: int = 1437         # training points of the digits KDE
    digits_model_test: int = 359      # test images the shipped digits model is scored on (all 359 in full mode)

    def __post_init__(self) -> None:
        if self.train_cpu_s != max(self.nll_marks_s):
            raise ValueError("train_cpu_s must be the last NLL mark: the models train to it")
        if not set(self.alloc_toys) <= set(self.train_toys) or not set(self.peer_toys) <= set(self.train_toys):
            raise ValueError("alloc_toys and peer_toys must be among train_toys")


QUICK = Settings("quick", n_samples=300, nfes=(5, 20, 200), repeats=2, train_cpu_s=2.0, nll_marks_s=(2.0,),
                 nll_points=30, rtols=(1e-3, 1e-5), rk4_steps=(10, 35), train_toys=("song_ermon",),
                 alloc_toys=("song_ermon",), peer_toys=("song_ermon",), peer_nfes=(20,), cost_steps=20,
                 digits_model_test=4)
FULL = Settings("full", n_samples=600, nfes=(5, 10, 20, 50, 100, 200), repeats=3, train_cpu_s=20.0,
                nll_marks_s=(5.0, 10.0, 20.0), nll_points=200, rtols=(1e-2, 1e-3, 1e-4, 1e-5, 1e-6),
                rk4_steps=(5, 10, 20, 37, 75), train_toys=("song_ermon", "8gaussians", "swiss_roll"),
                alloc_toys=("song_ermon", "8gaussians", "swiss_roll"), peer_toys=("song_ermon", "swiss_roll"),
                peer_nfes=(20, 50), cost_steps=200, train_seeds=2)

#: the ``2d`` preset's network and optimiser (scorebook.cli.PRESETS["2d"]), trained here by a plain loop
PRESET_2D = {"hidden": 128, "n_layers": 3, "batch_size": 512, "lr": 2e-3, "warmup_steps": 100, "ema_decay": 0.999,
             "grad_clip": 1.0, "n_train": 50_000}
AT_FLOOR = 1.25        #: "at the noise floor": median sliced Wasserstein <= this x the floor's median
LEARNED_TARGET = 1.25  #: issue 13: learned distance within this x the oracle's at equal NFE
EXACT = {"song_ermon": song_ermon_mixture, "8gaussians": eight_gaussians_mixture}


# ----- statistics -------------------------------------------------------------------------------
def stats(values: Sequence[float]) -> dict:
    """Median, min, max, interquartile range and the values themselves."""
    v = np.asarray([float(x) for x in values], dtype=float)
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"median": float(med), "min": float(v.min()), "max": float(v.max()), "iqr": float(q3 - q1),
            "n": int(v.size), "values": [float(x) for x in v]}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def quality(x: Tensor, ref: Tensor, mixture: GaussianMixture | None, seed: int) -> dict:
    """Sliced Wasserstein, MMD^2 and (for a mixture) the total-variation mode-fraction error of ``x`` against ``ref``."""
    x, ref = x.to(F64), ref.to(F64)
    if not torch.isfinite(x).all():
        return {"sw": float("inf"), "mmd": float("inf"), "mode_err": float("inf"), "finite": False}
    out = {"sw": float(sliced_wasserstein(x, ref, 256, generator=_gen(10_000 + seed))),
           "mmd": float(mmd(x, ref)), "finite": True}
    if mixture is not None:
        frac = mode_fractions(x, mixture)
        out["mode_err"] = float(0.5 * (frac - mixture.weights.to(F64)).abs().sum())
        out["minor_mode_bias"] = float(frac[int(mixture.weights.argmin())] - mixture.weights.min())
    return out


def _fresh(toy: str, n: int, seed: int) -> Tensor:
    return make_toy(toy, n, generator=_gen(seed))


# ----- training: the 2d preset, by CPU-second budget ---------------------------------------------
def train_2d(toy: str, t_sampling: str, seed: int, marks_s: Sequence[float]) -> dict:
    """Train the ``2d`` preset's ScoreMLP on ``toy`` for ``max(marks_s)`` CPU seconds; an EMA copy at each mark.

    The loop is the package's (:func:`scorebook.train.train`): Adam, linear warm-up, gradient clipping at 1 and
    EMA, without its checkpoint and finiteness bookkeeping, so that it can stop on a CPU-time budget.
    """
    p = PRESET_2D
    torch.manual_seed(seed)
    sde = VPSDE()
    data = make_toy(toy, p["n_train"], generator=_gen(seed)).float()
    model = ScoreMLP(2, p["hidden"], p["n_layers"], scale=sde)
    ema = EMA(model, p["ema_decay"])
    opt = torch.optim.Adam(model.parameters(), lr=p["lr"])
    g = _gen(seed + 1)
    snaps, marks = {}, sorted(marks_s)
    step, cpu0 = 0, time.process_time()
    while marks:
        lr = p["lr"] * min(1.0, (step + 1) / p["warmup_steps"])
        for grp in opt.param_groups:
            grp["lr"] = lr
        idx = torch.randint(0, data.shape[0], (p["batch_size"],), generator=g)
        loss = sde_loss(model, data[idx], sde, generator=g, t_sampling=t_sampling)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), p["grad_clip"])
        opt.step()
        ema.update(model)
        step += 1
        used = time.process_time() - cpu0
        while marks and used >= marks[0]:
            snaps[marks.pop(0)] = _copy_model(ema.module, sde)
    return {"snapshots": snaps, "steps": step, "cpu_s": time.process_time() - cpu0, "sde": sde,
            "n_params": count_parameters(model)}


def _copy_model(module: torch.nn.Module, sde: SDE) -> torch.nn.Module:
    m = ScoreMLP(2, PRESET_2D["hidden"], PRESET_2D["n_layers"], scale=sde)
    m.load_state_dict(module.state_dict())
    return m.eval()


def _learned_score(model: torch.nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    def score(x: Tensor, t) -> Tensor:
        return model(x.float(), t).to(x.dtype)
    return score


@torch.no_grad()
def _sample(name: str, sde: SDE, score, n: int, nfe: int, seed: int) -> Tensor:
    g = _gen(20_000 + seed)
    x_T = sde.prior_sample((n, 2), generator=g, dtype=torch.float32)
    return SAMPLERS[name](sde, score, x_T, nfe, generator=g)


# ----- 1. samplers -------------------------------------------------------------------------------
def bench_samplers(s: Settings, learned: dict, log: Callable[[str], None]) -> dict:
    """Every sampler x NFE on each exact mixture, oracle and learned scores, with the noise floor."""
    sde = VPSDE()
    out = {}
    for toy, make in EXACT.items():
        mix = make()
        floor = [quality(_fresh(toy, s.n_samples, 100 + r), _fresh(toy, s.n_samples, 200 + r), mix, r)
                 for r in range(s.repeats)]
        res = {"floor": {k: stats([f[k] for f in floor]) for k in ("sw", "mmd", "mode_err")}, "oracle": {},
               "learned": {}}
        scores = {"oracle": [oracle_score(mix, sde)] * s.repeats}
        for ts, models in learned.get(toy, {}).items():
            scores[f"learned_{ts}"] = [_learned_score(m) for m in models]
        for kind, fns in scores.items():
            table = {}
            for name in SAMPLERS:
                row = {}
                for nfe in s.nfes:
                    try:  # oracle: s.repeats sampling seeds; learned: one sampling seed per trained model
                        q = [quality(_sample(name, sde, fns[r], s.n_samples, nfe, r),
                                     _fresh(toy, s.n_samples, 300 + r), mix, r) for r in range(len(fns))]
                    except ValueError as e:  # a budget below the sampler's minimum (pc, ode_heun need 2)
                        row[str(nfe)] = {"skipped": str(e)}
                        continue
                    row[str(nfe)] = {k: stats([v[k] for v in q]) for k in ("sw", "mmd", "mode_err", "minor_mode_bias")}
                table[name] = row
            if kind == "oracle":
                res["oracle"] = table
            else:
                res["learned"][kind.removeprefix("learned_")] = table
            log(f"samplers: {toy} {kind} done")
        res["summary"] = _sampler_summary(res, s)
        out[toy] = res
    return out


def _sw(table: dict, name: str, nfe: int) -> float:
    cell = table[name].get(str(nfe), {})
    return cell["sw"]["median"] if "sw" in cell else float("inf")


def _sampler_summary(res: dict, s: Settings) -> dict:
    floor = res["floor"]["sw"]["median"]
    best = {}
    for nfe in s.nfes:
        name = min(res["oracle"], key=lambda k: _sw(res["oracle"], k, nfe))
        best[str(nfe)] = {"sampler": name, "sw": _sw(res["oracle"], name, nfe), "ratio_to_floor":
                          _sw(res["oracle"], name, nfe) / floor}
    reached = [n for n in s.nfes if best[str(n)]["ratio_to_floor"] <= AT_FLOOR]
    summ = {"floor_sw": floor, "best_oracle": best, "at_floor_criterion": f"median SW <= {AT_FLOOR} x floor median",
            "first_nfe_at_floor": reached[0] if reached else None,
            "target_floor_within_20_nfe": bool(reached and reached[0] <= 20), "learned_over_oracle": {}}
    for ts, table in res["learned"].items():
        ratios = {}
        for nfe in s.nfes:
            lname = min(table, key=lambda k: _sw(table, k, nfe))
            oname = best[str(nfe)]["sampler"]
            same = {k: _sw(table, k, nfe) / _sw(res["oracle"], k, nfe) for k in table
                    if math.isfinite(_sw(table, k, nfe)) and math.isfinite(_sw(res["oracle"], k, nfe))}
            ratios[str(nfe)] = {"best_learned_sampler": lname, "best_over_best": _sw(table, lname, nfe) /
                                _sw(res["oracle"], oname, nfe), "median_same_sampler": float(np.median(list(same.values())))}
        worst = max(r["best_over_best"] for r in ratios.values())
        summ["learned_over_oracle"][ts] = {"by_nfe": ratios, "worst_best_over_best": worst,
                                           "target_within_1_25": bool(worst <= LEARNED_TARGET)}
    return summ


# ----- 2. likelihood -----------------------------------------------------------------------------
def bench_likelihood(s: Settings, trained: dict, log: Callable[[str], None]) -> dict:
    """Oracle probability-flow NLL error against tolerance / NFE; learned NLL gap against training CPU seconds."""
    from .likelihood import log_likelihood

    sde, mix, eps = VPSDE(), song_ermon_mixture(), 1e-5
    x = mix.sample(s.nll_points, generator=_gen(7)).to(F64)
    true = mix.marginal(sde, eps).log_prob(x)                               # exact log p_eps
    prior = mix.marginal(sde, sde.T).log_prob                              # exact p_T: no prior mismatch
    oracle = oracle_score(mix, sde)
    rows = []
    for rtol in s.rtols:
        t0 = time.process_time()
        r = log_likelihood(sde, oracle, x, rtol=rtol, atol=rtol, eps=eps, prior_log_prob=prior)
        err = (r.nats - true).abs()
        rows.append({"method": "dopri5", "rtol": rtol, "nfe": r.nfe, "mean_abs_err": float(err.mean()),
                     "max_abs_err": float(err.max()), "cpu_s": time.process_time() - t0})
    for n in s.rk4_steps:
        t0 = time.process_time()
        r = log_likelihood(sde, oracle, x, method="rk4", n_steps=n, eps=eps, prior_log_prob=prior)
        err = (r.nats - true).abs()
        rows.append({"method": "rk4", "n_steps": n, "nfe": r.nfe, "mean_abs_err": float(err.mean()),
                     "max_abs_err": float(err.max()), "cpu_s": time.process_time() - t0})
    ok = [r for r in rows if r["nfe"] <= 150 and r["mean_abs_err"] <= 1e-4]
    best150 = min((r for r in rows if r["nfe"] <= 150), key=lambda r: r["mean_abs_err"], default=None)
    log("likelihood: oracle done")
    # learned: the gap of each snapshot on the same points, with the same exact prior and a tight solver
    learned = {}
    for ts, runs in trained.items():
        per_mark = {}
        for mark in s.nll_marks_s:
            signed, mean_abs = [], []
            for run in runs:
                model = run["snapshots"][mark]
                r = log_likelihood(sde, _learned_score(model), x, rtol=1e-5, atol=1e-5, eps=eps, prior_log_prob=prior)
                gap = -(r.nats - true)                                      # NLL_learned - NLL_true per point
                signed.append(float(gap.mean()))
                mean_abs.append(float(gap.abs().mean()))
            per_mark[str(mark)] = {"signed_gap": stats(signed), "mean_abs_gap": stats(mean_abs)}
        last = per_mark[str(max(s.nll_marks_s))]
        learned[ts] = {"by_cpu_s": per_mark, "steps_at_end": stats([r["steps"] for r in runs]),
                       "target_signed_0_005": bool(abs(last["signed_gap"]["median"]) <= 0.005),
                       "target_mean_abs_0_03": bool(last["mean_abs_gap"]["median"] <= 0.03)}
        log(f"likelihood: learned {ts} done")
    return {"n_points": s.nll_points, "eps": eps, "oracle": rows,
            "oracle_target_1e-4_within_150_nfe": bool(ok), "oracle_best_within_150_nfe": best150,
            "learned": learned}


# ----- noise allocation (the 2d preset) -------------------------------------------------------------
def bench_noise_allocation(s: Settings, runs: dict, log: Callable[[str], None]) -> dict:
    """Uniform vs log-SNR training times: sample quality of the learned scores (EDM Heun and EM at fixed NFE)."""
    sde = VPSDE()
    out = {}
    for toy, by_ts in runs.items():
        mix = EXACT[toy]() if toy in EXACT else None
        res = {}
        for name, nfe in (("edm", 50), ("em", 200)):
            per = {}
            for ts, rr in by_ts.items():
                q = [quality(_sample(name, sde, _learned_score(r["snapshots"][max(s.nll_marks_s)]), s.n_samples, nfe, i),
                             _fresh(toy, s.n_samples, 400 + i), mix, i) for i, r in enumerate(rr)]
                per[ts] = {k: stats([v[k] for v in q]) for k in q[0] if k != "finite"}
            ratio = {k: per["log_snr"][k]["median"] / per["uniform"][k]["median"] for k in ("sw", "mmd")}
            res[f"{name}_{nfe}"] = {"by_t_sampling": per, "log_snr_over_uniform": ratio}
        floor = [quality(_fresh(toy, s.n_samples, 500 + r), _fresh(toy, s.n_samples, 600 + r), mix, r)
                 for r in range(s.repeats)]
        res["floor_sw"] = stats([f["sw"] for f in floor])
        res["steps"] = {ts: stats([r["steps"] for r in rr]) for ts, rr in by_ts.items()}
        out[toy] = res
        log(f"noise allocation: {toy} done")
    sw_ratios = [v["log_snr_over_uniform"]["sw"] for r in out.values() for k, v in r.items() if "log_snr_over_uniform" in v]
    return {"by_toy": out, "median_sw_ratio_log_snr_over_uniform": float(np.median(sw_ratios)),
            "log_snr_better": bool(np.median(sw_ratios) < 1.0)}


# ----- 3. digits ---------------------------------------------------------------------------------
def bench_digits(s: Settings, log: Callable[[str], None]) -> dict:
    """Test bits/dim of a full-covariance Gaussian and a Gaussian KDE (bandwidth chosen on held-out train data)."""
    from .data import load_digits
    from .likelihood import dequantize, discrete_bpd

    split = load_digits(seed=0)
    k, dim = split.n_levels, 64
    ytr = dequantize(split.train_x, k, _gen(1)).reshape(-1, dim).to(F64)   # in [0, 1)
    yte = dequantize(split.test_x, k, _gen(2)).reshape(-1, dim).to(F64)
    mu = ytr.mean(0)
    cov = torch.cov(ytr.T) + 1e-6 * torch.eye(dim, dtype=F64)
    gauss = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov)
    bpd_gauss_per = discrete_bpd(gauss.log_prob(yte), dim, k)                # (n_test,) per image
    bpd_gauss = float(bpd_gauss_per.mean())

    def kde_logp(train: Tensor, test: Tensor, h: float) -> Tensor:
        d2 = torch.cdist(test, train).pow(2)                                # (M, N)
        return torch.logsumexp(-d2 / (2 * h * h), 1) - math.log(train.shape[0]) - 0.5 * dim * math.log(2 * math.pi * h * h)

    n_fit = min(s.kde_max_train, ytr.shape[0])
    fit, val = ytr[: int(0.8 * n_fit)], ytr[int(0.8 * n_fit): n_fit]
    grid = [0.03, 0.05, 0.07, 0.1, 0.14, 0.2, 0.28, 0.4]
    h = max(grid, key=lambda b: float(kde_logp(fit, val, b).mean()))
    bpd_kde = float(discrete_bpd(kde_logp(ytr[:n_fit], yte, h), dim, k).mean())
    log("digits: baselines done")
    model = _digits_model_bpd(yte, k, s.digits_model_test, bpd_gauss_per=bpd_gauss_per)
    log("digits: model done")
    return {"n_train": int(ytr.shape[0]), "n_test": int(yte.shape[0]), "gaussian_bpd": bpd_gauss, "kde_bpd": bpd_kde,
            "kde_bandwidth": h, "model": model, "target_bpd": 1.5,
            "note": "single dequantization draw per set; the baselines are deterministic given it"}


DIGITS_MODEL = Path(__file__).resolve().parents[1] / "book" / "data" / "digits_unet.pt"


def _digits_model_bpd(y_test: Tensor, k: int, n: int, bpd_gauss_per: Tensor) -> dict:
    """Test bits/dim of the shipped digits model (chapter 13) on the first ``n`` of the same dequantized test
    points as the baselines, with the paired difference to the full-covariance Gaussian on those points."""
    if not DIGITS_MODEL.is_file():
        return {"measured": False, "why": f"no digits model at {DIGITS_MODEL}"}
    from .likelihood import discrete_bpd, log_likelihood
    from .pretrained import load_model

    model, sde, meta = load_model(DIGITS_MODEL)
    z = (2 * y_test[:n] - 1).to(torch.float32).reshape(-1, 1, 8, 8)          # [0, 1) -> the model's [-1, 1)
    cpu0 = time.process_time()
    ll = log_likelihood(sde, model, z, trace="hutchinson", rtol=1e-4, atol=1e-4, generator=_gen(3))
    bpd = discrete_bpd(ll.nats.double(), 64, k, scale=2.0)                     # (n,)
    diff = bpd - bpd_gauss_per[:n]                                            # paired on the same points
    se = lambda v: float(v.std() / math.sqrt(v.numel())) if v.numel() > 1 else float("nan")  # noqa: E731
    return {"measured": True, "bpd": float(bpd.mean()), "bpd_se": se(bpd), "n_test": int(n),
            "minus_gaussian": float(diff.mean()), "minus_gaussian_se": se(diff), "nfe": int(ll.nfe),
            "cpu_s": time.process_time() - cpu0, "file": "book/data/digits_unet.pt", "command": meta["command"],
            "trace": "hutchinson, one Rademacher probe per image; dopri5 rtol = atol = 1e-4"}


# ----- 4. the peer ------------------------------------------------------------------------------
PEER_SCRIPT = r'''
import json, math, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from smalldiffusion import TimeInputMLP, ScheduleLogLinear, samples
a = json.loads(sys.argv[1])
torch.manual_seed(a["seed"])
data = torch.from_numpy(np.load(a["data"])).float()
model = TimeInputMLP(hidden_dims=tuple(a["hidden_dims"]))
sched = ScheduleLogLinear(N=200, sigma_min=a["sigma_min"], sigma_max=a["sigma_max"])
opt = torch.optim.AdamW(model.parameters(), lr=a["lr"])
g = torch.Generator().manual_seed(a["seed"] + 1)
steps, cpu0 = 0, time.process_time()
while time.process_time() - cpu0 < a["cpu_s"] and steps < a.get("max_steps", 10**9):
    x0 = data[torch.randint(0, data.shape[0], (a["batch_size"],), generator=g)]
    sigma = sched.sample_batch(x0).reshape(-1, 1)          # the package's own training draw (generate_train_sample)
    eps = torch.randn_like(x0)
    model.train(); opt.zero_grad()
    loss = type(model).get_loss(model, x0, sigma, eps)
    loss.backward(); opt.step(); steps += 1
cpu = time.process_time() - cpu0
out = {"steps": steps, "cpu_s": cpu, "n_params": sum(p.numel() for p in model.parameters()), "samples": {}}
for nfe in a["nfes"]:
    torch.manual_seed(a["seed"] + 7)
    *_, x = samples(model, sched.sample_sigmas(nfe), gam=2, batchsize=a["n"])
    np.save(a["out"] + f"_{nfe}.npy", x.double().numpy()); out["samples"][str(nfe)] = a["out"] + f"_{nfe}.npy"
print(json.dumps(out))
'''

PEER_README = {"hidden_dims": [16, 128, 128, 128, 128, 16], "sigma_min": 0.005, "sigma_max": 10.0, "lr": 1e-3,
               "batch_size": 2048}


def _peer_fitted(data: Tensor) -> dict:
    """The README's settings with the sigma range fitted to the data: sigma_max = the largest distance between
    two of 1000 training points (Song & Ermon 2020, technique 1), sigma_min = 0.005 x the data's std."""
    sub = data[:1000].to(F64)
    return {**PEER_README, "sigma_max": float(torch.cdist(sub, sub).max()), "sigma_min": 0.005 * float(sub.std())}


def run_peer(python: str, toy: str, settings: dict, seed: int, cpu_s: float, nfes: Sequence[int], n: int,
             work: Path, max_steps: int | None = None) -> dict:
    data_path = work / f"{toy}_{seed}.npy"
    if not data_path.exists():
        np.save(data_path, make_toy(toy, PRESET_2D["n_train"], generator=_gen(seed)).numpy())
    args = {**settings, "seed": seed, "cpu_s": cpu_s, "nfes": list(nfes), "n": n, "data": str(data_path),
            "out": str(work / f"peer_{toy}_{seed}_{len(list(work.iterdir()))}")}
    if max_steps is not None:
        args["max_steps"] = max_steps
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    p = subprocess.run([python, "-c", PEER_SCRIPT, json.dumps(args)], capture_output=True, text=True, env=env,
                       timeout=600 + 10 * cpu_s)
    if p.returncode != 0:
        raise RuntimeError(f"the peer run failed (exit {p.returncode}): {p.stderr.strip()[-2000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["samples"] = {k: torch.from_numpy(np.load(v)) for k, v in res["samples"].items()}
    return res


def peer_version(python: str) -> dict:
    code = ("import json, torch, importlib.metadata as m; print(json.dumps({'smalldiffusion': m.version('smalldiffusion'), "
            "'torch': torch.__version__}))")
    p = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise RuntimeError(f"--peer {python}: cannot import smalldiffusion and torch there: {p.stderr.strip()[-500:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


PEER_KINDS = ("peer_readme", "scorebook_uniform", "peer_fitted", "scorebook_log_snr")  #: the interleaving order


def bench_peer(s: Settings, python: str, trained: dict, peer_runs: dict, log: Callable[[str], None]) -> dict:
    """Side by side on the same data, CPU budget and NFE. The runs were made interleaved in :func:`run_suite`:
    for each seed, peer (README) -> scorebook (uniform) -> peer (fitted sigma range) -> scorebook (log_snr)."""
    sde = VPSDE()
    out = {"versions": peer_version(python), "readme_settings": PEER_README, "by_toy": {}}
    for toy in s.peer_toys:
        mix = EXACT[toy]() if toy in EXACT else None
        runs = {k: [] for k in PEER_KINDS}
        for kind in PEER_KINDS:
            if kind.startswith("peer"):
                rr = [(res["steps"], res["cpu_s"], res["n_params"], res["samples"]) for res in peer_runs[toy][kind]]
            else:
                rr = [(tr["steps"], tr["cpu_s"], tr["n_params"],
                       {str(nfe): _sample("edm", sde, _learned_score(tr["snapshots"][s.train_cpu_s]), s.n_samples, nfe, r)
                        for nfe in s.peer_nfes}) for r, tr in enumerate(trained[toy][kind.removeprefix("scorebook_")])]
            for r, (steps, cpu, n_params, xs) in enumerate(rr):
                ref = _fresh(toy, s.n_samples, 700 + r)
                runs[kind].append({"steps_per_cpu_s": steps / cpu, "n_params": n_params,
                                   "quality": {nfe: quality(x, ref, mix, r) for nfe, x in xs.items()}})
        summ = {}
        for kind, rr in runs.items():
            summ[kind] = {"steps_per_cpu_s": stats([x["steps_per_cpu_s"] for x in rr]), "n_params": rr[0]["n_params"],
                          "quality": {str(nfe): {k: stats([x["quality"][str(nfe)][k] for x in rr])
                                                 for k in rr[0]["quality"][str(nfe)] if k != "finite"}
                                      for nfe in s.peer_nfes}}
        ratios = {}
        for ours in ("scorebook_uniform", "scorebook_log_snr"):
            for peer in ("peer_readme", "peer_fitted"):
                key = f"{ours}/{peer}"
                ratios[key] = {"steps_per_cpu_s": summ[ours]["steps_per_cpu_s"]["median"] /
                               summ[peer]["steps_per_cpu_s"]["median"]}
                for nfe in s.peer_nfes:
                    for m in ("sw", "mmd", "mode_err"):
                        if m in summ[ours]["quality"][str(nfe)]:
                            a_, b_ = summ[ours]["quality"][str(nfe)][m]["median"], summ[peer]["quality"][str(nfe)][m]["median"]
                            ratios[key][f"{m}@{nfe}"] = a_ / b_ if b_ > 0 else float("nan")
        floor = [quality(_fresh(toy, s.n_samples, 800 + r), _fresh(toy, s.n_samples, 700 + r), mix, r)
                 for r in range(s.repeats)]
        out["by_toy"][toy] = {"runs": summ, "ratios_ours_over_peer": ratios, "fitted_settings": peer_runs[toy]["fitted"],
                              "floor": {k: stats([f[k] for f in floor]) for k in floor[0] if k != "finite"},
                              "our_sampler": "edm (Heun, rho = 7)", "peer_sampler": "smalldiffusion.samples, gam=2",
                              "training": "each side its own batch (ours 512, peer 2048 as in its README), same CPU seconds"}
    out["matched_batch_throughput"] = _peer_throughput(s, python)
    log("peer: done")
    return out


def _peer_throughput(s: Settings, python: str) -> dict:
    """Steps per CPU second at the same batch (512), interleaved: ours (2d preset) vs the peer's README MLP and a
    peer MLP widened to about our parameter count."""
    ours_params = count_parameters(ScoreMLP(2, PRESET_2D["hidden"], PRESET_2D["n_layers"], scale=VPSDE()))
    wide = {**PEER_README, "hidden_dims": [16, 256, 256, 256, 256, 16]}
    rows = {"scorebook": [], "peer_readme_mlp": [], "peer_wide_mlp": []}
    params = {"scorebook": ours_params}
    cap = max(1.0, s.train_cpu_s / 8)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(s.repeats):
            for kind in rows:
                if kind == "scorebook":
                    tr = train_2d("swiss_roll", "uniform", r, [cap])
                    rows[kind].append(tr["steps"] / tr["cpu_s"])
                else:
                    st = {**(PEER_README if kind == "peer_readme_mlp" else wide), "batch_size": PRESET_2D["batch_size"]}
                    res = run_peer(python, "swiss_roll", st, r, cap, [2], 4, Path(tmp))
                    rows[kind].append(res["steps"] / res["cpu_s"])
                    params[kind] = res["n_params"]
    med = {k: stats(v) for k, v in rows.items()}
    return {"batch_size": PRESET_2D["batch_size"], "cpu_s_each": cap, "steps_per_cpu_s": med, "n_params": params,
            "ratio_over_peer_readme": med["scorebook"]["median"] / med["peer_readme_mlp"]["median"],
            "ratio_over_peer_wide": med["scorebook"]["median"] / med["peer_wide_mlp"]["median"]}


# ----- 5. cost -----------------------------------------------------------------------------------
def _steps_per_cpu_s(model: torch.nn.Module, batch: Tensor, n: int) -> float:
    from .train import TrainConfig, train

    cfg = TrainConfig(steps=n, batch_size=batch.shape[0], lr=1e-3, device="cpu", progress=False, seed=0)
    data = batch.repeat(4, *([1] * (batch.ndim - 1)))
    loss = lambda score, x: sde_loss(score, x, VPSDE())                       # noqa: E731
    train(model, loss, data, TrainConfig(**{**asdict(cfg), "steps": 3}))    # warm-up (allocations)
    t0 = time.process_time()
    train(model, loss, data, cfg)
    return n / (time.process_time() - t0)


def bench_cost(s: Settings, log: Callable[[str], None]) -> dict:
    sde = VPSDE()
    mlp = [_steps_per_cpu_s(ScoreMLP(2, 128, 3, scale=sde), torch.randn(512, 2), s.cost_steps) for _ in range(s.repeats)]
    n_unet = max(5, s.cost_steps // 10)
    unet = [_steps_per_cpu_s(ScoreUNet(1, 32, (1, 2), 1, scale=sde), torch.randn(128, 1, 8, 8), n_unet)
            for _ in range(s.repeats)]
    out = {"threads": torch.get_num_threads(),
           "scorebook_train_mlp_2d_preset": {"batch": 512, "steps_per_cpu_s": stats(mlp),
                                             "n_params": count_parameters(ScoreMLP(2, 128, 3, scale=sde))},
           "scorebook_train_unet_digits_preset": {"batch": 128, "image": [1, 8, 8], "steps_per_cpu_s": stats(unet),
                                                  "n_params": count_parameters(ScoreUNet(1, 32, (1, 2), 1, scale=sde))},
           "gpu": _gpu_cost(s)}
    log("cost done")
    return out


def _gpu_cost(s: Settings) -> dict:
    if not torch.cuda.is_available():
        return {"measured": False, "why": "no CUDA device on this machine: GPU numbers are not measured"}
    dev = torch.device("cuda")
    out = {"measured": True, "device": torch.cuda.get_device_name(0)}
    sde = VPSDE()
    for dtype in ("fp32", "bf16"):
        model = ScoreUNet(3, 64, (1, 2, 2), 2, scale=sde).to(dev)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        x = torch.randn(128, 3, 32, 32, device=dev)
        times = []
        for i in range(4 + s.repeats):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                with torch.autocast("cuda", torch.bfloat16, enabled=dtype == "bf16"):
                    loss = sde_loss(model, x, sde)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            torch.cuda.synchronize()
            if i >= 4:
                times.append(10 * 128 / (time.perf_counter() - t0))
        out[f"unet32_train_images_per_s_{dtype}"] = stats(times)
    return out


# ----- the whole suite ---------------------------------------------------------------------------
def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
            "numpy": np.__version__, "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA device)"}


def run_suite(s: Settings, peer: str | None = None, log: Callable[[str], None] = print,
              sections: Sequence[str] | None = None) -> dict:
    """Run the suite with settings ``s``; returns the results file's content (a JSON-able dict)."""
    wanted = set(sections or ("samplers", "likelihood", "noise_allocation", "digits", "peer", "cost"))
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    results: dict = {}
    timings: dict = {}

    def timed(name, fn, *a):
        w, c = time.perf_counter(), time.process_time()
        results[name] = fn(*a)
        timings[name] = {"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c}

    # the learned scores shared by the sampler, noise-allocation, likelihood and peer sections; with a peer,
    # its runs are interleaved with ours (peer README, ours uniform, peer fitted, ours log_snr, for each seed)
    w, c = time.perf_counter(), time.process_time()
    trained: dict = {}
    peer_runs: dict = {}
    budget = max(s.nll_marks_s)
    toys = list(s.train_toys) if wanted & {"samplers", "noise_allocation", "peer"} else \
        (["song_ermon"] if "likelihood" in wanted else [])
    tmp = tempfile.TemporaryDirectory()
    try:
        for toy in toys:
            with_peer = bool(peer) and "peer" in wanted and toy in s.peer_toys
            if with_peer:
                fitted = _peer_fitted(make_toy(toy, PRESET_2D["n_train"], generator=_gen(0)))
                peer_runs[toy] = {"peer_readme": [], "peer_fitted": [], "fitted": fitted}
            for r in range(s.train_seeds):
                for kind in PEER_KINDS:
                    if kind.startswith("scorebook"):
                        ts = kind.removeprefix("scorebook_")
                        trained.setdefault(toy, {}).setdefault(ts, []).append(train_2d(toy, ts, r, s.nll_marks_s))
                    elif with_peer:
                        st = PEER_README if kind == "peer_readme" else peer_runs[toy]["fitted"]
                        peer_runs[toy][kind].append(run_peer(peer, toy, st, r, budget, s.peer_nfes, s.n_samples,
                                                             Path(tmp.name)))
            log(f"trained {toy}: {s.train_seeds} seeds x 2 time samplings x {budget:g} CPU s"
                + (" (interleaved with the peer)" if with_peer else ""))
    finally:
        tmp.cleanup()
    timings["training"] = {"wall_s": time.perf_counter() - w, "cpu_s": time.process_time() - c}
    final = max(s.nll_marks_s)
    chosen = "uniform"
    if "noise_allocation" in wanted:
        timed("noise_allocation", bench_noise_allocation, s, {t: trained[t] for t in s.alloc_toys if t in trained}, log)
        chosen = "log_snr" if results["noise_allocation"]["log_snr_better"] else "uniform"
    if "samplers" in wanted:  # the learned score: the 2d preset with the time sampling that measured better
        learned = {toy: {chosen: [r["snapshots"][final] for r in by[chosen]]} for toy, by in trained.items()
                   if toy in EXACT}
        timed("samplers", bench_samplers, s, learned, log)
    if "likelihood" in wanted:
        timed("likelihood", bench_likelihood, s, trained.get("song_ermon", {}), log)
    if "digits" in wanted:
        timed("digits", bench_digits, s, log)
    if "cost" in wanted:
        timed("cost", bench_cost, s, log)
    if "peer" in wanted:
        if peer:
            timed("peer", bench_peer, s, peer, trained, peer_runs, log)
        else:
            results["peer"] = {"measured": False, "why": "no --peer PYTHON given"}
    timings["total"] = {"wall_s": time.perf_counter() - t_wall, "cpu_s": time.process_time() - t_cpu}
    return {"schema": 1, "mode": s.mode, "settings": asdict(s), "preset_2d": PRESET_2D,
            "timings": timings, "results": results}


def summary(doc: dict) -> list[str]:
    """One line per target of issue 13: met or not, with the measured value."""
    r, lines = doc["results"], []
    for toy, res in r.get("samplers", {}).items():
        sm = res["summary"]
        lines.append(f"samplers/{toy}: best oracle sampler at the floor (SW <= {AT_FLOOR}x floor) by NFE "
                     f"{sm['first_nfe_at_floor']} -> target <= 20: {'met' if sm['target_floor_within_20_nfe'] else 'NOT met'}")
        for ts, lo in sm["learned_over_oracle"].items():
            lines.append(f"samplers/{toy}/{ts}: worst learned/oracle SW ratio {lo['worst_best_over_best']:.2f} -> "
                         f"target <= 1.25: {'met' if lo['target_within_1_25'] else 'NOT met'}")
    if "likelihood" in r:
        lk = r["likelihood"]
        b = lk["oracle_best_within_150_nfe"]
        lines.append(f"likelihood/oracle: best mean |error| within 150 NFE {b['mean_abs_err']:.2e} nats ({b['method']}, "
                     f"{b['nfe']} NFE) -> target <= 1e-4: {'met' if lk['oracle_target_1e-4_within_150_nfe'] else 'NOT met'}")
        for ts, v in lk["learned"].items():
            last = v["by_cpu_s"][max(v["by_cpu_s"], key=float)]
            lines.append(f"likelihood/learned/{ts}: signed gap {last['signed_gap']['median']:+.4f}, mean |gap| "
                         f"{last['mean_abs_gap']['median']:.4f} nats -> targets 0.005 / 0.03: "
                         f"{'met' if v['target_signed_0_005'] else 'NOT met'} / {'met' if v['target_mean_abs_0_03'] else 'NOT met'}")
    if "noise_allocation" in r:
        lines.append(f"noise allocation: median SW ratio log_snr/uniform {r['noise_allocation']['median_sw_ratio_log_snr_over_uniform']:.2f}")
    if "digits" in r:
        d = r["digits"]
        lines.append(f"digits: Gaussian {d['gaussian_bpd']:.3f}, KDE {d['kde_bpd']:.3f} bits/dim; model: "
                     f"{'%.3f' % d['model']['bpd'] if d['model'].get('measured') else 'not measured'}")
    if r.get("peer", {}).get("by_toy"):
        for toy, v in r["peer"]["by_toy"].items():
            for key, rat in v["ratios_ours_over_peer"].items():
                lines.append(f"peer/{toy}/{key}: " + ", ".join(f"{k} {x:.2f}" for k, x in rat.items()))
        t = r["peer"]["matched_batch_throughput"]
        lines.append(f"peer throughput at batch 512: ours/README MLP {t['ratio_over_peer_readme']:.2f}, "
                     f"ours/wide MLP {t['ratio_over_peer_wide']:.2f}")
    if "cost" in r:
        c = r["cost"]
        lines.append(f"cost: ScoreMLP {c['scorebook_train_mlp_2d_preset']['steps_per_cpu_s']['median']:.1f} steps/CPU s, "
                     f"ScoreUNet {c['scorebook_train_unet_digits_preset']['steps_per_cpu_s']['median']:.1f} steps/CPU s; "
                     f"GPU: {'measured' if c['gpu'].get('measured') else 'not measured'}")
    return lines


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scorebook.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the CI suite: small sizes, about a minute (the default)")
    mode.add_argument("--full", action="store_true", help="the full suite: about 15-20 CPU minutes on one thread")
    parser.add_argument("--out", type=Path, default=Path("bench_results.json"),
                        help="results file to write (JSON; default: bench_results.json)")
    parser.add_argument("--peer", metavar="PYTHON",
                        help="a Python interpreter with smalldiffusion and torch installed: also run the peer side by side")
    parser.add_argument("--only", nargs="+", metavar="SECTION",
                        choices=("samplers", "likelihood", "noise_allocation", "digits", "peer", "cost"),
                        help="run only these sections (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1; budgets are CPU seconds)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    if args.peer is not None:
        if not (Path(args.peer).is_file() and os.access(args.peer, os.X_OK)):
            parser.error(f"--peer {args.peer}: not an executable file")
        try:
            peer_version(args.peer)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            parser.error(str(e))
    if args.out.parent and not args.out.parent.exists():
        parser.error(f"--out {args.out}: folder {args.out.parent} does not exist")
    torch.set_num_threads(args.threads)
    s = FULL if args.full else QUICK
    start = _dt.datetime.now(_dt.timezone.utc)
    log = lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)  # noqa: E731
    doc = run_suite(s, peer=args.peer, log=log, sections=args.only)
    doc = {"date": start.isoformat(timespec="seconds"), "machine": machine(),
           "command": "python -m scorebook.bench " + " ".join(sys.argv[1:] if argv is None else argv),
           "versions": {"scorebook_git": _git_head(), "torch": torch.__version__, "numpy": np.__version__}, **doc}
    doc["summary"] = summary(doc)
    args.out.write_text(json.dumps(_json_safe(doc), indent=1) + "\n")
    for line in doc["summary"]:
        print(line)
    print(f"wrote {args.out} ({doc['timings']['total']['wall_s']:.0f} s wall, {doc['timings']['total']['cpu_s']:.0f} s CPU)")
    return 0


def _git_head() -> str | None:
    try:
        p = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                           cwd=Path(__file__).resolve().parent)
        return p.stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


if __name__ == "__main__":
    sys.exit(main())
