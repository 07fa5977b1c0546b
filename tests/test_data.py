"""scorebook.data: digits split, dequantization, transforms, toys, and user images (made on the fly)."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from scorebook.data import ImageTransform, TensorData, load_digits, load_images, toy_data
from scorebook.likelihood import dequantize
from scorebook.densities import make_toy


def test_digits_split_is_seeded_complete_and_integer():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert a.train_x.shape[0] + a.test_x.shape[0] == 1797 and a.test_x.shape[0] == round(0.2 * 1797)
    assert a.train_x.shape[1:] == (1, 8, 8) and a.n_levels == 17
    assert torch.equal(a.test_x, b.test_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.test_x, c.test_x)
    allx = torch.cat([a.train_x, a.test_x])
    assert allx.min() == 0 and allx.max() == 16 and allx.dtype == torch.int64
    # the split is a partition: pooled label counts equal sklearn's
    from sklearn.datasets import load_digits as sk

    counts = torch.bincount(torch.cat([a.train_y, a.test_y]), minlength=10)
    assert torch.equal(counts, torch.bincount(torch.as_tensor(sk().target), minlength=10))
    assert (torch.bincount(a.test_y, minlength=10) > 0).all()


def test_uniform_dequantization_fills_each_cell_uniformly():
    n_levels = 17
    x = torch.randint(0, n_levels, (20000,), generator=torch.Generator().manual_seed(0))
    y = dequantize(x, n_levels, torch.Generator().manual_seed(1))
    assert torch.equal(torch.floor(y * n_levels).long(), x)  # each y lies in its own cell [x, x+1)/n
    u = y * n_levels - x  # should be U[0, 1): mean 1/2, var 1/12
    se = math.sqrt(1 / 12 / u.numel())
    assert abs(u.mean().item() - 0.5) < 4 * se
    assert abs(u.var().item() - 1 / 12) < 0.005  # s.e. of the variance is ~ 0.0005 here
    with pytest.raises(ValueError, match="n_levels"):
        dequantize(x, 1)
    with pytest.raises(ValueError, match=r"data must lie in \{0, \.\.\., 16\}"):
        dequantize(torch.tensor([0, 17]), 17)


def test_image_transform_ranges_and_flip():
    x = torch.tensor([[[[0, 16], [8, 16]]]])  # (1, 1, 2, 2)
    grid01 = ImageTransform(17, (0, 1), dequantize=False)(x)
    torch.testing.assert_close(grid01, x.float() / 16)
    gridpm = ImageTransform(17, (-1, 1), dequantize=False)(x)
    assert gridpm.min() == -1 and gridpm.max() == 1
    # the (-1, 1) map is the affine image of the (0, 1) one, with the same noise
    y01 = ImageTransform(17, (0, 1))(x, torch.Generator().manual_seed(3))
    ypm = ImageTransform(17, (-1, 1))(x, torch.Generator().manual_seed(3))
    torch.testing.assert_close(ypm, 2 * y01 - 1)
    torch.testing.assert_close(ImageTransform(17, (-1, 1)).to_unit(ypm), y01)
    # horizontal flips: about half of a batch, and a flipped image is the mirror image
    imgs = torch.arange(4).repeat(400, 1, 4, 1)  # (400, 1, 4, 4), each row 0 1 2 3
    out = ImageTransform(4, dequantize=False, hflip=True)(imgs, torch.Generator().manual_seed(0))
    flipped = out[:, 0, 0, 0] == 1.0
    assert 0.4 < flipped.float().mean() < 0.6  # 400 fair coins: s.e. 0.025
    torch.testing.assert_close(out[flipped], (imgs[flipped].float() / 3).flip(-1))
    with pytest.raises(ValueError, match="value_range"):
        ImageTransform(256, (0, 255))


def test_toy_data_matches_make_toy_and_tensordata_batches():
    x = toy_data("moons", 100, seed=5)
    assert x.dtype == torch.float32
    torch.testing.assert_close(x, make_toy("moons", 100, torch.Generator().manual_seed(5)).float())
    d = TensorData(x)
    assert len(d) == 100 and torch.equal(d.batch(torch.tensor([3, 7])), x[[3, 7]])
    with pytest.raises(ValueError, match="TensorData.x"):
        TensorData(torch.zeros(5))


def test_npz_and_npy_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", x=grey, y=np.arange(5))
    np.savez(tmp_path / "rgb.npz", images=rgb)
    np.save(tmp_path / "rgb.npy", rgb.transpose(0, 3, 1, 2))
    g = load_images(tmp_path / "grey.npz")
    assert g.shape == (5, 1, 28, 28) and g.dtype == torch.uint8
    assert np.array_equal(g[:, 0].numpy(), grey)
    r = load_images(tmp_path / "rgb.npz")
    assert r.shape == (4, 3, 32, 32) and np.array_equal(r.permute(0, 2, 3, 1).numpy(), rgb)
    assert torch.equal(load_images(tmp_path / "rgb.npy"), r)


def test_folder_of_images_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    arrs = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    for i, a in enumerate(arrs):
        Image.fromarray(a).save(tmp_path / f"img{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    x = load_images(tmp_path)
    assert x.shape == (3, 3, 8, 8) and np.array_equal(x.permute(0, 2, 3, 1).numpy(), arrs)
    Image.fromarray(arrs[0, :4]).save(tmp_path / "img9.png")  # a different size
    with pytest.raises(ValueError, match="share one size"):
        load_images(tmp_path)


def test_bad_user_data_gives_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images(tmp_path / "missing.npz")
    np.savez(tmp_path / "float.npz", x=np.random.rand(2, 8, 8))
    with pytest.raises(ValueError, match="integers in \\[0, 255\\]"):
        load_images(tmp_path / "float.npz")
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 8, 8), np.uint8), b=np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="none is called 'x'.*--data-key NAME"):
        load_images(tmp_path / "two.npz")
    assert load_images(tmp_path / "two.npz", key="b").shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="no array 'c'"):
        load_images(tmp_path / "two.npz", key="c")
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((50, 8, 8), np.uint8))
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_images(tmp_path / "cut.npz")
    np.savez(tmp_path / "flat.npz", x=np.zeros((10, 64), np.uint8))
    with pytest.raises(ValueError, match="expected images shaped"):
        load_images(tmp_path / "flat.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        load_images(tmp_path / "empty")
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(ValueError, match=".npz or .npy"):
        load_images(tmp_path / "data.csv")
