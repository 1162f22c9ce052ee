"""Multi-pass randomized SVD of a re-readable row source (subspace iteration or block Krylov).

One *pass* reads every row block ``A_b`` of the source once and computes ``A_b X^T`` then
accumulates ``X A^T A += (A_b X^T)^T A_b``: because whole rows arrive together, one read applies
the Gram operator ``A^T A`` (two matrix products), so a pass here does the work of two reads in
scikit-learn's / torch's randomized SVD. Between passes the basis is orthonormalised (SVQB: its
Gram matrix's ``eigh``, twice, in float64; only matrix products on the d-long rows).

* ``method="subspace"``: ``X_{j+1} = orth(X_j A^T A)``; after ``n_iter`` iterations a final pass.
* ``method="block_krylov"``: the block Krylov basis ``[X_0, X_0 M, ..., X_0 M^q]`` (``M = A^T A``)
  kept orthonormal by block Gram-Schmidt (twice), Musco & Musco 2015: converges in
  ``O(log(d)/sqrt(gap))`` passes instead of ``O(log(d)/gap)``; memory ``2 (n_iter + 1) l d``.

Both finish with the same extraction from the LAST pass's products (no extra read): with
``Kt = X M`` and ``T = X M X^T``, ``A_hat = Q Q^T A`` with ``Q = orth(A X^T)`` has
``A_hat^T A_hat = Kt^T T^+ Kt`` (HMT 2011 Sec. 5.5; this is what sklearn computes as ``B = Q^T A``
with one more read). Passes = ``n_iter + 1``; the right subspace after ``n_iter`` is that of
``M^{n_iter + 1} Omega``, the same as scikit-learn's ``randomized_svd`` after ``2 n_iter + 2``
matrix reads when it does not transpose, and half a power more than it when it does (n < d).

Bounds (HMT 2011 Cor. 10.10; Musco & Musco 2015 Thm 1), for oversample ``p >= 2``, ``l = k + p``:
subspace: ``E ||A - A_hat||_2 <= [(1 + sqrt(k/(p-1))) sigma_{k+1}^{2q+1}
+ e sqrt(l)/p (sum_{j>k} sigma_j^{2(2q+1)})^{1/2}]^{1/(2q+1)}`` with ``q = n_iter`` (``Q = orth(A
M^{n_iter} Omega)`` is HMT's power scheme; Gaussian start); block Krylov reaches relative spectral error ``eps``
after ``q = O(log(d) / sqrt(eps))`` passes. A-posteriori (exact, computed): ``residual_fro``,
``sigma_upper`` and ``sin_angle_bound`` as in :class:`upi_fast.linalg.sketch.SketchError`; and,
with ``check=True`` (one extra pass), the eigen-residuals ``||A^T A v_i - ||A v_i||^2 v_i||``.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import torch

from ._checks import check_k, check_positive_int, row_norms_sq
from ._nystrom import default_rtol, nystrom_svd, orthonormal_rows, projection_bounds
from .sketch import _complete
from .sources import RowSource, as_source

__all__ = ["randomized_svd", "SVDResult", "gram_pass"]

METHODS = ("subspace", "block_krylov")


@dataclasses.dataclass
class SVDResult:
    """Result of :func:`randomized_svd`; iterating yields ``(S, Vh)``.

    Attributes:
        S: (k,) singular values (lower bounds of the true ones), compute dtype.
        Vh: (k, d) right singular vectors (orthonormal rows), compute dtype.
        fro_norm: ``||A||_F`` (exact).
        residual_fro: ``||A - A_hat||_F`` of the rank-r approximation the vectors come from (exact).
        residual_fro_k: ``||A - [A_hat]_k||_F`` (exact).
        sigma_upper: (k,) upper bounds of the true singular values.
        sin_angle_bound: Davis-Kahan bound on ``sin`` angle(top vector, true top vector).
        residuals: (k,) ``||A^T A v_i - ||A v_i||^2 v_i||`` when ``check=True``, else None.
        passes: number of reads of the source.
    """
    S: torch.Tensor
    Vh: torch.Tensor
    fro_norm: float
    residual_fro: float
    residual_fro_k: float
    sigma_upper: torch.Tensor
    sin_angle_bound: float
    residuals: torch.Tensor | None
    passes: int

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield self.S
        yield self.Vh


def gram_pass(source: RowSource, Xt: torch.Tensor, block_size: int | None = None,
              with_fro: bool = False) -> tuple[torch.Tensor, float]:
    """One read of ``source``: ``Kt = Xt A^T A`` (m, d) in ``Xt``'s dtype/device, and ``||A||_F^2``
    (float, only when ``with_fro``; it also checks every row for NaN/Inf)."""
    n, d = source.shape
    Kt = torch.zeros_like(Xt)
    fro2 = torch.zeros((), dtype=torch.float64, device=Xt.device)
    for off, blk in source.blocks(block_size):
        if blk.dim() != 2 or blk.shape[1] != d:
            raise ValueError(f"source: block at row {off} has shape {tuple(blk.shape)}, expected (b, {d})")
        x = blk.to(device=Xt.device, dtype=Xt.dtype)
        if with_fro:
            fro2 += row_norms_sq(x, f"source rows {off}..{off + x.shape[0] - 1}", torch.float64).sum()
        Kt.addmm_((x @ Xt.T).T, x)
    if not bool(torch.isfinite(Kt).all()):
        raise ValueError("source contains NaN or Inf (or its Gram overflows the compute dtype)")
    return Kt, float(fro2)


def _orth_rows(Z: torch.Tensor, basis: torch.Tensor | None = None) -> torch.Tensor:
    """Orthonormal rows spanning Z's rows, orthogonal to ``basis`` (see ``orthonormal_rows``)."""
    return orthonormal_rows(Z, basis)


def _first_device(source: RowSource) -> torch.device:
    dev = getattr(source, "device", None)
    if dev is not None:
        return torch.device(dev)
    for _, blk in source.blocks(1):
        return blk.device
    return torch.device("cpu")


def _compute_dtype(source: RowSource) -> torch.dtype:
    return torch.float64 if getattr(source, "dtype", None) == torch.float64 else torch.float32


def randomized_svd(source: object, k: int = 1, oversample: int = 10, n_iter: int = 4,
                   method: str = "subspace", seed: int = 0, block_size: int | None = None,
                   dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                   check: bool = False) -> SVDResult:
    """Top-k singular values and right singular vectors of an n x d re-readable matrix.

    Args:
        source: tensor (n, d), numpy array, or row source (:mod:`upi_fast.linalg.sources`).
        k: number of singular triplets (``1 <= k <= min(n, d)``).
        oversample: extra basis columns; block size ``l = min(k + oversample, min(n, d))``.
        n_iter: power (subspace) or Krylov iterations; the source is read ``n_iter + 1`` times
            (``n_iter + 2`` with ``check``).
        method: ``"subspace"`` or ``"block_krylov"``.
        seed: seed of the Gaussian start block (generated on the CPU, so identical on every device).
        block_size: rows per block (None: the source's default; a tensor is one block).
        dtype: compute dtype (default float64 for float64 sources, else float32).
        device: compute device (default: the source's).
        check: one extra pass to compute eigen-residuals of the returned vectors.

    Returns:
        :class:`SVDResult` (``S`` (k,), ``Vh`` (k, d), a-posteriori bounds).
    """
    src = as_source(source)
    n, d = src.shape
    check_k(k, min(n, d), "min(n, d) of the source")
    check_positive_int(oversample, "oversample", 0)
    check_positive_int(n_iter, "n_iter", 0)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    cdtype = dtype or _compute_dtype(src)
    dev = torch.device(device) if device is not None else _first_device(src)
    l = min(k + oversample, min(n, d))

    gen = torch.Generator(device="cpu").manual_seed(seed)
    X = _orth_rows(torch.randn(l, d, generator=gen, dtype=torch.float64).to(dev, cdtype))
    passes = 0
    if method == "subspace":
        Kt, fro2 = gram_pass(src, X, block_size, with_fro=True)
        passes += 1
        for _ in range(n_iter):
            X = _orth_rows(Kt)
            Kt, _ = gram_pass(src, X, block_size)
            passes += 1
        Xall, Kall = X, Kt
    else:
        blocks_x, blocks_k = [X], []
        fro2 = 0.0
        for it in range(n_iter + 1):
            Kt, f = gram_pass(src, blocks_x[-1], block_size, with_fro=(it == 0))
            fro2 = f if it == 0 else fro2
            passes += 1
            blocks_k.append(Kt)
            if it < n_iter:
                blocks_x.append(_orth_rows(Kt, torch.cat(blocks_x)))
        Xall, Kall = torch.cat(blocks_x), torch.cat(blocks_k)
    T = Xall.to(torch.float64) @ Kall.to(torch.float64).T
    S_all, Vh_all = nystrom_svd(Kall, T, default_rtol(cdtype))
    res, res_k, upper, sin_b = projection_bounds(S_all, fro2, k)
    S, Vh = _complete(S_all, Vh_all, k, d)
    S, Vh = S.to(cdtype), Vh.to(cdtype).contiguous()
    residuals = None
    if check:
        MV, _ = gram_pass(src, Vh, block_size)
        passes += 1
        theta = (MV * Vh).sum(1, keepdim=True)
        residuals = (MV - theta * Vh).norm(dim=1)
    return SVDResult(S, Vh, fro2 ** 0.5, res, res_k, upper.to(cdtype), sin_b, residuals, passes)
