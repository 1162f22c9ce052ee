"""Re-readable row sources: a matrix (n x d) that can be read in row blocks, any number of times.

A *row source* has ``shape -> (n, d)`` and ``blocks(block_size) -> Iterator[(row_offset, block)]``
where ``block`` is a (b, d) tensor holding rows ``row_offset .. row_offset + b - 1``. Multi-pass
methods (:mod:`upi_fast.linalg.krylov`, :mod:`upi_fast.linalg.eigsh`) read a source once per pass;
the single-pass sketches accept any iterable of blocks.

* :class:`TensorRows`  -- a tensor already in memory (blocks are views, no copies);
* :class:`~upi_fast.linalg.spill.MemmapRows` / :class:`~upi_fast.linalg.spill.MemmapRowWriter`
  (in :mod:`upi_fast.linalg.spill`) -- rows spilled to a raw, checksummed file (float32, or half
  precision with per-row scales) for multi-pass methods, read back through a ``numpy.memmap``;
* :class:`CallableRows` -- rows regenerated on demand by ``fn(start, stop)``.
"""
from __future__ import annotations

from typing import Callable, Iterator, Protocol, runtime_checkable

import numpy as np
import torch

from ._checks import check_positive_int, check_rows

__all__ = ["RowSource", "TensorRows", "CallableRows", "as_source", "default_block_size"]

def default_block_size(d: int, itemsize: int = 4, target_bytes: int = 64 * 2**20) -> int:
    """Rows per block so that one block holds about ``target_bytes`` (at least 1 row)."""
    return max(1, target_bytes // max(1, d * itemsize))


@runtime_checkable
class RowSource(Protocol):
    """A re-readable n x d matrix delivered in row blocks."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, d)``: number of rows and row width."""
        ...

    def blocks(self, block_size: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(row_offset, block)`` with ``block`` of shape (b, d), in row order."""
        ...


class TensorRows:
    """A (n, d) floating-point tensor as a row source; ``blocks()`` yields views (no copies).

    ``block_size=None`` yields the whole tensor as one block (fastest for in-memory data: one
    large matrix product per pass).
    """

    def __init__(self, tensor: torch.Tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            raise ValueError(f"tensor must be a 2-D torch.Tensor, got "
                             f"{tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__}")
        check_rows(tensor, tensor.shape[1], name="tensor")
        self.tensor = tensor

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, d)``: rows and row width."""
        return (int(self.tensor.shape[0]), int(self.tensor.shape[1]))

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the rows as stored."""
        return self.tensor.dtype

    @property
    def device(self) -> torch.device:
        """device the blocks are returned on."""
        return self.tensor.device

    def blocks(self, block_size: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(row_offset, block)`` pairs covering the rows in order; blocks are (b, d), b <= block_size."""
        n = self.tensor.shape[0]
        bs = n if block_size is None else check_positive_int(block_size, "block_size")
        for start in range(0, n, max(bs, 1)):
            yield start, self.tensor[start:start + bs]


class CallableRows:
    """Rows regenerated on demand: ``fn(start, stop)`` returns rows ``start .. stop-1`` as a tensor.

    ``fn`` must be deterministic (the same rows each call) for multi-pass methods to be correct.
    Each returned block is checked for shape ``(stop - start, d)``.

    Args:
        fn: ``fn(start: int, stop: int) -> Tensor`` of shape (stop - start, d).
        n, d: matrix shape.
        block_size: rows per call when ``blocks()`` is called without a size.
    """

    def __init__(self, fn: Callable[[int, int], torch.Tensor], n: int, d: int, block_size: int = 256) -> None:
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {type(fn).__name__}")
        check_positive_int(n, "n", 0)
        check_positive_int(d, "d")
        self.fn, self.n, self.d = fn, n, d
        self.block_size = check_positive_int(block_size, "block_size")

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, d)``: rows and row width."""
        return (self.n, self.d)

    def blocks(self, block_size: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(row_offset, block)`` pairs covering the rows in order; blocks are (b, d), b <= block_size."""
        bs = self.block_size if block_size is None else check_positive_int(block_size, "block_size")
        for start in range(0, self.n, bs):
            stop = min(start + bs, self.n)
            block = self.fn(start, stop)
            if not isinstance(block, torch.Tensor) or tuple(block.shape) != (stop - start, self.d):
                got = tuple(block.shape) if isinstance(block, torch.Tensor) else type(block).__name__
                raise ValueError(f"fn({start}, {stop}) must return a tensor of shape ({stop - start}, {self.d}), "
                                 f"got {got}")
            yield start, block


def as_source(x: object) -> RowSource:
    """A row source for ``x``: a tensor (or numpy array) becomes :class:`TensorRows`; a source is
    returned unchanged."""
    if isinstance(x, torch.Tensor):
        return TensorRows(x)
    if isinstance(x, np.ndarray):
        return TensorRows(torch.from_numpy(x))
    if isinstance(x, RowSource):
        return x
    raise ValueError(f"source must be a tensor, a numpy array or a row source (shape + blocks), "
                     f"got {type(x).__name__}")
