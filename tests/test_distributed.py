"""scorebook.train under torchrun: 2 gloo processes on CPU, DistributedDataParallel."""
import os
import subprocess
import sys
import textwrap

import torch

from scorebook.nets import ScoreMLP
from scorebook.train import TrainConfig, load_checkpoint, train

WORKER = textwrap.dedent("""
    import os, sys
    import torch
    torch.set_num_threads(1)
    from scorebook.nets import ScoreMLP
    from scorebook.train import TrainConfig, train

    def loss(score, x):  # deterministic: regress onto the score of N(0, I)
        return ((score(x, 0.5) + x) ** 2).sum(1).mean()

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    x = torch.load(os.path.join(out, "data.pt"))
    torch.manual_seed(rank)  # different initial weights per rank: DDP must start from rank 0's
    model = ScoreMLP(2, 16, 1)
    res = train(model, loss, x, TrainConfig(steps=6, batch_size=8, lr=1e-2, warmup_steps=0, device="cpu",
                                            progress=False, checkpoint=os.path.join(out, "ck.pt"),
                                            checkpoint_every=3))
    torch.save({"state": model.state_dict(), "losses": res.losses, "world": int(os.environ["WORLD_SIZE"])},
               os.path.join(out, f"rank{rank}.pt"))
""")


def _loss(score, x):
    return ((score(x, 0.5) + x) ** 2).sum(1).mean()


def test_two_gloo_ranks_agree_and_act_as_one_doubled_batch(tmp_path):
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "data.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(tmp_path / "worker.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=110, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["world"] == r1["world"] == 2
    # 1. after training the weights are identical on both ranks (bit for bit), and so is the logged loss
    for k in r0["state"]:
        assert torch.equal(r0["state"][k], r1["state"][k]), k
    assert r0["losses"] == r1["losses"]
    # 2. the effective batch is per-rank batch x world size: one process with batch 16 on the same
    #    data order reaches the same weights (up to float summation order)
    torch.manual_seed(0)
    ref = train(ScoreMLP(2, 16, 1), _loss, x, TrainConfig(steps=6, batch_size=16, lr=1e-2, warmup_steps=0,
                                                           device="cpu", progress=False))
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(ref.losses), rtol=1e-4, atol=1e-6)
    # 3. only rank 0 wrote the checkpoint; it holds the random states of both ranks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "data.pt", "rank0.pt", "rank1.pt", "worker.py"]
    ck = load_checkpoint(tmp_path / "ck.pt")
    assert ck["step"] == 6 and len(ck["rng"]) == 2
    for k in r0["state"]:
        assert torch.equal(ck["model"][k], r0["state"][k])
