"""Top eigenvector of an implicit symmetric operator, and the PCA+ direction of UPI-PCA.

Choice of solver: Lanczos with full re-orthogonalisation and thick restart. The PCA+ operator
``A = G^T G / ||G||_F^2 - lam V^T V / ||V||_F^2`` is indefinite and its top eigenvalue may sit close
to the next one; Lanczos converges like a Chebyshev polynomial in ``sqrt(gap)`` where block power
iteration (even shifted to make the operator positive) converges like ``(1 - gap)^j``. Every matvec
streams G and V once, so fewer matvecs means fewer passes over the data. We store the basis ``Q``
and ``A Q`` (2 m d entries, m <= ``basis_size``), which makes the Rayleigh-Ritz step exact (no
reliance on the three-term recurrence), the residuals ``||A v - theta v||`` exact, and thick restarts
trivial (keep the best Ritz vectors and their images).

``authors_ascent`` is the iteration of the UPI-PCA authors, kept for comparison: projected gradient
ascent ``v <- normalize(v + eta A v)`` with eta = 1e-4 for 5000 steps. Since ``||A|| <= 1 + lam``, it
equals ``exp(0.5 A)`` applied to the start up to O(eta): the top component grows by at most ``e^{0.5}``
relative to the others, so from a random start in high dimension it stays essentially where it began.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import torch

from ._checks import check_positive_int, row_norms_sq
from .sources import RowSource, TensorRows, as_source

__all__ = ["lanczos_top", "LanczosResult", "pca_plus_eigenvector", "PCAPlusResult", "GramOperator",
           "authors_ascent"]


@dataclasses.dataclass
class LanczosResult:
    """Result of :func:`lanczos_top`.

    Attributes:
        vector: (d,) unit eigenvector estimate.
        value: its Rayleigh quotient ``theta``.
        residual: ``||A v - theta v||`` (exact, from the stored ``A Q``).
        n_matvecs: operator applications.
        converged: ``residual <= tol * scale`` where scale is the largest |Ritz value| seen.
    """
    vector: torch.Tensor
    value: float
    residual: float
    n_matvecs: int
    converged: bool


def lanczos_top(matvec: Callable[[torch.Tensor], torch.Tensor], d: int, *, tol: float = 1e-6,
                max_iter: int = 500, basis_size: int = 40, keep: int = 6, seed: int = 0,
                v0: torch.Tensor | None = None, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float64) -> LanczosResult:
    """Largest (algebraic) eigenpair of a symmetric operator given by ``matvec``.

    Args:
        matvec: ``x (d,) -> A x (d,)``, A symmetric.
        d: dimension.
        tol: stop when ``||A v - theta v|| <= tol * max|Ritz value|`` (a relative residual).
        max_iter: maximum matvecs.
        basis_size: Krylov basis size before a thick restart (memory ``2 * basis_size * d``).
        keep: Ritz vectors kept at a restart.
        seed, v0: start vector (``v0`` if given, else Gaussian from ``seed``). A start inside an
            invariant subspace (e.g. orthogonal to the top eigenvector) returns that subspace's
            top pair, as for any Krylov method.
        device, dtype: of the basis (default: v0's device, else CPU; float64).

    Returns:
        :class:`LanczosResult`.
    """
    check_positive_int(d, "d")
    check_positive_int(max_iter, "max_iter")
    check_positive_int(basis_size, "basis_size", 2)
    keep = min(check_positive_int(keep, "keep"), basis_size - 1)
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if v0 is not None:
        if not isinstance(v0, torch.Tensor) or v0.shape != (d,):
            raise ValueError(f"v0 must be a tensor of shape ({d},)")
        dev = torch.device(device) if device is not None else v0.device
        q = v0.to(dev, dtype)
    else:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        q = torch.randn(d, generator=gen, dtype=torch.float64).to(dev, dtype)
    if not bool(torch.isfinite(q).all()) or float(q.norm()) == 0:
        raise ValueError("v0 must be finite and non-zero")
    q = q / q.norm()
    Q = torch.zeros(basis_size, d, device=dev, dtype=dtype)
    AQ = torch.zeros_like(Q)
    m, n_mv, scale = 0, 0, 0.0
    best = (q, float("nan"), float("inf"))
    gen_restart = torch.Generator(device="cpu").manual_seed(seed + 1)
    while True:
        w = matvec(q)
        if not isinstance(w, torch.Tensor) or w.shape != (d,):
            raise ValueError(f"matvec must return a tensor of shape ({d},)")
        w = w.to(dev, dtype)
        if not bool(torch.isfinite(w).all()):
            raise ValueError("matvec returned NaN or Inf")
        n_mv += 1
        Q[m], AQ[m] = q, w
        m += 1
        H = Q[:m] @ AQ[:m].T
        H = 0.5 * (H + H.T)
        theta, E = torch.linalg.eigh(H)
        theta, E = theta.flip(0), E.flip(1)
        scale = max(scale, float(theta.abs().max()))
        y, Ay = E[:, 0] @ Q[:m], E[:, 0] @ AQ[:m]
        r = Ay - theta[0] * y
        res = float(r.norm())
        if res < best[2]:
            best = (y, float(theta[0]), res)
        if res <= tol * scale or n_mv >= max_iter:
            break
        if m == basis_size:  # thick restart: keep the top Ritz vectors and their images
            kk = min(keep, m)
            Q[:kk], AQ[:kk] = E[:, :kk].T @ Q[:m], E[:, :kk].T @ AQ[:m]
            Q[kk:].zero_()
            AQ[kk:].zero_()
            m = kk
            w = r  # residuals of all Ritz vectors are parallel to the next Lanczos vector
        for _ in range(2):  # full re-orthogonalisation (classical Gram-Schmidt, twice)
            w = w - (Q[:m] @ w) @ Q[:m]
        nw = float(w.norm())
        if nw <= 1e-12 * max(scale, 1e-300):  # invariant subspace found: continue with a random vector
            w = torch.randn(d, generator=gen_restart, dtype=torch.float64).to(dev, dtype)
            for _ in range(2):
                w = w - (Q[:m] @ w) @ Q[:m]
            nw = float(w.norm())
        q = w / nw
    y, th, res = best
    y = y / y.norm()
    return LanczosResult(y, th, res, n_mv, res <= tol * scale)


class GramOperator:
    """``x -> A^T (A x) / scale`` for a row source A (n x d), streaming row blocks (never d x d).

    ``scale`` defaults to ``||A||_F^2`` (computed in one pass at construction, which also checks
    the rows for NaN/Inf). One application reads the source once; blocks are moved to ``device``
    (default: the vector's) and computed in ``dtype``.
    """

    def __init__(self, source: object, scale: float | None = None, block_size: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float64) -> None:
        self.source = as_source(source)
        self.n, self.d = self.source.shape
        self.block_size, self.dtype = block_size, dtype
        self.device = torch.device(device) if device is not None else None
        if scale is None:
            fro2 = 0.0
            for off, blk in self.source.blocks(block_size):
                blk = blk.to(dtype)  # the operator's own precision (it casts every block anyway)
                fro2 += float(row_norms_sq(blk, f"rows {off}..{off + blk.shape[0] - 1}", torch.float64).sum())
            scale = fro2
        if not scale > 0:
            raise ValueError(f"scale (||A||_F^2) must be > 0, got {scale}")
        self.scale = float(scale)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``A^T (A x) / scale`` for x (d,); computed on ``device`` (default: x's) in ``dtype``."""
        dev = self.device or x.device
        x = x.to(dev, self.dtype)
        out = torch.zeros(self.d, dtype=self.dtype, device=dev)
        for _, blk in self.source.blocks(self.block_size):
            b = blk.to(dev, self.dtype)
            out += (b @ x) @ b
        return out / self.scale


def _gram_factor(x: object) -> tuple[RowSource, float | None]:
    """A row source whose Gram stands for x's, and its ``||.||_F^2`` if it differs from the source's."""
    from .frequent_directions import FrequentDirections
    from .sketch import StreamingSketch
    if isinstance(x, FrequentDirections):
        if x.n_rows == 0:
            raise ValueError("the FrequentDirections sketch is empty")
        return TensorRows(x.sketch), x.fro2
    if isinstance(x, StreamingSketch):
        S, Vh = x.finalize(min(x.l, x.n_rows, x.d))
        return TensorRows(S.unsqueeze(1) * Vh), float(x.fro2)
    return as_source(x), None


class PCAPlusResult(NamedTuple):
    """``(v, theta, residual, n_matvecs)`` of :func:`pca_plus_eigenvector`."""
    v: torch.Tensor
    theta: float
    residual: float
    n_matvecs: int


def pca_plus_eigenvector(G: object, V: object, lam: float = 1.0, tol: float = 1e-6, max_iter: int = 500,
                         seed: int = 0, block_size: int | None = None, device: torch.device | str | None = None,
                         basis_size: int = 40) -> PCAPlusResult:
    """Top eigenvector of ``A = G^T G / ||G||_F^2 - lam V^T V / ||V||_F^2`` without any d x d matrix.

    Args:
        G, V: (n_G, d) and (n_V, d) tensors or row sources (re-read once per matvec), or
            precomputed sketches (:class:`FrequentDirections`: its rows ``B`` with ``B^T B ~ G^T G``
            and the exact ``||G||_F^2``; :class:`StreamingSketch`: its rank-l approximation).
        lam: weight of the classification-preserving term (>= 0).
        tol: relative residual tolerance ``||A v - theta v|| <= tol * |theta|_max``.
        max_iter: maximum matvecs.
        seed: start vector seed.
        block_size: rows per block when streaming.
        device: compute device (default: CPU unless the inputs are tensors on another device).

    Returns:
        :class:`PCAPlusResult` ``(v (d,) float64, theta, residual ||A v - theta v||, n_matvecs)``.
    """
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    gsrc, gscale = _gram_factor(G)
    vsrc, vscale = _gram_factor(V)
    if gsrc.shape[1] != vsrc.shape[1]:
        raise ValueError(f"V has width {vsrc.shape[1]} but G has width {gsrc.shape[1]}")
    if device is None:
        device = getattr(gsrc, "device", None) or torch.device("cpu")
    d = gsrc.shape[1]
    opG = GramOperator(gsrc, gscale, block_size)
    opV = GramOperator(vsrc, vscale, block_size) if lam > 0 else None

    def matvec(x: torch.Tensor) -> torch.Tensor:
        out = opG(x)
        if opV is not None:
            out = out - lam * opV(x)
        return out

    r = lanczos_top(matvec, d, tol=tol, max_iter=max_iter, seed=seed, device=device, basis_size=basis_size)
    return PCAPlusResult(r.vector, r.value, r.residual, r.n_matvecs)


def authors_ascent(matvec: Callable[[torch.Tensor], torch.Tensor], d: int, eta: float = 1e-4, steps: int = 5000,
                   seed: int = 0, v0: torch.Tensor | None = None, dtype: torch.dtype = torch.float64,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The UPI-PCA authors' iteration: ``v <- normalize(v + eta * A v)``, ``steps`` times.

    Returns ``(v_final (d,), v_start (d,))`` (start: ``v0`` or a Gaussian unit vector from ``seed``).
    """
    check_positive_int(d, "d")
    check_positive_int(steps, "steps")
    if v0 is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        v0 = torch.randn(d, generator=gen, dtype=torch.float64)
    dev = torch.device(device) if device is not None else v0.device
    v0 = (v0 / v0.norm()).to(dev, dtype)
    v = v0.clone()
    for _ in range(steps):
        v = v + eta * matvec(v)
        v = v / v.norm()
    return v, v0
