"""Cases shared by the tests of the C++/CUDA extension's tensor entry points (``csrc/*.cu``):

* on a GPU, ``tests/test_gpu_cuda_ext.py`` (``pytest -m gpu``): CUDA tensors through ``set_backend``,
  the ``cuda`` backend side by side with ``triton`` and ``torch``;
* without one, ``tests/test_cuda_host_emulated.py``: the same host code compiled by g++ against the
  emulator of ``csrc/emulate/``, registered as the ``upi_fast_emu::`` ops, on CPU tensors.

A :class:`Target` runs the ops: ``ops`` has the five ops as attributes (``torch.ops.upi_fast`` with a
backend selected, or ``torch.ops.upi_fast_emu``), and ``call(fn)`` runs ``fn()`` with freshly
allocated memory poisoned (NaN bytes: an output element a kernel forgets to write shows up) and
returns its result. Every check compares with the float64 references of ``upi_fast/ops/*.py``
evaluated on the same (rounded) inputs, on sizes that are not multiples of the block sizes.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
import torch

from _tolerance import dtype_rtol
from upi_fast.ops.saliency_dissim import saliency_dissim_reference
from upi_fast.ops.sketch_update import rademacher_columns, sketch_update_reference
from upi_fast.ops.softplus import (softplus_backward_reference, softplus_double_backward_reference,
                                   softplus_reference)

OPS = ("saliency_dissim", "softplus", "softplus_backward", "softplus_double_backward", "sketch_update")
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Elementwise ops (softplus): max |got - want| <= TOL * max |want|. The inputs are the same rounded
# values, so the error is the output's rounding (half an ulp of the dtype: 2 eps covers it for the
# half types, computed in float32) plus a few float32/float64 roundings of exp/log1p/division
# (16 eps32; ~4500 eps64 leaves room for exp/log1p of libm vs CUDA's). Reductions (saliency, sketch)
# take theirs from tests/_tolerance.py, by the sizes of their sums.
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

SOFTPLUS_SHAPES = [(1,), (1037,), (3, 5, 7), (4099 * 3 + 1,), (2, 3, 33, 65)]
# layouts of (x, grad_y): permuted (dense), channels_last both or x only, x a strided slice (not
# dense: the output is contiguous, x is copied), grad_y broadcast (stride 0, as autograd makes it)
SOFTPLUS_LAYOUTS = ["transposed", "channels_last", "mixed", "sliced", "expanded"]
# z = beta x around the threshold (20) and far out in both directions: finite outputs, y = x above.
SOFTPLUS_EDGE_Z = [-1e4, -80.0, -30.0, -1e-6, 0.0, 1e-6, 19.99, 20.01, 30.0, 80.0, 1e4]
# (B, C, H, W): N = H W odd or even, below and above one block's 256 threads x 4-vector, one chunk
# or many per sample, B = 64 (many samples, one chunk each), a single position, a single row.
SALIENCY_SHAPES = [(3, 3, 9, 7), (2, 2, 16, 32), (1, 3, 224, 224), (5, 1, 28, 28), (64, 3, 33, 31), (2, 3, 1, 1),
                   (1, 1, 1, 4099)]
KINDS = ("l2", "rel_l2", "cosine")
# (k, b, d): k below, at and above the 16 sketch rows of a tile, d with a partial 256-column tile,
# b with a partial 32-row chunk; the last one is a 224 x 224 x 3 image row block.
SKETCH_SHAPES = [(5, 37, 301), (20, 70, 4099), (16, 128, 150528)]


class Target(NamedTuple):
    name: str
    ops: object
    call: Callable


def assert_rel(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str, factor: float = 1.0,
               rtol: float | None = None) -> None:
    """``max |got - want| <= rtol * max |want|`` (default ``rtol``: ``TOL[dtype] * factor``), plus the
    spacing of ``dtype``'s subnormals (a result below its range, e.g. softplus(-28.7) = 4e-13 in
    float16, rounds to 0)."""
    got = got.double()
    assert torch.isfinite(got).all() == torch.isfinite(want).all(), f"{what}: NaN/Inf where the reference has none"
    err = (got - want).abs().max().item() if want.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    floor = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    rtol = TOL[dtype] * factor if rtol is None else rtol
    assert err <= rtol * scale + floor, f"{what}: max error {err:.3e}, scale {scale:.3e}, rtol {rtol:.2e}"


# ------------------------------------------------------------------------------------------------ softplus
def check_softplus_all_passes(targets, dtype, shape, device) -> None:
    beta = 10.0
    gen = torch.Generator(device=device).manual_seed(sum(shape))
    x = ((torch.rand(shape, generator=gen, device=device, dtype=torch.float64) * 2 - 1) * 3.0).to(dtype)
    # x[0]: beta x > 20, y = x. A lone element sets the scale of the comparison by itself, so there a
    # moderate z = 1 instead: at z = 25 the reference's 1 - s (float64, with cancellation) is only
    # good to eps64 / (1 - s) ~ 1e-5, and at z = -29 the torch backend's half-precision beta x alone
    # is off by |z| eps (check_softplus_edges covers extreme z against an exact formula)
    x.view(-1)[0] = 2.5 if x.numel() > 1 else 0.1
    gy = torch.randn(shape, generator=gen, device=device, dtype=torch.float64).to(dtype)
    gg = torch.randn(shape, generator=gen, device=device, dtype=torch.float64).to(dtype)
    xd, gyd, ggd = x.double(), gy.double(), gg.double()
    want = (softplus_reference(xd, beta), softplus_backward_reference(gyd, xd, beta),
            *softplus_double_backward_reference(ggd, gyd, xd, beta))
    for t in targets:
        got = t.call(lambda: (t.ops.softplus(x, beta), t.ops.softplus_backward(gy, x, beta),
                              *t.ops.softplus_double_backward(gg, gy, x, beta)))
        for g, w, what in zip(got, want, ("forward", "backward", "double backward[0]", "double backward[1]")):
            assert g.dtype == dtype and g.shape == x.shape and g.device == x.device
            assert_rel(g, w, dtype, f"{t.name} softplus {what} {dtype} {shape}", factor=2.0)


def check_softplus_layout(target, layout, device) -> None:
    """Inputs whose layouts differ from each other or from the contiguous one: the outputs have
    ``empty_like(x)``'s layout (what the fake kernel promises) and the right values."""
    gen = torch.Generator(device=device).manual_seed(5)
    x = torch.randn(4, 6, 9, 11, generator=gen, device=device)
    gy = torch.randn(4, 6, 9, 11, generator=gen, device=device)
    if layout == "transposed":
        x, gy = x.transpose(1, 3), gy.transpose(1, 3)
    elif layout == "channels_last":
        x, gy = x.to(memory_format=torch.channels_last), gy.to(memory_format=torch.channels_last)
    elif layout == "mixed":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(4, 6, 9, 23, generator=gen, device=device)[..., 1::2]
    else:
        gy = torch.randn(1, 6, 1, 11, generator=gen, device=device).expand(4, 6, 9, 11)
    y, gx = target.call(lambda: (target.ops.softplus(x, 4.0), target.ops.softplus_backward(gy, x, 4.0)))
    assert y.stride() == torch.empty_like(x).stride() == gx.stride() and y.shape == x.shape
    assert_rel(y, softplus_reference(x.double(), 4.0), torch.float32, f"{target.name} softplus {layout}")
    assert_rel(gx, softplus_backward_reference(gy.double(), x.double(), 4.0), torch.float32,
               f"{target.name} softplus_backward {layout}")


def check_softplus_edges(target, dtype, device) -> None:
    """Far outside the threshold in both directions: finite, y = x above it, s(1 - s) accurate."""
    beta = 4.0
    z = torch.tensor(SOFTPLUS_EDGE_Z, dtype=torch.float64, device=device)
    x = (z / beta).to(dtype)
    ones = torch.ones_like(x)
    y, (_, ds) = target.call(lambda: (target.ops.softplus(x, beta),
                                      target.ops.softplus_double_backward(ones, ones, x, beta)))
    assert torch.isfinite(y).all() and torch.isfinite(ds).all()
    above = x.double() * beta > 20
    assert torch.equal(y[above], x[above])
    assert_rel(y, softplus_reference(x.double(), beta), dtype, f"{target.name} softplus edges")
    xd = x.double()
    t = torch.exp(-(xd * beta).abs())
    exact = beta * t / (1 + t) ** 2  # beta s (1 - s), without cancellation
    keep = exact > torch.finfo(dtype).tiny / torch.finfo(dtype).eps  # normal numbers, not rounded to 0
    # beta = 4: z = beta x is exact; then exp, 1 / (1 + e), s, 1 - s and three products, each within
    # 2 ulps (libm's or CUDA's exp) in the compute type, and the output rounded to the dtype
    torch.testing.assert_close(ds.double()[keep], exact[keep], rtol=16 * torch.finfo(dtype).eps, atol=0)


def check_softplus_input_errors(target, device, other_device) -> None:
    """The TORCH_CHECKs name the argument; ``other_device``: a device whose tensors the kernels cannot read."""
    ops = target.ops
    x = torch.randn(10, device=device)
    with pytest.raises(RuntimeError, match="grad_y must have the shape of x"):
        ops.softplus_backward(torch.randn(11, device=device), x, 1.0)
    with pytest.raises(RuntimeError, match="gg has dtype"):
        ops.softplus_double_backward(x.double(), x, x, 1.0)
    with pytest.raises(RuntimeError, match="beta must be a finite positive"):
        ops.softplus(x, -1.0)
    with pytest.raises(RuntimeError, match="beta must be a finite positive"):
        ops.softplus_backward(x, x, float("nan"))
    with pytest.raises(RuntimeError, match="x must be float32, float64, float16 or bfloat16"):
        ops.softplus(torch.ones(3, device=device, dtype=torch.int32), 1.0)
    with pytest.raises(RuntimeError, match="grad_y must be a CUDA tensor, got device " + other_device):
        ops.softplus_backward(torch.randn(10, device=other_device), x, 1.0)


# ------------------------------------------------------------------------------------------------ saliency
def saliency_inputs(shape, dtype, device, seed=None):
    """g with a zero map (sample 1) and zero entries (sign 0), ref a distribution per sample."""
    gen = torch.Generator(device=device).manual_seed(sum(shape) if seed is None else seed)
    B, C, H, W = shape
    g = torch.randn(shape, generator=gen, device=device, dtype=torch.float64)
    if B > 1:
        g[1] = 0.0  # a zero map
    g[0, :, : H // 2] = 0.0
    ref = torch.rand(B, H * W, generator=gen, device=device, dtype=torch.float64)
    ref /= ref.sum(1, keepdim=True)
    return g.to(dtype), ref.to(dtype)


def saliency_rtol(dtype, C: int, N: int, kind: str, want_loss: torch.Tensor, depth: int) -> float:
    """Relative tolerance of the loss (``depth = 1``: S = sum over C channels, then sums over the N
    positions) or of the gradient (``depth = 2``: the loss's sums, then the projection). The cosine
    loss 1 - c and gradient c I/|I|^2 - r/(|I||r|) lose accuracy by a factor c / (1 - c) when I is
    close to ref's direction: that condition number multiplies the bound."""
    cond = 1.0
    if kind == "cosine" and want_loss.numel():
        c = 1.0 - want_loss
        cond = max(1.0, (c.abs() / want_loss.abs().clamp_min(1e-300)).max().item())
    return dtype_rtol(dtype, [max(C, 1), max(N, 1)], depth=depth) * cond


def check_saliency_all_kinds(targets, dtype, shape, device, kinds=KINDS) -> None:
    g, ref = saliency_inputs(shape, dtype, device)
    B, C, H, W = shape
    s1 = g.double().abs().sum((1, 2, 3))
    # natural size of the gradient entries, 1 / (||S||_1 ||ref||), for the absolute tolerance
    natural = (1.0 / (s1[s1 > 0] * ref.double()[s1 > 0].norm(dim=1))).max().item()
    for kind in kinds:
        want_loss, want_grad = saliency_dissim_reference(g.double(), ref.double(), kind, True)
        rtol_loss = saliency_rtol(dtype, C, H * W, kind, want_loss, depth=1)
        rtol_grad = saliency_rtol(dtype, C, H * W, kind, want_loss, depth=2)
        for t in targets:
            loss, grad = t.call(lambda: t.ops.saliency_dissim(g, ref, kind, True))
            loss2, empty = t.call(lambda: t.ops.saliency_dissim(g, ref, kind, False))
            what = f"{t.name} {kind} {dtype} {shape}"
            assert loss.dtype == dtype and grad.shape == g.shape and empty.numel() == 0
            assert_rel(loss, want_loss, dtype, what + " loss", rtol=rtol_loss)
            assert_rel(loss2, want_loss, dtype, what + " loss (no grad)", rtol=rtol_loss)
            err = (grad.double() - want_grad).abs().max().item()
            assert torch.isfinite(grad).all() and err <= rtol_grad * max(natural, want_grad.abs().max().item()), \
                f"{what} grad: max error {err:.3e}"


def check_saliency_layouts_and_errors(target, device, other_device) -> None:
    """channels_last g (the gradient comes back in g's layout), ref of another dtype, the checks."""
    ops = target.ops
    g = torch.randn(3, 3, 17, 19, device=device, dtype=torch.float64).to(memory_format=torch.channels_last)
    ref = torch.rand(3, 17 * 19, device=device, dtype=torch.float64)
    loss, grad = target.call(lambda: ops.saliency_dissim(g, ref, "rel_l2", True))
    assert grad.stride() == torch.empty_like(g).stride()
    want_loss, want_grad = saliency_dissim_reference(g.contiguous(), ref, "rel_l2", True)
    assert_rel(loss, want_loss, torch.float64, f"{target.name} channels_last loss")
    assert_rel(grad, want_grad, torch.float64, f"{target.name} channels_last grad")
    g32 = g.float()  # ref (float64) is converted to g's dtype
    loss, grad = target.call(lambda: ops.saliency_dissim(g32, ref, "cosine", True))
    want_loss, want_grad = saliency_dissim_reference(g32.double(), ref.float().double(), "cosine", True)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert_rel(loss, want_loss, torch.float32, f"{target.name} mixed dtypes loss",
               rtol=saliency_rtol(torch.float32, 3, 17 * 19, "cosine", want_loss, depth=1))
    assert_rel(grad, want_grad, torch.float32, f"{target.name} mixed dtypes grad",
               rtol=saliency_rtol(torch.float32, 3, 17 * 19, "cosine", want_loss, depth=2))
    with pytest.raises(RuntimeError, match="kind must be one of"):
        ops.saliency_dissim(g, ref, "topk", True)
    with pytest.raises(RuntimeError, match="ref must have shape"):
        ops.saliency_dissim(g, ref[:, :5], "l2", True)
    with pytest.raises(RuntimeError, match=r"g must be a \(B, C, H, W\) tensor"):
        ops.saliency_dissim(g[0], ref, "l2", True)
    with pytest.raises(RuntimeError, match="g must be float32 or float64"):
        ops.saliency_dissim(g.half(), ref, "l2", True)
    with pytest.raises(RuntimeError, match="ref must be floating point"):
        ops.saliency_dissim(g, ref.long(), "l2", True)
    with pytest.raises(RuntimeError, match="ref is on " + other_device):
        ops.saliency_dissim(g, ref.to(other_device), "l2", True)


# ------------------------------------------------------------------------------------------------ sketch
SKETCH_SEED = -3  # taken modulo 2^32 by the op's callers: the kernels get SKETCH_SEED & 0xFFFFFFFF


def check_sketch(targets, w_dtype, a_dtype, k, b, d, device, normalizes=(True, False)) -> None:
    gen = torch.Generator(device=device).manual_seed(k * b)
    A = torch.randn(b, d, generator=gen, device=device, dtype=torch.float64).to(a_dtype)
    A[min(3, b - 1)] = 0  # a zero row stays zero when normalised
    W0 = torch.randn(k, d, generator=gen, device=device, dtype=torch.float64)
    row_offset = 2**32 - b - 7  # the last rows of the 2^32 the generator can index
    for normalize in normalizes:
        want = W0.clone()
        sketch_update_reference(want, A, row_offset, SKETCH_SEED, normalize)
        for t in targets:
            W = W0.to(w_dtype, copy=True)
            t.call(lambda: t.ops.sketch_update(W, A, row_offset, SKETCH_SEED & 0xFFFFFFFF, normalize))
            # W_jc + sum_i psi A_ic / ||A_i||: b exactly signed terms accumulated in W's dtype, each
            # scaled by a norm (a sum of d squares) when normalising
            tol = dtype_rtol(w_dtype, [b, d] if normalize else [b])
            err = (W.double() - want).abs().max().item() / want.abs().max().item()
            assert err <= tol, f"{t.name} sketch {w_dtype} {a_dtype} {(k, b, d)} normalize={normalize}: {err:.3e}"


def check_rademacher_columns(targets, device) -> None:
    """W = 0, A = identity rows, no normalisation: W becomes Psi[:, rows] itself, bit for bit."""
    for seed, start in ((0, 0), (12345, 1_000_003), (2**32 - 1, 2**32 - 300)):
        rows = torch.arange(start, start + 300)
        want = rademacher_columns(seed, rows, 40).to(device)
        eye = torch.eye(300, device=device)
        for t in targets:
            W = torch.zeros(40, 300, device=device)
            t.call(lambda: t.ops.sketch_update(W, eye, start, seed, False))
            assert torch.equal(W, want), (t.name, seed, start)


def check_sketch_errors_and_merge(target, device, other_device) -> None:
    ops = target.ops
    W = torch.zeros(8, 64, device=device)
    with pytest.raises(RuntimeError, match="W must be contiguous"):
        ops.sketch_update(W.t().contiguous().t(), torch.randn(3, 8, device=device), 0, 1, True)
    with pytest.raises(RuntimeError, match="A must have shape"):
        ops.sketch_update(W, torch.randn(3, 63, device=device), 0, 1, True)
    with pytest.raises(RuntimeError, match="row_offset"):
        ops.sketch_update(W, torch.randn(3, 64, device=device), 2**32 - 2, 1, True)
    with pytest.raises(RuntimeError, match="row_offset"):
        ops.sketch_update(W, torch.randn(3, 64, device=device), -1, 1, True)
    with pytest.raises(RuntimeError, match="W must be float32 or float64"):
        ops.sketch_update(W.half(), torch.randn(3, 64, device=device), 0, 1, True)
    with pytest.raises(RuntimeError, match="A must be float32, float64, float16 or bfloat16"):
        ops.sketch_update(W, torch.ones(3, 64, device=device, dtype=torch.int64), 0, 1, True)
    with pytest.raises(RuntimeError, match="A is on " + other_device):
        ops.sketch_update(W, torch.randn(3, 64, device=other_device), 0, 1, True)
    assert torch.equal(W, torch.zeros_like(W))  # rejected calls wrote nothing
    # split into blocks of rows, the updates add up to one update with all the rows
    A = torch.randn(100, 64, device=device, dtype=torch.float64)
    whole = torch.zeros(8, 64, device=device, dtype=torch.float64)
    parts = torch.zeros_like(whole)
    target.call(lambda: ops.sketch_update(whole, A, 1000, 5, True))
    target.call(lambda: ops.sketch_update(parts, A[:37], 1000, 5, True))
    target.call(lambda: ops.sketch_update(parts, A[37:], 1037, 5, True))
    torch.testing.assert_close(parts, whole, rtol=1e-12, atol=1e-12)
    # A overlapping W (a view of rows 2..4, which the first tile of 16 sketch rows writes and the
    # second reads): A is read as it was before the update
    W2 = torch.randn(20, 64, device=device, dtype=torch.float64)
    want = W2.clone()
    sketch_update_reference(want, W2[2:5].clone(), 0, 9, True)
    target.call(lambda: ops.sketch_update(W2, W2[2:5], 0, 9, True))
    torch.testing.assert_close(W2, want, rtol=1e-12, atol=1e-12)
