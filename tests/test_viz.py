"""PNG figures: each writes a readable PNG; bad shapes get clear errors; pyplot is never imported."""
import os
import subprocess
import sys

import pytest
import torch

from upi_fast.viz import plot_metric_bars, plot_perturbation, plot_saliency_grid

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
    from matplotlib.image import imread
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert float(img[..., :3].std()) > 0.01  # something was drawn
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    return img


@pytest.mark.parametrize("shape", [(1, 16, 16), (3, 12, 10)])
def test_plot_perturbation(tmp_path, shape):
    path = tmp_path / "delta.png"
    plot_perturbation(torch.randn(shape) * 0.1, path, title="UPI-Grad, eps = 0.5")
    _check_png(path)


def test_plot_perturbation_zero_and_errors(tmp_path):
    plot_perturbation(torch.zeros(1, 8, 8), tmp_path / "zero.png")  # no division by zero
    assert (tmp_path / "zero.png").read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match=r"delta must have shape \(C, H, W\) with C = 1 or 3"):
        plot_perturbation(torch.randn(2, 8, 8), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="delta must have shape"):
        plot_perturbation(torch.randn(8, 8), tmp_path / "bad.png")
    with pytest.raises(ValueError, match="NaN"):
        plot_perturbation(torch.full((1, 4, 4), float("nan")), tmp_path / "bad.png")
    with pytest.raises(TypeError, match="delta must be a torch.Tensor"):
        plot_perturbation([[[0.0]]], tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.parametrize("channels,flat", [(1, True), (3, False)])
def test_plot_saliency_grid(tmp_path, channels, flat):
    B, H, W = 5, 9, 7
    x = torch.rand(B, channels, H, W)
    before = torch.rand(B, H * W) if flat else torch.rand(B, H, W)
    after = torch.rand(B, H * W) if flat else torch.rand(B, H, W)
    path = tmp_path / "grid.png"
    plot_saliency_grid(x, before, after, path, labels=torch.arange(B), max_rows=3,
                       images_after=(x + 0.05 * torch.randn_like(x)) if channels == 3 else None)
    img = _check_png(path)
    assert img.shape[0] > img.shape[1] * 0.6  # three rows drawn
    path2 = tmp_path / "titled.png"
    plot_saliency_grid(x[:1], before[:1], after[:1], path2, titles=["x", "I(x)", "I(x + delta)"])
    _check_png(path2)


def test_plot_saliency_grid_errors(tmp_path):
    x = torch.rand(4, 1, 6, 6)
    m = torch.rand(4, 36)
    with pytest.raises(ValueError, match=r"maps_before must have shape \(4, 36\) or \(4, 6, 6\)"):
        plot_saliency_grid(x, torch.rand(4, 35), m, tmp_path / "g.png")
    with pytest.raises(ValueError, match="maps_after must have shape"):
        plot_saliency_grid(x, m, torch.rand(3, 36), tmp_path / "g.png")
    with pytest.raises(ValueError, match=r"images must have shape \(B, C, H, W\)"):
        plot_saliency_grid(x[:, 0], m, m, tmp_path / "g.png")
    with pytest.raises(ValueError, match="images_after must have the shape"):
        plot_saliency_grid(x, m, m, tmp_path / "g.png", images_after=x[:2])
    with pytest.raises(ValueError, match="labels must have 4 entries"):
        plot_saliency_grid(x, m, m, tmp_path / "g.png", labels=[1, 2])
    with pytest.raises(ValueError, match="titles must have 3 entries"):
        plot_saliency_grid(x, m, m, tmp_path / "g.png", titles=["a"])
    with pytest.raises(ValueError, match="max_rows"):
        plot_saliency_grid(x, m, m, tmp_path / "g.png", max_rows=0)
    assert list(tmp_path.iterdir()) == []


def test_plot_metric_bars(tmp_path):
    results = {
        "upi_grad": {"dissimilarity": 0.48, "topk_intersection": 0.42, "spearman": 0.31, "fooling_rate": 0.08},
        "random": {"dissimilarity": 0.23, "topk_intersection": 0.81, "spearman": 0.74, "fooling_rate": 0.003},
        "pca": {"dissimilarity": 0.46, "spearman": -0.05},  # a missing metric leaves a gap
    }
    path = tmp_path / "bars.png"
    plot_metric_bars(results, path)
    _check_png(path)
    plot_metric_bars(results, tmp_path / "one.png", metrics=["dissimilarity"], title="digits")
    _check_png(tmp_path / "one.png")


def test_plot_metric_bars_errors(tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        plot_metric_bars({}, tmp_path / "b.png")
    with pytest.raises(ValueError, match=r"\['nope'\] have no value"):
        plot_metric_bars({"a": {"dissimilarity": 0.3}}, tmp_path / "b.png", metrics=("dissimilarity", "nope"))
    with pytest.raises(TypeError, match=r"results\['a'\]\['dissimilarity'\] must be a number"):
        plot_metric_bars({"a": {"dissimilarity": "high"}}, tmp_path / "b.png", metrics=("dissimilarity",))
    with pytest.raises(TypeError, match=r"results\['a'\] must be a dict"):
        plot_metric_bars({"a": 0.5}, tmp_path / "b.png")
    assert list(tmp_path.iterdir()) == []


def test_no_display_no_pyplot(tmp_path):
    """Importing upi_fast never loads matplotlib; plotting never loads pyplot (even with an
    interactive MPLBACKEND and no display)."""
    png = str(tmp_path / "p.png")
    code = ("import sys, torch, upi_fast, upi_fast.viz, upi_fast.io, upi_fast.data, upi_fast.models; "
            "print('matplotlib' in sys.modules); "
            f"upi_fast.viz.plot_perturbation(torch.ones(1, 4, 4), {png!r}); "
            "print('matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MPLBACKEND": "TkAgg", "DISPLAY": ""})
    assert out.stdout.split() == ["False", "False"]
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_SIGNATURE
