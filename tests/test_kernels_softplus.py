"""Triton kernels of the softplus surrogate (forward, backward, double backward) against the float64
reference, under the interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1)."""
import math

import pytest
import torch

import upi_fast.ops as ops
from upi_fast.ops.softplus import (softplus, softplus_backward_reference, softplus_double_backward_reference,
                                   softplus_reference)

pytest.importorskip("triton")
from upi_fast.kernels.softplus import (softplus_bwd2_triton, softplus_bwd_triton,  # noqa: E402
                                       softplus_fwd_triton)

# float results compared between code paths: rerun by .ci/run with other CPU kernels forced
pytestmark = pytest.mark.numerics

# 2 * 2048 + 37 elements: three programs, the last one partial.
SHAPES = [(4133,), (3, 7, 11, 5)]


def _nan_like(x):
    return torch.full_like(x, float("nan"))


def assert_rel(got, want, rtol=1e-5):
    """Elementwise ``|got - want| <= rtol |want|`` (plus a denormal-sized floor), never NaN."""
    got = got.double()
    assert torch.isfinite(got).all(), "kernel left NaN/Inf (skipped or wrong elements)"
    err = (got - want).abs()
    bad = err > rtol * want.abs() + 1e-35
    rel = (err / want.abs().clamp_min(1e-35)).reshape(-1)
    assert not bad.any(), f"{int(bad.sum())} elements off; worst relative error {rel.max().item():.3e}"


def _inputs(shape, beta, seed=0, zmax=24.0):
    g = torch.Generator().manual_seed(seed)
    # beta x uniform in [-zmax, zmax]: both sides of the threshold 20, and inside the range where the
    # float64 reference is itself accurate to 1e-5 (its s * (1 - s) loses ~1e-16 / exp(-|beta x|)
    # to the rounding of 1 - s; the tails are checked against the exact formula below).
    x = ((torch.rand(shape, generator=g) * 2.0 - 1.0) * (zmax / beta)).float()
    gy = torch.randn(shape, generator=g).float()
    gg = torch.randn(shape, generator=g).float()
    return x, gy, gg


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta", [10.0, 2.5])
def test_kernels_match_float64_reference(shape, beta):
    x, gy, gg = _inputs(shape, beta)
    xd, gyd, ggd = x.double(), gy.double(), gg.double()  # the same values, computed in float64
    y = softplus_fwd_triton(x, beta, out=_nan_like(x))
    assert_rel(y, softplus_reference(xd, beta))
    gx = softplus_bwd_triton(gy, x, beta, out=_nan_like(x))
    assert_rel(gx, softplus_backward_reference(gyd, xd, beta))
    o1, o2 = softplus_bwd2_triton(gg, gy, x, beta, out=(_nan_like(x), _nan_like(x)))
    r1, r2 = softplus_double_backward_reference(ggd, gyd, xd, beta)
    assert_rel(o1, r1)
    assert_rel(o2, r2)
    # Without ``out`` the launchers allocate in x's layout.
    torch.testing.assert_close(softplus_fwd_triton(x, beta), y, rtol=0, atol=0)


def test_extreme_inputs_are_finite_and_accurate():
    beta = 4.0
    z = torch.tensor([-1e4, -200.0, -80.0, -30.0, -20.5, -1e-6, 0.0, 1e-6, 17.0, 19.99, 20.01, 30.0, 80.0, 1e4])
    x = (z / beta).float()
    one = torch.ones_like(x)
    y = softplus_fwd_triton(x, beta)
    above = x * beta > 20
    assert torch.equal(y[above], x[above]), "y = x above the threshold, exactly as torch"
    xd = x.double()
    assert_rel(y, softplus_reference(xd, beta))
    s, ds = softplus_bwd2_triton(one, one, x, beta)
    # The exact value of beta * s * (1 - s) = beta * t / (1 + t)^2, t = exp(-|beta x|), in float64.
    t = torch.exp(-(xd * beta).abs())
    exact_ds = beta * t / (1 + t) ** 2
    tiny = exact_ds < 1e-37  # below float32's normal range: only finiteness is asked
    assert_rel(ds[~tiny], exact_ds[~tiny])
    assert torch.isfinite(ds).all() and (ds[tiny].abs() <= 1e-37).all()
    assert_rel(s, torch.sigmoid(xd * beta))
    assert_rel(softplus_bwd_triton(one, x, beta), torch.sigmoid(xd * beta))


def test_float64_inputs_compute_in_float64():
    beta = 0.3  # not a float32 number: float64 tensors must not see float32(beta)
    x, gy, gg = (t.double() for t in _inputs((1001,), beta, seed=1, zmax=5.0))
    close = dict(rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(softplus_fwd_triton(x, beta), softplus_reference(x, beta), **close)
    torch.testing.assert_close(softplus_bwd_triton(gy, x, beta), softplus_backward_reference(gy, x, beta), **close)
    for got, want in zip(softplus_bwd2_triton(gg, gy, x, beta), softplus_double_backward_reference(gg, gy, x, beta)):
        torch.testing.assert_close(got, want, **close)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_upcast_in_registers(dtype):
    x, gy, gg = (t.to(dtype) for t in _inputs((777,), 10.0, seed=2))
    xd, gyd, ggd = x.double(), gy.double(), gg.double()
    eps = torch.finfo(dtype).eps
    y = softplus_fwd_triton(x, 10.0)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), softplus_reference(xd, 10.0).to(dtype).double(), rtol=eps, atol=1e-6)
    o1, o2 = softplus_bwd2_triton(gg, gy, x, 10.0)
    r1, r2 = softplus_double_backward_reference(ggd, gyd, xd, 10.0)
    torch.testing.assert_close(o1.double(), r1, rtol=eps, atol=1e-4)
    torch.testing.assert_close(o2.double(), r2, rtol=eps, atol=1e-4)


def test_non_contiguous_inputs():
    beta = 10.0
    base, gy_base, gg_base = _inputs((6, 9, 8), beta, seed=3)
    x = base.permute(2, 0, 1)                  # dense, permuted: output keeps this layout
    y = softplus_fwd_triton(x, beta)
    assert y.stride() == x.stride()
    assert_rel(y, softplus_reference(x.double(), beta))
    xs = base[:, ::2, 1:]                      # not dense: output contiguous, input copied
    ys = softplus_fwd_triton(xs, beta)
    assert ys.is_contiguous()
    assert_rel(ys, softplus_reference(xs.double(), beta))
    gy = gy_base.permute(2, 0, 1).contiguous()  # same shape as x, other layout than x
    gx = softplus_bwd_triton(gy, x, beta)
    assert_rel(gx, softplus_backward_reference(gy.double(), x.double(), beta))
    gg = gg_base[:, ::2, 1:]
    o1, o2 = softplus_bwd2_triton(gg, gy_base[:, ::2, 1:], xs, beta)
    r1, r2 = softplus_double_backward_reference(gg.double(), gy_base[:, ::2, 1:].double(), xs.double(), beta)
    assert_rel(o1, r1)
    assert_rel(o2, r2)


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(10)
    with pytest.raises(ValueError, match="beta"):
        softplus_fwd_triton(x, 0.0)
    with pytest.raises(ValueError, match="beta"):
        softplus_fwd_triton(x, math.inf)
    with pytest.raises(TypeError, match="x must be"):
        softplus_fwd_triton(torch.arange(10), 1.0)
    with pytest.raises(ValueError, match="grad_y must match x"):
        softplus_bwd_triton(torch.randn(11), x, 1.0)
    with pytest.raises(ValueError, match="grad_y must match x"):
        softplus_bwd_triton(torch.randn(10, dtype=torch.float64), x, 1.0)
    with pytest.raises(ValueError, match="out"):
        softplus_fwd_triton(x, 1.0, out=torch.empty(11))
    with pytest.raises(ValueError, match="out"):
        softplus_bwd2_triton(x, x, x, 1.0, out=(torch.empty(10),))
    assert softplus_fwd_triton(torch.empty(0), 1.0).shape == (0,)


def _spy(monkeypatch, op):
    """Count calls of ``op``'s Triton launcher made through the dispatch layer."""
    import importlib
    spec = ops._REGISTRY[op]["triton"]
    fn = spec if callable(spec) else getattr(importlib.import_module(spec.split(":")[0]), spec.split(":")[1])
    calls = []

    def wrapped(*args):
        calls.append(args[0].device)
        return fn(*args)

    monkeypatch.setitem(ops._REGISTRY[op], "triton", wrapped)
    return calls


def test_ops_dispatch_to_triton_and_gradcheck_in_float64(monkeypatch):
    """The torch.library ops run the Triton kernels when the backend says so, and their autograd
    (first, second and -- composed -- third order) passes gradcheck in float64 on both backends."""
    names = ("softplus", "softplus_backward", "softplus_double_backward")
    x = torch.randn(7, dtype=torch.float64) * 0.3
    gy = torch.randn(7, dtype=torch.float64)
    gg = torch.randn(7, dtype=torch.float64)
    results = {}
    for backend in ("torch", "triton"):
        ops.set_backend(backend)
        spies = {n: _spy(monkeypatch, n) for n in names}
        xr, gyr, ggr = (t.clone().requires_grad_(True) for t in (x, gy, gg))
        bwd = torch.ops.upi_fast.softplus_backward
        bwd2 = torch.ops.upi_fast.softplus_double_backward
        assert torch.autograd.gradcheck(lambda a, b: bwd(a, b, 2.5), (gyr, xr))
        assert torch.autograd.gradcheck(lambda a, b, c: bwd2(a, b, c, 2.5), (ggr, gyr, xr))
        assert torch.autograd.gradgradcheck(lambda t: softplus(t, 2.5), (xr,))
        results[backend] = (softplus(x, 2.5), bwd(gy, x, 2.5), *bwd2(gg, gy, x, 2.5))
        used = {n: len(c) for n, c in spies.items()}
        if backend == "triton":
            assert all(used.values()), f"Triton launchers not reached: {used}"
        else:
            assert not any(used.values()), f"torch backend reached Triton: {used}"
    for a, b in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-300)
