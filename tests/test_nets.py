"""scorebook.nets: both networks fulfil the score contract at every supported shape."""
import pytest
import torch

from scorebook.contract import evaluate_score
from scorebook.losses import sde_loss
from scorebook.nets import ScoreMLP, ScoreUNet, count_parameters, sigma_scale
from scorebook.sde import VESDE, VPSDE



@pytest.mark.parametrize("embed", ["fourier", "sinusoidal"])
def test_mlp_is_a_score_and_conditions_per_sample(embed):
    torch.manual_seed(0)
    net = ScoreMLP(3, hidden=32, n_layers=2, embed=embed)
    x, t = torch.randn(5, 3), torch.rand(5)
    out = evaluate_score(net, x, t)  # shape and finiteness enforced by the contract
    # each sample is conditioned on its own t: batch call == one call per sample
    rows = torch.cat([net(x[i:i + 1], t[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(out, rows, rtol=1e-5, atol=1e-6)
    # and t matters
    assert (net(x, t) - net(x, t + 0.3)).abs().max() > 1e-4


@pytest.mark.parametrize("res, channels_in, mults", [(8, 1, (1, 2)), (28, 1, (1, 2, 2)), (32, 3, (1, 2, 2))])
def test_unet_shapes_and_per_sample_conditioning(res, channels_in, mults):
    torch.manual_seed(0)
    net = ScoreUNet(channels_in, channels=16, channel_mults=mults, n_res_blocks=1)
    x, t = torch.randn(2, channels_in, res, res), torch.tensor([0.1, 0.9])
    out = evaluate_score(net, x, t)
    rows = torch.cat([net(x[i:i + 1], t[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(out, rows, rtol=1e-4, atol=1e-5)
    assert (net(x, 0.1) - net(x, 0.9)).abs().max() > 1e-4


def test_28x28_padding_does_not_leak_between_samples_or_crop_wrongly():
    # a 28x28 input is padded to 32x32 inside; the output must depend on the real pixels only
    torch.manual_seed(1)
    net = ScoreUNet(1, channels=16, channel_mults=(1, 2, 2), n_res_blocks=1).eval()
    x = torch.randn(1, 1, 28, 28, requires_grad=True)
    out = net(x, 0.5)
    out[0, 0, 27, 27].backward()  # the bottom-right output pixel depends on the input near it
    assert x.grad[0, 0, 24:, 24:].abs().sum() > 0


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(0.01, 10.0)])
def test_scale_by_marginal_std(sde):
    torch.manual_seed(0)
    scaled = ScoreMLP(2, hidden=16, n_layers=1, scale=sde)
    raw = ScoreMLP(2, hidden=16, n_layers=1)
    raw.load_state_dict(scaled.state_dict())
    x, t = torch.randn(4, 2), torch.tensor([0.01, 0.2, 0.5, 1.0])
    std = sde.marginal_std(t).float()
    torch.testing.assert_close(scaled(x, t), raw(x, t) / std[:, None])


def test_sigma_world_divides_by_t_and_embeds_log_sigma():
    torch.manual_seed(0)
    unet = ScoreUNet(1, channels=8, channel_mults=(1, 2), n_res_blocks=1, scale=sigma_scale, log_time=True)
    raw = ScoreUNet(1, channels=8, channel_mults=(1, 2), n_res_blocks=1, log_time=True)
    raw.load_state_dict(unet.state_dict())
    x, sig = torch.randn(2, 1, 8, 8), torch.tensor([0.05, 20.0])
    torch.testing.assert_close(unet(x, sig), raw(x, sig) / sig[:, None, None, None])
    with pytest.raises(ValueError, match="t > 0"):
        unet(x, 0.0)


def test_every_parameter_gets_a_gradient_through_a_loss():
    torch.manual_seed(0)
    sde = VPSDE()
    net = ScoreUNet(1, channels=8, channel_mults=(1, 2), n_res_blocks=1, scale=sde)
    loss = sde_loss(net, torch.rand(4, 1, 8, 8), sde)
    loss.backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
            or p.grad.abs().sum() == 0]
    assert not dead, dead
    assert count_parameters(net) == sum(p.numel() for p in net.parameters())


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="embed"):
        ScoreMLP(2, embed="wavelet")
    with pytest.raises(ValueError, match="hidden"):
        ScoreMLP(2, hidden=0)
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        ScoreMLP(2)(torch.randn(3, 4), 0.5)
    with pytest.raises(ValueError, match="channel_mults"):
        ScoreUNet(1, channel_mults=())
    with pytest.raises(ValueError, match="3, H, W"):
        ScoreUNet(3, channels=8, channel_mults=(1,))(torch.randn(2, 1, 8, 8), 0.5)
    with pytest.raises(TypeError, match="scale"):
        ScoreMLP(2, scale=3.0)
