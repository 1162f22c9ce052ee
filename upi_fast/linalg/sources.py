"""Re-readable row sources: a matrix (n x d) that can be read in row blocks, any number of times.

A *row source* has ``shape -> (n, d)`` and ``blocks(block_size) -> Iterator[(row_offset, block)]``
where ``block`` is a (b, d) tensor holding rows ``row_offset .. row_offset + b - 1``. Multi-pass
methods (:mod:`upi_fast.linalg.krylov`, :mod:`upi_fast.linalg.eigsh`) read a source once per pass;
the single-pass sketches accept any iterable of blocks.

* :class:`TensorRows`  -- a tensor already in memory (blocks are views, no copies);
* :class:`MemmapRows`  -- a raw row-major file read through a read-only ``numpy.memmap``;
* :class:`MemmapRowWriter` -- appends row blocks to such a file (spill rows that arrive once, e.g.
  gradients, when a multi-pass method is wanted) and ``finish()`` returns the :class:`MemmapRows`;
* :class:`CallableRows` -- rows regenerated on demand by ``fn(start, stop)``.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Protocol, runtime_checkable

import numpy as np
import torch

from ._checks import check_positive_int, check_rows

__all__ = ["RowSource", "TensorRows", "MemmapRows", "MemmapRowWriter", "CallableRows", "as_source",
           "default_block_size"]

_NP_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


def default_block_size(d: int, itemsize: int = 4, target_bytes: int = 64 * 2**20) -> int:
    """Rows per block so that one block holds about ``target_bytes`` (at least 1 row)."""
    return max(1, target_bytes // max(1, d * itemsize))


def _torch_dtype(dtype: object, name: str = "dtype") -> torch.dtype:
    """float16/32/64 given as a torch dtype, a numpy dtype or a string."""
    if isinstance(dtype, torch.dtype):
        if dtype in _NP_DTYPES:
            return dtype
    else:
        try:
            npd = np.dtype(dtype)
        except TypeError:
            npd = None
        for td, nd in _NP_DTYPES.items():
            if npd == np.dtype(nd):
                return td
    raise ValueError(f"{name} must be float16, float32 or float64, got {dtype!r}")


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


class MemmapRows:
    """Rows of a raw row-major binary file (no header), read through a read-only ``numpy.memmap``.

    Args:
        path: file of exactly ``n * d * itemsize`` bytes (from ``offset``).
        n, d: matrix shape.
        dtype: element type of the file (float16/32/64, torch or numpy spelling).
        device: where blocks are delivered (default: CPU).
        offset: byte offset of the first row in the file.
    """

    def __init__(self, path: str | os.PathLike, n: int, d: int, dtype: object = torch.float32,
                 device: torch.device | str | None = None, offset: int = 0) -> None:
        check_positive_int(n, "n", 0)
        check_positive_int(d, "d")
        self.path = os.fspath(path)
        self._dtype = _torch_dtype(dtype)
        itemsize = np.dtype(_NP_DTYPES[self._dtype]).itemsize
        if not os.path.exists(self.path):
            raise ValueError(f"path {self.path!r} does not exist")
        size = os.path.getsize(self.path) - offset
        if size != n * d * itemsize:
            raise ValueError(f"path {self.path!r} holds {size} bytes after offset {offset}, expected "
                             f"n*d*itemsize = {n}*{d}*{itemsize} = {n * d * itemsize}")
        self.n, self.d, self.offset = n, d, offset
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._mm = (np.memmap(self.path, dtype=_NP_DTYPES[self._dtype], mode="r", offset=offset, shape=(n, d))
                    if n > 0 else None)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, d)``: rows and row width."""
        return (self.n, self.d)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the rows as stored."""
        return self._dtype

    @property
    def device(self) -> torch.device:
        """device the blocks are returned on."""
        return self._device

    def blocks(self, block_size: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(row_offset, block)`` pairs covering the rows in order; blocks are (b, d), b <= block_size."""
        bs = (default_block_size(self.d, torch.finfo(self._dtype).bits // 8) if block_size is None
              else check_positive_int(block_size, "block_size"))
        for start in range(0, self.n, bs):
            chunk = np.array(self._mm[start:start + bs])  # copy out of the read-only map
            yield start, torch.from_numpy(chunk).to(self._device)


class MemmapRowWriter:
    """Append (b, d) row blocks to a raw file; :meth:`finish` closes it and returns :class:`MemmapRows`.

    Rows are converted to ``dtype`` (float16/32/64) on the way out; rows with NaN/Inf are refused
    (nothing is written for a refused block). Usable as a context manager.
    """

    def __init__(self, path: str | os.PathLike, d: int, dtype: object = torch.float32) -> None:
        check_positive_int(d, "d")
        self.path = os.fspath(path)
        self.d = d
        self.dtype = _torch_dtype(dtype)
        self.n = 0
        self._fh = open(self.path, "wb")

    def append(self, rows: torch.Tensor) -> None:
        """Write a (b, d) block (any float dtype/device) after the rows written so far."""
        if self._fh is None:
            raise ValueError("rows: the writer is finished; open a new MemmapRowWriter")
        rows = check_rows(rows, self.d)
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("rows contains NaN or Inf; nothing was written")
        arr = rows.detach().to("cpu", self.dtype).contiguous().numpy()
        self._fh.write(arr.tobytes())
        self.n += arr.shape[0]

    def finish(self, device: torch.device | str | None = None) -> MemmapRows:
        """Flush and close the file; return a :class:`MemmapRows` over the rows written."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        return MemmapRows(self.path, self.n, self.d, self.dtype, device=device)

    def __enter__(self) -> "MemmapRowWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


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
