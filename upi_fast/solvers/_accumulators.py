"""Row accumulators for UPI-PCA: where the direction matrix G goes, block by block.

Every accumulator has ``update(rows)`` (rows: (b, d)) and ``finalize(k) -> (S (k,), Vh (k, d))``.
``ExactRows`` holds G in memory (float32) and solves exactly in float64; the others come from
:mod:`upi_fast.linalg` and never hold G.
"""
from __future__ import annotations

import math

import torch

__all__ = ["SOLVERS", "ExactRows", "make_accumulator", "pca_plus_direction"]

SOLVERS = ("auto", "exact", "sketch", "frequent_directions", "subspace", "block_krylov")


def _normalize(rows: torch.Tensor) -> torch.Tensor:
    n = rows.norm(dim=1, keepdim=True)
    return torch.where(n > 0, rows / n.clamp_min(1e-30), torch.zeros_like(rows))


class ExactRows:
    """G kept in memory; exact top singular vectors through the Gram matrix of the smaller side."""

    def __init__(self, d: int, normalize_rows: bool, device) -> None:
        self.d, self.normalize_rows, self.device = d, normalize_rows, device
        self.blocks: list[torch.Tensor] = []

    def update(self, rows: torch.Tensor) -> None:
        if rows.dim() != 2 or rows.shape[1] != self.d:
            raise ValueError(f"rows must have shape (b, {self.d}), got {tuple(rows.shape)}")
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("rows contain NaN or Inf values")
        rows = rows.detach().float()
        self.blocks.append(_normalize(rows) if self.normalize_rows else rows)

    def matrix(self) -> torch.Tensor:
        if not self.blocks:
            raise ValueError("no rows were accumulated")
        return torch.cat(self.blocks)

    @property
    def frobenius_sq(self) -> float:
        return float(sum(b.double().pow(2).sum() for b in self.blocks))

    def finalize(self, k: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        G = self.matrix().double()
        n, d = G.shape
        k = min(k, n, d)
        if n <= d:
            evals, U = torch.linalg.eigh(G @ G.T)
            evals, U = evals.flip(0)[:k].clamp_min(0), U.flip(1)[:, :k]
            S = evals.sqrt()
            Vh = (U.T @ G) / S.clamp_min(1e-300).unsqueeze(1)
        else:
            evals, V = torch.linalg.eigh(G.T @ G)
            S = evals.flip(0)[:k].clamp_min(0).sqrt()
            Vh = V.flip(1)[:, :k].T
        return S, Vh


def make_accumulator(solver: str, d: int, n: int, k: int, seed: int, normalize_rows: bool, device,
                     memory_budget: int, spill_dir: str | None, sketch_kwargs: dict):
    """The accumulator for ``solver``; ``"auto"`` keeps G in memory when ``n * d * 4`` bytes fit
    ``memory_budget`` (``n`` = 0 when unknown, e.g. a streamed loader) and streams otherwise."""
    if solver == "auto":
        solver = "exact" if 0 < n and n * d * 4 <= memory_budget else "sketch"
    if solver == "exact":
        return ExactRows(d, normalize_rows, device)
    from ._streaming import streaming_accumulator
    return streaming_accumulator(solver, d, k, seed, normalize_rows, device, spill_dir, sketch_kwargs)


def _pca_plus_operator(G: torch.Tensor, V: torch.Tensor, lam: float):
    g2 = G.pow(2).sum().clamp_min(1e-300)
    v2 = V.pow(2).sum().clamp_min(1e-300)

    def apply(X: torch.Tensor) -> torch.Tensor:  # X: (d, m)
        return G.T @ (G @ X) / g2 - lam * (V.T @ (V @ X)) / v2

    return apply


def pca_plus_direction(rows, lab, lam: float, seed: int = 0) -> tuple[torch.Tensor, float, float]:
    """Top eigenvector of ``G^T G / ||G||_F^2 - lam V^T V / ||V||_F^2`` without a d x d matrix.

    For in-memory accumulators the problem is solved exactly in the span of the rows of G and V
    (every eigenvector with a non-zero eigenvalue lies there): an (m x m) eigenproblem,
    m = rows of G + rows of V, or the d x d one when d < m. Returns ``(v (d,), theta, residual)``
    with ``residual = ||A v - theta v||_2`` computed against the operator itself.
    """
    if isinstance(rows, ExactRows) and isinstance(lab, ExactRows):
        G, V = rows.matrix().double(), lab.matrix().double()
        apply = _pca_plus_operator(G, V, lam)
        d = G.shape[1]
        m = G.shape[0] + V.shape[0]
        if d <= m:
            A = apply(torch.eye(d, dtype=torch.float64, device=G.device))
            evals, vecs = torch.linalg.eigh((A + A.T) / 2)
            v = vecs[:, -1]
        else:
            Q, _ = torch.linalg.qr(torch.cat([G, V]).T)  # (d, m) orthonormal basis of the row span
            small = Q.T @ apply(Q)
            evals, vecs = torch.linalg.eigh((small + small.T) / 2)
            v = Q @ vecs[:, -1]
        v = v / v.norm()
        Av = apply(v.unsqueeze(1)).squeeze(1)
        theta = float(v @ Av)
        return v, theta, float((Av - theta * v).norm())
    from ._streaming import streaming_pca_plus
    return streaming_pca_plus(rows, lab, lam, seed)
