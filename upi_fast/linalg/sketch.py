"""Single-pass, mergeable sketch of a row stream for its top singular values / right vectors.

Design (why not the Tropp et al. 2019 core-sketch reconstruction): the rows of ``A`` (n x d) arrive
in blocks ``A_b`` and each block is seen whole, so besides the range products ``Y_b = A_b Omega^T``
we can also accumulate ``A^T Y = sum_b A_b^T Y_b`` in the same pass. That is exactly the
information of the Halko-Martinsson-Tropp single-pass scheme with the *exact* ``B = Q^T A``
(equivalently the Nystrom approximation of ``A^T A``), with no per-row state: ``Y`` (n x l) is
never stored, only ``Kt = Omega A^T A`` (l x d). The core sketch ``Z = Phi A Psi^T`` of Tropp,
Yurtsever, Udell & Cevher (2017/2019) exists for *turnstile* streams where ``A^T Y`` cannot be
formed; for row streams it is strictly less accurate (measured on planted spectra: top-vector
|cos| 0.9958 vs 0.99996 with the same l = 11 and fast decay, 0.26 vs 0.98 with slow decay).

State (all O(d l), l = k + oversample; merged exactly by summation):

* ``W = Psi A`` (l x d): the linear co-range sketch, updated with
  :func:`upi_fast.ops.sketch_update.sketch_update` (Psi is a Rademacher matrix generated from
  ``(seed, global row index)``). It is independent of ``Omega`` and gives an unbiased a-posteriori
  estimate of ``||A - A_hat||_F`` (:meth:`StreamingSketch.error_estimate`) that, unlike the exact
  identity below, does not suffer cancellation when the residual is tiny.
* ``Kt = Omega A^T A`` (l x d): the Gram sketch; ``Omega`` (l x d) is Rademacher, generated from
  ``(seed, column index)`` and cached (never per row).
* ``fro2 = ||A||_F^2`` (float64), the row count, and the set of global row indices seen (to refuse
  merges of overlapping row ranges, which would silently reuse test-matrix columns).

Guarantees of :meth:`StreamingSketch.finalize` (``A_hat = Q Q^T A``, ``Q = orth(A Omega^T)``):
``S_i <= sigma_i(A) <= sqrt(S_i^2 + ||A - A_hat||_2^2)`` and
``||A - A_hat||_F^2 = ||A||_F^2 - sum_i S_i^2`` (exact, computed). In expectation
(HMT 2011, Thm 10.5, proved for Gaussian test matrices; Rademacher ones behave alike in practice),
``E ||A - A_hat||_F <= (1 + k/(p-1))^{1/2} (sum_{j>k} sigma_j^2)^{1/2}`` with ``p = oversample >= 2``:
one pass is only as good as the Frobenius tail allows. When the top direction carries a small share
of ``||A||_F^2`` (heavy-tailed spectra, e.g. normalised gradient rows), use a multi-pass method on a
re-readable source (:func:`upi_fast.linalg.randomized_svd`; spill with ``MemmapRowWriter``).
The top vector's angle obeys
``sin theta_1 <= r^2 / (S_1^2 - S_2^2 - r^2)`` with ``r = ||A - A_hat||_2`` (Davis-Kahan), reported.

Memory: ``2 l d`` accumulator entries plus the cached ``Omega`` (l x d); no per-row state.
"""
from __future__ import annotations

import dataclasses

import torch

from .. import ops as _ops
from ..ops.sketch_update import rademacher_columns, sketch_update
from ._checks import check_dtype, check_k, check_positive_int, check_rows, row_norms_sq
from ._nystrom import default_rtol, nystrom_svd, projection_bounds

__all__ = ["StreamingSketch", "SketchError"]

_STATE_VERSION = 1
_OMEGA_SALT = 0x5BD1E995  # derives Omega's seed from the sketch seed (independent of Psi)
_MAX_ROW = 2**32


@dataclasses.dataclass
class SketchError:
    """A-posteriori accuracy of :meth:`StreamingSketch.finalize` (all in the units of A's entries).

    Attributes:
        fro_norm: ``||A||_F`` of the rows seen (exact, float64 accumulation).
        residual_fro: ``||A - A_hat||_F`` from the exact identity ``||A||_F^2 - sum S_i^2``
            (rigorous, but limited by cancellation to about ``sqrt(eps) ||A||_F``).
        residual_fro_k: ``||A - [A_hat]_k||_F`` for the rank-k truncation (same identity).
        residual_fro_sketch: unbiased randomized estimate of ``||A - A_hat||_F`` from the co-range
            sketch W (relative spread about ``sqrt(2/l)``; no cancellation).
        sigma_upper: (k,) upper bounds ``sqrt(S_i^2 + residual_fro^2)`` of the true singular values
            (the returned ``S_i`` are lower bounds).
        sin_angle_bound: Davis-Kahan bound on ``sin`` of the angle between the returned top vector
            and the true one (1.0 when the bound is vacuous).
    """
    fro_norm: float
    residual_fro: float
    residual_fro_k: float
    residual_fro_sketch: float
    sigma_upper: torch.Tensor
    sin_angle_bound: float


class StreamingSketch:
    """Single-pass, mergeable sketch of an n x d row stream (n unknown in advance).

    Args:
        d: row width.
        k: number of singular triplets wanted by default (``finalize(k=None)``).
        oversample: extra sketch columns; the sketch size is ``l = k + oversample``.
        seed: seed of every test matrix (identical on every worker so sketches merge).
        normalize_rows: scale each row to unit L2 norm before sketching (zero rows stay zero).
        device: where the state lives; ``None`` adopts the device of the first update.
        dtype: accumulator dtype, float32 or float64.

    Per update of ``b`` rows the cost is about ``3 * b * d * l`` multiply-adds; memory is
    ``3 * l * d`` entries (W, Kt, cached Omega).
    """

    def __init__(self, d: int, k: int = 1, oversample: int = 10, seed: int = 0, normalize_rows: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.d = check_positive_int(d, "d")
        self.k = check_positive_int(k, "k")
        self.oversample = check_positive_int(oversample, "oversample", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.normalize_rows = bool(normalize_rows)
        self.dtype = check_dtype(dtype)
        self.l = self.k + self.oversample
        self._device_fixed = device is not None
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.W = torch.zeros(self.l, d, dtype=dtype, device=dev)
        self.Kt = torch.zeros(self.l, d, dtype=dtype, device=dev)
        self.fro2 = torch.zeros((), dtype=torch.float64, device=dev)
        self.n_rows = 0
        self.next_row = 0
        self._ranges: list[list[int]] = []  # sorted disjoint [start, stop) of global rows seen
        self._omega: torch.Tensor | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        """device holding the sketch state."""
        return self.W.device

    def _params(self) -> dict:
        return {"d": self.d, "k": self.k, "oversample": self.oversample, "seed": self.seed,
                "normalize_rows": int(self.normalize_rows)}

    def _to(self, device: torch.device) -> None:
        self.W, self.Kt, self.fro2 = self.W.to(device), self.Kt.to(device), self.fro2.to(device)
        self._omega = None

    def omega(self) -> torch.Tensor:
        """The (l, d) Rademacher test matrix of the Gram sketch (a pure function of seed, column)."""
        if self._omega is None or self._omega.device != self.device:
            cols = torch.arange(self.d, device=self.device)
            self._omega = rademacher_columns(self.seed ^ _OMEGA_SALT, cols, self.l, self.dtype)
        return self._omega

    @staticmethod
    def _overlaps(ranges: list[list[int]], start: int, stop: int) -> bool:
        return any(s < stop and start < e for s, e in ranges)

    @staticmethod
    def _add_range(ranges: list[list[int]], start: int, stop: int) -> list[list[int]]:
        out = sorted([list(r) for r in ranges] + [[start, stop]])
        merged: list[list[int]] = []
        for s, e in out:
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        return merged

    # ------------------------------------------------------------------ streaming
    def update(self, rows: torch.Tensor, row_offset: int | None = None) -> None:
        """Add a block of rows (b, d) whose first row has global index ``row_offset``.

        ``row_offset`` defaults to the end of the previous update (the count of rows seen when
        offsets are never given). Offsets must be disjoint across updates and across sketches that
        will be merged. A rejected block (wrong shape/dtype/device, NaN/Inf, overlapping offsets)
        raises ValueError and leaves the sketch unchanged.
        """
        if not self._device_fixed and self.n_rows == 0 and isinstance(rows, torch.Tensor) \
                and rows.device != self.device:
            self._to(rows.device)
        rows = check_rows(rows, self.d, device=self.device)
        b = rows.shape[0]
        off = self.next_row if row_offset is None else row_offset
        if isinstance(off, bool) or not isinstance(off, int) or off < 0 or off + b > _MAX_ROW:
            raise ValueError(f"row_offset must be an int in [0, 2^32 - b] (b = {b}), got {row_offset!r}")
        if b == 0:
            return
        if self._overlaps(self._ranges, off, off + b):
            raise ValueError(f"row_offset: rows [{off}, {off + b}) overlap rows already in the sketch")
        x = rows.to(self.dtype)
        sq = row_norms_sq(x, "rows", dtype=torch.float64)  # NaN/Inf check before any state change
        om = self.omega()
        y = x @ om.T  # (b, l) = A_b Omega^T
        if self.normalize_rows:
            nz = sq > 0
            inv = torch.where(nz, sq.clamp_min(1e-300).rsqrt(), torch.zeros_like(sq)).to(self.dtype)
            y = y * inv.square().unsqueeze(1)  # rows of A_b scaled twice: once for Y, once for A_b^T
            fro_inc = nz.sum().to(torch.float64)
        else:
            fro_inc = sq.sum()
        # --- commit (no failure possible past this point) ---
        if self.normalize_rows and _ops.resolve_backend(self.device) == "torch":
            # The reference op would re-normalise with several temporaries; one scaling here is cheaper.
            sketch_update(self.W, x * inv.unsqueeze(1), off, self.seed, False)
        else:
            sketch_update(self.W, rows if self.normalize_rows else x, off, self.seed, self.normalize_rows)
        self.Kt.addmm_(y.T, x)
        self.fro2 += fro_inc
        self.n_rows += b
        self.next_row = off + b
        self._ranges = self._add_range(self._ranges, off, off + b)

    def merge(self, other: "StreamingSketch") -> "StreamingSketch":
        """Add another sketch of *disjoint* rows (same d, k, oversample, seed, normalize_rows,
        dtype); the result equals the sketch of the stacked rows up to rounding. Returns self."""
        if not isinstance(other, StreamingSketch):
            raise ValueError(f"other must be a StreamingSketch, got {type(other).__name__}")
        mine, theirs = self._params(), other._params()
        diff = [f"{key}: {mine[key]} != {theirs[key]}" for key in mine if mine[key] != theirs[key]]
        if other.dtype != self.dtype:
            diff.append(f"dtype: {self.dtype} != {other.dtype}")
        if diff:
            raise ValueError("other: cannot merge sketches with different parameters (" + "; ".join(diff) + ")")
        for s, e in other._ranges:
            if self._overlaps(self._ranges, s, e):
                raise ValueError(f"other: its rows [{s}, {e}) overlap rows of this sketch; "
                                 "give each worker disjoint row_offset ranges")
        if self.n_rows == 0 and not self._device_fixed and other.device != self.device:
            self._to(other.device)
        self.W += other.W.to(self.device)
        self.Kt += other.Kt.to(self.device)
        self.fro2 += other.fro2.to(self.device)
        self.n_rows += other.n_rows
        self.next_row = max(self.next_row, other.next_row)
        for s, e in other._ranges:
            self._ranges = self._add_range(self._ranges, s, e)
        return self

    # ------------------------------------------------------------------ results
    def _core(self) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.Kt.to(torch.float64) @ self.omega().to(torch.float64).T  # Omega A^T A Omega^T
        return nystrom_svd(self.Kt, T, default_rtol(self.dtype))

    def _check_k(self, k: int | None) -> int:
        k = self.k if k is None else k
        check_k(k, self.l, "the sketch size l = k + oversample")
        if self.n_rows == 0:
            raise ValueError("k: the sketch has seen no rows yet")
        check_k(k, min(self.n_rows, self.d), "min(rows seen, d)")
        return k

    def finalize(self, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k singular values ``S`` (k,) and right singular vectors ``Vh`` (k, d).

        ``S`` are lower bounds of the true singular values (see :class:`SketchError` for upper
        bounds); dtype is the sketch dtype; device the sketch device. If the sketch captured fewer
        than k directions (rank-deficient data), the missing singular values are 0 and their rows
        of ``Vh`` complete an orthonormal set. Does not change the sketch (more rows may follow).
        """
        k = self._check_k(k)
        S, Vh = self._core()
        S, Vh = _complete(S, Vh, k, self.d)
        return S.to(self.dtype), Vh.to(self.dtype)

    def error_estimate(self, k: int | None = None) -> SketchError:
        """A-posteriori accuracy of :meth:`finalize` (see :class:`SketchError`)."""
        k = self._check_k(k)
        S, Vh = self._core()
        fro2 = float(self.fro2)
        res, res_k, upper, sin_b = projection_bounds(S, fro2, k)
        # Co-range estimate: A_hat = Y T^+ Y^T A with Y = A Omega^T, so Psi A_hat = (Psi Y) T^+ Kt and
        # Psi Y = W Omega^T; Psi is independent of Omega, hence E ||Psi (A - A_hat)||_F^2 = l ||A - A_hat||_F^2.
        W64, om64 = self.W.to(torch.float64), self.omega().to(torch.float64)
        T = self.Kt.to(torch.float64) @ om64.T
        T = 0.5 * (T + T.T)
        lam, E = torch.linalg.eigh(T)
        keep = lam > default_rtol(self.dtype) * max(float(lam[-1]), 0.0)
        if float(lam[-1]) <= 0:
            keep[:] = False
        Tpinv = (E[:, keep] / lam[keep]) @ E[:, keep].T
        D = W64 - (W64 @ om64.T) @ Tpinv @ self.Kt.to(torch.float64)
        res_sketch = float(D.square().sum() / self.l) ** 0.5
        return SketchError(fro2 ** 0.5, res, res_k, res_sketch, upper, sin_b)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        """Plain tensors and ints: the accumulators, counters, row ranges and parameters."""
        ranges = torch.tensor(self._ranges, dtype=torch.int64).reshape(-1, 2)
        return {"version": _STATE_VERSION, **self._params(), "W": self.W.clone(), "Kt": self.Kt.clone(),
                "fro2": self.fro2.clone(), "n_rows": self.n_rows, "next_row": self.next_row, "ranges": ranges}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output; the parameters must equal this sketch's."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"state must be a StreamingSketch state_dict (version {_STATE_VERSION})")
        diff = [f"{key}: {v} != {state.get(key)}" for key, v in self._params().items() if state.get(key) != v]
        if diff:
            raise ValueError("state: parameters differ from this sketch's (" + "; ".join(diff) + ")")
        for name in ("W", "Kt"):
            t = state[name]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (self.l, self.d):
                raise ValueError(f"state[{name!r}] must be a tensor of shape ({self.l}, {self.d})")
            if t.dtype != self.dtype:
                raise ValueError(f"state[{name!r}] has dtype {t.dtype}, this sketch uses {self.dtype}")
        dev = self.device if self._device_fixed else state["W"].device
        self.W = state["W"].to(dev).clone()
        self.Kt = state["Kt"].to(dev).clone()
        self.fro2 = state["fro2"].to(dev, torch.float64).clone()
        self.n_rows, self.next_row = int(state["n_rows"]), int(state["next_row"])
        self._ranges = [[int(s), int(e)] for s, e in state["ranges"].tolist()]
        self._omega = None


def _complete(S: torch.Tensor, Vh: torch.Tensor, k: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (S, Vh) to k triplets: zero singular values and orthonormal completion rows."""
    r = S.numel()
    if r >= k:
        return S[:k], Vh[:k]
    gen = torch.Generator(device="cpu").manual_seed(12345)
    extra = torch.randn(k - r, d, generator=gen, dtype=torch.float64).to(Vh.device)
    if r:
        extra = extra - (extra @ Vh.T) @ Vh
    q = torch.linalg.qr(extra.T)[0].T
    if r:
        q = q - (q @ Vh.T) @ Vh
        q = torch.linalg.qr(q.T)[0].T
    return torch.cat([S, S.new_zeros(k - r)]), torch.cat([Vh, q])
