"""scorebook.cli: `python -m scorebook train|sample|nll`, presets, outputs and clear errors."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from scorebook.cli import PRESETS, main



def _fails(argv, capsys, *needles):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


def test_help_for_every_command(capsys):
    for argv in (["--help"], ["train", "--help"], ["sample", "--help"], ["nll", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert name in out
    assert "--checkpoint" in out and "--trace" in out
    for name in ("edm", "edm_sde", "dpmpp_2m", "ddim", "ddpm", "ode_heun", "ode_euler", "--nfe", "Algorithm 1"):
        assert name in out  # sample --help lists every fixed-budget sampler, with its algorithm


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "scorebook", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "train" in proc.stdout and "nll" in proc.stdout


def test_bad_presets_flags_and_files(tmp_path, capsys):
    _fails(["train", "--preset", "imagenet"], capsys, "invalid choice: 'imagenet'")
    _fails(["train", "--preset", "2d", "--steps", "-5"], capsys, "--steps", "expected a positive integer, got '-5'")
    _fails(["train", "--preset", "2d", "--lr", "fast"], capsys, "--lr", "expected a positive number, got 'fast'")
    _fails(["train", "--preset", "2d", "--device", "gpu0"], capsys, "--device", "expected a torch device")
    _fails(["train", "--preset", "mnist", "--out", str(tmp_path)], capsys, "pass --data PATH")
    _fails(["train", "--preset", "mnist", "--data", str(tmp_path / "none.npz")], capsys, "--data", "does not exist")
    (tmp_path / "bad.npz").write_text("not a zip")
    _fails(["train", "--preset", "cifar10", "--data", str(tmp_path / "bad.npz")], capsys, "not a readable .npz")
    _fails(["train", "--preset", "2d", "--data", str(tmp_path / "bad.npz")], capsys, "--data only applies")
    _fails(["sample", "--checkpoint", str(tmp_path / "none.pt")], capsys, "does not exist")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    _fails(["nll", "--checkpoint", str(tmp_path / "foreign.pt")], capsys, "not a scorebook checkpoint")
    _fails(["sample", "--checkpoint", str(tmp_path / "foreign.pt"), "--sampler", "unipc"], capsys, "invalid choice")


def test_sampler_flags_are_checked_before_the_checkpoint(tmp_path, capsys):
    ckpt = str(tmp_path / "none.pt")  # never opened: each flag error comes first
    _fails(["sample", "--checkpoint", ckpt, "--sampler", "dpm2m"], capsys,
           "argument --sampler: invalid choice: 'dpm2m'", "dpmpp_2m")
    _fails(["sample", "--checkpoint", ckpt, "--sampler", "edm", "--steps", "10"], capsys,
           "--steps is for --sampler pc or em", "use --nfe")
    _fails(["sample", "--checkpoint", ckpt, "--nfe", "10"], capsys, "--nfe is for the fixed-budget samplers",
           "--sampler pc takes --steps")
    _fails(["sample", "--checkpoint", ckpt, "--sampler", "ode", "--nfe", "10"], capsys, "picks its own steps")
    _fails(["sample", "--checkpoint", ckpt, "--sampler", "ddim", "--nfe", "0"], capsys, "--nfe",
           "expected a positive integer, got '0'")
    _fails(["sample", "--checkpoint", ckpt, "--sampler", "ode_heun", "--nfe", "1"], capsys,
           "--sampler ode_heun needs at least 2 score evaluations, got 1")


def test_2d_train_resume_sample_nll(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "2d", "--toy", "moons", "--steps", "30", "--batch-size", "64",
                 "--out", str(run), "--no-progress"]) == 0
    assert (run / "checkpoint.pt").is_file()
    assert main(["train", "--preset", "2d", "--toy", "moons", "--steps", "40", "--batch-size", "64",
                 "--out", str(run), "--no-progress"]) == 0
    assert "to step 40" in capsys.readouterr().out  # resumed from step 30, not restarted
    assert main(["sample", "--checkpoint", str(run / "checkpoint.pt"), "--n", "64", "--steps", "40"]) == 0
    x = np.load(run / "samples.npz")["x"]
    assert x.shape == (64, 2) and np.isfinite(x).all()
    with Image.open(run / "samples.png") as im:
        assert im.size[0] > 100
    capsys.readouterr()
    # every fixed-budget sampler of scorebook.solvers, at a budget of 10 score evaluations: Heun-type EDM
    # spends 2 per step and 1 on the last (so 9 of the 10), the others all 10
    used = {"edm": 9, "edm_sde": 9, "dpmpp_2m": 10, "ddim": 10, "ddpm": 10, "ode_heun": 10, "ode_euler": 10}
    got = {}
    for name, n in used.items():
        assert main(["sample", "--checkpoint", str(run / "checkpoint.pt"), "--n", "64", "--sampler", name,
                     "--nfe", "10"]) == 0
        assert f"{name}: {n} score evaluations (budget 10)" in capsys.readouterr().out
        got[name] = np.load(run / "samples.npz")["x"]
        assert got[name].shape == (64, 2) and np.isfinite(got[name]).all()
    assert main(["sample", "--checkpoint", str(run / "checkpoint.pt"), "--n", "64", "--sampler", "dpmpp_2m",
                 "--nfe", "10"]) == 0  # the same seed gives the same samples
    np.testing.assert_array_equal(np.load(run / "samples.npz")["x"], got["dpmpp_2m"])
    assert not np.allclose(got["dpmpp_2m"], got["ddim"])  # a different sampler, different samples
    assert main(["sample", "--checkpoint", str(run / "checkpoint.pt"), "--n", "64", "--sampler", "edm"]) == 0
    assert "edm: 35 score evaluations (budget 35)" in capsys.readouterr().out  # the default budget
    assert main(["nll", "--checkpoint", str(run / "checkpoint.pt"), "--n", "32", "--tol", "1e-3",
                 "--trace", "exact"]) == 0
    out = capsys.readouterr().out
    assert "bits/dim" in out and "nats per sample" in out


def test_digits_and_user_images(tmp_path, capsys):
    run = tmp_path / "digits"
    assert main(["train", "--preset", "digits", "--steps", "2", "--batch-size", "16", "--out", str(run),
                 "--no-progress"]) == 0
    assert main(["sample", "--checkpoint", str(run / "checkpoint.pt"), "--n", "4", "--steps", "30",
                 "--out", str(tmp_path / "grid.png")]) == 0
    imgs = np.load(tmp_path / "grid.npz")["images"]
    assert imgs.shape == (4, 1, 8, 8) and imgs.dtype == np.uint8
    with Image.open(tmp_path / "grid.png") as im:
        assert min(im.size) >= 64  # an 8x8 grid is enlarged to be visible
    _fails(["nll", "--checkpoint", str(run / "checkpoint.pt"), "--data", "x.npz"], capsys, "does not apply")
    # a user's folder of 28x28 grey PNGs trains the mnist preset (one tiny step on CPU)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (28, 28), dtype=np.uint8)).save(folder / f"{i}.png")
    assert main(["train", "--preset", "mnist", "--data", str(folder), "--steps", "1", "--batch-size", "2",
                 "--out", str(tmp_path / "mnist"), "--no-progress", "--no-bf16"]) == 0
    from scorebook.train import load_checkpoint

    meta = load_checkpoint(tmp_path / "mnist" / "checkpoint.pt")["meta"]
    assert meta["image_hw"] == [28, 28] and meta["net"]["in_channels"] == 1
