"""scorebook.train: the one loop (warm-up, EMA, divergence), exact resume, and safe checkpoints."""
import functools
import random

import numpy as np
import pytest
import torch
from torch import nn

import scorebook.train as train_mod
from scorebook.data import ImageTransform, TensorData
from scorebook.densities import Gaussian, oracle_score
from scorebook.losses import ncsn_loss, sde_loss
from scorebook.nets import ScoreMLP, sigma_scale
from scorebook.sde import VPSDE, geometric_sigmas
from scorebook.train import (CheckpointError, TrainConfig, TrainingDivergedError, load_checkpoint,
                             save_checkpoint, train)



def _cfg(**kw):
    base = dict(steps=12, batch_size=8, lr=1e-3, warmup_steps=3, device="cpu", progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


class Scalar(nn.Module):
    """One parameter p; the 'score' ignores x. loss = p has gradient 1 at every step."""

    def __init__(self):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        return self.p.expand_as(x)


def test_warmup_and_ema_follow_their_formulas():
    # Adam with a constant gradient moves p by exactly lr_k per step (m_hat/sqrt(v_hat) = 1 up to eps),
    # so the trajectory reveals the warm-up schedule lr_k = lr * min(1, (k+1)/W).
    model, lr, W, steps = Scalar(), 0.01, 4, 8
    traj = []
    res = train(model, lambda s, b: s(b, 0.0)[0, 0], torch.zeros(16, 1),
                _cfg(steps=steps, lr=lr, warmup_steps=W, adam_eps=1e-12, ema_decay=0.9, grad_clip=None),
                callback=lambda k, v: traj.append(model.p.item()))
    expected = np.cumsum([-lr * min(1.0, (k + 1) / W) for k in range(steps)])
    np.testing.assert_allclose(traj, expected, rtol=1e-6, atol=1e-9)
    # EMA with the ramped decay d_k = min(0.9, (1+k)/(10+k)), started from p_0 = 0
    ema = 0.0
    for k, p in enumerate(traj):
        d = min(0.9, (1 + k) / (10 + k))
        ema = d * ema + (1 - d) * p
    assert res.ema_model.p.item() == pytest.approx(ema, rel=1e-6)
    assert res.losses[0] == 0.0 and len(res.losses) == steps


def test_one_loop_trains_two_losses_towards_the_exact_score():
    # the same loop minimises the continuous-time SDE loss and the discrete NCSN loss;
    # both bring a ScoreMLP close to the closed-form score of a 2-D Gaussian.
    dist = Gaussian(torch.tensor([1.0, -1.0]), std=torch.tensor([0.5, 1.5]))
    x = dist.sample(4096, generator=torch.Generator().manual_seed(0)).float()
    sde = VPSDE()
    sigmas = geometric_sigmas(3.0, 0.1, 10).float()
    for loss, model, t_eval, oracle in (
        (functools.partial(sde_loss, sde=sde), ScoreMLP(2, 64, 2, scale=sde), 0.3, oracle_score(dist, sde)),
        (functools.partial(ncsn_loss, sigmas=sigmas), ScoreMLP(2, 64, 2, scale=sigma_scale, log_time=True),
         0.5, oracle_score(dist)),
    ):
        torch.manual_seed(0)
        xe = dist.sample(1000, generator=torch.Generator().manual_seed(1)).float()
        xe = xe + (0.5 * torch.randn_like(xe))  # evaluate on noisy points
        err = lambda m: ((m(xe, t_eval) - oracle(xe, t_eval)) ** 2).sum(1).mean().item()  # noqa: E731
        ref = (oracle(xe, t_eval) ** 2).sum(1).mean().item()
        before = err(model)
        res = train(model, loss, x, _cfg(steps=300, batch_size=256, lr=3e-3, warmup_steps=20, ema_decay=0.99))
        after = err(res.ema_model)
        # relative squared error below 10% of E||s||^2 (untrained nets start near 100%)
        assert after < 0.1 * ref and after < 0.2 * before, (before, after, ref)


def _noisy_loss(sde):
    """sde_loss whose value also draws from numpy's and Python's global RNGs."""
    def loss(score, x):
        base = sde_loss(score, x, sde)
        return base * (1.0 + 0.01 * float(np.random.rand()) + 0.01 * random.random())
    return loss


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    # data with per-batch randomness (dequantization), 5 steps per epoch so the break falls mid-epoch
    x_int = torch.randint(0, 17, (40, 1, 2, 2), generator=torch.Generator().manual_seed(0))
    data = TensorData(x_int.reshape(40, 4), ImageTransform(17, (-1, 1)))
    sde = VPSDE()

    def fresh(seed):
        torch.manual_seed(seed)
        return ScoreMLP(4, 16, 1, scale=sde)

    full = train(fresh(0), _noisy_loss(sde), data, _cfg(checkpoint=str(tmp_path / "a.pt"), checkpoint_every=6))
    part1 = train(fresh(0), _noisy_loss(sde), data, _cfg(steps=6, checkpoint=str(tmp_path / "b.pt")))
    assert part1.losses == full.losses[:6]
    # a new process would start with other RNG states and other weights: simulate both
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    part2 = train(fresh(99), _noisy_loss(sde), data, _cfg(checkpoint=str(tmp_path / "b.pt")))
    assert part2.step == 12
    assert part2.losses == full.losses  # the whole trajectory, the first half read from the checkpoint
    for a, b in zip(full.model.state_dict().values(), part2.model.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(full.ema_model.state_dict().values(), part2.ema_model.state_dict().values()):
        assert torch.equal(a, b)
    ck = load_checkpoint(tmp_path / "b.pt")
    assert ck["step"] == 12 and len(ck["losses"]) == 12


def test_nan_loss_names_the_step():
    calls = []

    def loss(score, x):
        calls.append(1)
        v = (score(x, 0.5) ** 2).mean()
        return v * float("nan") if len(calls) == 3 else v

    with pytest.raises(TrainingDivergedError, match="step 3"):
        train(ScoreMLP(2, 8, 1), loss, torch.randn(32, 2), _cfg())


def test_bad_checkpoints_give_clear_errors(tmp_path):
    model = ScoreMLP(2, 8, 1)
    good = tmp_path / "good.pt"
    x = torch.randn(32, 2)
    train(model, lambda s, x: (s(x, 0.5) ** 2).mean(), x, _cfg(steps=2, checkpoint=str(good)))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(cut)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": model.state_dict()}, foreign)
    with pytest.raises(CheckpointError, match="not a scorebook checkpoint"):
        load_checkpoint(foreign)
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        load_checkpoint(tmp_path / "junk.pt")
    # resuming a different architecture from a good file
    with pytest.raises(CheckpointError, match="does not fit this model"):
        train(ScoreMLP(2, 16, 1), lambda s, x: (s(x, 0.5) ** 2).mean(), x, _cfg(steps=4, checkpoint=str(good)))
    # resuming with other data, or another batch size, is a different run: refused, naming what differs
    with pytest.raises(CheckpointError, match="different run: the training data"):
        train(ScoreMLP(2, 8, 1), lambda s, x: (s(x, 0.5) ** 2).mean(), x + 1, _cfg(steps=4, checkpoint=str(good)))
    with pytest.raises(CheckpointError, match="different run: the batch_size"):
        train(ScoreMLP(2, 8, 1), lambda s, x: (s(x, 0.5) ** 2).mean(), x,
              _cfg(steps=4, batch_size=4, checkpoint=str(good)))
    # a directory as the checkpoint path fails before any training step
    steps_run = []
    with pytest.raises(CheckpointError, match="is a directory"):
        train(ScoreMLP(2, 8, 1), lambda s, x: steps_run.append(1) or (s(x, 0.5) ** 2).mean(), x,
              _cfg(steps=4, checkpoint=str(tmp_path)))
    assert steps_run == []
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(tmp_path)
    # resuming from a truncated file fails instead of silently starting over
    with pytest.raises(CheckpointError, match="truncated"):
        train(ScoreMLP(2, 8, 1), lambda s, x: (s(x, 0.5) ** 2).mean(), torch.randn(32, 2),
              _cfg(steps=4, checkpoint=str(cut)))


def test_config_rejects_values_of_the_wrong_type():
    for bad in ({"lr": True}, {"ema_decay": "0.9"}, {"grad_clip": "1"}, {"seed": 1.5},
                {"adam_betas": (0.9, 1.5)}, {"adam_eps": 0.0}):
        with pytest.raises(ValueError, match=f"TrainConfig.{next(iter(bad))}"):
            TrainConfig(**bad)


def test_failed_write_leaves_the_good_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint(path, {"model": {}, "ema": {}, "optimizer": {}, "step": 1, "losses": [1.0], "rng": []})
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"PK\x03\x04 half a file")  # some bytes reach the disk, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_mod.torch, "save", broken_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, {"model": {}, "ema": {}, "optimizer": {}, "step": 2, "losses": [], "rng": []})
    monkeypatch.undo()
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt"]  # no temporary file left behind


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="gpu0")
    with pytest.raises(ValueError, match="batch_size=64 is larger than the 10 examples"):
        train(ScoreMLP(2, 8, 1), lambda s, x: s(x, 0.5).mean(), torch.randn(10, 2), _cfg(batch_size=64))
    with pytest.raises(ValueError, match="scalar"):
        train(ScoreMLP(2, 8, 1), lambda s, x: s(x, 0.5), torch.randn(10, 2), _cfg(batch_size=5))
    with pytest.warns(UserWarning, match="bf16"):
        train(ScoreMLP(2, 8, 1), lambda s, x: (s(x, 0.5) ** 2).mean(), torch.randn(10, 2),
              _cfg(steps=1, batch_size=5, bf16=True))
