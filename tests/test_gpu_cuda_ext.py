"""The C++/CUDA extension ``upi_fast._C`` on CUDA tensors, against the Triton kernels and the PyTorch
references: every op, every backend (``cuda``, ``triton``, ``torch``) selected through the same
dispatch layer (``set_backend``), compared with float64 references computed on the GPU, on sizes
that are not multiples of the block sizes, with the CUDA caching allocator poisoned (freed memory
filled with NaN bytes, so an output element a kernel forgets to write shows up as NaN).

Needs a CUDA device and the extension built for it (bench/gpu_check.sh does both), and the Triton
kernels compiled rather than interpreted:

    TRITON_INTERPRET=0 UPI_FAST_REQUIRE_EXT=1 python -m pytest -m gpu tests/test_gpu_cuda_ext.py
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import upi_fast
import upi_fast.ops as ops
from upi_fast.ops.saliency_dissim import saliency_dissim, saliency_dissim_reference
from upi_fast.ops.sketch_update import rademacher_columns, sketch_update, sketch_update_reference
from upi_fast.ops.softplus import (softplus, softplus_backward_reference, softplus_double_backward_reference,
                                   softplus_reference)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = "cuda"
REQUIRE_EXT = os.environ.get("UPI_FAST_REQUIRE_EXT", "0") not in ("", "0")
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# max |got - want| <= TOL * max |want| (want: float64 reference of the same, rounded, inputs)
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def _require_ext():
    if ops._cuda_ext() is None or not upi_fast.backends()["cuda"]:
        msg = f"the cuda backend is unavailable: {ops._why_unavailable('cuda')}"
        if REQUIRE_EXT:
            pytest.fail("UPI_FAST_REQUIRE_EXT=1 but " + msg)
        pytest.skip(msg)


def _backends() -> list[str]:
    names = ["cuda", "torch"]
    if not INTERPRETED and upi_fast.backends()["triton"]:
        names.insert(1, "triton")
    return names


def _poison() -> None:
    """Fill freed blocks of both allocator pools with 0xFF bytes (NaN in every float dtype)."""
    torch.cuda.synchronize()
    blocks = [torch.full((n,), -1, dtype=torch.int32, device=DEV) for n in (1 << 8, 1 << 12, 1 << 16, 1 << 18,
                                                                             1 << 22, 1 << 25)]
    del blocks
    torch.cuda.synchronize()


def assert_rel(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str, factor: float = 1.0) -> None:
    got = got.double()
    assert torch.isfinite(got).all() == torch.isfinite(want).all(), f"{what}: NaN/Inf where the reference has none"
    err = (got - want).abs().max().item() if want.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    assert err <= TOL[dtype] * factor * scale + 1e-300, f"{what}: max error {err:.3e}, scale {scale:.3e}"


def _with_backend(name: str, fn):
    upi_fast.set_backend(name)
    try:
        _poison()
        out = fn()
        torch.cuda.synchronize()
        return out
    finally:
        upi_fast.set_backend("auto")


# ------------------------------------------------------------------------------------------------ dispatch
def test_cuda_backend_serves_cuda_tensors_through_the_cpp_kernels():
    info = ops._cuda_ext().build_info()
    major, minor = torch.cuda.get_device_capability()
    cap = major * 10 + minor
    archs = info["cuda_archs"]
    assert f"sm_{cap}" in archs or any(a.startswith("compute_") and int(a[8:].rstrip("af")) <= cap for a in archs), \
        f"the extension has no code for sm_{cap}: {archs}"
    upi_fast.set_backend("auto")
    assert ops.resolve_backend(DEV) == "cuda"
    for op in ops._REGISTRY:
        active = [l for l in torch._C._dispatch_dump(f"upi_fast::{op}").splitlines() if l.startswith("CUDA:")]
        assert "csrc/register.cpp" in active[0], active
    upi_fast.set_backend("torch")
    active = [l for l in torch._C._dispatch_dump("upi_fast::softplus").splitlines() if l.startswith("CUDA:")]
    assert "upi_fast/ops/__init__.py" in active[0]


def test_importing_upi_fast_does_not_initialise_cuda():
    code = ("import sys, torch, upi_fast; assert 'upi_fast._C' in sys.modules; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ softplus
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", [(1,), (1037,), (3, 5, 7), (4099 * 3 + 1,), (2, 3, 33, 65)])
def test_softplus_all_passes_all_backends(dtype, shape):
    beta = 10.0
    gen = torch.Generator(device=DEV).manual_seed(sum(shape))
    x = ((torch.rand(shape, generator=gen, device=DEV, dtype=torch.float64) * 2 - 1) * 3.0).to(dtype)
    x.view(-1)[0] = 2.5  # beta x > 20: y = x
    gy = torch.randn(shape, generator=gen, device=DEV, dtype=torch.float64).to(dtype)
    gg = torch.randn(shape, generator=gen, device=DEV, dtype=torch.float64).to(dtype)
    xd, gyd, ggd = x.double(), gy.double(), gg.double()
    want = (softplus_reference(xd, beta), softplus_backward_reference(gyd, xd, beta),
            *softplus_double_backward_reference(ggd, gyd, xd, beta))
    for name in _backends():
        got = _with_backend(name, lambda: (torch.ops.upi_fast.softplus(x, beta),
                                           torch.ops.upi_fast.softplus_backward(gy, x, beta),
                                           *torch.ops.upi_fast.softplus_double_backward(gg, gy, x, beta)))
        for g, w, what in zip(got, want, ("forward", "backward", "double backward[0]", "double backward[1]")):
            assert g.dtype == dtype and g.shape == x.shape
            assert_rel(g, w, dtype, f"{name} softplus {what} {dtype} {shape}", factor=2.0)


@pytest.mark.parametrize("layout", ["transposed", "channels_last", "mixed"])
def test_softplus_cuda_kernels_on_non_contiguous_inputs(layout):
    x = torch.randn(4, 6, 9, 11, device=DEV)
    gy = torch.randn(4, 6, 9, 11, device=DEV)
    if layout == "transposed":
        x, gy = x.transpose(1, 3), gy.transpose(1, 3)
    elif layout == "channels_last":
        x, gy = x.to(memory_format=torch.channels_last), gy.to(memory_format=torch.channels_last)
    else:
        x = x.to(memory_format=torch.channels_last)
    upi_fast.set_backend("cuda")
    _poison()
    y = torch.ops.upi_fast.softplus(x, 4.0)
    gx = torch.ops.upi_fast.softplus_backward(gy, x, 4.0)
    assert y.stride() == torch.empty_like(x).stride()  # the layout the fake kernel promises
    assert_rel(y, softplus_reference(x.double(), 4.0), torch.float32, "softplus")
    assert_rel(gx, softplus_backward_reference(gy.double(), x.double(), 4.0), torch.float32, "softplus_backward")


def test_softplus_autograd_through_the_cuda_kernels():
    upi_fast.set_backend("cuda")
    x = (torch.randn(37, device=DEV, dtype=torch.float64) * 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: softplus(t, 3.0), (x,))
    assert torch.autograd.gradgradcheck(lambda t: softplus(t, 3.0), (x,))


def test_softplus_cuda_input_checks_name_the_argument():
    upi_fast.set_backend("cuda")
    x = torch.randn(10, device=DEV)
    with pytest.raises(RuntimeError, match="grad_y must have the shape of x"):
        torch.ops.upi_fast.softplus_backward(torch.randn(11, device=DEV), x, 1.0)
    with pytest.raises(RuntimeError, match="gg has dtype"):
        torch.ops.upi_fast.softplus_double_backward(x.double(), x, x, 1.0)
    with pytest.raises(RuntimeError, match="beta must be a finite positive"):
        torch.ops.upi_fast.softplus(x, -1.0)
    with pytest.raises(RuntimeError, match="x must be float32, float64, float16 or bfloat16"):
        torch.ops.upi_fast.softplus(torch.ones(3, device=DEV, dtype=torch.int32), 1.0)


# ------------------------------------------------------------------------------------------------ saliency
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 3, 9, 7), (2, 2, 16, 32), (1, 3, 224, 224), (5, 1, 28, 28),
                                   (64, 3, 33, 31), (2, 3, 1, 1), (1, 1, 1, 4099)])
def test_saliency_dissim_all_kinds_all_backends(dtype, shape):
    gen = torch.Generator(device=DEV).manual_seed(sum(shape))
    B, C, H, W = shape
    g = torch.randn(shape, generator=gen, device=DEV, dtype=torch.float64)
    if B > 1:
        g[1] = 0.0  # a zero map
    g[0, :, : H // 2] = 0.0
    ref = torch.rand(B, H * W, generator=gen, device=DEV, dtype=torch.float64)
    ref /= ref.sum(1, keepdim=True)
    g, ref = g.to(dtype), ref.to(dtype)
    for kind in ("l2", "rel_l2", "cosine"):
        want_loss, want_grad = saliency_dissim_reference(g.double(), ref.double(), kind, True)
        s1 = g.double().abs().sum((1, 2, 3))
        natural = (1.0 / (s1[s1 > 0] * ref.double()[s1 > 0].norm(dim=1))).max().item()
        for name in _backends():
            loss, grad = _with_backend(name, lambda: torch.ops.upi_fast.saliency_dissim(g, ref, kind, True))
            loss2, empty = _with_backend(name, lambda: torch.ops.upi_fast.saliency_dissim(g, ref, kind, False))
            what = f"{name} {kind} {dtype} {shape}"
            assert loss.dtype == dtype and grad.shape == g.shape and empty.numel() == 0
            assert_rel(loss, want_loss, dtype, what + " loss", factor=10)
            assert_rel(loss2, want_loss, dtype, what + " loss (no grad)", factor=10)
            err = (grad.double() - want_grad).abs().max().item()
            assert torch.isfinite(grad).all() and err <= TOL[dtype] * 10 * max(natural, want_grad.abs().max().item()), \
                f"{what} grad: max error {err:.3e}"


def test_saliency_dissim_cuda_channels_last_and_autograd():
    upi_fast.set_backend("cuda")
    g = torch.randn(3, 3, 17, 19, device=DEV, dtype=torch.float64).to(memory_format=torch.channels_last)
    ref = torch.rand(3, 17 * 19, device=DEV, dtype=torch.float64)
    _poison()
    loss, grad = torch.ops.upi_fast.saliency_dissim(g, ref, "rel_l2", True)
    assert grad.stride() == torch.empty_like(g).stride()
    want_loss, want_grad = saliency_dissim_reference(g.contiguous(), ref, "rel_l2", True)
    assert_rel(loss, want_loss, torch.float64, "loss")
    assert_rel(grad, want_grad, torch.float64, "grad")
    gg = torch.randn(2, 2, 5, 7, device=DEV, dtype=torch.float64, requires_grad=True)
    r = torch.rand(2, 35, device=DEV, dtype=torch.float64)
    for kind in ("l2", "rel_l2", "cosine"):
        assert torch.autograd.gradcheck(lambda t: saliency_dissim(t, r, kind)[0], (gg,))
    with pytest.raises(RuntimeError, match="kind must be one of"):
        torch.ops.upi_fast.saliency_dissim(g, ref, "topk", True)
    with pytest.raises(RuntimeError, match="ref must have shape"):
        torch.ops.upi_fast.saliency_dissim(g, ref[:, :5], "l2", True)


# ------------------------------------------------------------------------------------------------ sketch
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("a_dtype", ALL_DTYPES)
@pytest.mark.parametrize("k,b,d", [(5, 37, 301), (20, 70, 4099), (16, 128, 150528)])
def test_sketch_update_all_backends(w_dtype, a_dtype, k, b, d):
    gen = torch.Generator(device=DEV).manual_seed(k * b)
    A = torch.randn(b, d, generator=gen, device=DEV, dtype=torch.float64).to(a_dtype)
    A[min(3, b - 1)] = 0
    W0 = torch.randn(k, d, generator=gen, device=DEV, dtype=torch.float64)
    for normalize in (True, False):
        want = W0.clone()
        sketch_update_reference(want, A, 2**32 - b - 7, -3, normalize)
        for name in _backends():
            W = W0.to(w_dtype, copy=True)
            _with_backend(name, lambda: torch.ops.upi_fast.sketch_update(W, A, 2**32 - b - 7, -3 & 0xFFFFFFFF,
                                                                         normalize))
            tol = 1e-12 if w_dtype == torch.float64 else 2e-6 * b ** 0.5
            err = (W.double() - want).abs().max().item() / want.abs().max().item()
            assert err <= tol, f"{name} sketch {w_dtype} {a_dtype} {(k, b, d)} normalize={normalize}: {err:.3e}"


def test_sketch_update_generates_exactly_rademacher_columns():
    """W = 0, A = identity rows, no normalisation: W becomes Psi[:, rows] itself, bit for bit."""
    for seed, start in ((0, 0), (12345, 1_000_003), (2**32 - 1, 2**32 - 300)):
        rows = torch.arange(start, start + 300)
        want = rademacher_columns(seed, rows, 40).to(DEV)
        for name in _backends():
            W = torch.zeros(40, 300, device=DEV)
            _with_backend(name, lambda: sketch_update(W, torch.eye(300, device=DEV), start, seed, False))
            assert torch.equal(W, want), (name, seed, start)


def test_sketch_update_cuda_checks_and_merges():
    upi_fast.set_backend("cuda")
    W = torch.zeros(8, 64, device=DEV)
    with pytest.raises(RuntimeError, match="W must be contiguous"):
        torch.ops.upi_fast.sketch_update(W.t().contiguous().t(), torch.randn(3, 8, device=DEV), 0, 1, True)
    with pytest.raises(RuntimeError, match="A must have shape"):
        torch.ops.upi_fast.sketch_update(W, torch.randn(3, 63, device=DEV), 0, 1, True)
    with pytest.raises(RuntimeError, match="row_offset"):
        torch.ops.upi_fast.sketch_update(W, torch.randn(3, 64, device=DEV), 2**32 - 2, 1, True)
    A = torch.randn(100, 64, device=DEV, dtype=torch.float64)
    whole = torch.zeros(8, 64, device=DEV, dtype=torch.float64)
    parts = torch.zeros_like(whole)
    sketch_update(whole, A, 1000, 5, True)
    sketch_update(parts, A[:37], 1000, 5, True)
    sketch_update(parts, A[37:], 1037, 5, True)
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)
