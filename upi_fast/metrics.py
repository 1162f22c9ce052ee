"""Evaluation metrics for interpretation maps, batched, torch only (no scipy at run time).

Maps are (B, N) tensors (or (B, H, W) where the spatial layout matters). Each function returns
one value per sample, shape (B,), in float64 for the rank-based ones.

* :func:`relative_l2`: ``||I - I_ref||_2 / ||I_ref||_2`` (the paper's metric);
* :func:`topk_intersection`: ``|topk(I) ∩ topk(I_ref)| / k`` (Ghorbani et al. 2019);
* :func:`spearman`: Spearman rank correlation, ties given their average rank;
* :func:`center_of_mass_shift`: distance in pixels between the maps' centres of mass;
* :func:`fooling_rate`: fraction of samples whose predicted label changed.
"""
from __future__ import annotations

import math

import torch

from .dissimilarity import default_k, dissimilarity

__all__ = ["relative_l2", "topk_intersection", "spearman", "center_of_mass_shift", "fooling_rate", "rankdata"]


def _pair(I: torch.Tensor, I_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(I, torch.Tensor) or not isinstance(I_ref, torch.Tensor):
        raise TypeError("I and I_ref must be torch.Tensors")
    if I.dim() < 2 or I.shape != I_ref.shape:
        raise ValueError(f"I and I_ref must have the same shape (B, N), got {tuple(I.shape)} and {tuple(I_ref.shape)}")
    return I.reshape(I.shape[0], -1), I_ref.reshape(I_ref.shape[0], -1)


def relative_l2(I: torch.Tensor, I_ref: torch.Tensor) -> torch.Tensor:
    """``||I - I_ref||_2 / ||I_ref||_2`` per sample: maps (B, N) (or (B, ...), flattened) -> (B,)
    in ``I``'s dtype, dimensionless."""
    a, r = _pair(I, I_ref)
    return dissimilarity(a, r, "rel_l2")


def topk_intersection(I: torch.Tensor, I_ref: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Fraction of the ``k`` largest entries of ``I_ref`` that are also among the ``k`` largest of
    ``I``, per sample (B,) in [0, 1]. ``k`` defaults to 10% of the pixels. Ties are broken by
    ``torch.topk``'s order."""
    a, r = _pair(I, I_ref)
    n = a.shape[1]
    k = default_k(n) if k is None else int(k)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    ma = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
    mr = torch.zeros_like(r, dtype=torch.bool).scatter_(1, r.topk(k, dim=1).indices, True)
    return (ma & mr).sum(1).to(torch.float64) / k


def rankdata(x: torch.Tensor) -> torch.Tensor:
    """Ranks (1-based, float64) along dim 1 of ``x`` (B, n) -> (B, n), ties receiving the average of
    their ranks."""
    B, n = x.shape
    s, order = x.sort(dim=1, stable=True)
    pos = torch.arange(n, device=x.device).expand(B, n)
    new_group = torch.ones_like(s, dtype=torch.bool)
    new_group[:, 1:] = s[:, 1:] != s[:, :-1]
    start = torch.where(new_group, pos, torch.zeros_like(pos)).cummax(1).values
    ends_here = torch.ones_like(new_group)
    ends_here[:, :-1] = new_group[:, 1:]
    big = torch.full_like(pos, n - 1)
    end = torch.where(ends_here, pos, big).flip(1).cummin(1).values.flip(1)
    avg = (start + end).to(torch.float64) / 2.0 + 1.0
    return torch.empty_like(avg).scatter_(1, order, avg)


def spearman(I: torch.Tensor, I_ref: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per sample (B,), float64 in [-1, 1]; the Pearson correlation of the
    average ranks (equal to ``1 - 6 sum d^2 / (n (n^2 - 1))`` without ties). A constant map gives 0."""
    a, r = _pair(I, I_ref)
    ra, rr = rankdata(a), rankdata(r)
    ra = ra - ra.mean(1, keepdim=True)
    rr = rr - rr.mean(1, keepdim=True)
    den = ra.norm(dim=1) * rr.norm(dim=1)
    return torch.where(den > 0, (ra * rr).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den))


def _as_grid(m: torch.Tensor, shape: tuple[int, int] | None) -> torch.Tensor:
    if m.dim() == 3:
        return m
    if m.dim() != 2:
        raise ValueError(f"maps must be (B, H, W) or (B, H*W), got {tuple(m.shape)}")
    if shape is None:
        side = math.isqrt(m.shape[1])
        if side * side != m.shape[1]:
            raise ValueError(f"maps of {m.shape[1]} pixels are not square: pass shape=(H, W)")
        shape = (side, side)
    if shape[0] * shape[1] != m.shape[1]:
        raise ValueError(f"shape {tuple(shape)} does not match maps of {m.shape[1]} pixels")
    return m.reshape(m.shape[0], *shape)


def center_of_mass_shift(I: torch.Tensor, I_ref: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """Euclidean distance in pixels between the centres of mass of ``|I|`` and ``|I_ref|``, (B,).

    Maps are (B, H, W), or (B, H*W) with ``shape=(H, W)`` (square maps need no shape). A zero
    map's centre is the image centre.
    """
    if not isinstance(I, torch.Tensor) or not isinstance(I_ref, torch.Tensor) or I.shape != I_ref.shape:
        raise ValueError("I and I_ref must be tensors of the same shape")
    a, r = _as_grid(I, shape).abs().to(torch.float64), _as_grid(I_ref, shape).abs().to(torch.float64)
    H, W = a.shape[1:]
    ys = torch.arange(H, dtype=torch.float64, device=a.device).view(1, H, 1)
    xs = torch.arange(W, dtype=torch.float64, device=a.device).view(1, 1, W)

    def com(m):
        tot = m.sum((1, 2))
        cy = torch.where(tot > 0, (m * ys).sum((1, 2)) / tot.clamp_min(1e-300), torch.full_like(tot, (H - 1) / 2))
        cx = torch.where(tot > 0, (m * xs).sum((1, 2)) / tot.clamp_min(1e-300), torch.full_like(tot, (W - 1) / 2))
        return cy, cx

    (ay, ax), (ry, rx) = com(a), com(r)
    return torch.sqrt((ay - ry) ** 2 + (ax - rx) ** 2)


def fooling_rate(pred_clean: torch.Tensor, pred_perturbed: torch.Tensor) -> float:
    """Fraction in [0, 1] of samples whose predicted label changed, from the predicted labels (B,)
    before and after the perturbation (lower is better for an interpretation attack, which should
    leave the label alone)."""
    if pred_clean.shape != pred_perturbed.shape:
        raise ValueError("pred_clean and pred_perturbed must have the same shape")
    if pred_clean.numel() == 0:
        raise ValueError("no predictions given")
    return float((pred_clean != pred_perturbed).to(torch.float64).mean())
