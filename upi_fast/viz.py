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

__all__ = ["plot_perturbation", "plot_saliency_grid", "plot_metric_bars", "plot_sweep", "plot_transfer"]

_DIVERGING = "RdBu_r"   # blue < 0 < red, white at 0
_SALIENCY = "inferno"


def _wrap(text: str, width: int) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width)) if text else text


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
def plot_perturbation(delta: torch.Tensor, path: str | os.PathLike, title: str | None = None,
                      units: str = "model units") -> None:
    """Draw a perturbation ``delta`` (C, H, W), C = 1 or 3, to the PNG ``path``.

    One channel: a diverging colormap (blue negative, white 0, red positive) with limits
    ``±max|delta|`` and a colour bar in ``units``. Three channels: the RGB composite
    ``0.5 + delta / (2 max|delta|)`` (mid-grey = 0; no colour bar, an RGB image has no single
    scale) beside one signed map per channel (R, G, B) on one shared diverging scale, whose colour
    bar is in ``units``. The subtitle gives the L2 and Linf norms; axes are in pixels.
    """
    d = _as_cpu_tensor("delta", delta)
    if d.dim() != 3 or d.shape[0] not in (1, 3) or d.shape[1] == 0 or d.shape[2] == 0:
        raise ValueError(f"delta must have shape (C, H, W) with C = 1 or 3, got {tuple(d.shape)}")
    m = float(d.abs().max())
    lim = m if m > 0 else 1.0
    cbar = f"delta ({units})\nred = increase, blue = decrease"
    if d.shape[0] == 1:
        fig = _new_figure(5.0, 4.6)
        ax = fig.add_subplot()
        im = ax.imshow(d[0].numpy(), cmap=_DIVERGING, vmin=-lim, vmax=lim, interpolation="nearest")
        fig.colorbar(im, ax=ax, label=cbar)
        axes = [ax]
    else:
        fig = _new_figure(12.0, 3.9)
        axes = fig.subplots(1, 4)
        rgb = (0.5 + d / (2 * lim)).clamp(0, 1).permute(1, 2, 0).numpy()
        axes[0].imshow(rgb, interpolation="nearest")
        axes[0].set_title("RGB composite\n(mid-grey = 0, scaled to max |delta|)", fontsize=9)
        for c, name in enumerate(("red", "green", "blue")):
            im = axes[c + 1].imshow(d[c].numpy(), cmap=_DIVERGING, vmin=-lim, vmax=lim, interpolation="nearest")
            axes[c + 1].set_title(f"{name} channel", fontsize=9)
        fig.colorbar(im, ax=list(axes[1:]), label=cbar, shrink=0.85)
    for ax in axes:
        ax.set_xlabel("x (pixel)", fontsize=8)
        ax.set_ylabel("y (pixel)", fontsize=8)
        ax.tick_params(labelsize=7)
    l2, linf = float(d.norm()), m
    sub = f"L2 = {l2:.4g}, Linf = {linf:.4g} ({units}), shape {tuple(d.shape)}"
    fig.suptitle(f"{title}\n{sub}" if title else f"perturbation\n{sub}", fontsize=10)
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
                       images_after: torch.Tensor | None = None, title: str | None = None,
                       map_label: str = "saliency (share of the map's total)") -> None:
    """A grid with one row per sample: image, saliency before, saliency after, and the perturbed
    image when ``images_after`` is given.

    Args:
        images: (B, C, H, W) with C = 1 or 3; each image is min-max rescaled for display.
        maps_before, maps_after: (B, H*W) or (B, H, W) saliency maps; each row's two maps share one
            colour scale, so their intensities compare.
        path: the PNG to write.
        labels: optional per-sample labels (B,), written at the left of each row: class names
            (strings, e.g. an ImageFolder's ``classes[y]``) as they are, numbers as ``class N``.
        titles: optional column titles (as many as columns).
        max_rows: at most this many samples (the first ones) are drawn.
        images_after: optional (B, C, H, W) perturbed images.
        title: the figure's title (default: what the columns show).
        map_label: the label (with units) of each row's saliency colour bar.
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
    fig = _new_figure(2.0 * len(cols) + 0.8, 2.0 * rows + 0.8)
    fig.suptitle(title or "saliency maps before and after the perturbation (brighter = more salient; "
                 "one colour scale per row)", fontsize=9)
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
        cb = fig.colorbar(im, ax=[axes[r][1], axes[r][2]], shrink=0.8, format="%.2g")
        if r == rows - 1:
            cb.set_label(map_label, fontsize=7)
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=9)
        if labels is not None:
            lab = labels[r]
            axes[r][0].set_ylabel(lab if isinstance(lab, str) else f"class {lab}", fontsize=9)
    _save_png(fig, path)


# --------------------------------------------------------------------------------------------- metric bars
def plot_metric_bars(results: Mapping[str, Mapping[str, float]], path: str | os.PathLike,
                     metrics: Sequence[str] = ("dissimilarity", "topk_intersection", "spearman", "fooling_rate"),
                     title: str | None = None, caption: str | None = None) -> None:
    """Grouped bar chart: one group per metric, one bar per method, value written above each bar.

    Each group is labelled with the metric's readable name, unit and direction (e.g. "top-k
    intersection ... lower = stronger attack", :data:`upi_fast.report.METRIC_INFO`).

    Args:
        results: ``{method: {metric: value}}``; a metric a method lacks (or a NaN) leaves a gap.
        path: the PNG to write.
        metrics: the metrics to draw, in order; each must be present for at least one method.
        title: the title (default "interpretation attack metrics on the evaluation split").
        caption: a line under the axis, e.g. the samples used (:func:`upi_fast.report.samples_line`);
            default: built from the results' ``n`` / ``n_total`` when they carry them.
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
    fig_w = max(6.5, 2.6 + n_k * max(2.0, 0.35 * n_m + 0.6))
    fig = _new_figure(fig_w, 4.6)
    ax = fig.add_subplot()
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    for i, (meth, row) in enumerate(zip(methods, table)):
        xs = [j + (i - (n_m - 1) / 2) * width for j in range(n_k)]
        bars = ax.bar(xs, row, width=width * 0.95, label=meth, color=cmap(i % 10))
        ax.bar_label(bars, labels=["" if math.isnan(v) else f"{v:.3g}" for v in row], fontsize=7, padding=1)
    from .report import METRIC_INFO, samples_line

    ticks = []
    for k in metrics:
        name, unit, direction = METRIC_INFO.get(k, (k.replace("_", " "), "", ""))
        ticks.append("\n".join(_wrap(p, 22) for p in (name, f"({unit})" if unit else "", direction) if p))
    ax.set_xticks(range(n_k), ticks, fontsize=8)
    ax.set_ylabel("metric value (dimensionless)", fontsize=9)
    if caption is None:
        caption = samples_line([dict(v) for v in results.values()])
    ax.set_xlabel(_wrap(caption, int(fig_w * 11)) if caption else "metric", fontsize=8)
    ax.axhline(0.0, color="black", linewidth=0.6)
    finite = [v for row in table for v in row if not math.isnan(v)]
    lo, hi = min(0.0, min(finite)), max(1.0, max(finite))
    ax.set_ylim(lo - 0.05 * (hi - lo) if lo < 0 else 0.0, hi + 0.08 * (hi - lo))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title(title or "interpretation attack metrics on the evaluation split", fontsize=10)
    _save_png(fig, path)


# --------------------------------------------------------------------------------------------- sweep
def _finite_series(name: str, values, length: int) -> list[float]:
    vals = list(values)
    if len(vals) != length:
        raise ValueError(f"{name} must have {length} values (one per budget), got {len(vals)}")
    out = []
    for v in vals:
        try:
            out.append(math.nan if v is None else float(v))
        except (TypeError, ValueError):
            raise TypeError(f"{name} must hold numbers, got {v!r}") from None
    return out


def plot_sweep(budgets: Sequence[float], series: Mapping[str, Mapping[str, Sequence[float]]],
               path: str | os.PathLike, budget_label: str = "eps (model units)",
               metrics: Sequence[str] = ("dissimilarity", "topk_intersection", "fooling_rate"),
               ceiling: str | None = None, title: str | None = None, caption: str | None = None) -> None:
    """One panel per metric against the budget, one line per method (:func:`upi_fast.sweep.sweep`).

    Args:
        budgets: the budget axis, increasing (e.g. eps in grey levels).
        series: ``{method: {metric: [value per budget]}}``; None / NaN leaves a gap.
        path: the PNG to write.
        budget_label: the x axis label, with its unit.
        metrics: the panels, in order; each y axis is labelled with the metric's name, unit and
            which direction is a stronger attack (:data:`upi_fast.report.METRIC_INFO`).
        ceiling: the method drawn as the ceiling (dashed black, e.g. the per-image attack).
        title: the figure title. caption: a line under the panels (e.g. the samples used).
    """
    xs = _finite_series("budgets", budgets, len(list(budgets)))
    if not xs or any(math.isnan(v) for v in xs):
        raise ValueError("budgets must be a non-empty list of numbers")
    if any(b <= a for a, b in zip(xs, xs[1:])):
        raise ValueError(f"budgets must be strictly increasing, got {xs}")
    if not isinstance(series, Mapping) or not series:
        raise ValueError("series must be a non-empty dict {method: {metric: [values]}}")
    if ceiling is not None and ceiling not in series:
        raise ValueError(f"ceiling {ceiling!r} is not one of the methods {list(series)}")
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not metrics:
        raise ValueError("metrics must name at least one metric")
    data = {m: {k: _finite_series(f"series[{m!r}][{k!r}]", v.get(k, [None] * len(xs)), len(xs)) for k in metrics}
            for m, v in series.items()}
    from matplotlib import colormaps

    from .report import METRIC_INFO

    cmap = colormaps["tab10"]
    fig = _new_figure(4.2 * len(metrics) + 1.8, 4.3)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    colour = 0
    for meth, vals in data.items():
        is_ceiling = meth == ceiling
        style = dict(color="black", linestyle="--", marker="s") if is_ceiling else \
            dict(color=cmap(colour % 10), linestyle="-", marker="o")
        colour += 0 if is_ceiling else 1
        label = f"{meth} (ceiling)" if is_ceiling else meth
        for ax, k in zip(axes, metrics):
            ax.plot(xs, vals[k], label=label, markersize=4, linewidth=1.4, **style)
    for ax, k in zip(axes, metrics):
        name, unit, direction = METRIC_INFO.get(k, (k.replace("_", " "), "", ""))
        ax.set_title(f"{name}\n({direction})" if direction else name, fontsize=9)
        ax.set_ylabel(f"{name} ({unit})" if unit else name, fontsize=8)
        ax.set_xlabel(budget_label, fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        if k in ("topk_intersection", "fooling_rate"):
            ax.set_ylim(-0.03, 1.03)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.suptitle(title or "attack strength against the budget", fontsize=10)
    if caption:
        fig.supxlabel(_wrap(caption, 150), fontsize=8)
    _save_png(fig, path)


# --------------------------------------------------------------------------------------------- transfer
def plot_transfer(sources: Sequence[str], targets: Sequence[str], matrices: Mapping[str, Sequence[Sequence[float]]],
                  path: str | os.PathLike, target_notes: Sequence[str] | None = None, title: str | None = None,
                  caption: str | None = None) -> None:
    """Heat maps of a source x target transfer matrix (:func:`upi_fast.transfer.transfer`), one per
    metric, each cell annotated with its value.

    Args:
        sources: row labels (the model each UPI was computed on).
        targets: column labels (the model it is evaluated on).
        matrices: ``{metric: [[value per target] per source]}``; None / NaN draws a grey cell.
        path: the PNG to write.
        target_notes: optional extra line per target under its label (e.g. ``n = 8/20``).
        title: the figure title. caption: a line under the panels (e.g. the samples used).
    """
    rows, cols = [str(s) for s in sources], [str(t) for t in targets]
    if not rows or not cols:
        raise ValueError("sources and targets must both be non-empty")
    if not isinstance(matrices, Mapping) or not matrices:
        raise ValueError("matrices must be a non-empty dict {metric: [[value]]}")
    if target_notes is not None and len(target_notes) != len(cols):
        raise ValueError(f"target_notes must have {len(cols)} entries (one per target), got {len(target_notes)}")
    grids = {}
    for k, mat in matrices.items():
        mat = list(mat)
        if len(mat) != len(rows):
            raise ValueError(f"matrices[{k!r}] must have {len(rows)} rows (one per source), got {len(mat)}")
        grids[k] = [_finite_series(f"matrices[{k!r}][{i}]", r, len(cols)) for i, r in enumerate(mat)]
    import numpy as np
    from matplotlib import colormaps

    from .report import METRIC_INFO

    import textwrap
    wrap = lambda t: "\n".join(textwrap.wrap(t, 22, break_on_hyphens=False) or [t])
    col_labels = [wrap(c) if target_notes is None else f"{wrap(c)}\n{target_notes[j]}" for j, c in enumerate(cols)]
    row_labels = [wrap(r) for r in rows]
    side = 1.5 * len(cols) + 2.6
    fig = _new_figure(side * len(grids) + 1.6, 1.0 * len(rows) + 3.4)
    axes = fig.subplots(1, len(grids), squeeze=False)[0]
    for ax, (k, grid) in zip(axes, grids.items()):
        name, unit, direction = METRIC_INFO.get(k, (k.replace("_", " "), "", ""))
        arr = np.array(grid, dtype=float)
        cmap = colormaps["viridis"].with_extremes(bad="lightgrey")
        finite = arr[np.isfinite(arr)]
        vmin, vmax = (0.0, 1.0) if k in ("topk_intersection", "fooling_rate") else \
            (0.0, float(finite.max()) if finite.size and finite.max() > 0 else 1.0)
        im = ax.imshow(np.ma.masked_invalid(arr), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
        for i in range(arr.shape[0]):
            for j in range(arr.shape[1]):
                v = arr[i, j]
                txt = "-" if not math.isfinite(v) else f"{v:.3f}"
                light = math.isfinite(v) and (v - vmin) / ((vmax - vmin) or 1.0) < 0.6
                ax.text(j, i, txt, ha="center", va="center", fontsize=8, color="white" if light else "black")
        ax.set_xticks(range(len(cols)), col_labels, fontsize=7)
        ax.set_yticks(range(len(rows)), row_labels, fontsize=7)
        ax.set_xlabel("target model (UPI evaluated on)", fontsize=8)
        ax.set_ylabel("source model (UPI computed on)", fontsize=8)
        ax.set_title(f"{name}\n({direction})" if direction else name, fontsize=9)
        cb = fig.colorbar(im, ax=ax, shrink=0.85)
        cb.set_label(_wrap(f"{name} ({unit})" if unit else name, 34), fontsize=8)
        cb.ax.tick_params(labelsize=7)
    fig.suptitle(title or "transfer of universal perturbations across models", fontsize=10)
    if caption:
        fig.supxlabel(_wrap(caption, 140), fontsize=8)
    _save_png(fig, path)
