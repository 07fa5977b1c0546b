"""The score contract: ``score(x, t)`` returns a tensor shaped like ``x``; helpers enforce it."""
import math

import pytest
import torch

from scorebook.contract import as_time, check_finite, check_positive, default_device, evaluate_score


def test_as_time_broadcasts_a_number_to_x_batch_dtype_and_device():
    x = torch.zeros(7, 3, dtype=torch.float32)
    t = as_time(0.25, x)
    assert t.shape == (7,) and t.dtype == torch.float32 and t.device == x.device
    assert torch.equal(t, torch.full((7,), 0.25))


def test_as_time_accepts_0d_and_per_sample_tensors_and_casts_to_x_dtype():
    x = torch.zeros(4, 2, dtype=torch.float64)
    t0 = as_time(torch.tensor(0.5, dtype=torch.float32), x)
    assert t0.shape == (4,) and t0.dtype == torch.float64 and (t0 == 0.5).all()
    tb = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float32)
    t1 = as_time(tb, x)
    assert t1.dtype == torch.float64
    torch.testing.assert_close(t1, tb.double())


def test_as_time_rejects_wrong_batch_and_non_numbers():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"t must be .*\(4,\)"):
        as_time(torch.zeros(3), x)
    with pytest.raises(TypeError, match="t must be"):
        as_time("0.5", x)


def test_evaluate_score_passes_a_valid_score_through_unchanged():
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    out = evaluate_score(lambda y, t: -y * (1 + as_time(t, y))[:, None], x, 1.0)
    torch.testing.assert_close(out, -2 * x)


@pytest.mark.parametrize("bad", [lambda x, t: x.sum(1), lambda x, t: x[:, :2], lambda x, t: x[None]])
def test_evaluate_score_rejects_output_not_shaped_like_x(bad):
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"shaped like x \(5, 3\)"):
        evaluate_score(bad, x, 0.0)


def test_evaluate_score_rejects_nan_inf_and_non_tensors():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_score(lambda y, t: y * float("nan"), x, 0.0)
    with pytest.raises(ValueError, match="infinite"):
        evaluate_score(lambda y, t: y / 0.0 + 1.0, x, 0.0)
    with pytest.raises(TypeError, match="must return a tensor"):
        evaluate_score(lambda y, t: y.numpy(), x, 0.0)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf"), [1.0, 0.0]])
def test_check_positive_names_the_argument(value):
    with pytest.raises(ValueError, match="sigma must be finite and > 0"):
        check_positive("sigma", value)
    check_positive("sigma", 1e-12)  # a tiny positive value is fine


def test_check_finite_counts_bad_entries():
    with pytest.raises(ValueError, match="x contains 1 NaN and 2 infinite"):
        check_finite("x", torch.tensor([1.0, math.nan, math.inf, -math.inf]))


def test_default_device_honours_preference_and_falls_back_in_documented_order():
    assert default_device("cpu") == torch.device("cpu")
    dev = default_device()
    if torch.cuda.is_available():
        assert dev.type == "cuda"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        assert dev.type == "mps"
    else:
        assert dev == torch.device("cpu")
