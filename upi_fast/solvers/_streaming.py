"""Streaming row accumulators for UPI-PCA, built on :mod:`upi_fast.linalg` (G is never held)."""
from __future__ import annotations

import os
import tempfile

import torch

from ..distributed import merge_sketch
from ..linalg import FrequentDirections, MemmapRowWriter, StreamingSketch, pca_plus_eigenvector, randomized_svd
from ..linalg import spill_dtype as _spill_dtype

__all__ = ["SketchRows", "FDRows", "SpilledRows", "streaming_accumulator", "streaming_pca_plus"]


def _normalize(rows: torch.Tensor) -> torch.Tensor:
    n = rows.norm(dim=1, keepdim=True)
    return torch.where(n > 0, rows / n.clamp_min(1e-30), torch.zeros_like(rows))


def _split_state(st: dict) -> tuple[dict, dict]:
    """A sketch's ``state_dict`` as ``(tensors on the CPU, everything else)`` for a checkpoint."""
    return ({k: v.cpu() for k, v in st.items() if isinstance(v, torch.Tensor)},
            {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)})


class SketchRows:
    """Single pass: :class:`~upi_fast.linalg.StreamingSketch` (linear: processes' sketches of disjoint
    global rows are summed, :func:`upi_fast.distributed.merge_sketch`)."""

    checkpointable = True

    def __init__(self, d, k, seed, normalize_rows, device, oversample: int = 10) -> None:
        self.sketch = StreamingSketch(d, k=k, oversample=oversample, seed=seed, normalize_rows=normalize_rows,
                                      device=device)

    def update(self, rows: torch.Tensor, row_offset: int | None = None) -> None:
        self.sketch.update(rows.detach().float(), row_offset)

    def merge(self, comm) -> None:
        merge_sketch(self.sketch, comm)

    def state(self) -> tuple[dict, dict]:
        return _split_state(self.sketch.state_dict())

    def load(self, tensors: dict, meta: dict) -> None:
        self.sketch.load_state_dict({**meta, **tensors})

    def finalize(self, k: int = 1):
        return self.sketch.finalize(k)

    @property
    def operand(self):
        return self.sketch


class FDRows:
    """Single pass, deterministic: :class:`~upi_fast.linalg.FrequentDirections`."""

    checkpointable = True

    def __init__(self, d, k, normalize_rows, device, ell: int | None = None) -> None:
        self.fd = FrequentDirections(d, ell or max(2 * k + 8, 16), device=device)
        self.normalize_rows = normalize_rows

    def update(self, rows: torch.Tensor, row_offset: int | None = None) -> None:
        rows = rows.detach().float()
        self.fd.update(_normalize(rows) if self.normalize_rows else rows)

    def merge(self, comm) -> None:
        """Every rank's sketch merged in rank order (deterministic; FD is not linear, so the result
        is a valid FD sketch of all rows but not bit-equal to a single process's)."""
        if not comm.active:
            return
        states = comm.all_gather_objects(self.state())
        merged = FrequentDirections(self.fd.d, self.fd.ell, device=self.fd.device)
        for tensors, meta in states:
            part = FrequentDirections(self.fd.d, self.fd.ell, device=self.fd.device)
            part.load_state_dict({**meta, **tensors})
            merged.merge(part)
        self.fd = merged

    def state(self) -> tuple[dict, dict]:
        return _split_state(self.fd.state_dict())

    def load(self, tensors: dict, meta: dict) -> None:
        self.fd.load_state_dict({**meta, **tensors})

    def finalize(self, k: int = 1):
        return self.fd.finalize(k)

    @property
    def operand(self):
        return self.fd


class SpilledRows:
    """Multi-pass: rows spill to a memory-mapped file (``spill_dir`` or the temp dir), then
    :func:`~upi_fast.linalg.randomized_svd` (subspace iteration or block Krylov) re-reads it.
    ``spill_dtype``: float32, or float16 (per-row power-of-two scales) / bfloat16, half the disk
    (:mod:`upi_fast.linalg.spill`); each row carries a CRC32, checked the first time it is read."""

    def __init__(self, d, k, seed, normalize_rows, device, method, spill_dir=None, spill_dtype="float32",
                 **kw) -> None:
        dtype = _spill_dtype(spill_dtype, "spill_dtype")
        suffix = {torch.float32: ".f32", torch.float16: ".f16", torch.bfloat16: ".bf16", torch.float64: ".f64"}[dtype]
        fd, self.path = tempfile.mkstemp(prefix="upi_rows_", suffix=suffix, dir=spill_dir)
        os.close(fd)
        self.writer = MemmapRowWriter(self.path, d, dtype)
        self.normalize_rows, self.method, self.seed, self.kw, self.device = normalize_rows, method, seed, kw, device
        self._source = None

    checkpointable = False

    def update(self, rows: torch.Tensor, row_offset: int | None = None) -> None:
        rows = rows.detach().float()
        self.writer.append(_normalize(rows) if self.normalize_rows else rows)

    def merge(self, comm) -> None:
        if comm.active:
            raise ValueError(f"solver={self.method!r} is single-process only (its rows spill to a local file); "
                             "use solver='sketch' or 'exact' with several processes")

    @property
    def operand(self):
        if self._source is None:
            self._source = self.writer.finish(device=self.device)
        return self._source

    def finalize(self, k: int = 1):
        r = randomized_svd(self.operand, k=k, method=self.method, seed=self.seed, **self.kw)
        return r.S, r.Vh

    def close(self) -> None:
        """Delete the spill file (idempotent)."""
        self.writer.close()
        self._source = None
        for path in (self.path, self.writer.partial):
            if os.path.exists(path):
                os.unlink(path)

    def __del__(self) -> None:
        try:
            self.close()
        except (OSError, AttributeError):
            pass


def streaming_accumulator(solver: str, d: int, k: int, seed: int, normalize_rows: bool, device, spill_dir,
                          kw: dict, spill_dtype: object = "float32"):
    if solver == "sketch":
        return SketchRows(d, k, seed, normalize_rows, device, **kw)
    if solver == "frequent_directions":
        return FDRows(d, k, normalize_rows, device, **kw)
    return SpilledRows(d, k, seed, normalize_rows, device, solver, spill_dir, spill_dtype, **kw)


def streaming_pca_plus(rows, lab, lam: float, seed: int = 0):
    """PCA+ eigenvector by Lanczos on ``G^T G / ||G||_F^2 - lam V^T V / ||V||_F^2``, with G and V
    given as in-memory matrices, spilled files (exact operator, one pass per matvec) or sketches
    (their low-rank approximations of the Gram matrices)."""
    ops = [r.matrix() if hasattr(r, "matrix") else r.operand for r in (rows, lab)]
    res = pca_plus_eigenvector(ops[0], ops[1], lam=lam, seed=seed)
    return res.v, res.theta, res.residual
