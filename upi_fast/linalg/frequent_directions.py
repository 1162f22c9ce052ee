"""Frequent Directions (Liberty 2013; Ghashami, Liberty, Phillips & Woodruff 2016): a deterministic,
mergeable sketch ``B`` (at most 2*ell x d) of a row stream ``A`` (n x d).

Rows fill a doubled buffer of ``2 * ell`` rows; when it is full the buffer is replaced by its SVD with
every squared singular value reduced by ``delta = s_ell^2`` (the ell-th largest), which zeroes at least
ell + 1 rows. Guarantees, for every unit vector x and every k < ell:

    0 <= ||A x||^2 - ||B x||^2 <= Delta <= ||A - A_k||_F^2 / (ell - k),

where ``Delta`` is the sum of the shrinkage amounts (tracked exactly, :attr:`delta_total`, an
a-posteriori bound often far below the a-priori one). Each shrink removes at least ``ell * delta`` of
squared Frobenius mass, which is what the bound rests on; the same accounting holds when two sketches
are merged (stack and shrink; Agarwal et al. 2013, "Mergeable summaries").

Cost: one shrink per ``ell + 1`` rows, each ``O(ell^2 d)`` (Gram of the buffer in the buffer dtype,
``eigh`` in float64). Memory: ``4 * ell * d`` entries (the buffer and a spare for the shrink).
"""
from __future__ import annotations

import torch

from ._checks import check_dtype, check_k, check_positive_int, check_rows, row_norms_sq
from ._nystrom import lowdin_rows
from .sketch import _complete

__all__ = ["FrequentDirections"]


class FrequentDirections:
    """Frequent Directions sketch with a doubled buffer.

    Args:
        d: row width.
        ell: sketch size; ``finalize(k)`` needs ``k < ell``. The bound is ``||A - A_k||_F^2/(ell-k)``.
        device: where the buffer lives; ``None`` adopts the device of the first update.
        dtype: buffer dtype, float32 or float64 (Gram products in it; eigen-decompositions in float64).
    """

    def __init__(self, d: int, ell: int, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        self.d = check_positive_int(d, "d")
        self.ell = check_positive_int(ell, "ell", 2)
        self.dtype = check_dtype(dtype)
        self._device_fixed = device is not None
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.buffer = torch.zeros(2 * self.ell, d, dtype=dtype, device=dev)
        self._work = torch.empty_like(self.buffer)  # double buffering for the shrink
        self.fill = 0  # rows of buffer in use
        self.n_rows = 0
        self.fro2 = 0.0  # ||A||_F^2 (float64 accumulation)
        self.delta_total = 0.0  # sum of shrinkage amounts: ||Ax||^2 - ||Bx||^2 <= delta_total

    @property
    def device(self) -> torch.device:
        """device holding the sketch buffer."""
        return self.buffer.device

    @property
    def sketch(self) -> torch.Tensor:
        """The current sketch rows ``B`` (fill, d) (a view)."""
        return self.buffer[:self.fill]

    def update(self, rows: torch.Tensor) -> None:
        """Add a block of rows (b, d). A rejected block (wrong shape/dtype/device, NaN/Inf) raises
        ValueError and leaves the sketch unchanged."""
        if not self._device_fixed and self.n_rows == 0 and isinstance(rows, torch.Tensor) \
                and rows.device != self.device:
            self.buffer = self.buffer.to(rows.device)
            self._work = torch.empty_like(self.buffer)
        rows = check_rows(rows, self.d, device=self.device)
        sq = row_norms_sq(rows, "rows", dtype=torch.float64)
        x = rows.to(self.dtype)
        self.fro2 += float(sq.sum())
        self.n_rows += x.shape[0]
        self._insert(x)

    def _insert(self, x: torch.Tensor) -> None:
        i, b = 0, x.shape[0]
        cap = 2 * self.ell
        while i < b:
            take = min(cap - self.fill, b - i)
            self.buffer[self.fill:self.fill + take] = x[i:i + take]
            self.fill += take
            i += take
            if self.fill == cap:
                self._shrink()

    def _shrink(self) -> None:
        C = self.buffer[:self.fill]
        G = (C @ C.T).to(torch.float64)  # Gram in the buffer dtype; eigh in float64
        lam, U = torch.linalg.eigh(0.5 * (G + G.T))  # ascending
        lam, U = lam.flip(0).clamp_min(0.0), U.flip(1)
        delta = float(lam[self.ell - 1]) if lam.numel() >= self.ell else 0.0
        keep = lam > delta
        lam_k, U_k = lam[keep], U[:, keep]
        # rows sqrt(lam - delta) v_i = sqrt((lam - delta)/lam) u_i^T C  (bounded: the factor is <= 1)
        coeff = (U_k * ((lam_k - delta) / lam_k).sqrt()).T.to(self.dtype)
        m = coeff.shape[0]
        torch.mm(coeff, C, out=self._work[:m])  # into the spare buffer: no allocation, no copy back
        self.buffer, self._work = self._work, self.buffer
        self.fill = m
        self.delta_total += delta

    def merge(self, other: "FrequentDirections") -> "FrequentDirections":
        """Absorb another FD sketch (same d; any ell): stack its rows and shrink. Returns self."""
        if not isinstance(other, FrequentDirections):
            raise ValueError(f"other must be a FrequentDirections, got {type(other).__name__}")
        if other.d != self.d:
            raise ValueError(f"other: row width {other.d} != {self.d}")
        if other.ell != self.ell:
            raise ValueError(f"other: ell {other.ell} != {self.ell}; merged bounds need equal ell")
        self._insert(other.sketch.to(self.device, self.dtype))
        self.fro2 += other.fro2
        self.delta_total += other.delta_total
        self.n_rows += other.n_rows
        return self

    def finalize(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k singular values ``S`` (k,) and right singular vectors ``Vh`` (k, d) of the sketch
        ``B`` (``k < ell``). ``S_i`` lies in ``[sqrt(sigma_i^2 - Delta), sigma_i]`` (sigma: A's)."""
        check_k(k, self.ell - 1, "ell - 1")
        if self.n_rows == 0:
            raise ValueError("k: the sketch has seen no rows yet")
        check_k(k, min(self.n_rows, self.d), "min(rows seen, d)")
        C = self.sketch.to(torch.float64)
        lam, U = torch.linalg.eigh(C @ C.T)
        lam, U = lam.flip(0).clamp_min(0.0), U.flip(1)
        S = lam.sqrt()
        pos = S > (S[0] * 1e-12 if S.numel() else 0.0)
        S, U = S[pos], U[:, pos]
        Vh = (U.T @ C) / S.unsqueeze(1)
        Vh = lowdin_rows(Vh)
        S, Vh = _complete(S, Vh, k, self.d)
        return S.to(self.dtype), Vh.to(self.dtype)

    def state_dict(self) -> dict:
        """Plain tensors and numbers (for checkpointing)."""
        return {"d": self.d, "ell": self.ell, "sketch": self.sketch.clone(), "n_rows": self.n_rows,
                "fro2": torch.tensor(self.fro2, dtype=torch.float64),
                "delta_total": torch.tensor(self.delta_total, dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (same d and ell)."""
        if state.get("d") != self.d or state.get("ell") != self.ell:
            raise ValueError(f"state: d/ell ({state.get('d')}, {state.get('ell')}) != ({self.d}, {self.ell})")
        B = state["sketch"]
        if not isinstance(B, torch.Tensor) or B.dim() != 2 or B.shape[1] != self.d or B.shape[0] > 2 * self.ell:
            raise ValueError(f"state['sketch'] must be a (m <= {2 * self.ell}, {self.d}) tensor")
        self.buffer[:B.shape[0]] = B.to(self.device, self.dtype)
        self.fill = B.shape[0]
        self.n_rows = int(state["n_rows"])
        self.fro2 = float(state["fro2"])
        self.delta_total = float(state["delta_total"])
