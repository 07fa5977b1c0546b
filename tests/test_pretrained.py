"""scorebook.pretrained: a model file keeps the EMA weights (float16 parameters, exact buffers) and the model
description of a training run, and loads back into the same network."""
import pytest
import torch

from scorebook.cli import main as cli_main
from scorebook.pretrained import MODEL_FORMAT, export_model, image_shape, load_model
from scorebook.sde import VPSDE
from scorebook.train import load_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_run")
    assert cli_main(["train", "--preset", "digits", "--steps", "3", "--batch-size", "16", "--out", str(out),
                     "--no-progress", "--threads", "1"]) == 0
    return out / "checkpoint.pt"


def test_full_precision_export_reproduces_the_ema_model_exactly(run, tmp_path):
    path = export_model(run, tmp_path / "m.pt", command="python -m scorebook train --preset digits", half=False)
    model, sde, meta = load_model(path)
    ema = load_checkpoint(run)["ema"]["module"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, ema[k]), k
    assert isinstance(sde, VPSDE) and not model.training
    assert meta["step"] == 3 and len(meta["losses"]) == 3 and meta["command"].startswith("python -m scorebook")
    assert image_shape(meta) == (1, 8, 8)
    x = torch.randn(4, 1, 8, 8)
    assert model(x, 0.5).shape == x.shape


def test_half_precision_rounds_parameters_only(run, tmp_path):
    path = export_model(run, tmp_path / "m16.pt", command="train")
    model, _, _ = load_model(path)
    ema = load_checkpoint(run)["ema"]["module"]
    params = dict(model.named_parameters())
    for k, v in model.state_dict().items():
        if k in params:  # exactly the float16 rounding of the trained value, no other change
            assert torch.equal(v, ema[k].half().float()), k
        else:            # buffers (the fixed random Fourier frequencies) are kept exactly
            assert torch.equal(v, ema[k]), k
    full = torch.load(path, weights_only=True)
    assert full["format"] == MODEL_FORMAT
    assert all(full["ema"][k].dtype == torch.float16 for k in params)
    # half the bytes of the parameters, and far below the training checkpoint (which also holds Adam's moments)
    assert path.stat().st_size < 0.3 * run.stat().st_size


def test_clear_errors(run, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="not a scorebook model file"):
        load_model(run)  # a training checkpoint is not a model file
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="truncated, corrupt"):
        load_model(tmp_path / "junk.pt")
    with pytest.raises(ValueError, match="command"):
        export_model(run, tmp_path / "m.pt", command=" ")
    with pytest.raises(ValueError, match="U-Net"):
        image_shape({"net": {"kind": "mlp"}})
