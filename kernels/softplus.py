"""Triton kernels of ``upi_fast::softplus``, ``softplus_backward`` and ``softplus_double_backward``.

The smooth ReLU surrogate ``y = softplus(beta x) / beta`` and its two derivatives, each one fused
elementwise pass over memory (the math is in :mod:`upi_fast.ops.softplus`). With ``z = beta x``,
``t = exp(-|z|)`` (never overflows):

* ``sigmoid(z) = 1 / (1 + t)`` for ``z >= 0``, ``t / (1 + t)`` otherwise;
* ``sigmoid(z) (1 - sigmoid(z)) = t / (1 + t)^2`` -- exact even where ``1 - sigmoid(z)`` would round
  to 0 (``|z| > 17`` in float32), so the double backward keeps its tiny tails;
* ``softplus(z) = max(z, 0) + log1p(t)``, and ``y = x`` where ``z > 20`` (torch's threshold);
  ``log1p(t)`` is a short ``atanh`` series (no hardware ``log``, whose absolute error near 1 would
  cost relative accuracy for small ``t``).

Memory traffic per element (the minimum for each op): forward reads ``x`` and writes ``y``; backward
reads ``grad_y`` and ``x`` and writes ``grad_x``; double backward reads ``gg``, ``grad_y`` and ``x``
and writes both outputs in the same pass. Arithmetic runs in float32 (float64 for float64
tensors); float16 / bfloat16 tensors are loaded, upcast in registers and rounded once on store.

Layouts: the kernels walk the tensors' storage linearly, so every operand must share the output's
strides, and the output is ``torch.empty_like(x)`` (``x``'s strides when ``x`` is dense, e.g.
``channels_last``; contiguous otherwise). An operand with other strides (a transposed or sliced
view) is first copied into that layout -- one extra pass over that operand, correct but not free.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

__all__ = ["softplus_fwd_triton", "softplus_bwd_triton", "softplus_bwd2_triton"]

_THRESHOLD = 20.0
_BLOCK = 2048  # elements per program: 8 warps x 32 threads x 8 contiguous elements
_NUM_WARPS = 8


@triton.jit
def _log1p_exp_neg_abs(z, TERMS: tl.constexpr):
    """``log1p(exp(-|z|))`` without calling ``log``.

    With ``t = exp(-|z|)`` in (0, 1] and ``s = t / (2 + t)`` in (0, 1/3]:
    ``log1p(t) = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...)``, summed by Horner to ``TERMS`` terms
    (the remainder is below ``(1/9)^TERMS / (2 TERMS + 1)`` relative: 8 terms for float32, 16 for
    float64). Only ``exp``, one division and FMAs: accurate even where ``log(1 + t)`` with a fast
    hardware ``log`` would lose digits to its absolute error near 1 (small ``t``).
    """
    t = tl.exp(-tl.abs(z))
    s = t / (2.0 + t)
    s2 = s * s
    acc = tl.full(s.shape, 1.0 / (2 * TERMS - 1), s.dtype)
    for i in tl.static_range(1, TERMS):  # coefficients made in s's dtype (exact in float64)
        acc = acc * s2 + tl.full(s.shape, 1.0 / (2 * (TERMS - 1 - i) + 1), s.dtype)
    return 2.0 * s * acc


@triton.jit
def _softplus_fwd_kernel(x_ptr, y_ptr, n, beta_hi, beta_lo, threshold, BLOCK: tl.constexpr,
                         COMPUTE: tl.constexpr, TERMS: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    beta = tl.cast(beta_hi, COMPUTE) + tl.cast(beta_lo, COMPUTE)
    z = x * beta
    y = (tl.maximum(z, 0.0) + _log1p_exp_neg_abs(z, TERMS)) / beta
    y = tl.where(z > threshold, x, y)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sigmoid_parts(x, beta):
    """``(s, s * (1 - s))`` for ``s = sigmoid(beta x)``, both accurate to relative precision."""
    z = x * beta
    t = tl.exp(-tl.abs(z))
    inv = 1.0 / (1.0 + t)
    s = tl.where(z >= 0, inv, t * inv)
    return s, t * inv * inv


@triton.jit
def _softplus_bwd_kernel(gy_ptr, x_ptr, gx_ptr, n, beta_hi, beta_lo, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    beta = tl.cast(beta_hi, COMPUTE) + tl.cast(beta_lo, COMPUTE)
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(x.dtype)
    s, _ = _sigmoid_parts(x, beta)
    tl.store(gx_ptr + offs, (gy * s).to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softplus_bwd2_kernel(gg_ptr, gy_ptr, x_ptr, out_gy_ptr, out_x_ptr, n, beta_hi, beta_lo,
                          BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
    beta = tl.cast(beta_hi, COMPUTE) + tl.cast(beta_lo, COMPUTE)
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0).to(x.dtype)
    gg = tl.load(gg_ptr + offs, mask=mask, other=0.0).to(x.dtype)
    s, ds = _sigmoid_parts(x, beta)
    tl.store(out_gy_ptr + offs, (gg * s).to(out_gy_ptr.dtype.element_ty), mask=mask)
    tl.store(out_x_ptr + offs, (gg * gy * (beta * ds)).to(out_x_ptr.dtype.element_ty), mask=mask)


def _check_beta(beta: float) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (0.0 < beta < float("inf")):
        raise ValueError(f"beta must be a finite positive number, got {beta!r}")
    return float(beta)


def _check_inputs(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    x = tensors[-1]
    for name, t in zip(names, tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
        if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} must match x in shape, dtype and device: got {tuple(t.shape)} {t.dtype} "
                             f"{t.device}, x is {tuple(x.shape)} {x.dtype} {x.device}")


def _output(x: torch.Tensor, out: torch.Tensor | None, name: str) -> torch.Tensor:
    """``out`` (validated) or a fresh ``torch.empty_like(x)`` (dense, in ``x``'s layout when ``x`` is dense)."""
    if out is None:
        return torch.empty_like(x)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"{name} must be a tensor of x's shape {tuple(x.shape)}, dtype {x.dtype} and device "
                         f"{x.device}")
    if not _dense(out):
        raise ValueError(f"{name} must be dense (non-overlapping, no gaps), e.g. contiguous")
    return out


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` covers exactly ``numel`` consecutive storage elements (any order of dimensions)."""
    expected = 1
    for size, stride in sorted(((s, st) for s, st in zip(t.shape, t.stride()) if s != 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def _like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` laid out with ``ref``'s strides (``t`` itself when it already is; else one copy)."""
    if t.stride() == ref.stride() or t.numel() <= 1:
        return t
    return torch.empty_like(ref).copy_(t)


def _compute(x: torch.Tensor):
    """Arithmetic precision: float64 for float64 tensors, float32 otherwise."""
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _beta_parts(beta: float, x: torch.Tensor) -> tuple[float, float]:
    """``beta`` as float32 ``hi + lo`` (Triton passes float scalars as float32): float32 tensors use
    ``hi = float32(beta)`` as torch does; float64 tensors get ``hi + lo``, good to ~2^-48."""
    hi = float(torch.tensor(beta, dtype=torch.float32))
    if x.dtype != torch.float64:
        return hi, 0.0
    return hi, float(torch.tensor(beta - hi, dtype=torch.float32))


def _grid(n: int):
    return (triton.cdiv(n, _BLOCK),)


def _on_device(t: torch.Tensor):
    """Launch on ``t``'s GPU (Triton launches on the current CUDA device), a no-op on the CPU."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def softplus_fwd_triton(x: torch.Tensor, beta: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``softplus(beta x) / beta`` (same shape and dtype as ``x``); ``out`` receives it when given."""
    beta = _check_beta(beta)
    _check_inputs(("x",), (x,))
    y = _output(x, out, "out")
    n = x.numel()
    if n:
        terms = 16 if x.dtype == torch.float64 else 8
        with _on_device(x):
            _softplus_fwd_kernel[_grid(n)](_like(x, y), y, n, *_beta_parts(beta, x), _THRESHOLD, BLOCK=_BLOCK,
                                           COMPUTE=_compute(x), TERMS=terms, num_warps=_NUM_WARPS)
    return y


def softplus_bwd_triton(grad_y: torch.Tensor, x: torch.Tensor, beta: float, *,
                        out: torch.Tensor | None = None) -> torch.Tensor:
    """``grad_y * sigmoid(beta x)``; ``grad_y`` and ``x`` of the same shape and dtype."""
    beta = _check_beta(beta)
    _check_inputs(("grad_y", "x"), (grad_y, x))
    gx = _output(x, out, "out")
    n = x.numel()
    if n:
        with _on_device(x):
            _softplus_bwd_kernel[_grid(n)](_like(grad_y, gx), _like(x, gx), gx, n, *_beta_parts(beta, x),
                                           BLOCK=_BLOCK, COMPUTE=_compute(x), num_warps=_NUM_WARPS)
    return gx


def softplus_bwd2_triton(gg: torch.Tensor, grad_y: torch.Tensor, x: torch.Tensor, beta: float, *,
                         out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gg * s, gg * grad_y * beta * s * (1 - s))`` with ``s = sigmoid(beta x)``, in one pass."""
    beta = _check_beta(beta)
    _check_inputs(("gg", "grad_y", "x"), (gg, grad_y, x))
    if out is not None and (not isinstance(out, (tuple, list)) or len(out) != 2):
        raise ValueError("out must be a pair of tensors (grad_grad_y, grad_x)")
    o1 = _output(x, None if out is None else out[0], "out[0]")
    o2 = _output(x, None if out is None else out[1], "out[1]")
    if o2.stride() != o1.stride():
        raise ValueError("out[0] and out[1] must have the same strides")
    n = x.numel()
    if n:
        with _on_device(x):
            _softplus_bwd2_kernel[_grid(n)](_like(gg, o1), _like(grad_y, o1), _like(x, o1), o1, o2, n,
                                            *_beta_parts(beta, x), BLOCK=_BLOCK, COMPUTE=_compute(x),
                                            num_warps=_NUM_WARPS)
    return o1, o2
