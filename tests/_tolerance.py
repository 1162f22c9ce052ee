"""Floating-point tolerances derived from the computation, so that tests hold on any x86-64 CPU.

Why not "what this machine produced": ATen, oneDNN and MKL choose their kernels at run time from
the CPU's instruction set (AVX-512, AVX2 or the scalar ``default``; ``ATEN_CPU_CAPABILITY`` and
``ONEDNN_MAX_CPU_ISA`` force one). Each kernel set blocks, vectorises and fuses (FMA) its sums
differently, so a float32 result is only defined up to the rounding of its reductions. CI reruns
the ``numerics`` tests with the scalar kernels forced (.ci/run) to prove the bounds below.

The model (u = eps / 2 is the unit roundoff, eps = 2^-23 for float32):

* A sum of n terms in any order has, in the worst case, ``|fl(s) - s| <= (n - 1) u sum|x_i|``
  (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., eq. 4.4).
* Treating the rounding errors as independent and zero-mean (Higham & Mary, SISC 2019), the error
  of recursive summation is a random walk over the partial sums: sum_k u |s_k| delta_k with
  |s_k| ~ sqrt(k) sigma for random-sign terms of size sigma (~ k |mean| for same-sign terms, e.g.
  after a ReLU). Its standard deviation is u sigma n / sqrt(2) (resp. u |mean| n^1.5 / sqrt(3)),
  and the sum itself is ~ sqrt(n) sigma (resp. n |mean|): a relative error of
  ``u sqrt(n / 2) = eps sqrt(n) / sqrt(8)`` (resp. eps sqrt(n) / sqrt(12)) in both cases. Blocked
  and pairwise (SIMD) summation only lowers it, so ``0.35 eps sqrt(n)`` is the typical relative
  error of one reduction, whatever order a kernel uses.
* The largest of m such errors is about sqrt(2 ln m) standard deviations: 5.3 for m = 10^6
  elements. One more rounding of the result and a few elementwise ops (activation, scaling) add
  a few eps, which sqrt(n) >= 1 covers. ``0.35 * 5.3 ~ 1.9``; the default ``c = 4`` (elementwise
  comparisons) leaves a factor 2 on top. Norm-wise errors (``||got - want|| / ||want||``) are
  root-mean-square ones, 0.35 eps sqrt(n): ``normwise=True`` takes ``c = 1``, a factor ~3 above.
* A chain of ``depth`` dependent reductions (layers of a network; a gradient runs the forward and
  then the backward chain, a Hessian-vector product four passes) adds one such error per step,
  each carried forward with the following layers' (norm-wise ~1) condition number: ``depth``
  multiplies the bound. Several different widths: pass the list of the n's.
* Two float32 computations compared with each other (batched vs unbatched, two kernels, two HVP
  modes) are each that far from the exact value: the bound doubles (``pair=True``).

The same holds for float64 with eps = 2^-52 (``f64_rtol``). A tolerance from here is still
meaningful: for reductions over 10^3 terms, depth 4, pair, float32 gives 1.2e-4; a real bug (a
missing term, a wrong scale, a wrong sign) changes results by 1e-2 or (much) more.
"""
from __future__ import annotations

import math
from typing import Iterable, Union

import torch

EPS32 = float(torch.finfo(torch.float32).eps)  # 2^-23 ~ 1.19e-7
EPS64 = float(torch.finfo(torch.float64).eps)  # 2^-52 ~ 2.22e-16
C_DEFAULT = 4.0   # elementwise (max over the elements) bounds
C_NORMWISE = 1.0  # norm-wise (root-mean-square) bounds

Terms = Union[int, Iterable[int]]


def _sqrt_terms(n_terms: Terms) -> float:
    ns = [n_terms] if isinstance(n_terms, int) else list(n_terms)
    if not ns or any(n < 1 for n in ns):
        raise ValueError(f"n_terms must be positive: {n_terms!r}")
    return sum(math.sqrt(n) for n in ns)


def rtol_for(eps: float, n_terms: Terms, depth: int = 1, c: float = C_DEFAULT, pair: bool = False) -> float:
    """``c * depth * sum_l sqrt(n_l) * eps``, doubled when two rounded computations are compared."""
    return (2.0 if pair else 1.0) * c * depth * _sqrt_terms(n_terms) * eps


def f32_rtol(n_terms: Terms, depth: int = 1, c: float | None = None, pair: bool = False,
             normwise: bool = False) -> float:
    """Relative tolerance of a float32 result against the exact (float64) one: ``depth`` chained
    passes over reductions of ``n_terms`` terms each (an int, or one int per reduction of a pass,
    e.g. per layer). ``pair=True`` when both sides are float32 computations; ``normwise=True`` for
    ``||got - want|| / ||want||`` (``c = 1`` instead of 4; see the module docstring)."""
    return rtol_for(EPS32, n_terms, depth, _c(c, normwise), pair)


def f64_rtol(n_terms: Terms, depth: int = 1, c: float | None = None, pair: bool = False,
             normwise: bool = False) -> float:
    """As :func:`f32_rtol` for float64 results."""
    return rtol_for(EPS64, n_terms, depth, _c(c, normwise), pair)


def _c(c: float | None, normwise: bool) -> float:
    return c if c is not None else (C_NORMWISE if normwise else C_DEFAULT)


def dtype_rtol(dtype: torch.dtype, n_terms: Terms, depth: int = 1, c: float | None = None,
               pair: bool = False, normwise: bool = False) -> float:
    """:func:`f32_rtol` or :func:`f64_rtol` by ``dtype``."""
    eps = {torch.float32: EPS32, torch.float64: EPS64}[dtype]
    return rtol_for(eps, n_terms, depth, _c(c, normwise), pair)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Norm-wise relative error ``||got - want|| / ||want||``, computed in float64."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm())


def assert_rel(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str = "") -> None:
    """Norm-wise ``||got - want|| <= rtol ||want||`` (finite, nonzero ``want``)."""
    assert bool(torch.isfinite(got.detach()).all()), f"{what}: non-finite result"
    err = rel_err(got, want)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.3e}"


def assert_close_scaled(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str = "") -> None:
    """Elementwise ``|got - want| <= rtol (|want| + max |want|)``: a relative bound whose absolute
    floor is the tensor's scale, where an element of a sum may cancel to near zero (the rounding
    error of a sum is relative to its terms, not to the sum)."""
    got, want = got.detach().double(), want.detach().double()
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")
