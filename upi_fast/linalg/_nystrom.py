"""Singular values / right singular vectors from a Gram sketch (private, shared by sketch and krylov).

Given a test basis ``X`` (m x d, rows) and the products ``Kt = X A^T A`` (m x d) and
``T = X A^T A X^T`` (m x m), both obtainable in ONE pass over the rows of A, the matrix

    A_hat = Q Q^T A,   Q = orth(A X^T)   (n x m, never formed)

satisfies ``A_hat^T A_hat = Kt^T T^+ Kt`` (the Nystrom approximation of A^T A). Its singular values
are lower bounds of A's (interlacing of an orthogonal projection) and, because A_hat is an
orthogonal projection of A, ``||A - A_hat||_F^2 = ||A||_F^2 - sum_i S_i^2`` exactly (Halko,
Martinsson & Tropp 2011, Sec. 5.5; Tropp, Yurtsever, Udell & Cevher 2017, "Fixed-rank approximation
of a positive-semidefinite matrix from streaming data").

Directions of ``T`` with eigenvalues below ``rtol * max`` are dropped (pseudo-inverse): they carry
only rounding noise of ``Kt`` amplified by ``lambda^{-1/2}``. Dropping them shrinks the subspace
(still an orthogonal projection, so the identities above still hold).
"""
from __future__ import annotations

import torch

__all__ = ["nystrom_svd", "default_rtol", "projection_bounds", "orthonormal_rows", "lowdin_rows"]


def orthonormal_rows(Z: torch.Tensor, basis: torch.Tensor | None = None, rtol: float = 1e-13) -> torch.Tensor:
    """Orthonormal rows spanning the rows of ``Z`` (m, d), orthogonal to the rows of ``basis``.

    SVQB (Stathopoulos & Wu 2002), twice: ``Z Z^T = E diag(lam) E^T`` in float64, rows
    ``diag(lam)^{-1/2} E^T Z``; directions with ``lam <= rtol * max(lam)`` (rank deficiency, rounding
    noise) are dropped, so fewer than m rows may come back. Only matrix products and an m x m
    ``eigh``: much faster than Householder QR of a d x m matrix on a busy CPU, and equally accurate
    after the second round. Returned in ``Z``'s dtype.
    """
    dtype = Z.dtype
    Q = Z.to(torch.float64)
    B = basis.to(torch.float64) if basis is not None else None
    for _ in range(2):
        if B is not None and B.shape[0]:
            Q = Q - (Q @ B.T) @ B
        G = Q @ Q.T
        lam, E = torch.linalg.eigh(0.5 * (G + G.T))
        top = float(lam[-1]) if lam.numel() else 0.0
        if top <= 0.0:
            return Z.new_zeros(0, Z.shape[1])
        keep = lam > rtol * top
        Q = (E[:, keep] / lam[keep].sqrt()).T @ Q
    return Q.to(dtype).contiguous()


def lowdin_rows(Vh: torch.Tensor) -> torch.Tensor:
    """``(Vh Vh^T)^{-1/2} Vh``: the orthonormal rows closest to nearly orthonormal rows ``Vh``
    (each row keeps its direction to first order, unlike Gram-Schmidt); float64 in, float64 out."""
    C = Vh @ Vh.T
    w, F = torch.linalg.eigh(0.5 * (C + C.T))
    return (F / w.clamp_min(1e-300).sqrt()) @ F.T @ Vh


def default_rtol(dtype: torch.dtype) -> float:
    """Relative eigenvalue cut-off of ``T`` for products computed in ``dtype``."""
    return 1e-6 if dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-13


def nystrom_svd(Kt: torch.Tensor, T: torch.Tensor, rtol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """All singular values and right singular vectors of ``A_hat`` (see module docstring).

    Args:
        Kt: (m, d) rows of ``X A^T A`` (any float dtype).
        T: (m, m) ``X A^T A X^T`` (symmetrised here; float64 recommended).
        rtol: relative cut-off for the eigenvalues of ``T``.

    Returns:
        ``S`` (r,) float64 singular values in descending order (r <= m is the kept rank) and
        ``Vh`` (r, d) float64 orthonormal rows.
    """
    T = T.to(torch.float64)
    T = 0.5 * (T + T.T)
    lam, E = torch.linalg.eigh(T)
    lam_max = float(lam[-1]) if lam.numel() else 0.0
    d = Kt.shape[1]
    if lam_max <= 0.0:
        return (torch.zeros(0, dtype=torch.float64, device=Kt.device),
                torch.zeros(0, d, dtype=torch.float64, device=Kt.device))
    keep = lam > rtol * lam_max
    Ek = E[:, keep] / lam[keep].sqrt()  # (m, r)
    Ft = Ek.T @ Kt.to(torch.float64)  # (r, d): A_hat^T A_hat = Ft^T Ft
    # SVD of the short-wide Ft through its (r x r) Gram, in float64.
    g = Ft @ Ft.T
    g = 0.5 * (g + g.T)
    mu, U = torch.linalg.eigh(g)
    mu, U = mu.flip(0).clamp_min(0.0), U.flip(1)
    S = mu.sqrt()
    pos = S > S[0] * 1e-12 if S.numel() else S > 0
    S, U = S[pos], U[:, pos]
    Vh = (U.T @ Ft) / S.unsqueeze(1)
    # Re-orthonormalise without reordering (the Gram-based SVD loses orthogonality ~ eps * cond^2 in
    # the tail): one Gram-Schmidt-free correction Vh <- (Vh Vh^T)^{-1/2} Vh keeps each row's direction
    # to first order and makes the rows orthonormal to rounding.
    Vh = lowdin_rows(Vh)
    return S, Vh


def projection_bounds(S: torch.Tensor, fro2: float, k: int) -> tuple[float, float, torch.Tensor, float]:
    """Rigorous a-posteriori bounds for ``A_hat`` an orthogonal projection of A with singular values S.

    Returns ``(residual_fro, residual_fro_k, sigma_upper (k,), sin_angle_bound)``:
    ``||A - A_hat||_F = sqrt(||A||_F^2 - sum S^2)``; ``||A - [A_hat]_k||_F`` likewise with the top k;
    ``S_i <= sigma_i <= sqrt(S_i^2 + r^2)`` (r = residual_fro >= ||A - A_hat||_2, Weyl on
    ``A^T A = A_hat^T A_hat + (A - A_hat)^T (A - A_hat)``); Davis-Kahan
    ``sin theta_1 <= r^2 / (S_1^2 - S_2^2 - r^2)`` (1.0 when not positive).
    """
    S = S.to(torch.float64)
    res2 = max(fro2 - float((S ** 2).sum()), 0.0)
    res2_k = max(fro2 - float((S[:k] ** 2).sum()), 0.0)
    Sk = torch.zeros(k, dtype=torch.float64, device=S.device)
    Sk[:min(k, S.numel())] = S[:k]
    upper = (Sk ** 2 + res2).sqrt()
    s1 = float(S[0]) ** 2 if S.numel() else 0.0
    s2 = float(S[1]) ** 2 if S.numel() > 1 else 0.0
    denom = s1 - s2 - res2
    sin_b = min(1.0, res2 / denom) if denom > 0 else 1.0
    return res2 ** 0.5, res2_k ** 0.5, upper, sin_b
