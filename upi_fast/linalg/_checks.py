"""Argument checks shared by the linalg modules (private).

Every check raises :class:`ValueError` whose message starts with the argument's name, so a bad
call says which argument was wrong. Nothing here mutates its inputs.
"""
from __future__ import annotations

import torch

__all__ = ["check_dtype", "check_rows", "check_k", "check_positive_int", "row_norms_sq"]

_FLOAT_SKETCH_DTYPES = (torch.float32, torch.float64)


def check_dtype(dtype: torch.dtype, name: str = "dtype") -> torch.dtype:
    """Accumulator dtypes: float32 or float64."""
    if dtype not in _FLOAT_SKETCH_DTYPES:
        raise ValueError(f"{name} must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def check_positive_int(value: int, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_k(k: int, limit: int, what: str, name: str = "k") -> int:
    """``1 <= k <= limit``; ``what`` names the limit in the message."""
    check_positive_int(k, name)
    if k > limit:
        raise ValueError(f"{name}={k} is larger than {what} ({limit})")
    return k


def check_rows(rows: object, d: int, name: str = "rows", device: torch.device | None = None) -> torch.Tensor:
    """A (b, d) real floating-point tensor (b >= 0); 1-D input of length d is one row.

    Finiteness is *not* checked here (it needs a pass over the data): callers check the squared
    row norms they compute anyway with :func:`row_norms_sq`.
    """
    if not isinstance(rows, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape (b, {d}), got {type(rows).__name__}")
    if rows.dim() == 1:
        rows = rows.unsqueeze(0)
    if rows.dim() != 2 or rows.shape[1] != d:
        raise ValueError(f"{name} must have shape (b, {d}), got {tuple(rows.shape)}")
    if not rows.is_floating_point() or rows.is_complex():
        raise ValueError(f"{name} must be a real floating-point tensor, got dtype {rows.dtype}")
    if device is not None and rows.device != device:
        raise ValueError(f"{name} is on {rows.device} but the sketch lives on {device}; move it first")
    return rows


def row_norms_sq(x: torch.Tensor, name: str = "rows", dtype: torch.dtype | None = None) -> torch.Tensor:
    """Squared L2 norm of each row, (b,), in ``dtype`` (default ``x.dtype``).

    Raises ValueError naming the first offending row when a row holds NaN/Inf (a non-finite norm
    is the cheap signal; an exact ``isfinite`` scan runs only then), or when a finite row's norm
    overflows ``dtype``.
    """
    dtype = dtype or x.dtype
    # Norms in x's own dtype (no widened copy of the block), squared in ``dtype``.
    sq = torch.linalg.vector_norm(x, dim=1).to(dtype).square()
    if not bool(torch.isfinite(sq).all()):
        bad_rows = (~torch.isfinite(x).all(dim=1)).nonzero()
        if bad_rows.numel():
            raise ValueError(f"{name} contains NaN or Inf (first bad row: {int(bad_rows[0, 0])} of the block)")
        raise ValueError(f"{name}: a row norm overflows {dtype}; rescale the rows or use float64")
    return sq
