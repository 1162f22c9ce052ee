"""PNG figures: a perturbation, saliency maps before / after it, metric bars.

matplotlib is imported inside each function and used through ``matplotlib.figure.Figure`` with
the Agg canvas, never ``pyplot``: importing upi_fast stays fast, never opens a display and never
changes matplotlib's global backend. Every PNG is written atomically (:func:`upi_fast.io.write_bytes_atomic`).
"""
from __future__ import annotations

import io as _io
import math
import os
from typing import Mapping, Sequence

import torch

from .io import write_bytes_atomic

__all__ = ["plot_perturbation", "plot_saliency_grid", "plot_metric_bars"]

_DIVERGING = "RdBu_r"   # blue < 0 < red, white at 0
_SALIENCY = "inferno"


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path) -> None:
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes_atomic(path, buf.getvalue())


def _as_cpu_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        try:
            import numpy as np
            if isinstance(t, np.ndarray):
                t = torch.from_numpy(t)
        except ImportError:  # pragma: no cover
            pass
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_floating_point() or t.dtype in (torch.uint8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{name} must hold real numbers, got {t.dtype}")
    t = t.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf values")
    return t


# --------------------------------------------------------------------------------------------- perturbation
def plot_perturbation(delta: torch.Tensor, path: str | os.PathLike, title: str | None = None) -> None:
    """Draw a perturbation ``delta`` (C, H, W), C = 1 or 3, to the PNG ``path``.

    One channel: a diverging colormap (blue negative, white 0, red positive) with limits
    ``±max|delta|`` and a colorbar in model units. Three channels: an RGB image
    ``0.5 + delta / (2 max|delta|)`` (mid-grey = 0) with a grey colorbar giving the scale. The
    subtitle gives the L2 and Linf norms.
    """
    d = _as_cpu_tensor("delta", delta)
    if d.dim() != 3 or d.shape[0] not in (1, 3) or d.shape[1] == 0 or d.shape[2] == 0:
        raise ValueError(f"delta must have shape (C, H, W) with C = 1 or 3, got {tuple(d.shape)}")
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    m = float(d.abs().max())
    lim = m if m > 0 else 1.0
    fig = _new_figure(5.0, 4.4)
    ax = fig.add_subplot()
    if d.shape[0] == 1:
        im = ax.imshow(d[0].numpy(), cmap=_DIVERGING, vmin=-lim, vmax=lim, interpolation="nearest")
        fig.colorbar(im, ax=ax, label="delta (model units)")
    else:
        rgb = (0.5 + d / (2 * lim)).clamp(0, 1).permute(1, 2, 0).numpy()
        ax.imshow(rgb, interpolation="nearest")
        fig.colorbar(ScalarMappable(norm=Normalize(-lim, lim), cmap="gray"), ax=ax,
                     label="delta per channel (model units)")
    ax.set_xticks([])
    ax.set_yticks([])
    l2, linf = float(d.norm()), m
    sub = f"L2 = {l2:.4g}, Linf = {linf:.4g}, shape {tuple(d.shape)}"
    ax.set_title(f"{title}\n{sub}" if title else sub, fontsize=10)
    _save_png(fig, path)


# --------------------------------------------------------------------------------------------- saliency grid
def _display_image(img: torch.Tensor):
    """(C, H, W) -> an array imshow can draw, min-max rescaled to [0, 1] (inputs may be normalised)."""
    lo, hi = float(img.min()), float(img.max())
    x = (img - lo) / (hi - lo) if hi > lo else torch.zeros_like(img)
    return (x[0].numpy(), "gray") if x.shape[0] == 1 else (x.permute(1, 2, 0).numpy(), None)


def _maps(name: str, m, batch: int, hw: tuple[int, int]) -> torch.Tensor:
    t = _as_cpu_tensor(name, m)
    H, W = hw
    if t.dim() == 2 and t.shape == (batch, H * W):
        return t.view(batch, H, W)
    if t.dim() == 3 and t.shape == (batch, H, W):
        return t
    raise ValueError(f"{name} must have shape ({batch}, {H * W}) or ({batch}, {H}, {W}) to match images, "
                     f"got {tuple(t.shape)}")


def plot_saliency_grid(images: torch.Tensor, maps_before: torch.Tensor, maps_after: torch.Tensor,
                       path: str | os.PathLike,
                       labels: Sequence | None = None, titles: Sequence[str] | None = None, max_rows: int = 8,
                       images_after: torch.Tensor | None = None) -> None:
    """A grid with one row per sample: image, saliency before, saliency after, and the perturbed
    image when ``images_after`` is given.

    Args:
        images: (B, C, H, W) with C = 1 or 3; each image is min-max rescaled for display.
        maps_before, maps_after: (B, H*W) or (B, H, W) saliency maps; each row's two maps share one
            colour scale, so their intensities compare.
        path: the PNG to write.
        labels: optional per-sample labels (B,), written at the left of each row.
        titles: optional column titles (as many as columns).
        max_rows: at most this many samples (the first ones) are drawn.
        images_after: optional (B, C, H, W) perturbed images.
    """
    x = _as_cpu_tensor("images", images)
    if x.dim() != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(f"images must have shape (B, C, H, W) with B >= 1 and C = 1 or 3, got {tuple(x.shape)}")
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
    B, _, H, W = x.shape
    before = _maps("maps_before", maps_before, B, (H, W))
    after = _maps("maps_after", maps_after, B, (H, W))
    xa = None
    if images_after is not None:
        xa = _as_cpu_tensor("images_after", images_after)
        if xa.shape != x.shape:
            raise ValueError(f"images_after must have the shape of images {tuple(x.shape)}, got {tuple(xa.shape)}")
    if labels is not None:
        labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
        if len(labels) != B:
            raise ValueError(f"labels must have {B} entries (one per image), got {len(labels)}")
    cols = ["image", "saliency before", "saliency after"] + (["perturbed image"] if xa is not None else [])
    if titles is not None:
        titles = [str(t) for t in titles]
        if len(titles) != len(cols):
            raise ValueError(f"titles must have {len(cols)} entries (columns {cols}), got {len(titles)}")
        cols = titles
    rows = min(B, max_rows)
    fig = _new_figure(2.0 * len(cols) + 0.6, 2.0 * rows + 0.4)
    axes = fig.subplots(rows, len(cols), squeeze=False)
    for r in range(rows):
        lo = float(min(before[r].min(), after[r].min()))
        hi = float(max(before[r].max(), after[r].max()))
        if hi <= lo:
            hi = lo + 1.0
        img, cmap = _display_image(x[r])
        axes[r][0].imshow(img, cmap=cmap, interpolation="nearest")
        axes[r][1].imshow(before[r].numpy(), cmap=_SALIENCY, vmin=lo, vmax=hi, interpolation="nearest")
        im = axes[r][2].imshow(after[r].numpy(), cmap=_SALIENCY, vmin=lo, vmax=hi, interpolation="nearest")
        if xa is not None:
            img, cmap = _display_image(xa[r])
            axes[r][3].imshow(img, cmap=cmap, interpolation="nearest")
        fig.colorbar(im, ax=[axes[r][1], axes[r][2]], shrink=0.8, format="%.2g")
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
        if labels is not None:
            axes[r][0].set_ylabel(f"label {labels[r]}", fontsize=9)
    _save_png(fig, path)


# --------------------------------------------------------------------------------------------- metric bars
def plot_metric_bars(results: Mapping[str, Mapping[str, float]], path: str | os.PathLike,
                     metrics: Sequence[str] = ("dissimilarity", "topk_intersection", "spearman", "fooling_rate"),
                     title: str | None = None) -> None:
    """Grouped bar chart: one group per metric, one bar per method, value written above each bar.

    Args:
        results: ``{method: {metric: value}}``; a metric a method lacks (or a NaN) leaves a gap.
        path: the PNG to write.
        metrics: the metrics to draw, in order; each must be present for at least one method.
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError("results must be a non-empty dict {method: {metric: value}}")
    for meth, vals in results.items():
        if not isinstance(vals, Mapping):
            raise TypeError(f"results[{meth!r}] must be a dict {{metric: value}}, got {type(vals).__name__}")
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = list(metrics)
    if not metrics:
        raise ValueError("metrics must name at least one metric")
    methods = [str(m) for m in results]
    table: list[list[float]] = []
    for meth, vals in results.items():
        row = []
        for k in metrics:
            v = vals.get(k)
            if v is None:
                row.append(math.nan)
                continue
            try:
                row.append(float(v))
            except (TypeError, ValueError):
                raise TypeError(f"results[{meth!r}][{k!r}] must be a number, got {v!r}") from None
            if math.isinf(row[-1]):
                raise ValueError(f"results[{meth!r}][{k!r}] is infinite")
        table.append(row)
    absent = [k for j, k in enumerate(metrics) if all(math.isnan(row[j]) for row in table)]
    if absent:
        raise ValueError(f"metrics {absent} have no value for any method (methods have "
                         f"{sorted({k for v in results.values() for k in v})})")
    n_m, n_k = len(methods), len(metrics)
    width = 0.8 / n_m
    fig = _new_figure(max(5.0, 1.2 + n_k * (0.35 * n_m + 0.6)), 4.0)
    ax = fig.add_subplot()
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    for i, (meth, row) in enumerate(zip(methods, table)):
        xs = [j + (i - (n_m - 1) / 2) * width for j in range(n_k)]
        bars = ax.bar(xs, row, width=width * 0.95, label=meth, color=cmap(i % 10))
        ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.3g}" for v in row], fontsize=7, padding=1)
    ax.set_xticks(range(n_k), metrics, fontsize=9)
    ax.axhline(0.0, color="black", linewidth=0.6)
    finite = [v for row in table for v in row if not math.isnan(v)]
    lo, hi = min(0.0, min(finite)), max(1.0, max(finite))
    ax.set_ylim(lo - 0.05 * (hi - lo) if lo < 0 else 0.0, hi + 0.08 * (hi - lo))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    _save_png(fig, path)
