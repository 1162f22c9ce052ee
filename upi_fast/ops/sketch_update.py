"""Op ``upi_fast::sketch_update``: ``W += Psi[:, rows] @ normalize_rows(A)`` in place.

``W`` (k x d, float32/float64) is the co-range sketch of a streamed matrix whose rows arrive in
blocks ``A`` (b x d, any float dtype) with global row indices ``row_offset .. row_offset+b-1``.
``Psi`` (k x n) is a Rademacher test matrix that is never materialised: its entry for sketch row
``j`` and global matrix row ``i`` is a pure function of ``(seed, i, j)`` (:func:`rademacher_columns`),
so that every implementation (PyTorch, Triton, CUDA), device and worker generates the same
entries, and sketches of disjoint row sets merge exactly by summation.

Generator (all arithmetic on unsigned 32-bit integers, wrapping):

    mix(x)   = lowbias32: x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15; x *= 0x846CA68B; x ^= x >> 16
    key      = mix(seed mod 2^32)
    h(i, j)  = mix( mix(i + key) + j * 0x9E3779B9 )
    Psi[j,i] = +1 if the top bit of h is 0 else -1

Rows are optionally scaled to unit L2 norm first (a zero row stays zero).
"""
from __future__ import annotations

import torch

__all__ = ["sketch_update", "sketch_update_reference", "rademacher_columns", "mix32"]

_M32 = 0xFFFFFFFF
_C1, _C2, _GOLD = 0x7FEB352D, 0x846CA68B, 0x9E3779B9

# The schema and the implementations (torch reference, Triton, CUDA) are in upi_fast/ops/table.py.


@torch.library.register_fake("upi_fast::sketch_update")
def _fake(W, A, row_offset, seed, normalize):
    return None


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2^32`` for int64 tensors holding values in [0, 2^32), without overflow."""
    lo = x * (c & 0xFFFF)
    hi = (x * (c >> 16)) & 0xFFFF
    return (lo + (hi << 16)) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 integer hash on an int64 tensor of values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, _C1)
    x = x ^ (x >> 15)
    x = _mul32(x, _C2)
    return x ^ (x >> 16)


def rademacher_columns(seed: int, rows: torch.Tensor, k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Columns ``rows`` of the Rademacher test matrix: a (k, len(rows)) tensor of +-1.

    Args:
        seed: any integer (used modulo 2^32).
        rows: 1-D integer tensor of global row indices in [0, 2^32); its device is used.
        k: number of sketch rows.
    """
    rows = rows.to(torch.int64)
    key = mix32(torch.tensor(int(seed) & _M32, dtype=torch.int64, device=rows.device))
    hi = mix32((rows + key) & _M32)  # (b,)
    j = torch.arange(k, dtype=torch.int64, device=rows.device)
    h = mix32((hi.unsqueeze(0) + _mul32(j, _GOLD).unsqueeze(1)) & _M32)  # (k, b)
    return (1 - 2 * (h >> 31)).to(dtype)


def sketch_update_reference(W: torch.Tensor, A: torch.Tensor, row_offset: int, seed: int,
                            normalize: bool) -> None:
    """Pure-PyTorch implementation; accumulates in ``W``'s dtype."""
    A = A.to(W.dtype)
    if normalize:
        n = A.norm(dim=1, keepdim=True)
        A = torch.where(n > 0, A / n.clamp_min(1e-30), torch.zeros_like(A))
    rows = torch.arange(row_offset, row_offset + A.shape[0], device=A.device)
    W.add_(rademacher_columns(seed, rows, W.shape[0], W.dtype) @ A)


def sketch_update(W: torch.Tensor, A: torch.Tensor, row_offset: int, seed: int, normalize: bool = True) -> None:
    """``W += Psi[:, row_offset:row_offset+b] @ normalize_rows(A)`` in place.

    Args:
        W: (k, d) float32 or float64 accumulator, contiguous, on the same device as ``A``.
        A: (b, d) block of rows (any float dtype; cast to ``W``'s dtype).
        row_offset: global index of ``A``'s first row (>= 0).
        seed: seed of the test matrix (the same for every block and every worker).
        normalize: scale each row to unit L2 norm first.
    """
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or W.dtype not in (torch.float32, torch.float64):
        raise ValueError("W must be a 2-D float32/float64 tensor (k, d)")
    if not W.is_contiguous():
        raise ValueError("W must be contiguous (it is updated in place)")
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[1] != W.shape[1]:
        raise ValueError(f"A must have shape (b, {W.shape[1]}), got "
                         f"{tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__}")
    if not A.is_floating_point():
        raise TypeError(f"A must be a floating-point tensor, got {A.dtype}")
    if A.device != W.device:
        raise ValueError(f"A is on {A.device} but W is on {W.device}")
    if row_offset < 0 or row_offset + A.shape[0] > 2**32:
        raise ValueError(f"row_offset must be in [0, 2^32 - b], got {row_offset}")
    if A.shape[0] == 0:
        return
    torch.ops.upi_fast.sketch_update(W, A.contiguous(), int(row_offset), int(seed) & _M32, bool(normalize))
