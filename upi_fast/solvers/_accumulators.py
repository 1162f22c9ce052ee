"""Row accumulators for UPI-PCA: where the direction matrix G goes, block by block.

Every accumulator has ``update(rows, row_offset=None)`` (rows: (b, d), the first one's global row
index), ``finalize(k) -> (S (k,), Vh (k, d))`` and ``merge(comm)`` (combine all processes' rows,
in place, on every rank). Checkpointable ones (``checkpointable = True``) also have
``state() -> (tensors, meta)`` and ``load(tensors, meta)``.
``ExactRows`` holds G in memory (float32) and solves exactly in float64; the others come from
:mod:`upi_fast.linalg` and never hold G.
"""
from __future__ import annotations

import warnings

import torch

__all__ = ["SOLVERS", "ExactRows", "resolve_solver", "make_accumulator", "pca_plus_direction"]

SOLVERS = ("auto", "exact", "sketch", "frequent_directions", "subspace", "block_krylov")


def _normalize(rows: torch.Tensor) -> torch.Tensor:
    n = rows.norm(dim=1, keepdim=True)
    return torch.where(n > 0, rows / n.clamp_min(1e-30), torch.zeros_like(rows))


class ExactRows:
    """G kept in memory; exact top singular vectors through the Gram matrix of the smaller side.

    Rows carry their global indices (``row_offset``), so that the blocks of several processes are
    put back in global row order when merged (:meth:`merge`)."""

    checkpointable = True

    def __init__(self, d: int, normalize_rows: bool, device) -> None:
        self.d, self.normalize_rows, self.device = d, normalize_rows, device
        self.blocks: list[torch.Tensor] = []
        self.starts: list[int] = []
        self._next = 0

    def update(self, rows: torch.Tensor, row_offset: int | None = None) -> None:
        if rows.dim() != 2 or rows.shape[1] != self.d:
            raise ValueError(f"rows must have shape (b, {self.d}), got {tuple(rows.shape)}")
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("rows contain NaN or Inf values")
        rows = rows.detach().float()
        off = self._next if row_offset is None else int(row_offset)
        self.blocks.append(_normalize(rows) if self.normalize_rows else rows)
        self.starts.append(off)
        self._next = off + rows.shape[0]

    def matrix(self) -> torch.Tensor:
        if not self.blocks:
            raise ValueError("no rows were accumulated")
        return torch.cat(self.blocks)

    def _index(self) -> torch.Tensor:
        return torch.cat([torch.arange(s, s + b.shape[0]) for s, b in zip(self.starts, self.blocks)]) \
            if self.blocks else torch.zeros(0, dtype=torch.long)

    def state(self) -> tuple[dict, dict]:
        """``(tensors, meta)`` for a checkpoint: the rows so far and their global indices."""
        rows = torch.cat(self.blocks) if self.blocks else torch.zeros(0, self.d)
        return {"rows": rows.cpu(), "index": self._index()}, {"next": self._next}

    def load(self, tensors: dict, meta: dict) -> None:
        rows, index = tensors["rows"], tensors["index"]
        if rows.dim() != 2 or rows.shape[1] != self.d or index.shape != (rows.shape[0],):
            raise ValueError(f"checkpoint: exact rows of shape {tuple(rows.shape)} do not fit d = {self.d}")
        self.blocks, self.starts = [], []
        self._set_rows(rows, index)
        self._next = int(meta["next"])

    def _set_rows(self, rows: torch.Tensor, index: torch.Tensor) -> None:
        """Rows in global order, split into contiguous runs of indices."""
        order = torch.argsort(index, stable=True)
        rows, index = rows[order].to(self.device), index[order]
        cuts = (torch.nonzero(index[1:] != index[:-1] + 1).flatten() + 1).tolist() if index.numel() > 1 else []
        bounds = [0, *cuts, index.numel()]
        self.blocks = [rows[a:b] for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        self.starts = [int(index[a]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def merge(self, comm) -> None:
        """Gather every process's rows (all ranks end with all rows, in global row order)."""
        if not comm.active:
            return
        tensors, _ = self.state()
        parts = comm.all_gather_objects((tensors["rows"], tensors["index"]))
        self._set_rows(torch.cat([r for r, _ in parts]), torch.cat([i for _, i in parts]))

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


#: Peak bytes per matrix entry of the exact solve: the float32 row blocks (4), their concatenation (4)
#: and its float64 copy (8).
EXACT_PEAK_BYTES_PER_ENTRY = 16


def resolve_solver(solver: str, d: int, n: int, memory_budget: int, multi_pass_ok: bool = True) -> str:
    """``solver``, with ``"auto"`` resolved: ``"exact"`` when the exact solve's peak fits
    ``memory_budget`` bytes (the n x d float32 rows, their concatenation and its float64 copy:
    :data:`EXACT_PEAK_BYTES_PER_ENTRY` = 16 bytes per entry); otherwise ``"block_krylov"`` over rows spilled to disk (two passes of
    block Krylov reach the exact top vector to |cos| ~ 1 where one pass cannot: per-sample attack
    directions have a flat spectrum, see bench/RESULTS.md), or, when spilling is not possible
    (``multi_pass_ok`` false: several processes or checkpoints), the single-pass ``"sketch"``
    with a warning. ``n`` = 0 means unknown (a streamed loader without a length)."""
    if solver != "auto":
        return solver
    if 0 < n and n * d * EXACT_PEAK_BYTES_PER_ENTRY <= memory_budget:
        return "exact"
    if multi_pass_ok:
        return "block_krylov"
    warnings.warn("UPIPCA(solver='auto'): the direction matrix does not fit memory_budget and cannot be spilled "
                  "(several processes or checkpoints); using the single-pass sketch, whose top vector is "
                  "unreliable when the spectrum is flat (check singular_values_)", UserWarning, stacklevel=3)
    return "sketch"


def make_accumulator(solver: str, d: int, n: int, k: int, seed: int, normalize_rows: bool, device,
                     memory_budget: int, spill_dir: str | None, sketch_kwargs: dict, spill_dtype: object = "float32"):
    """The accumulator for ``solver`` (``"auto"``: see :func:`resolve_solver`); ``spill_dtype`` is
    the storage dtype of the multi-pass solvers' spill file."""
    solver = resolve_solver(solver, d, n, memory_budget)
    if solver == "exact":
        return ExactRows(d, normalize_rows, device)
    from ._streaming import streaming_accumulator
    return streaming_accumulator(solver, d, k, seed, normalize_rows, device, spill_dir, sketch_kwargs, spill_dtype)


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
