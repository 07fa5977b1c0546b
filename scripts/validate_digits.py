"""Issue 3, "What must be shown", digits: train the `digits` preset on CPU and check it.

Prints, all computed in this run:
* training steps, CPU and wall time;
* test bits/dim from the probability-flow ODE (17 levels, uniform dequantization, Hutchinson
  trace) next to a full-covariance Gaussian fitted to the same dequantized training data;
* a classifier trained on real digits (test accuracy), the fraction of samples it labels with
  confidence >= 0.9, and the classes the samples cover;
and writes the sample grid to --out (default runs/digits_validation/samples.png).

    /tmp/venv/bin/python scripts/validate_digits.py [--train-cpu 330] [--threads 1]
"""
from __future__ import annotations

import argparse
import functools
import math
import time
from pathlib import Path

import numpy as np
import torch

from scorebook.cli import PRESETS, _grid_png, build_net, build_sde
from scorebook.data import ImageTransform, TensorData, load_digits
from scorebook.densities import Gaussian
from scorebook.likelihood import discrete_bpd, log_likelihood
from scorebook.losses import sde_loss
from scorebook.samplers import predictor_corrector
from scorebook.train import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-cpu", type=float, default=330.0, help="CPU seconds for training (stops early)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--n-samples", type=int, default=200)
    ap.add_argument("--sample-steps", type=int, default=500)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("runs/digits_validation"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    c_start, w_start = time.process_time(), time.perf_counter()

    preset = PRESETS["digits"]
    digits = load_digits(seed=preset.data.split_seed)
    n_levels, D = digits.n_levels, 64
    tf = ImageTransform(n_levels, preset.data.value_range)
    sde = build_sde(preset.sde)
    torch.manual_seed(args.seed)
    model = build_net(preset.net, sde)
    cfg = preset.train
    cfg = type(cfg)(**{**cfg.__dict__, "seed": args.seed, "device": "cpu", "progress": False,
                       "steps": max(cfg.steps, 20_000)})  # the CPU budget decides when to stop
    c0, w0 = time.process_time(), time.perf_counter()
    res = train(model, functools.partial(sde_loss, sde=sde), TensorData(digits.train_x, tf), cfg,
                callback=lambda step, value: time.process_time() - c0 > args.train_cpu)
    print(f"training: {res.step} steps of batch {cfg.batch_size}, CPU {time.process_time() - c0:.0f} s, "
          f"wall {time.perf_counter() - w0:.0f} s, {args.threads} thread(s); "
          f"mean loss of the last 200 steps {np.mean(res.losses[-200:]):.4f}")
    score = res.ema_model

    # --- likelihood: model vs a full-covariance Gaussian, both on dequantized data ------------
    g = torch.Generator().manual_seed(args.seed + 1)
    unit = ImageTransform(n_levels, (0.0, 1.0))
    y_train = torch.cat([unit(digits.train_x, g) for _ in range(10)]).reshape(-1, D).double()  # 10 dequantizations
    cov = torch.cov(y_train.T) + 1e-9 * torch.eye(D, dtype=torch.float64)
    gauss = Gaussian(y_train.mean(0), cov)
    y_test01 = unit(digits.test_x, g)  # (N, 1, 8, 8) in [0, 1]
    bpd_gauss = discrete_bpd(gauss.log_prob(y_test01.reshape(-1, D).double()), D, n_levels, scale=1.0)
    y_test = 2 * y_test01 - 1 if preset.data.value_range == (-1.0, 1.0) else y_test01
    scale = 2.0 if preset.data.value_range == (-1.0, 1.0) else 1.0
    t0 = time.perf_counter()
    ll = log_likelihood(sde, score, y_test, trace="hutchinson", rtol=args.tol, atol=args.tol,
                        generator=torch.Generator().manual_seed(args.seed + 2))
    bpd_model = discrete_bpd(ll.nats.double(), D, n_levels, scale=scale)
    se = lambda v: v.std().item() / math.sqrt(v.numel())  # noqa: E731
    diff = bpd_model - bpd_gauss  # paired on the same dequantized test points
    print(f"test bits/dim ({y_test.shape[0]} images, 17 levels): model {bpd_model.mean():.4f} +- {se(bpd_model):.4f} "
          f"(PF ODE, Hutchinson, rtol=atol={args.tol:g}, NFE {ll.nfe}, {time.perf_counter() - t0:.0f} s); "
          f"full-covariance Gaussian {bpd_gauss.mean():.4f} +- {se(bpd_gauss):.4f}; "
          f"model - Gaussian {diff.mean():+.4f} +- {se(diff):.4f}")

    # --- samples ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    gs = torch.Generator().manual_seed(args.seed + 3)
    with torch.no_grad():
        x_T = sde.prior_sample((args.n_samples, 1, 8, 8), generator=gs)
        xs = predictor_corrector(sde, score, x_T, args.sample_steps, snr=0.16, generator=gs, progress=False)
    xs01 = tf.to_unit(xs).clamp(0, 1)  # (N, 1, 8, 8) in [0, 1]
    print(f"sampling: {args.n_samples} samples, PC {args.sample_steps} steps, {time.perf_counter() - t0:.0f} s")
    args.out.mkdir(parents=True, exist_ok=True)
    _grid_png(xs01[:100], args.out / "samples.png")
    np.savez(args.out / "samples.npz", x=xs01.numpy())

    # --- a classifier trained on real digits ------------------------------------------------
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(256,), max_iter=600, random_state=args.seed)
    feats = lambda x: x.reshape(x.shape[0], -1).float().numpy() / (n_levels - 1)  # noqa: E731
    clf.fit(feats(digits.train_x), digits.train_y.numpy())
    acc = clf.score(feats(digits.test_x), digits.test_y.numpy())
    # samples live on the dequantized scale y = (x + u) / 17; map back to the integer scale x ~ 17 y - 1/2
    sample_feats = np.clip((xs01.reshape(args.n_samples, -1).numpy() * n_levels - 0.5) / (n_levels - 1), 0, 1)
    proba = clf.predict_proba(sample_feats)
    conf, label = proba.max(1), proba.argmax(1)
    counts = np.bincount(label[conf >= 0.9], minlength=10)
    print(f"classifier: MLP on real digits, test accuracy {acc:.4f}")
    print(f"samples: {np.mean(conf >= 0.9):.3f} labelled with confidence >= 0.9 (target >= 0.70); "
          f"confident labels per class {counts.tolist()}; classes covered {int((counts > 0).sum())}/10")
    print(f"grid: {args.out / 'samples.png'}")
    print(f"total: CPU {time.process_time() - c_start:.0f} s, wall {time.perf_counter() - w_start:.0f} s")


if __name__ == "__main__":
    main()
