"""Linear algebra for UPI-PCA: top singular vectors of huge row streams, and PCA+.

* :mod:`.sources` -- re-readable row sources (tensor, regenerating callable);
* :mod:`.spill` -- a one-shot stream spilled to a checksummed file (float32, or float16 / bfloat16:
  half the disk) and re-read through a memmap, for multi-pass methods;
* :mod:`.sketch` -- :class:`StreamingSketch`, single pass, mergeable by summation, O(d k) memory;
* :mod:`.frequent_directions` -- :class:`FrequentDirections` (deterministic, mergeable);
* :mod:`.krylov` -- :func:`randomized_svd`, multi-pass subspace / block Krylov with a-posteriori bounds;
* :mod:`.eigsh` -- :func:`lanczos_top` and :func:`pca_plus_eigenvector` (PCA+ without d x d matrices);
* :mod:`.planted` -- planted-spectrum matrices regenerated from a seed (tests, benchmarks).

:func:`top_singular_vectors` picks one of them.
"""
from __future__ import annotations

import os
import tempfile
from typing import Iterable

import torch

from ._checks import check_k, check_positive_int
from .eigsh import (GramOperator, LanczosResult, PCAPlusResult, authors_ascent, lanczos_top,
                    pca_plus_eigenvector)
from .frequent_directions import FrequentDirections
from .krylov import SVDResult, randomized_svd
from .planted import PlantedRows
from .sketch import SketchError, StreamingSketch
from .sources import CallableRows, RowSource, TensorRows, as_source, default_block_size
from . import spill as _spill
from .spill import SPILL_DTYPES, MemmapRows, MemmapRowWriter, SpillChecksumError, spill_dtype, spill_rows

__all__ = [
    "RowSource", "TensorRows", "MemmapRows", "MemmapRowWriter", "CallableRows", "as_source", "default_block_size",
    "SpillChecksumError", "SPILL_DTYPES", "spill_dtype", "spill_rows",
    "StreamingSketch", "SketchError", "FrequentDirections", "randomized_svd", "SVDResult",
    "lanczos_top", "LanczosResult", "pca_plus_eigenvector", "PCAPlusResult", "GramOperator", "authors_ascent",
    "PlantedRows", "top_singular_vectors", "exact_svd", "METHODS",
]

#: Methods accepted by :func:`top_singular_vectors`.
METHODS = ("auto", "exact", "sketch", "subspace", "block_krylov", "frequent_directions")
_DIRECT_MAX_ELEMENTS = 4_000_000  # below this, torch.linalg.svd on the matrix itself


def exact_svd(source: object, k: int = 1, block_size: int | None = None,
              gram_dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k ``(S (k,), Vh (k, d))`` in float64.

    Small matrices (n*d <= 4e6): ``torch.linalg.svd`` in float64. Otherwise ``eigh`` of the smaller
    Gram: ``A A^T`` (n x n; the matrix is gathered in its own dtype and the Gram accumulated in
    ``gram_dtype`` over column chunks, so no float64 copy of A is made), or ``A^T A`` (d x d,
    accumulated over row blocks, A never held). Gram route: ``sigma_i`` accurate to about
    ``eps(gram_dtype) * sigma_1^2 / sigma_i``, vectors to ``eps * sigma_1^2 / (sigma_i^2 - sigma_{i+1}^2)``.
    """
    src = as_source(source)
    n, d = src.shape
    check_k(k, min(n, d), "min(n, d) of the source")
    if n * d <= _DIRECT_MAX_ELEMENTS:
        A = torch.cat([blk.to(torch.float64) for _, blk in src.blocks(block_size)])
        if not bool(torch.isfinite(A).all()):
            raise ValueError("source contains NaN or Inf")
        _, S, Vh = torch.linalg.svd(A, full_matrices=False)
        return S[:k], Vh[:k]
    if n <= d:
        A = src.tensor if isinstance(src, TensorRows) else torch.cat([blk for _, blk in src.blocks(block_size)])
        C = torch.zeros(n, n, dtype=torch.float64, device=A.device)
        step = max(1, (256 * 2**20) // (8 * n))
        for c in range(0, d, step):
            blk = A[:, c:c + step].to(gram_dtype)
            C += (blk @ blk.T).to(torch.float64)
        if not bool(torch.isfinite(C).all()):
            raise ValueError("source contains NaN or Inf")
        lam, U = torch.linalg.eigh(C)
        lam, U = lam.flip(0)[:k].clamp_min(0), U.flip(1)[:, :k]
        Vh = (U.T.to(gram_dtype) @ A.to(gram_dtype) if A.dtype != gram_dtype else U.T.to(A.dtype) @ A).to(torch.float64)
        return lam.sqrt(), Vh / Vh.norm(dim=1, keepdim=True).clamp_min(1e-300)
    dev = getattr(src, "device", None) or torch.device("cpu")
    M = torch.zeros(d, d, dtype=torch.float64, device=dev)
    for _, blk in src.blocks(block_size):
        b = blk.to(dev, gram_dtype)
        M += (b.T @ b).to(torch.float64)
    if not bool(torch.isfinite(M).all()):
        raise ValueError("source contains NaN or Inf")
    lam, E = torch.linalg.eigh(M)
    return lam.flip(0)[:k].clamp_min(0).sqrt(), E.flip(1)[:, :k].T.contiguous()


def _single_pass(blocks: Iterable, d: int | None, k: int, method: str, kw: dict) -> tuple[torch.Tensor, torch.Tensor]:
    sk = None
    for item in blocks:
        off, blk = item if isinstance(item, tuple) else (None, item)
        if sk is None:
            width = blk.shape[-1] if d is None else d
            if method == "frequent_directions":
                sk = FrequentDirections(width, kw.pop("ell", max(2 * k + 8, k + 1)), **kw)
            else:
                sk = StreamingSketch(width, k=k, **kw)
        if isinstance(sk, FrequentDirections):
            sk.update(blk)
        else:
            sk.update(blk, off)
    if sk is None:
        raise ValueError("source: the block iterable was empty")
    return sk.finalize(k)


def top_singular_vectors(source: object, k: int = 1, method: str = "auto", memory_budget_bytes: int = 2**30,
                         spill_dir: str | os.PathLike | None = None, spill_dtype: object = None,
                         **kw: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k singular values ``S`` (k,) and right singular vectors ``Vh`` (k, d) of an n x d matrix.

    Args:
        source: a tensor / numpy array, a row source, or a one-shot iterable of blocks (b, d) or of
            ``(row_offset, block)`` pairs (single-pass methods only).
        k: number of triplets.
        method: ``"exact"`` (:func:`exact_svd`), ``"sketch"`` (:class:`StreamingSketch`, one pass),
            ``"frequent_directions"`` (one pass), ``"subspace"`` / ``"block_krylov"``
            (:func:`randomized_svd`), or ``"auto"``: exact when it fits ``memory_budget_bytes``
            (n <= d: the matrix, its n x n Gram and a 256 MiB work chunk; d < n: the d x d Gram),
            else block Krylov for re-readable sources and the sketch for one-shot iterables.
        memory_budget_bytes: budget for the exact route.
        spill_dir, spill_dtype: for a one-shot iterable only: giving either spills the blocks to a
            temporary file in ``spill_dir`` (default: the temp dir), stored as ``spill_dtype``
            (``"float32"`` default, ``"float16"`` with per-row scales, ``"bfloat16"``: half the
            disk; see :mod:`.spill`), so that ``"auto"`` (then block Krylov), ``"subspace"`` and
            ``"block_krylov"`` can read it several times; the file is deleted before returning.
        **kw: passed to the chosen method (e.g. ``oversample``, ``n_iter``, ``seed``, ``block_size``,
            ``ell`` for frequent directions).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_positive_int(memory_budget_bytes, "memory_budget_bytes")
    reread = isinstance(source, (torch.Tensor,)) or isinstance(source, RowSource) or hasattr(source, "__array__")
    spill = spill_dir is not None or spill_dtype is not None
    if spill:
        sdt = _spill.spill_dtype(spill_dtype if spill_dtype is not None else "float32", "spill_dtype")
        if reread:
            raise ValueError("spill_dir / spill_dtype apply to one-shot iterables of blocks; this source can "
                             "already be re-read (pass it without them)")
        if method not in ("auto", "subspace", "block_krylov"):
            raise ValueError(f"spill_dir / spill_dtype spill rows for a multi-pass method; method {method!r} "
                             "reads once (use 'auto', 'subspace' or 'block_krylov', or drop the spill arguments)")
        if not isinstance(source, Iterable):
            raise ValueError(f"source must be an iterable of blocks, got {type(source).__name__}")
        fd, path = tempfile.mkstemp(prefix="upi_spill_", suffix=".rows", dir=spill_dir)
        os.close(fd)
        try:
            src = spill_rows(source, path, kw.pop("d", None), sdt)
            r = randomized_svd(src, k=k, method="block_krylov" if method == "auto" else method, **kw)
            return r.S, r.Vh
        finally:
            for p in (path, path + ".partial"):
                if os.path.exists(p):
                    os.unlink(p)
    if not reread:
        if method not in ("auto", "sketch", "frequent_directions"):
            raise ValueError(f"method {method!r} needs a re-readable source (tensor or row source); "
                             "spill a one-shot stream with MemmapRowWriter first")
        if not isinstance(source, Iterable):
            raise ValueError(f"source must be a tensor, a row source or an iterable of blocks, "
                             f"got {type(source).__name__}")
        return _single_pass(source, kw.pop("d", None), k, "sketch" if method == "auto" else method, kw)
    src = as_source(source)
    n, d = src.shape
    check_k(k, min(n, d), "min(n, d) of the source")
    if method == "auto":
        small = min(n, d)
        item = torch.finfo(getattr(src, "dtype", torch.float32)).bits // 8
        fits = (n * d * item + small * small * 8 + 256 * 2**20 <= memory_budget_bytes) if n <= d \
            else (d * d * 8 <= memory_budget_bytes)
        method = "exact" if fits else "block_krylov"
    if method == "exact":
        S, Vh = exact_svd(src, k, kw.get("block_size"))
        dt = getattr(src, "dtype", torch.float32)
        dt = dt if dt in (torch.float32, torch.float64) else torch.float32
        return S.to(dt), Vh.to(dt)
    if method in ("subspace", "block_krylov"):
        r = randomized_svd(src, k=k, method=method, **kw)
        return r.S, r.Vh
    bs = kw.pop("block_size", None)
    return _single_pass(src.blocks(bs), d, k, method, kw)
