"""Triton kernels of ``upi_fast::sketch_update``: ``W += Psi[:, rows] @ normalize_rows(A)`` in place.

``W`` is (k x d), ``A`` a block of b rows (b x d) with global row indices ``row_offset + i``. The
Rademacher entries ``Psi[j, i]`` are generated in registers from ``(seed, global row, j)`` by the
counter-based lowbias32 hash of :mod:`upi_fast.ops.sketch_update` (bit-identical to
:func:`~upi_fast.ops.sketch_update.rademacher_columns`); ``Psi`` is never written to memory.

Design. The update kernel tiles ``d``: program (t, u) owns ``W[k-tile u, d-tile t]`` and loops over
the rows of ``A`` in chunks of ``BLOCK_R``, accumulating ``Psi[k-tile, chunk] @ A[chunk, d-tile]``
in float32 registers (float64 for a float64 ``W``) with ``tl.dot`` in exact IEEE float32 (FMA, no
TF32), then adds the tile into ``W`` once. Each element of ``A`` is therefore read once per k-tile
(one k-tile up to k = 128) and ``W`` is read and written once: ``b d + 2 k d`` elements, the
minimum, when ``normalize`` is false.

Row normalisation needs every row's full norm before any column tile can be finished, and programs
of one launch cannot wait for each other, so ``normalize=True`` adds a first, small kernel: grid
(rows x splits of ``d``), each program sums the squares of its piece of one row into a float64
workspace (b x splits, no atomics, deterministic). The update kernel then folds
``1 / ||A_i||`` into the (k x BLOCK_R) block of ``Psi`` (b k multiplies instead of b d) so ``A`` is
never rescaled in memory. Cost: one more read of ``A``, i.e. ``2 b d + 2 k d`` elements (for the
128 x 150528 block into k = 16: 1.8x the minimum). To soften it, on CUDA the update kernel walks
the row chunks last-to-first, starting with the rows the norm kernel read last, which may still
be in L2 (a heuristic; nothing depends on it).

Dtypes: ``A`` may be float16, bfloat16, float32 or float64 and is upcast in registers; ``W`` is
float32 or float64 and is the accumulation type. Strides: any for ``A`` and ``W`` (unit stride
along ``d`` gives vectorised access).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["sketch_update_triton", "plan"]

_M32 = 0xFFFFFFFF


@triton.jit
def _mix32(x):
    """lowbias32 on uint32 tensors (wrapping arithmetic)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _row_sqnorm_kernel(a_ptr, ws_ptr, D, a_s0, a_s1, NSPLIT, SPLIT_D: tl.constexpr, BLOCK_D: tl.constexpr,
                       ACC: tl.constexpr):
    """Partial ``sum_d A[row, d]^2`` over one split of ``d`` for one row, into ``ws[row, split]``."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // NSPLIT
    sp = pid % NSPLIT
    acc = tl.zeros([BLOCK_D], ACC)
    for k in range(0, SPLIT_D, BLOCK_D):
        d = sp * SPLIT_D + k + tl.arange(0, BLOCK_D).to(tl.int64)
        a = tl.load(a_ptr + row * a_s0 + d * a_s1, mask=d < D, other=0.0).to(ACC)
        acc += a * a
    tl.store(ws_ptr + pid, tl.sum(acc, axis=0).to(tl.float64))


@triton.jit
def _sketch_update_kernel(w_ptr, a_ptr, ws_ptr, K, B, D, w_s0, w_s1, a_s0, a_s1, row_offset, key, NSPLIT,
                          NORMALIZE: tl.constexpr, REVERSE_ROWS: tl.constexpr, USE_DOT: tl.constexpr,
                          BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                          NSPLIT_POW2: tl.constexpr, ACC: tl.constexpr):
    """``W[k-tile, d-tile] += Psi[k-tile, :] @ (A[:, d-tile] / ||A_i||)``."""
    pid_d = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D).to(tl.int64)
    dm = d < D
    j = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    jm = j < K
    j_mix = j.to(tl.uint32) * 0x9E3779B9
    acc = tl.zeros([BLOCK_K, BLOCK_D], ACC)
    n_chunks = tl.cdiv(B, BLOCK_R)
    for it in range(0, n_chunks):
        if REVERSE_ROWS:
            ch = n_chunks - 1 - it
        else:
            ch = it
        r = ch * BLOCK_R + tl.arange(0, BLOCK_R)
        rm = r < B
        a = tl.load(a_ptr + r.to(tl.int64)[:, None] * a_s0 + d[None, :] * a_s1,
                    mask=rm[:, None] & dm[None, :], other=0.0).to(ACC)
        # Psi[j, i] = +-1 from the top bit of mix(mix(i + key) + j * golden), i = row_offset + r.
        hi = _mix32((r.to(tl.int64) + row_offset + key).to(tl.uint32))
        h = _mix32(hi[None, :] + j_mix[:, None])
        psi = tl.where((h >> 31) == 0, 1.0, -1.0).to(ACC)
        if NORMALIZE:
            s = tl.arange(0, NSPLIT_POW2)
            parts = tl.load(ws_ptr + r.to(tl.int64)[:, None] * NSPLIT + s[None, :],
                            mask=rm[:, None] & (s < NSPLIT)[None, :], other=0.0)
            norm = tl.sqrt(tl.sum(parts, axis=1))
            scale = tl.where(norm > 0, 1.0 / tl.maximum(norm, 1e-30), 0.0).to(ACC)
            psi = psi * scale[None, :]
        psi = tl.where(rm[None, :], psi, 0.0)
        if USE_DOT:
            acc = tl.dot(psi, a, acc, input_precision="ieee")
        else:
            acc += tl.sum(psi[:, :, None] * a[None, :, :], axis=1)
    w_off = j.to(tl.int64)[:, None] * w_s0 + d[None, :] * w_s1
    wm = jm[:, None] & dm[None, :]
    w = tl.load(w_ptr + w_off, mask=wm, other=0.0)
    tl.store(w_ptr + w_off, (w + acc).to(w_ptr.dtype.element_ty), mask=wm)


def mix32_int(x: int) -> int:
    """lowbias32 of a Python integer in [0, 2^32) (host side, for the seed's key)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current CUDA device), a no-op on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def plan(k: int, d: int, w_dtype: torch.dtype = torch.float32, use_dot: bool | None = None,
         block_d: int | None = None, split_d: int | None = None) -> dict:
    """Tiling of the update kernel: ``{"block_k", "k_tiles", "block_r", "block_d", "use_dot",
    "num_warps", "split_d", "nsplit", "norm_block_d"}`` for a (k x d) sketch.

    ``use_dot`` (default: float32 ``W``) selects ``tl.dot`` in IEEE float32; otherwise (and always
    for float64) a broadcast multiply-and-sum with smaller tiles. ``block_d`` (a power of two >= 16)
    overrides the columns per program and ``split_d`` (a power of two) the columns per program of
    the norm kernel (tests lower both to exercise many tiles on small inputs)."""
    if use_dot is None:
        use_dot = w_dtype == torch.float32
    if use_dot and w_dtype != torch.float32:
        raise ValueError("use_dot=True needs a float32 W (tl.dot in float64 is not portable)")
    block_k = min(max(16 if use_dot else 1, triton.next_power_of_2(k)), 128 if use_dot else 32)
    if block_d is None:
        block_d = max(64, min(256, 16384 // block_k)) if use_dot else max(32, min(128, 2048 // block_k))
    elif block_d < 16 or block_d & (block_d - 1):
        raise ValueError(f"block_d must be a power of two >= 16, got {block_d}")
    if split_d is None:  # >= 8192 columns per norm program, at most ~16 splits per row (each update
        # program re-reduces the splits of every row: 16 x 8 bytes per row, L2 hits)
        split_d = min(max(8192, triton.next_power_of_2(triton.cdiv(d, 16))), triton.next_power_of_2(d))
    elif split_d < 1 or split_d & (split_d - 1):
        raise ValueError(f"split_d must be a positive power of two, got {split_d}")
    norm_block_d = min(1024, split_d)
    return {"block_k": block_k, "k_tiles": triton.cdiv(k, block_k), "block_r": 32 if use_dot else 4,
            "block_d": block_d, "use_dot": use_dot,
            "num_warps": 8 if max(block_k, 32 if use_dot else 4) * block_d >= 8192 else 4,
            "split_d": split_d, "nsplit": triton.cdiv(d, split_d), "norm_block_d": norm_block_d}


def sketch_update_triton(W: torch.Tensor, A: torch.Tensor, row_offset: int, seed: int, normalize: bool, *,
                         use_dot: bool | None = None, block_d: int | None = None, split_d: int | None = None,
                         reverse_rows: bool | None = None) -> None:
    """``W += Psi[:, row_offset:row_offset + b] @ normalize_rows(A)`` in place (returns ``None``).

    Args:
        W: (k, d) float32 or float64 accumulator (any strides), updated in place.
        A: (b, d) rows, float16/bfloat16/float32/float64 (any strides), same device as ``W``.
        row_offset: global index of ``A``'s first row, ``0 <= row_offset``, ``row_offset + b <= 2^32``.
        seed: seed of the test matrix (taken modulo 2^32).
        normalize: scale each row of ``A`` to unit L2 norm first (a zero row stays zero).
        use_dot, block_d, split_d: tiling overrides (see :func:`plan`).
        reverse_rows: walk row chunks last-to-first (default: on CUDA with ``normalize``).
    """
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or W.dtype not in (torch.float32, torch.float64):
        raise ValueError("W must be a 2-D float32/float64 tensor (k, d)")
    if not isinstance(A, torch.Tensor) or A.dim() != 2 or A.shape[1] != W.shape[1]:
        raise ValueError(f"A must have shape (b, {W.shape[1]}), got "
                         f"{tuple(A.shape) if isinstance(A, torch.Tensor) else type(A).__name__}")
    if A.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"A must be float16, bfloat16, float32 or float64, got {A.dtype}")
    if A.device != W.device:
        raise ValueError(f"A is on {A.device} but W is on {W.device}")
    row_offset, seed = int(row_offset), int(seed)
    b = A.shape[0]
    if row_offset < 0 or row_offset + b > 2**32:
        raise ValueError(f"row_offset must be in [0, 2^32 - b], got {row_offset}")
    k, d = W.shape
    if b == 0 or k == 0 or d == 0:
        return None
    cfg = plan(k, d, W.dtype, use_dot, block_d, split_d)
    if reverse_rows is None:
        reverse_rows = bool(normalize) and W.is_cuda
    with _on_device(W):
        _launch(W, A, row_offset, mix32_int(seed), bool(normalize), bool(reverse_rows), cfg)
    return None


def _launch(W, A, row_offset: int, key: int, normalize: bool, reverse_rows: bool, cfg: dict) -> None:
    """Enqueue the row-norm kernel (when normalising) and the update kernel of one plan."""
    (k, d), b = W.shape, A.shape[0]
    acc = tl.float64 if W.dtype == torch.float64 else tl.float32
    ws = W  # placeholder pointer when not normalising (never read)
    if normalize:
        ws = torch.empty((b * cfg["nsplit"],), dtype=torch.float64, device=W.device)
        _row_sqnorm_kernel[(b * cfg["nsplit"],)](A, ws, d, A.stride(0), A.stride(1), cfg["nsplit"],
                                                 SPLIT_D=cfg["split_d"], BLOCK_D=cfg["norm_block_d"],
                                                 ACC=acc, num_warps=4)
    grid = (triton.cdiv(d, cfg["block_d"]), cfg["k_tiles"])
    _sketch_update_kernel[grid](W, A, ws, k, b, d, W.stride(0), W.stride(1), A.stride(0), A.stride(1),
                                row_offset, key, cfg["nsplit"], NORMALIZE=normalize, REVERSE_ROWS=reverse_rows,
                                USE_DOT=cfg["use_dot"], BLOCK_K=cfg["block_k"], BLOCK_R=cfg["block_r"],
                                BLOCK_D=cfg["block_d"],
                                NSPLIT_POW2=triton.next_power_of_2(cfg["nsplit"]), ACC=acc,
                                num_warps=cfg["num_warps"])
