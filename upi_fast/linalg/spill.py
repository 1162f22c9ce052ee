"""Spilling rows to disk for multi-pass methods: a checksummed raw file, optionally half precision.

* :class:`MemmapRowWriter` appends (b, d) row blocks to ``<path>.partial`` and :meth:`~MemmapRowWriter.finish`
  renames it to ``path`` (``os.replace``: a reader never sees a half-written spill) and returns
* :class:`MemmapRows`, the rows read back through a read-only ``numpy.memmap``, one block at a time.

Storage dtypes (:data:`SPILL_DTYPES`): ``float32`` (default, 4 bytes a value), ``float16`` and
``bfloat16`` (2 bytes: half the disk and half the bytes read per pass), ``float64``.

* ``float16`` has a narrow range (max 65504, smallest normal 2^-14): by default every row is stored
  divided by a per-row power of two ``s_i >= max_j |a_ij|`` (kept in memory, float32, 4 bytes a row),
  so no row can overflow and every row uses the full fp16 resolution, whatever its norm. The division
  and the multiplication back are exact (powers of two), so the only error is the fp16 rounding:
  ``|a_hat_ij - a_ij| <= max(2^-11 |a_ij|, 2^-25 s_i)`` (half an ulp; the second term for values
  that land in fp16's subnormal range). Blocks of a scaled spill come back as float32.
  Without scaling (``scale_rows=False``) a row holding a value beyond 65504 is refused.
* ``bfloat16`` has float32's range (no scaling needed) and 8 significant bits:
  ``|a_hat_ij - a_ij| <= 2^-8 |a_ij|``; blocks come back as bfloat16.

Every row carries a CRC32 of its stored bytes (kept in memory, 4 bytes a row); reading checks it
(``verify="first"``: the first time each row is read; ``"always"``; ``"never"``) and raises
:class:`SpillChecksumError` naming the row when the file no longer holds what was written.
"""
from __future__ import annotations

import os
import zlib
from typing import Iterable, Iterator

import numpy as np
import torch

from ._checks import check_positive_int, check_rows
from .sources import default_block_size

__all__ = ["MemmapRows", "MemmapRowWriter", "SpillChecksumError", "SPILL_DTYPES", "spill_dtype", "spill_rows"]

#: Storage dtypes of a spill, by name.
SPILL_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}
_ALIASES = {"fp32": "float32", "single": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16",
            "fp64": "float64", "double": "float64"}
# numpy type of the stored words (numpy has no bfloat16: its 16-bit patterns are stored as int16)
_NP_STORE = {torch.float16: np.float16, torch.bfloat16: np.int16, torch.float32: np.float32,
             torch.float64: np.float64}
_VERIFY = ("first", "always", "never")


class SpillChecksumError(ValueError):
    """A spilled row no longer matches the CRC32 recorded when it was written."""


def spill_dtype(dtype: object, name: str = "dtype") -> torch.dtype:
    """The storage dtype named by ``dtype``: a torch dtype, a numpy dtype or a string
    (``"float32"``/``"fp32"``, ``"float16"``/``"fp16"``/``"half"``, ``"bfloat16"``/``"bf16"``, ``"float64"``).
    Raises ValueError naming ``name`` for anything else."""
    if isinstance(dtype, torch.dtype):
        if dtype in _NP_STORE:
            return dtype
    elif isinstance(dtype, str):
        key = _ALIASES.get(dtype.lower(), dtype.lower())
        if key in SPILL_DTYPES:
            return SPILL_DTYPES[key]
    elif isinstance(dtype, (np.dtype, type)):  # numpy dtypes / scalar types only (np.dtype(None) is float64)
        try:
            npd = np.dtype(dtype)
        except TypeError:
            npd = None
        for td, nd in _NP_STORE.items():
            if td is not torch.bfloat16 and npd == np.dtype(nd):
                return td
    raise ValueError(f"{name} must be one of {tuple(SPILL_DTYPES)} (a string, torch or numpy dtype), got {dtype!r}")


def _itemsize(dtype: torch.dtype) -> int:
    return np.dtype(_NP_STORE[dtype]).itemsize


def _row_crcs(arr: np.ndarray) -> np.ndarray:
    """CRC32 of each row's bytes of a C-contiguous 2-D array, (b,) uint32."""
    return np.fromiter((zlib.crc32(row) for row in arr), dtype=np.uint32, count=arr.shape[0])


def pow2_scales(rows: torch.Tensor) -> torch.Tensor:
    """Per-row powers of two ``max_j |rows_ij| <= s_i < 2 max_j |rows_ij|`` (1 for an all-zero row),
    float32 (b,)."""
    amax = rows.abs().amax(dim=1).to(torch.float32) if rows.shape[1] else torch.zeros(rows.shape[0])
    m, e = torch.frexp(amax)  # amax = m 2^e, m in [0.5, 1)
    e = e - (m == 0.5).to(e.dtype)  # amax itself a power of two: s = amax
    return torch.where(amax > 0, torch.ldexp(torch.ones_like(amax), e), torch.ones_like(amax))


class MemmapRows:
    """Rows of a raw row-major binary file (no header), read through a read-only ``numpy.memmap``.

    Args:
        path: file of exactly ``n * d * itemsize`` bytes (from ``offset``).
        n, d: matrix shape.
        dtype: element type of the file (see :func:`spill_dtype`).
        device: where blocks are delivered (default: CPU).
        offset: byte offset of the first row in the file.
        scales: (n,) per-row factors the stored rows are multiplied by on reading (then blocks are
            float32); None: blocks come back in ``dtype``.
        checksums: (n,) CRC32 of each stored row (None: not checked).
        verify: ``"first"`` (check each row's CRC the first time it is read), ``"always"`` or ``"never"``.
    """

    def __init__(self, path: str | os.PathLike, n: int, d: int, dtype: object = torch.float32,
                 device: torch.device | str | None = None, offset: int = 0, scales: object = None,
                 checksums: object = None, verify: str = "first") -> None:
        check_positive_int(n, "n", 0)
        check_positive_int(d, "d")
        self.path = os.fspath(path)
        self._dtype = spill_dtype(dtype)
        itemsize = _itemsize(self._dtype)
        if not os.path.exists(self.path):
            raise ValueError(f"path {self.path!r} does not exist")
        size = os.path.getsize(self.path) - offset
        if size != n * d * itemsize:
            raise ValueError(f"path {self.path!r} holds {size} bytes after offset {offset}, expected "
                             f"n*d*itemsize = {n}*{d}*{itemsize} = {n * d * itemsize}")
        if verify not in _VERIFY:
            raise ValueError(f"verify must be one of {_VERIFY}, got {verify!r}")
        self.scales = self._per_row(scales, n, np.float32, "scales")
        self.checksums = self._per_row(checksums, n, np.uint32, "checksums")
        if self.scales is not None and not (np.isfinite(self.scales).all() and (self.scales > 0).all()):
            raise ValueError("scales must be finite and > 0")
        self.n, self.d, self.offset, self.verify = n, d, offset, verify
        self._checked = np.zeros(n, dtype=bool)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._mm = (np.memmap(self.path, dtype=_NP_STORE[self._dtype], mode="r", offset=offset, shape=(n, d))
                    if n > 0 else None)

    @staticmethod
    def _per_row(values, n: int, np_dtype, name: str) -> np.ndarray | None:
        if values is None:
            return None
        arr = np.asarray(values.cpu() if isinstance(values, torch.Tensor) else values)
        if arr.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
        return np.ascontiguousarray(arr, dtype=np_dtype)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, d)``: rows and row width."""
        return (self.n, self.d)

    @property
    def dtype(self) -> torch.dtype:
        """dtype of the rows as stored."""
        return self._dtype

    @property
    def block_dtype(self) -> torch.dtype:
        """dtype of the blocks yielded: float32 for a scaled spill, else the stored dtype."""
        return torch.float32 if self.scales is not None else self._dtype

    @property
    def nbytes(self) -> int:
        """Bytes of row data on disk (``n * d * itemsize``)."""
        return self.n * self.d * _itemsize(self._dtype)

    @property
    def device(self) -> torch.device:
        """device the blocks are returned on."""
        return self._device

    def _check(self, start: int, chunk: np.ndarray) -> None:
        stop = start + chunk.shape[0]
        todo = (np.arange(chunk.shape[0]) if self.verify == "always"
                else np.flatnonzero(~self._checked[start:stop]))
        if not todo.size:
            return
        got = _row_crcs(chunk[todo]) if todo.size < chunk.shape[0] else _row_crcs(chunk)
        bad = np.flatnonzero(got != self.checksums[start + todo])
        if bad.size:
            row = int(start + todo[bad[0]])
            raise SpillChecksumError(f"path {self.path!r}: row {row} fails its CRC32 checksum (written "
                                     f"{int(self.checksums[row]):08x}, read {int(got[bad[0]]):08x}); the spill "
                                     "file was modified or corrupted after it was written")
        self._checked[start + todo] = True

    def blocks(self, block_size: int | None = None) -> Iterator[tuple[int, torch.Tensor]]:
        """Yield ``(row_offset, block)`` pairs covering the rows in order; blocks are (b, d), b <= block_size."""
        bs = (default_block_size(self.d, _itemsize(self._dtype)) if block_size is None
              else check_positive_int(block_size, "block_size"))
        for start in range(0, self.n, bs):
            chunk = np.array(self._mm[start:start + bs])  # copy out of the read-only map
            if self.checksums is not None and self.verify != "never":
                self._check(start, chunk)
            blk = torch.from_numpy(chunk)
            if self._dtype == torch.bfloat16:
                blk = blk.view(torch.bfloat16)
            if self.scales is not None:
                s = torch.from_numpy(self.scales[start:start + chunk.shape[0]])
                blk = blk.to(torch.float32).mul_(s.unsqueeze(1))  # exact: powers of two
            yield start, blk.to(self._device)


class MemmapRowWriter:
    """Append (b, d) row blocks to a raw file; :meth:`finish` closes it and returns :class:`MemmapRows`.

    Rows are written to ``<path>.partial``, converted to ``dtype``; ``finish()`` renames the file to
    ``path``. Rows with NaN/Inf are refused (nothing is written for a refused block). Usable as a
    context manager; leaving the ``with`` block without ``finish()`` deletes the partial file.

    Args:
        path: the finished file.
        d: row width.
        dtype: storage dtype (:func:`spill_dtype`): float32 (default), float16, bfloat16, float64.
        scale_rows: store each row divided by a power of two ``>= max |row|`` (see the module doc);
            None: only for float16, where it is needed to be safe from overflow and underflow.
        checksums: record a CRC32 per row (checked on reading).
    """

    def __init__(self, path: str | os.PathLike, d: int, dtype: object = torch.float32,
                 scale_rows: bool | None = None, checksums: bool = True) -> None:
        check_positive_int(d, "d")
        self.path = os.fspath(path)
        self.partial = self.path + ".partial"
        self.d = d
        self.dtype = spill_dtype(dtype)
        if scale_rows is not None and not isinstance(scale_rows, bool):
            raise ValueError(f"scale_rows must be True, False or None, got {scale_rows!r}")
        if not isinstance(checksums, bool):
            raise ValueError(f"checksums must be True or False, got {checksums!r}")
        self.scale_rows = (self.dtype == torch.float16) if scale_rows is None else scale_rows
        self.n = 0
        self._scales: list[torch.Tensor] = []
        self._crcs: list[np.ndarray] | None = [] if checksums else None
        self._fh = open(self.partial, "wb")
        self._source: MemmapRows | None = None

    def append(self, rows: torch.Tensor) -> None:
        """Write a (b, d) block (any float dtype/device) after the rows written so far."""
        if self._fh is None:
            raise ValueError("rows: the writer is finished; open a new MemmapRowWriter")
        rows = check_rows(rows, self.d).detach().cpu()
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("rows contains NaN or Inf; nothing was written")
        if self.scale_rows:
            s = pow2_scales(rows)
            if not bool(torch.isfinite(s).all()):
                raise ValueError("rows: a value overflows float32 (the per-row scales are float32); nothing was written")
            rows = rows / s.to(rows.dtype).unsqueeze(1)  # exact: a power of two
        elif self.dtype == torch.float16 and rows.numel():
            big = float(rows.abs().max())
            if big > torch.finfo(torch.float16).max:
                raise ValueError(f"rows: a value of magnitude {big:.4g} overflows float16 (max 65504); use "
                                 "scale_rows=True (per-row scales) or dtype float32/bfloat16; nothing was written")
        stored = rows.to(self.dtype).contiguous()
        arr = (stored.view(torch.int16) if self.dtype == torch.bfloat16 else stored).numpy()
        if self._crcs is not None:
            self._crcs.append(_row_crcs(arr))
        self._fh.write(arr.data)
        if self.scale_rows:
            self._scales.append(s)
        self.n += arr.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes of row data written so far."""
        return self.n * self.d * _itemsize(self.dtype)

    def finish(self, device: torch.device | str | None = None, verify: str = "first") -> MemmapRows:
        """Flush and close the file, rename it to ``path``; return a :class:`MemmapRows` over the
        rows written (the same object on a second call)."""
        if self._source is not None:
            return self._source
        if self._fh is None:
            raise ValueError(f"path {self.path!r}: the writer was closed without finish(); nothing to read")
        self._fh.close()
        self._fh = None
        os.replace(self.partial, self.path)
        scales = torch.cat(self._scales) if self.scale_rows and self._scales else (
            torch.ones(0) if self.scale_rows else None)
        crcs = (np.concatenate(self._crcs) if self._crcs else np.zeros(0, np.uint32)) \
            if self._crcs is not None else None
        self._source = MemmapRows(self.path, self.n, self.d, self.dtype, device=device, scales=scales,
                                  checksums=crcs, verify=verify)
        return self._source

    def close(self) -> None:
        """Close without finishing: the partial file is deleted (idempotent; a finished file is kept)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            if os.path.exists(self.partial):
                os.unlink(self.partial)

    def __enter__(self) -> "MemmapRowWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def spill_rows(blocks: Iterable, path: str | os.PathLike, d: int | None = None, dtype: object = torch.float32,
               scale_rows: bool | None = None, device: torch.device | str | None = None) -> MemmapRows:
    """Write a one-shot iterable of (b, d) blocks (or ``(row_offset, block)`` pairs, in row order)
    to ``path`` and return the re-readable :class:`MemmapRows`. ``d``: row width (default: the
    first block's). The partial file is deleted if the iterable raises."""
    it = iter(blocks)
    writer = None
    try:
        for item in it:
            blk = item[1] if isinstance(item, tuple) else item
            if writer is None:
                width = d if d is not None else (blk.shape[-1] if isinstance(blk, torch.Tensor) else None)
                if width is None:
                    raise ValueError(f"blocks must yield tensors, got {type(blk).__name__}")
                writer = MemmapRowWriter(path, width, dtype, scale_rows)
            writer.append(blk)
        if writer is None:
            raise ValueError("blocks: the block iterable was empty")
        return writer.finish(device=device)
    finally:
        if writer is not None:
            writer.close()
