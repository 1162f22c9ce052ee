"""The compiled Triton kernels on CUDA tensors: the same comparisons as the interpreter tests (float64
reference, poisoned outputs, odd sizes) plus float16 / bfloat16 inputs and the backend switch.

Needs a CUDA device, and the kernels compiled rather than interpreted: tests/conftest.py sets
``TRITON_INTERPRET=1`` unless the variable is already set, so run

    TRITON_INTERPRET=0 python -m pytest -m gpu tests/test_gpu_kernels.py
"""
import os

import pytest
import torch

import upi_fast
import upi_fast.ops as ops
from upi_fast.ops.saliency_dissim import saliency_dissim, saliency_dissim_reference
from upi_fast.ops.sketch_update import rademacher_columns, sketch_update, sketch_update_reference
from upi_fast.ops.softplus import (softplus_backward_reference, softplus_double_backward_reference,
                                   softplus_reference)
from _cuda_ext_cases import SOFTPLUS_EDGE_Z  # shared with the CUDA extension's tests

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="TRITON_INTERPRET=1 interprets the kernels; run with TRITON_INTERPRET=0"),
]

DEV = "cuda"
HALF = [torch.float16, torch.bfloat16]


def _nan(shape, dtype=torch.float32):
    shape = (shape,) if isinstance(shape, int) else shape
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def assert_rel(got, want, rtol=1e-5):
    """``max |got - want| <= rtol max |want|`` and no NaN."""
    got = got.double()
    assert torch.isfinite(got).all(), "NaN/Inf left in the output"
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rtol * scale + 1e-30, f"max error {err:.3e} vs scale {scale:.3e}"


# --------------------------------------------------------------------------- softplus


def _softplus_inputs(n, beta, dtype=torch.float32, zmax=24.0, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = ((torch.rand(n, generator=g, device=DEV) * 2 - 1) * (zmax / beta)).to(dtype)
    gy = torch.randn(n, generator=g, device=DEV).to(dtype)
    gg = torch.randn(n, generator=g, device=DEV).to(dtype)
    return x, gy, gg


@pytest.mark.parametrize("n", [(1 << 20) + 37, 3001])
def test_softplus_kernels_float32(n):
    from upi_fast.kernels.softplus import softplus_bwd2_triton, softplus_bwd_triton, softplus_fwd_triton
    beta = 10.0
    x, gy, gg = _softplus_inputs(n, beta)
    xd, gyd, ggd = x.double(), gy.double(), gg.double()
    y = softplus_fwd_triton(x, beta, out=_nan(n))
    want = softplus_reference(xd, beta)
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-30)
    gx = softplus_bwd_triton(gy, x, beta, out=_nan(n))
    torch.testing.assert_close(gx.double(), softplus_backward_reference(gyd, xd, beta), rtol=1e-5, atol=1e-30)
    o1, o2 = softplus_bwd2_triton(gg, gy, x, beta, out=(_nan(n), _nan(n)))
    r1, r2 = softplus_double_backward_reference(ggd, gyd, xd, beta)
    torch.testing.assert_close(o1.double(), r1, rtol=1e-5, atol=1e-30)
    torch.testing.assert_close(o2.double(), r2, rtol=1e-5, atol=1e-30)


def test_softplus_kernels_float64_and_tails():
    from upi_fast.kernels.softplus import softplus_bwd2_triton, softplus_fwd_triton
    x, gy, gg = (t.double() for t in _softplus_inputs(4099, 0.3, zmax=5.0, seed=1))
    torch.testing.assert_close(softplus_fwd_triton(x, 0.3), softplus_reference(x, 0.3), rtol=1e-12, atol=1e-300)
    for a, b in zip(softplus_bwd2_triton(gg, gy, x, 0.3), softplus_double_backward_reference(gg, gy, x, 0.3)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-300)
    z = torch.tensor(SOFTPLUS_EDGE_Z, device=DEV)
    x = z / 4.0
    y = softplus_fwd_triton(x, 4.0)
    assert torch.isfinite(y).all() and torch.equal(y[z > 20], x[z > 20])
    _, ds = softplus_bwd2_triton(torch.ones_like(x), torch.ones_like(x), x, 4.0)
    t = torch.exp(-z.double().abs())
    exact = 4.0 * t / (1 + t) ** 2
    keep = exact > 1e-30
    torch.testing.assert_close(ds.double()[keep], exact[keep], rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", HALF)
def test_softplus_kernels_half(dtype):
    from upi_fast.kernels.softplus import softplus_bwd2_triton, softplus_fwd_triton
    x, gy, gg = _softplus_inputs(10007, 10.0, dtype=dtype, seed=2)
    eps = torch.finfo(dtype).eps
    y = softplus_fwd_triton(x, 10.0, out=_nan((10007,), dtype))
    torch.testing.assert_close(y.double(), softplus_reference(x.double(), 10.0), rtol=eps, atol=1e-5)
    o1, o2 = softplus_bwd2_triton(gg, gy, x, 10.0)
    r1, r2 = softplus_double_backward_reference(gg.double(), gy.double(), x.double(), 10.0)
    torch.testing.assert_close(o1.double(), r1, rtol=eps, atol=1e-4)
    torch.testing.assert_close(o2.double(), r2, rtol=eps, atol=1e-4)


def test_softplus_channels_last_keeps_layout():
    from upi_fast.kernels.softplus import softplus_fwd_triton
    x = torch.randn(3, 17, 9, 11, device=DEV).contiguous(memory_format=torch.channels_last)
    y = softplus_fwd_triton(x, 10.0)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), softplus_reference(x.double(), 10.0), rtol=1e-5, atol=1e-30)


# --------------------------------------------------------------------------- saliency dissimilarity

SD_CASES = [((5, 3, 31, 29), "auto", None), ((4, 3, 224, 224), "auto", None), ((3, 3, 100, 77), "split", 256),
            ((2, 11, 19, 23), "auto", None)]


def _sd_inputs(shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(shape, generator=g, device=DEV).to(dtype)
    ref = torch.rand(shape[0], shape[2] * shape[3], generator=g, device=DEV)
    return x, (ref / ref.sum(1, keepdim=True)).to(dtype)


@pytest.mark.parametrize("shape,path,block_n", SD_CASES)
def test_saliency_dissim_float32(shape, path, block_n):
    from upi_fast.kernels.saliency_dissim import saliency_dissim_triton
    g, ref = _sd_inputs(shape)
    for kind in ("l2", "rel_l2", "cosine"):
        want_loss, want_grad = saliency_dissim_reference(g.double(), ref.double(), kind, True)
        out = (_nan((shape[0],)), _nan(shape))
        loss, grad = saliency_dissim_triton(g, ref, kind, True, out=out, path=path, block_n=block_n)
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=0)
        assert_rel(grad, want_grad)
        loss2, _ = saliency_dissim_triton(g, ref, kind, False, path=path, block_n=block_n)
        torch.testing.assert_close(loss2.double(), want_loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", HALF + [torch.float64])
def test_saliency_dissim_other_dtypes(dtype):
    from upi_fast.kernels.saliency_dissim import saliency_dissim_triton
    for shape in ((3, 3, 32, 32), (2, 3, 224, 224)):
        g, ref = _sd_inputs(shape, dtype, seed=1)
        want_loss, want_grad = saliency_dissim_reference(g.double(), ref.double(), "rel_l2", True)
        loss, grad = saliency_dissim_triton(g, ref, "rel_l2", True)
        assert loss.dtype == dtype and grad.dtype == dtype
        rtol = 1e-10 if dtype == torch.float64 else 2 * torch.finfo(dtype).eps
        torch.testing.assert_close(loss.double(), want_loss, rtol=rtol, atol=0)
        assert_rel(grad, want_grad, rtol)


def test_saliency_dissim_zero_and_equal_maps_and_strides():
    from upi_fast.kernels.saliency_dissim import saliency_dissim_triton
    for shape in ((3, 3, 20, 20), (3, 3, 150, 150)):
        g, ref = _sd_inputs(shape, seed=2)
        g[1] = 0
        ref[2] = g[2].abs().sum(0).flatten() / g[2].abs().sum()
        for kind in ("l2", "rel_l2", "cosine"):
            loss, grad = saliency_dissim_triton(g, ref, kind, True)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
            assert torch.equal(grad[1], torch.zeros_like(grad[1])) and loss[2].abs() < 1e-5
        gl = g.contiguous(memory_format=torch.channels_last)
        loss, grad = saliency_dissim_triton(gl, ref, "l2", True)
        assert grad.is_contiguous(memory_format=torch.channels_last)
        want_loss, want_grad = saliency_dissim_reference(g.double(), ref.double(), "l2", True)
        assert_rel(grad[0], want_grad[0])  # sample 2 (I = ref) has a rounding-noise direction
        assert torch.equal(grad[1], torch.zeros_like(grad[1]))


# --------------------------------------------------------------------------- sketch update


@pytest.mark.parametrize("k,b,d", [(16, 128, 150528 // 8 + 3), (5, 37, 1001), (130, 33, 515)])
@pytest.mark.parametrize("normalize", [True, False])
def test_sketch_update_float32(k, b, d, normalize):
    from upi_fast.kernels.sketch_update import sketch_update_triton
    g = torch.Generator(device=DEV).manual_seed(0)
    W0 = torch.randn(k, d, generator=g, device=DEV)
    A = torch.randn(b, d, generator=g, device=DEV)
    A[1] = 0
    W = W0.clone()
    sketch_update_triton(W, A, 2**32 - b - 1, 2**32 - 3, normalize)
    want = W0.double()
    sketch_update_reference(want, A.double(), 2**32 - b - 1, 2**32 - 3, normalize)
    assert_rel(W, want)


def test_sketch_update_bit_identical_psi_and_other_dtypes():
    from upi_fast.kernels.sketch_update import sketch_update_triton
    for use_dot in (True, False):
        W = torch.zeros(37, 50, device=DEV)
        sketch_update_triton(W, torch.eye(50, device=DEV), 2**31 - 7, 99, False, use_dot=use_dot)
        assert torch.equal(W, rademacher_columns(99, torch.arange(2**31 - 7, 2**31 + 43, device=DEV), 37))
    g = torch.Generator(device=DEV).manual_seed(1)
    A = torch.randn(40, 3001, generator=g, device=DEV)
    for dtype in HALF:
        W = torch.zeros(16, 3001, device=DEV)
        sketch_update_triton(W, A.to(dtype), 5, 6, True)
        want = torch.zeros(16, 3001, dtype=torch.float64, device=DEV)
        sketch_update_reference(want, A.to(dtype).double(), 5, 6, True)
        assert_rel(W, want)
    W64 = torch.zeros(16, 3001, dtype=torch.float64, device=DEV)
    sketch_update_triton(W64, A.double(), 5, 6, True)
    want = torch.zeros_like(W64)
    sketch_update_reference(want, A.double(), 5, 6, True)
    torch.testing.assert_close(W64, want, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- backend switching


def _ops_outputs(seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(4, 8, 13, 11, generator=g, device=DEV)
    gd, ref = _sd_inputs((4, 3, 40, 37), seed=seed)
    W = torch.zeros(16, 1000, device=DEV)
    sketch_update(W, torch.randn(50, 1000, generator=g, device=DEV), 0, 3)
    return [upi_fast.ops.softplus.softplus(x, 10.0), *saliency_dissim(gd, ref, "cosine"), W]


def test_backend_switching_on_cuda():
    results = {}
    for backend in ("torch", "triton") + (("cuda",) if upi_fast.backends()["cuda"] else ()):
        upi_fast.set_backend(backend)
        assert ops.resolve_backend(DEV) == backend
        results[backend] = _ops_outputs()
    for backend, outs in results.items():
        for a, b in zip(outs, results["torch"]):
            assert_rel(a, b.double(), 1e-5)


def test_saliency_loss_grad_triton_matches_torch_on_cuda():
    from _models import relu_cnn
    model = relu_cnn(channels=3, size=(32, 32), dtype=torch.float32).to(DEV)
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(8, 3, 32, 32, generator=g, device=DEV)
    y = torch.arange(8, device=DEV) % 5
    delta = 0.05 * torch.randn(3, 32, 32, generator=g, device=DEV)
    res = {}
    for backend in ("torch", "triton"):
        upi_fast.set_backend(backend)
        with upi_fast.softplus_surrogate(model, beta=10.0):
            I_ref = upi_fast.saliency(model, x, y)
            res[backend] = upi_fast.saliency_loss_grad(model, x, y, I_ref, delta, "rel_l2", "double_backward")
    (l0, g0), (l1, g1) = res["torch"], res["triton"]
    torch.testing.assert_close(l1, l0, rtol=1e-4, atol=1e-4 * l0.abs().max().item())
    torch.testing.assert_close(g1, g0, rtol=1e-3, atol=1e-4 * g0.abs().max().item())
