"""The evaluation protocol: how much a perturbation changes interpretations, on held-out data.

On the evaluation split, correctly classified samples only, with the real network:
``dissimilarity`` = mean relative L2 ``||I - I'||_2 / ||I||_2``, ``topk_intersection`` (mean),
``spearman`` (mean rank correlation), ``center_of_mass_shift`` (mean, pixels) and
``fooling_rate`` (fraction of those samples whose predicted label changes under the
perturbation: lower is better, the goal is the explanation, not the label).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import metrics as M
from ._checks import check_model, eval_mode
from .data import as_batches
from .hvp import SaliencySpec
from .saliency import postprocess_maps, raw_gradient
from .solvers._common import resolve_device

__all__ = ["evaluate", "METRICS", "SaliencyFn"]

METRICS = ("dissimilarity", "topk_intersection", "spearman", "fooling_rate", "center_of_mass_shift")

SaliencyFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _saliency_fn(model, saliency, target_kind: str, saliency_kwargs: dict | None) -> SaliencyFn:
    """``fn(x, y) -> maps (B, N)``: a method name, or any object with ``attribute(inputs, target=...)``
    (a captum attribution, duck-typed), whose raw attributions are post-processed like ours."""
    kw = dict(saliency_kwargs or {})
    post = kw.pop("postprocess", "abs_sum_l1")
    if hasattr(saliency, "attribute") and callable(saliency.attribute):
        def fn(x, y):
            with torch.enable_grad():
                attr = saliency.attribute(x.detach().clone().requires_grad_(True), target=y)
            if not isinstance(attr, torch.Tensor) or attr.shape != x.shape:
                raise ValueError(f"saliency.attribute returned {type(attr).__name__} "
                                 f"{tuple(getattr(attr, 'shape', ()))}, expected a tensor of shape {tuple(x.shape)}")
            return postprocess_maps(attr.detach(), post)
        return fn
    spec = SaliencySpec(method=saliency, target_kind=target_kind, postprocess=post,
                        **{k: v for k, v in kw.items() if k != "k"})
    gen = torch.Generator()

    def fn(x, y):
        if spec.method == "smoothgrad":
            gen.manual_seed(0)
        g = raw_gradient(model, x, y, spec.method, spec.target_kind, False, spec.steps, spec.baseline,
                         spec.multiply_by_input, spec.smoothgrad_std, spec.n_samples,
                         gen if x.device.type == "cpu" else None)
        return postprocess_maps(g, spec.postprocess).detach()
    return fn


def evaluate(model, delta, data, saliency="simple", target_kind: str = "prob", k: int | None = None,
             metrics: Sequence[str] = ("dissimilarity", "topk_intersection", "spearman", "fooling_rate"),
             batch_size: int = 256, device=None, saliency_kwargs: dict | None = None,
             return_per_sample: bool = False) -> dict:
    """Evaluate ``delta`` on ``data`` against ``model``'s clean interpretations.

    Args:
        model: classifier returning logits (B, K) (the real network; eval mode).
        delta: (C, H, W) perturbation in model units, or a function ``fn(x, y) -> (B, C, H, W)``
            (per-sample perturbations, e.g. :func:`upi_fast.baselines.per_sample_random`).
        data: a DataLoader of ``(x, y)`` or a tuple ``(X, y)`` (the evaluation split).
        saliency: ``"simple"``, ``"integrated"``, ``"smoothgrad"``, or an object with
            ``attribute(inputs, target=...)`` (e.g. a captum attribution).
        target_kind: ``"prob"`` or ``"logit"``.
        k: top-k size for ``topk_intersection`` (default 10% of the pixels).
        metrics: any of :data:`METRICS`.
        batch_size: samples per batch when ``data`` is a tuple.
        device: where to compute (default: the model's device).
        saliency_kwargs: ``steps``, ``baseline``, ``multiply_by_input``, ``smoothgrad_std``,
            ``n_samples``, ``postprocess``.
        return_per_sample: also return the per-sample values under ``"per_sample"``.

    Returns:
        ``{metric: mean value, ..., "n": correctly classified samples used, "n_total": samples seen}``.
    """
    check_model(model)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"metrics has unknown names {unknown}; choose from {METRICS}")
    dev = resolve_device(device, model)
    sal = _saliency_fn(model, saliency, target_kind, saliency_kwargs)
    if not callable(delta):
        if not isinstance(delta, torch.Tensor) or delta.dim() != 3:
            raise ValueError(f"delta must be a (C, H, W) tensor or a function, got "
                             f"{tuple(delta.shape) if isinstance(delta, torch.Tensor) else type(delta).__name__}")
        if not bool(torch.isfinite(delta).all()):
            raise ValueError("delta contains NaN or Inf values")
        delta = delta.to(dev)
    per: dict[str, list] = {m: [] for m in metrics}
    n_total = 0
    with eval_mode(model):
        for x, y in as_batches(data, batch_size):
            x, y = x.to(dev), y.to(dev)
            n_total += x.shape[0]
            if not callable(delta) and tuple(delta.shape) != tuple(x.shape[1:]):
                raise ValueError(f"delta has shape {tuple(delta.shape)} but the images have shape {tuple(x.shape[1:])}")
            with torch.no_grad():
                logits = model(x)
            if logits.dim() != 2 or int(y.max()) >= logits.shape[1] or int(y.min()) < 0:
                raise ValueError(f"labels in data must be in [0, {logits.shape[1] - 1}]")
            keep = logits.argmax(1) == y
            if not bool(keep.any()):
                continue
            x, y = x[keep], y[keep]
            d = delta(x, y) if callable(delta) else delta
            x_adv = x + d.to(x.dtype)
            I, I_adv = sal(x, y), sal(x_adv, y)
            for m in metrics:
                if m == "dissimilarity":
                    per[m].append(M.relative_l2(I_adv, I).double())
                elif m == "topk_intersection":
                    per[m].append(M.topk_intersection(I_adv, I, k))
                elif m == "spearman":
                    per[m].append(M.spearman(I_adv, I))
                elif m == "center_of_mass_shift":
                    per[m].append(M.center_of_mass_shift(I_adv, I, shape=tuple(x.shape[2:])))
                else:
                    with torch.no_grad():
                        per[m].append((model(x_adv).argmax(1) != y).double())
    if n_total == 0:
        raise ValueError("data is empty")
    values = {m: torch.cat(v).cpu() if v else torch.zeros(0, dtype=torch.float64) for m, v in per.items()}
    n = int(next(iter(values.values())).numel()) if values else 0
    if n == 0:
        raise ValueError("the model classifies none of the samples in data correctly")
    out = {m: float(v.mean()) for m, v in values.items()}
    out["n"], out["n_total"] = n, n_total
    if return_per_sample:
        out["per_sample"] = values
    return out
