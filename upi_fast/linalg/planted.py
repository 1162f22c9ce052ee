"""Matrices with a planted spectrum, regenerated row by row from a seed (for tests and benchmarks).

``A = U diag(sigma) V + noise * Z`` with ``V`` (r x d) orthonormal rows, ``U`` (n x r) and ``Z``
(n x d) i.i.d. Gaussian, ``U`` scaled by ``1/sqrt(n)`` so that ``U^T U ~ I`` and A's top singular
values are close to ``sigma`` (exact values: compute them; the noise adds a Marchenko-Pastur bulk
near ``noise * (sqrt(n) + sqrt(d))``). Rows are produced in fixed chunks of ``chunk`` rows, chunk
``c`` from a generator seeded by ``(seed, c)``, so any row range is reproducible without storing
anything: the same rows for every block size and every pass (on a given device type).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ._checks import check_dtype, check_positive_int
from .sources import CallableRows

__all__ = ["PlantedRows", "SPECTRA"]

#: Named spectra ``r -> (sigma, noise)``: fast decay, slow (power-law) decay, small top gap
#: (sigma_2 / sigma_1 = 0.95), and the benchmark's ratio ~1.27 between the top two.
SPECTRA = {
    "fast": lambda r: ([0.5 ** j for j in range(r)], 1e-5),
    "slow": lambda r: ([(j + 1) ** -0.5 for j in range(r)], 1e-4),
    "gap": lambda r: ([1.0, 0.95] + [0.6 * 0.8 ** j for j in range(r - 2)], 1e-4),
    "ratio127": lambda r: ([1.27 ** -j for j in range(r)], 8e-4),
}


class PlantedRows(CallableRows):
    """Row source of an n x d planted-spectrum matrix (see module docstring).

    Args:
        n, d: shape.
        spectrum: the r planted singular values (descending), r <= d.
        noise: standard deviation of the i.i.d. Gaussian noise entries.
        seed: seed of V, U and Z.
        chunk: rows per generator chunk (block sizes that are multiples of it are cheapest).
        block_size: default rows per block.
        device, dtype: where and in which dtype rows are generated (float32/float64).
    """

    def __init__(self, n: int, d: int, spectrum: Sequence[float] | torch.Tensor, noise: float = 0.0,
                 seed: int = 0, chunk: int = 64, block_size: int = 256,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        check_positive_int(n, "n")
        check_positive_int(d, "d")
        self.chunk = check_positive_int(chunk, "chunk")
        self.dtype = check_dtype(dtype)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        sig = torch.as_tensor(spectrum, dtype=torch.float64).flatten()
        if sig.numel() == 0 or sig.numel() > d:
            raise ValueError(f"spectrum must hold 1..d values, got {sig.numel()}")
        if float(noise) < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.sigma, self.noise, self.seed = sig, float(noise), int(seed)
        g = torch.Generator(device="cpu").manual_seed(self.seed)
        V = torch.linalg.qr(torch.randn(d, sig.numel(), generator=g, dtype=torch.float64))[0].T
        self.V = V.to(self.device, dtype).contiguous()  # (r, d) planted right singular vectors
        self._SV = (sig.unsqueeze(1) * V).to(self.device, dtype).contiguous()  # diag(sigma) V
        super().__init__(self._rows, n, d, block_size)

    @classmethod
    def preset(cls, kind: str, n: int, d: int, r: int = 20, seed: int = 0, **kw: object) -> "PlantedRows":
        """A :data:`SPECTRA` preset (``"fast"``, ``"slow"``, ``"gap"``, ``"ratio127"``) with r planted values."""
        if kind not in SPECTRA:
            raise ValueError(f"kind must be one of {sorted(SPECTRA)}, got {kind!r}")
        sigma, noise = SPECTRA[kind](min(r, d))
        return cls(n, d, sigma, noise=noise, seed=seed, **kw)

    def _chunk_rows(self, c: int) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed((self.seed * 1_000_003 + c) % (2**63))
        rows = min(self.chunk, self.n - c * self.chunk)
        u = torch.randn(rows, self.sigma.numel(), generator=gen, device=self.device, dtype=self.dtype)
        u /= math.sqrt(self.n)
        if self.noise > 0:
            out = torch.randn(rows, self.d, generator=gen, device=self.device, dtype=self.dtype)
            out.mul_(self.noise).addmm_(u, self._SV)
            return out
        return u @ self._SV

    def _rows(self, start: int, stop: int) -> torch.Tensor:
        c0, c1 = start // self.chunk, (stop - 1) // self.chunk
        parts = [self._chunk_rows(c) for c in range(c0, c1 + 1)]
        full = parts[0] if len(parts) == 1 else torch.cat(parts)
        lo = start - c0 * self.chunk
        return full[lo:lo + (stop - start)]

    def materialize(self) -> torch.Tensor:
        """The whole matrix (n, d) (small sizes only)."""
        return self._rows(0, self.n)
