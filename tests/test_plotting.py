"""scorebook.plotting: grids, image tiling and the score-field arrows, checked against what they must draw."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from scorebook.densities import Gaussian, oracle_score  # noqa: E402
from scorebook.nets import ScoreMLP  # noqa: E402
from scorebook.plotting import (grid_2d, image_grid, plot_density, plot_samples, plot_score_field,  # noqa: E402
                                show_images)


def test_grid_2d_covers_the_box_row_by_row():
    X, Y, pts = grid_2d(((-1.0, 3.0), (0.0, 2.0)), n=5)
    assert X.shape == Y.shape == (5, 5) and pts.shape == (25, 2) and pts.dtype == torch.float64
    assert np.allclose(X[0], np.linspace(-1, 3, 5)) and np.allclose(Y[:, 0], np.linspace(0, 2, 5))
    assert torch.equal(pts[7], torch.tensor([X[1, 2], Y[1, 2]], dtype=torch.float64))  # ravel order matches X, Y


def test_image_grid_places_each_image_in_its_tile():
    x = torch.arange(6, dtype=torch.float32).reshape(6, 1, 1, 1).expand(6, 1, 2, 3) / 5  # image i is constant i/5
    grid = image_grid(x, nrow=2, pad=1)                   # 2 rows x 3 columns of 2x3 tiles
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1)
    for i in range(6):
        r, c = divmod(i, 3)
        tile = grid[1 + r * 3: 1 + r * 3 + 2, 1 + c * 4: 1 + c * 4 + 3]
        assert np.allclose(tile, i / 5)
    assert np.all(grid[0] == 1.0)                         # padding is white
    rgb = image_grid(torch.rand(4, 3, 5, 5), value_range=(0, 1))
    assert rgb.shape == (2 * 6 + 1, 2 * 6 + 1, 3)
    with pytest.raises(ValueError, match="image_grid needs images"):
        image_grid(torch.rand(4, 5))


def test_score_arrows_are_the_normalised_score():
    g = Gaussian([1.0, -1.0], std=0.5)
    fig, ax = plt.subplots()
    q = plot_score_field(ax, oracle_score(g), lim=2.0, n=7)
    X, Y, pts = grid_2d(2.0, 7)
    s = g.score(pts).numpy()
    s = s / np.linalg.norm(s, axis=1, keepdims=True)
    assert np.allclose(q.U.ravel(), s[:, 0]) and np.allclose(q.V.ravel(), s[:, 1])
    plt.close(fig)


def test_a_float32_network_can_be_drawn():
    """A trained network lives in float32 (maybe on a GPU); the grid is float64 on the CPU."""
    fig, ax = plt.subplots()
    net = ScoreMLP(2, 8, 1)
    q = plot_score_field(ax, net, lim=1.0, n=5, t=0.5, normalize=False)
    X, Y, pts = grid_2d(1.0, 5)
    with torch.no_grad():
        expect = net(pts.float(), 0.5).double().numpy()
    assert np.allclose(q.U.ravel(), expect[:, 0], atol=1e-6)
    plt.close(fig)


def test_density_contours_reach_the_peak_and_samples_need_2d():
    g = Gaussian([0.0, 0.0], std=1.0)
    fig, ax = plt.subplots()
    cs = plot_density(ax, g.log_prob, lim=3.0, n=101)
    assert cs.levels.max() >= 1 / (2 * np.pi) * 0.99       # the peak density 1/(2 pi) lies within the levels
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        plot_samples(ax, torch.zeros(5, 3))
    show_images(ax, torch.rand(4, 1, 8, 8), title="ok")
    plt.close(fig)


# ----- the explorer ------------------------------------------------------------------------
def test_explorer_redraws_on_every_control_change_without_an_output_widget():
    ipywidgets = pytest.importorskip("ipywidgets")
    from scorebook.plotting import explorer

    calls = []
    plt.close("all")

    def draw(sigma, n):
        calls.append((sigma, n))
        fig, ax = plt.subplots(figsize=(2, 2))
        ax.plot(range(n), [sigma] * n)
        return fig

    s = ipywidgets.FloatSlider(value=0.5, min=0.1, max=2.0)
    k = ipywidgets.IntSlider(value=3, min=2, max=9)
    box = explorer(draw, sigma=s, n=k)
    image = box.children[1]
    assert isinstance(image, ipywidgets.Image) and image.value[:8] == b"\x89PNG\r\n\x1a\n"
    first = image.value
    s.value = 1.5
    k.value = 7
    assert calls == [(0.5, 3), (1.5, 3), (1.5, 7)]
    assert image.value != first
    # no Output widget anywhere: nbclient would answer it through the kernel's shell socket
    def walk(w):
        yield w
        for c in getattr(w, "children", ()):
            yield from walk(c)
    assert not any(isinstance(w, ipywidgets.Output) for w in walk(box))
    assert plt.get_fignums() == []          # every rendered figure was closed, none left to show twice


def test_explorer_rejects_bad_controls_and_draws():
    ipywidgets = pytest.importorskip("ipywidgets")
    from scorebook.plotting import explorer

    with pytest.raises(ValueError, match="at least one control"):
        explorer(lambda: None)
    with pytest.raises(TypeError, match="control 'sigma' must be an ipywidgets value widget"):
        explorer(lambda sigma: None, sigma=0.5)
    with pytest.raises(TypeError, match="must return a matplotlib Figure"):
        explorer(lambda sigma: None, sigma=ipywidgets.FloatSlider())


def test_animation_html_needs_no_network_and_keeps_every_button():
    import re

    import matplotlib
    from matplotlib.animation import FuncAnimation

    from scorebook.plotting import animation_html

    matplotlib.use("Agg")
    fig, ax = plt.subplots()
    (line,) = ax.plot([0, 1], [0, 1])
    anim = FuncAnimation(fig, lambda k: [line], frames=3)
    raw = anim.to_jshtml()
    html = animation_html(anim, default_mode="loop")
    plt.close(fig)
    assert "https://" in raw and "https://" not in html and "http://" not in html
    # every icon class the player uses has a glyph in the inline style
    icons = set(re.findall(r"fa-[a-z-]+", raw)) - {"fa-flip-horizontal"}
    assert icons and all(f".{c}::before" in html for c in icons), icons
