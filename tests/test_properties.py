"""Property-based tests (hypothesis) of the ops and the metrics: random shapes, strides and
layouts, zero and constant maps, extreme magnitudes.

What "correct" means at extreme magnitudes (inputs whose largest entry has magnitude ``10^e``,
``e`` in [-30, 30], float32 or float64):

* nothing is ever NaN or Inf;
* the normalised maps (``abs_sum_l1``) and everything computed from them (the fused
  saliency-dissimilarity loss) are scale invariant: ``I(c g) = I(g)``, ``loss(c g) = loss(g)``
  and ``c grad(c g) = grad(g)``, to the dtype's rounding; rows sum to 1 (0 for a zero map);
* the row-normalised sketch update is scale invariant per row; the L2 norm of a row is formed in
  the accumulation dtype, so in float32 this holds for rows whose largest entry lies in
  [1e-15, 1e15] (their squares stay normal floats); in float64 over the whole range. Rows outside
  the float32 range still give finite results (a row whose norm overflows counts as zero);
* the metrics are invariant under rescaling each map (relative L2, top-k intersection, Spearman,
  centre of mass), Spearman under any strictly increasing transform; ranks equal scipy's.

Values are also compared with float64 references, and non-contiguous inputs with contiguous
copies. The Triton kernels run under the interpreter (slow: few examples, small shapes) and must
agree with the PyTorch path or refuse with a ValueError / TypeError.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import upi_fast.ops as ops
from upi_fast import metrics as M
from upi_fast.dissimilarity import KINDS as DISSIM_KINDS
from upi_fast.dissimilarity import dissimilarity
from upi_fast.ops.saliency_dissim import saliency_dissim, saliency_dissim_reference
from upi_fast.ops.sketch_update import rademacher_columns, sketch_update
from upi_fast.ops.softplus import softplus
from upi_fast.saliency import postprocess_maps

# float results compared between code paths: rerun by .ci/run with other CPU kernels forced
pytestmark = pytest.mark.numerics

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TRITON = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = (torch.float32, torch.float64)
RTOL = {torch.float32: 2e-5, torch.float64: 1e-11}

exponents = st.integers(-30, 30)
layouts = st.sampled_from(["contiguous", "strided", "transposed", "channels_last"])
specials = st.sampled_from(["none", "zero_row", "constant", "one_pixel"])


def _unit(shape, seed: int) -> torch.Tensor:
    """float64 Gaussian tensor scaled so that its largest magnitude is exactly 1."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return t / t.abs().max()


def _special(u: torch.Tensor, special: str) -> torch.Tensor:
    u = u.clone()
    if special == "zero_row":
        u[0] = 0.0
    elif special == "constant":
        u.fill_(-1.0)
    elif special == "one_pixel":
        u.zero_()
        u[..., 0, 0] = 1.0
    return u


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``t`` with other strides."""
    if how == "strided":
        big = torch.full([2 * s for s in t.shape], float("nan"), dtype=t.dtype)
        view = big[tuple(slice(None, None, 2) for _ in t.shape)]
        view.copy_(t)
        return view
    if how == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _finite(*ts) -> None:
    for t in ts:
        assert bool(torch.isfinite(t).all()), "NaN or Inf in the result"


def _close(got, want, dtype, factor: float = 1.0, floor: float = 0.0) -> None:
    """``max |got - want| <= factor * rtol(dtype) * max(max |want|, floor)``: the error relative to the
    result's scale, or to ``floor`` (the quantity's natural scale) when the result is near zero."""
    got, want = got.double(), want.double()
    scale = want.abs().max().item() if want.numel() else 0.0
    err = (got - want).abs().max().item() if want.numel() else 0.0
    bound = factor * RTOL[dtype] * max(scale, floor, 1e-300)
    assert err <= bound, f"max error {err:.3e} vs scale {scale:.3e} (bound {bound:.3e})"


def _grad_scale(g: torch.Tensor) -> float:
    """Natural scale of d loss / d g: 1 / ||S||_1 of the sample with the smallest nonzero mass."""
    n1 = g.double().abs().sum((1, 2, 3))
    n1 = n1[n1 > 0]
    return float(1.0 / n1.min()) if n1.numel() else 0.0


@st.composite
def gradients(draw, max_side: int = 9, max_b: int = 3, max_c: int = 4):
    """(g, unit u, exponent, dtype, special): g = u * 10^e in dtype, u of largest magnitude 1."""
    shape = (draw(st.integers(1, max_b)), draw(st.integers(1, max_c)), draw(st.integers(1, max_side)),
             draw(st.integers(1, max_side)))
    special = draw(specials)
    u = _special(_unit(shape, draw(st.integers(0, 2**16))), special)
    e = draw(exponents)
    dtype = draw(st.sampled_from(DTYPES))
    return (u * 10.0 ** e).to(dtype), u.to(dtype), e, dtype, special


# ------------------------------------------------------------------------------------------ maps
@FAST
@given(gradients(), layouts)
def test_normalised_maps_scale_invariant_and_sum_to_one(case, layout):
    g, u, e, dtype, special = case
    I = postprocess_maps(_layout(g, layout))
    _finite(I)
    assert I.shape == (g.shape[0], g.shape[2] * g.shape[3]) and bool((I >= 0).all())
    sums = I.double().sum(1)
    zero = g.reshape(g.shape[0], -1).abs().sum(1) == 0
    assert torch.allclose(sums[~zero], torch.ones_like(sums[~zero]), rtol=0, atol=1e-5)
    assert bool((sums[zero] == 0).all())
    _close(I, postprocess_maps(u), dtype, factor=4)  # scale invariance (u has the same dtype)
    _close(I, postprocess_maps(u.double()), dtype, factor=4)  # the float64 map
    if special == "constant":
        assert torch.allclose(I.double(), torch.full_like(I, 1.0 / I.shape[1]).double(), rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------ fused op
def _well_conditioned(loss: torch.Tensor, ref: torch.Tensor, kind: str) -> torch.Tensor:
    """Rows whose gradient is determined beyond rounding. Left out: ``l2`` / ``rel_l2`` with
    ``I = ref`` up to rounding (the gradient is the direction of the rounding error: any unit vector
    is right)."""
    ok = torch.ones_like(loss, dtype=torch.bool)
    if kind in ("l2", "rel_l2"):
        ok &= loss.double() >= 1e-4
    return ok


def _in_domain(ref: torch.Tensor, kind: str) -> bool:
    """``rel_l2`` divides by the reference's norm: a zero reference gives the sentinel loss
    ``||I|| / 1e-30`` and a gradient that overflows float32. The solvers and the evaluation never
    pass one (samples whose clean map is zero are left out), so it is outside the op's domain."""
    return not (kind == "rel_l2" and bool((ref == 0).all(1).any()))


@st.composite
def references(draw, g: torch.Tensor):
    B, N = g.shape[0], g.shape[2] * g.shape[3]
    how = draw(st.sampled_from(["random", "equal", "zero_row", "one_hot"]))
    ref = torch.rand((B, N), generator=torch.Generator().manual_seed(draw(st.integers(0, 2**16))),
                     dtype=torch.float64)
    ref = ref / ref.sum(1, keepdim=True)
    if how == "equal":
        ref = postprocess_maps(g.double())
    elif how == "zero_row":
        ref[0] = 0.0
    elif how == "one_hot":
        ref.zero_()
        ref[:, -1] = 1.0
    return ref.to(g.dtype)


@FAST
@given(st.data(), gradients(), layouts, st.sampled_from(["l2", "rel_l2", "cosine"]))
def test_fused_op_matches_float64_reference_and_is_scale_invariant(data, case, layout, kind):
    g, u, e, dtype, special = case
    ref = data.draw(references(g))
    assume(_in_domain(ref, kind))
    loss, grad = saliency_dissim(_layout(g, layout), ref, kind)
    _finite(loss, grad)
    want_loss, want_grad = saliency_dissim_reference(g.double(), ref.double(), kind, True)
    ok = _well_conditioned(want_loss, ref, kind)
    _close(loss, want_loss, dtype, factor=8, floor=1.0)
    _close(grad[ok], want_grad[ok], dtype, factor=8, floor=_grad_scale(g))
    l_u, g_u = saliency_dissim(u, ref, kind)  # scale invariance: loss(c u) = loss(u), c grad(c u) = grad(u)
    _close(loss, l_u, dtype, factor=8, floor=1.0)
    _close(grad[ok].double() * 10.0 ** e, g_u[ok], dtype, factor=8, floor=_grad_scale(u))
    if special == "none" and bool(ok.all()):
        # away from the special points the op is the gradient of the unfused loss (autograd, float64)
        gg = u.double().clone().requires_grad_(True)
        ref_loss = dissimilarity(postprocess_maps(gg), ref.double(), kind)
        (auto,) = torch.autograd.grad(ref_loss.sum(), gg)
        _close(l_u, ref_loss.detach(), dtype, factor=8, floor=1.0)
        _close(g_u, auto, dtype, factor=8, floor=_grad_scale(u))


@TRITON
@given(st.data(), gradients(max_side=6, max_b=2, max_c=3), st.sampled_from(["contiguous", "strided", "channels_last"]),
       st.sampled_from(["l2", "rel_l2", "cosine"]))
def test_triton_fused_op_agrees_with_torch(data, case, layout, kind):
    pytest.importorskip("triton")
    from upi_fast.kernels.saliency_dissim import saliency_dissim_triton
    g, u, e, dtype, special = case
    ref = data.draw(references(g))
    assume(_in_domain(ref, kind))
    want_loss, want_grad = saliency_dissim_reference(g, ref, kind, True)
    out = (torch.full((g.shape[0],), float("nan"), dtype=dtype), torch.full_like(g, float("nan")))  # poisoned
    loss, grad = saliency_dissim_triton(_layout(g, layout), ref, kind, True, out=out)
    _finite(loss, grad)
    ok = _well_conditioned(want_loss, ref, kind)
    _close(loss, want_loss, dtype, factor=50, floor=1.0)
    _close(grad[ok], want_grad[ok], dtype, factor=50, floor=_grad_scale(g))


# ------------------------------------------------------------------------------------------ softplus
@st.composite
def softplus_inputs(draw, max_n: int = 40):
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, max_n)))
    x = _unit(shape, draw(st.integers(0, 2**16))) * 10.0 ** draw(exponents)
    beta = 10.0 ** draw(st.integers(-2, 2))
    return x.to(draw(st.sampled_from(DTYPES))), beta


@FAST
@given(softplus_inputs(), st.sampled_from(["contiguous", "transposed", "strided"]))
def test_softplus_matches_torch_and_stays_finite(inp, layout):
    x, beta = inp
    xl = _layout(x, layout).detach().requires_grad_(True)
    y = softplus(xl, beta)
    want = F.softplus(x.double(), beta=beta, threshold=20.0)
    # natural scales: softplus(0) = log 2 / beta, sigmoid <= 1, the second derivative <= beta / 4
    _finite(y)
    _close(y, want, x.dtype, factor=4, floor=math.log(2) / beta)
    (gx,) = torch.autograd.grad(y.sum(), xl, create_graph=True)
    _finite(gx)
    _close(gx, torch.sigmoid(beta * x.double()), x.dtype, factor=4, floor=1.0)
    (ggx,) = torch.autograd.grad(gx.sum(), xl)
    s = torch.sigmoid(beta * x.double())
    _finite(ggx)
    _close(ggx, beta * s * (1 - s), x.dtype, factor=16, floor=beta / 4)


@TRITON
@given(softplus_inputs(max_n=20), st.sampled_from(["contiguous", "transposed"]))
def test_triton_softplus_agrees_with_torch(inp, layout):
    pytest.importorskip("triton")
    from upi_fast.kernels.softplus import softplus_bwd2_triton, softplus_bwd_triton, softplus_fwd_triton
    from upi_fast.ops.softplus import (softplus_backward_reference, softplus_double_backward_reference,
                                       softplus_reference)
    x, beta = inp
    xl = _layout(x, layout)
    gy = _unit(x.shape, 7).to(x.dtype)
    y = softplus_fwd_triton(xl, beta, out=torch.full_like(x, float("nan")))
    gx = softplus_bwd_triton(gy, xl, beta)
    o1, o2 = softplus_bwd2_triton(gy, gy, xl, beta)
    _finite(y, gx, o1, o2)
    _close(y, softplus_reference(x.double(), beta), x.dtype, factor=16, floor=math.log(2) / beta)
    _close(gx, softplus_backward_reference(gy.double(), x.double(), beta), x.dtype, factor=16, floor=1.0)
    w1, w2 = softplus_double_backward_reference(gy.double(), gy.double(), x.double(), beta)
    _close(o1, w1, x.dtype, factor=16, floor=1.0)
    _close(o2, w2, x.dtype, factor=64, floor=beta / 4)


# ------------------------------------------------------------------------------------------ sketch update
@st.composite
def sketch_inputs(draw, max_d: int = 40, max_b: int = 6):
    k, b, d = draw(st.integers(1, 5)), draw(st.integers(1, max_b)), draw(st.integers(1, max_d))
    dtype = draw(st.sampled_from(DTYPES))
    lo, hi = (-30, 30) if dtype == torch.float64 else (-15, 15)
    A = _unit((b, d), draw(st.integers(0, 2**16)))
    A = A / A.abs().amax(1, keepdim=True)  # every row's largest magnitude is 1 (then 10^e_i)
    exps = [draw(st.integers(lo, hi)) for _ in range(b)]
    if draw(st.booleans()):
        A[0] = 0.0
    W0 = _unit((k, d), draw(st.integers(0, 2**16))).to(dtype)
    return W0, A, exps, dtype, draw(st.integers(0, 1000)), draw(st.integers(0, 2**32 - 1))


@FAST
@given(sketch_inputs(), st.sampled_from(["contiguous", "transposed", "strided"]))
def test_normalised_sketch_update_is_scale_invariant(inp, layout):
    W0, A, exps, dtype, offset, seed = inp
    scaled = A * torch.tensor([10.0 ** e for e in exps], dtype=torch.float64).view(-1, 1)
    W = W0.clone()
    sketch_update(W, _layout(scaled.to(dtype), layout), offset, seed, normalize=True)
    _finite(W)
    n = A.norm(dim=1, keepdim=True)
    unit_rows = torch.where(n > 0, A / n.clamp_min(1e-300), torch.zeros_like(A))
    psi = rademacher_columns(seed, torch.arange(offset, offset + A.shape[0]), W0.shape[0], torch.float64)
    _close(W, W0.double() + psi @ unit_rows, dtype, factor=64)


@FAST
@given(st.integers(1, 4), st.integers(1, 30), st.sampled_from([-30, -20, 20, 30]))
def test_float32_sketch_update_stays_finite_beyond_its_range(b, d, e):
    A = _unit((b, d), b * 31 + d) * 10.0 ** e
    W = torch.zeros(3, d)
    sketch_update(W, A.float(), 0, 5, normalize=True)
    _finite(W)


@TRITON
@given(sketch_inputs(max_d=24, max_b=4), st.sampled_from(["contiguous", "transposed"]), st.booleans())
def test_triton_sketch_update_agrees_with_torch(inp, layout, normalize):
    pytest.importorskip("triton")
    from upi_fast.kernels.sketch_update import sketch_update_triton
    from upi_fast.ops.sketch_update import sketch_update_reference
    W0, A, exps, dtype, offset, seed = inp
    if normalize:
        A = A * torch.tensor([10.0 ** e for e in exps], dtype=torch.float64).view(-1, 1)
    A = A.to(dtype)
    want = W0.clone()
    sketch_update_reference(want, A, offset, seed, normalize)
    got = W0.clone()
    sketch_update_triton(got, _layout(A, layout), offset, seed, normalize)
    _finite(got)
    _close(got, want, dtype, factor=64)


# ------------------------------------------------------------------------------------------ metrics
@st.composite
def map_pairs(draw, max_side: int = 8):
    B, H, W = draw(st.integers(1, 3)), draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    a = postprocess_maps(_special(_unit((B, 1, H, W), draw(st.integers(0, 2**16))), draw(specials)))
    b = postprocess_maps(_unit((B, 1, H, W), draw(st.integers(0, 2**16))))
    return a, b, (H, W), 10.0 ** draw(exponents), 10.0 ** draw(exponents)


@FAST
@given(map_pairs())
def test_metrics_are_scale_invariant_and_bounded(pair):
    a, b, hw, ca, cb = pair
    rel = M.relative_l2(a, b)
    _finite(rel)
    assert bool((rel >= 0).all()) and float(M.relative_l2(b, b).max()) == 0.0
    _close(M.relative_l2(a * ca, b * ca), rel, torch.float64, factor=10, floor=1.0)
    k = max(1, a.shape[1] // 10)
    top = M.topk_intersection(a, b, k)
    assert bool(((top >= 0) & (top <= 1)).all()) and bool((M.topk_intersection(b, b, k) == 1).all())
    assert torch.equal(M.topk_intersection(a * ca, b * cb, k), top)
    rho = M.spearman(a, b)
    _finite(rho)
    assert bool((rho.abs() <= 1 + 1e-12).all())
    _close(M.spearman(a * ca, b * cb), rho, torch.float64, factor=10, floor=1.0)
    _close(M.spearman(a ** 3 + 2 * a, b), rho, torch.float64, factor=10, floor=1.0)  # strictly increasing
    com = M.center_of_mass_shift(a, b, shape=hw)
    _finite(com)
    diag = math.hypot(hw[0] - 1, hw[1] - 1)
    assert bool(((com >= 0) & (com <= diag + 1e-9)).all())
    _close(M.center_of_mass_shift(a * ca, b * cb, shape=hw), com, torch.float64, factor=100, floor=1.0)
    _close(M.center_of_mass_shift(b, a, shape=hw), com, torch.float64, factor=10, floor=1.0)


@FAST
@given(map_pairs(), st.sampled_from(DISSIM_KINDS), st.sampled_from(DTYPES))
def test_dissimilarities_defined_everywhere(pair, kind, dtype):
    a, b, _, ca, _ = pair
    a, b = a.to(dtype), b.to(dtype)
    for x, y in ((a, b), (a, a), (torch.zeros_like(a), b), (a, torch.zeros_like(b)), (torch.zeros_like(a),) * 2):
        d = dissimilarity(x, y, kind)
        _finite(d)
        assert bool((d >= -1e-6).all())
    if kind in ("l2", "rel_l2"):
        assert float(dissimilarity(b, b, kind).abs().max()) == 0.0
    if kind in ("rel_l2", "cosine", "topk"):  # invariant under rescaling both maps (in float64's range)
        a64, b64 = a.double(), b.double()
        _close(dissimilarity(a64 * ca, b64 * ca, kind), dissimilarity(a64, b64, kind), torch.float64, factor=100,
               floor=1.0)


@FAST
@given(st.integers(1, 3), st.integers(1, 30), st.integers(0, 2**16), st.integers(1, 5))
def test_ranks_and_spearman_match_scipy(B, n, seed, levels):
    from scipy import stats
    x = torch.randint(0, levels, (B, n), generator=torch.Generator().manual_seed(seed)).double()
    y = torch.randn((B, n), generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    r = M.rankdata(x)
    for i in range(B):
        assert r[i].tolist() == stats.rankdata(x[i].numpy()).tolist()
    rho = M.spearman(x, y)
    for i in range(B):
        if len(set(x[i].tolist())) > 1:
            assert abs(float(rho[i]) - stats.spearmanr(x[i].numpy(), y[i].numpy()).statistic) < 1e-10
        else:
            assert float(rho[i]) == 0.0


def test_triton_kernels_refuse_bad_inputs_clearly():
    """Inputs the kernels do not take are refused with a ValueError / TypeError naming the argument."""
    pytest.importorskip("triton")
    from upi_fast.kernels.saliency_dissim import saliency_dissim_triton
    from upi_fast.kernels.sketch_update import sketch_update_triton
    from upi_fast.kernels.softplus import softplus_fwd_triton
    g, ref = torch.randn(2, 3, 4, 5), torch.rand(2, 20)
    with pytest.raises(TypeError, match="g must be"):
        saliency_dissim_triton(g.int(), ref, "l2", True)
    with pytest.raises(ValueError, match="ref must have shape"):
        saliency_dissim_triton(g, ref[:, :7], "l2", True)
    with pytest.raises(ValueError, match="kind"):
        saliency_dissim_triton(g, ref, "topk", True)
    with pytest.raises(TypeError, match="x must be"):
        softplus_fwd_triton(torch.arange(4), 1.0)
    with pytest.raises(ValueError, match="beta"):
        softplus_fwd_triton(torch.randn(4), float("nan"))
    with pytest.raises((ValueError, TypeError), match="W|A"):
        sketch_update_triton(torch.zeros(3, 5, dtype=torch.int32), torch.randn(2, 5), 0, 1, True)


def test_triton_runs_under_the_interpreter_or_is_refused_clearly():
    """The backend switch itself: available under the interpreter (conftest), else a clear error."""
    if ops.backends()["triton"]:
        ops.set_backend("triton")
        g = torch.randn(2, 3, 5, 4)
        ref = postprocess_maps(torch.randn(2, 3, 5, 4))
        got = saliency_dissim(g, ref, "l2")
        ops.set_backend("torch")
        want = saliency_dissim(g, ref, "l2")
        _close(got[0], want[0], torch.float32, factor=50)
        _close(got[1], want[1], torch.float32, factor=50)
    else:
        with pytest.raises(RuntimeError, match="unavailable"):
            ops.set_backend("triton")
