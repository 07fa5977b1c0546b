"""The at-scale commands of chapter 13 run as printed: `torchrun -m scorebook train --preset mnist --data your.npz`
with two processes (gloo on CPU, one tiny step; this checks the code path, not GPU speed)."""
import os
import subprocess
import sys

import numpy as np

from scorebook.train import load_checkpoint


def test_torchrun_trains_the_mnist_preset_from_an_npz(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "mnist_train.npz", x=rng.integers(0, 256, (8, 28, 28), dtype=np.uint8))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "scorebook", "train", "--preset", "mnist", "--data", str(tmp_path / "mnist_train.npz"),
           "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--device", "cpu",
           "--no-progress", "--no-bf16", "--threads", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("trained mnist to step 2") == 1          # only rank 0 reports
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ck["step"] == 2 and len(ck["rng"]) == 2                     # one random state per process
    assert ck["meta"]["image_hw"] == [28, 28] and ck["meta"]["preset"] == "mnist"
