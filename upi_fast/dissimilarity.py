"""Dissimilarities D(I, I_ref) between interpretation maps: the attack losses.

All take maps of shape (B, N) (any trailing shape is flattened) and return one value per sample
(``reduction="none"``), or their mean / sum. ``I`` is the perturbed map, ``I_ref`` the reference.

* ``l2``:     ``||I - I_ref||_2`` (the paper's attack loss);
* ``rel_l2``: ``||I - I_ref||_2 / ||I_ref||_2`` (the evaluation metric);
* ``cosine``: ``1 - <I, I_ref> / (||I|| ||I_ref||)``;
* ``topk``:   ``1 - (mass of I on the top-k pixels of I_ref) / (mass of I on all pixels)``,
  a smooth (linear in I) top-k loss in the spirit of Ghorbani et al. 2019; ``k`` defaults to
  10% of the pixels.

Every kind is differentiable with respect to ``I``, and defined (never NaN) for zero maps and at
``I = I_ref`` (where ``l2`` takes the subgradient 0).
"""
from __future__ import annotations

import torch

from ._checks import check_choice

__all__ = ["dissimilarity", "KINDS", "default_k"]

#: Dissimilarity kinds accepted by :func:`dissimilarity` (see the module docstring).
KINDS = ("l2", "rel_l2", "cosine", "topk")
_TINY = 1e-30


def _safe_norm(v: torch.Tensor) -> torch.Tensor:
    """Row L2 norms (B,) with gradient 0 at the zero vector instead of NaN."""
    sq = (v * v).sum(1)
    pos = sq > 0
    return torch.where(pos, torch.where(pos, sq, torch.ones_like(sq)).sqrt(), torch.zeros_like(sq))


def default_k(n: int) -> int:
    """Default top-k size: 10% of the ``n`` pixels, at least 1."""
    return max(1, n // 10)


def dissimilarity(I: torch.Tensor, I_ref: torch.Tensor, kind: str = "l2", reduction: str = "none",
                  k: int | None = None) -> torch.Tensor:
    """Dissimilarity of maps ``I`` (B, N) from reference maps ``I_ref`` (B, N).

    Args:
        I: perturbed maps, (B, N) or (B, ...) (flattened), floating point.
        I_ref: reference maps, same shape.
        kind: ``"l2"``, ``"rel_l2"``, ``"cosine"`` or ``"topk"``.
        reduction: ``"none"`` -> (B,), ``"mean"`` or ``"sum"`` -> scalar.
        k: pixels in the top-k set for ``kind="topk"`` (default :func:`default_k`).

    Returns:
        Dissimilarities in ``I``'s dtype (dimensionless).
    """
    check_choice("kind", kind, KINDS)
    check_choice("reduction", reduction, ("none", "mean", "sum"))
    if not isinstance(I, torch.Tensor) or not isinstance(I_ref, torch.Tensor):
        raise TypeError("I and I_ref must be torch.Tensors")
    if I.dim() < 2 or I.shape != I_ref.shape:
        raise ValueError(f"I and I_ref must have the same shape (B, N), got {tuple(I.shape)} and {tuple(I_ref.shape)}")
    a = I.reshape(I.shape[0], -1)
    r = I_ref.reshape(I_ref.shape[0], -1).to(a.dtype)
    if kind == "l2":
        d = _safe_norm(a - r)
    elif kind == "rel_l2":
        rn = _safe_norm(r)
        d = _safe_norm(a - r) / torch.where(rn > 0, rn, torch.full_like(rn, _TINY))
    elif kind == "cosine":
        denom = _safe_norm(a) * _safe_norm(r)
        pos = denom > 0  # a zero map: 1, with gradient 0
        d = torch.where(pos, 1.0 - (a * r).sum(1) / torch.where(pos, denom, torch.ones_like(denom)),
                        torch.ones_like(denom))
    else:
        n = a.shape[1]
        kk = default_k(n) if k is None else int(k)
        if not 1 <= kk <= n:
            raise ValueError(f"k must be in [1, {n}], got {k}")
        idx = r.topk(kk, dim=1).indices
        total = a.abs().sum(1)
        top = a.abs().gather(1, idx).sum(1)
        d = torch.where(total > 0, 1.0 - top / torch.where(total > 0, total, torch.ones_like(total)),
                        torch.ones_like(total))
    if reduction == "mean":
        return d.mean()
    if reduction == "sum":
        return d.sum()
    return d
