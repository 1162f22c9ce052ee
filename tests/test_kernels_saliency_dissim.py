"""Triton kernels of the fused saliency dissimilarity (both tilings) against the float64 reference,
under the interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1)."""
import pytest
import torch

import upi_fast.ops as ops
from upi_fast.ops.saliency_dissim import fused_saliency_loss, saliency_dissim, saliency_dissim_reference

pytest.importorskip("triton")
from upi_fast.kernels.saliency_dissim import _flat, plan, saliency_dissim_triton  # noqa: E402

# float results compared between code paths: rerun by .ci/run with other CPU kernels forced
pytestmark = pytest.mark.numerics

KINDS = ("l2", "rel_l2", "cosine")
# (shape, path, block_n): sizes that are not multiples of the tiles. The split cases use a small
# block_n so that several blocks per sample (and the two-stage reduction) are exercised.
CASES = [
    ((3, 3, 13, 17), "auto", None),    # single: C=3 -> 4 padded channels, 221 -> 256 pixels
    ((2, 1, 9, 31), "split", 64),      # split: 279 pixels in 5 blocks, last one partial
    ((2, 11, 5, 7), "auto", None),     # C=11 > 8: split with two channel chunks
]


def _poisoned(g):
    return (torch.full((g.shape[0],), float("nan"), dtype=g.dtype), torch.full_like(g, float("nan")))


def _inputs(shape, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen).to(dtype)
    ref = torch.rand(shape[0], shape[2] * shape[3], generator=gen).to(dtype)
    return g, ref / ref.sum(1, keepdim=True)


def assert_rel(got, want, rtol=1e-5):
    """``max |got - want| <= rtol max |want|``, never NaN (the error of each tensor relative to its scale)."""
    got = got.double()
    assert torch.isfinite(got).all(), "kernel left NaN/Inf (skipped or wrong elements)"
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rtol * scale + 1e-30, f"max error {err:.3e} vs scale {scale:.3e}"


def test_plan_picks_paths():
    assert plan(3, 13 * 17)["path"] == "single"
    assert plan(3, 224 * 224)["path"] == "split" and plan(3, 224 * 224)["blocks"] == 25
    assert plan(11, 35)["path"] == "split" and plan(11, 35)["c_chunks"] == 2
    assert plan(3, 279, "split", 64)["blocks"] == 5
    with pytest.raises(ValueError, match="single"):
        plan(3, 224 * 224, "single")
    with pytest.raises(ValueError, match="block_n"):
        plan(3, 300, "split", 48)


@pytest.mark.parametrize("shape,path,block_n", CASES)
def test_kernels_match_float64_reference(shape, path, block_n):
    g, ref = _inputs(shape)
    assert plan(shape[1], shape[2] * shape[3], path, block_n)["path"] == ("single" if shape[0] == 3 else "split")
    for kind in KINDS:
        want_loss, want_grad = saliency_dissim_reference(g.double(), ref.double(), kind, True)
        out = _poisoned(g)
        loss, grad = saliency_dissim_triton(g, ref, kind, True, out=out, path=path, block_n=block_n)
        assert loss is out[0] and grad is out[1]
        assert_rel(loss, want_loss)
        torch.testing.assert_close(loss.double(), want_loss, rtol=1e-5, atol=0)  # per sample, too
        assert_rel(grad, want_grad)
        out = _poisoned(g)
        loss2, empty = saliency_dissim_triton(g, ref, kind, False, out=out, path=path, block_n=block_n)
        assert empty.numel() == 0 and torch.isnan(out[1]).all(), "compute_grad=False must not write a gradient"
        torch.testing.assert_close(loss2.double(), want_loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("path", ["single", "split"])
def test_zero_maps_equal_maps_and_zero_reference_are_defined(path):
    g, ref = _inputs((3, 2, 6, 5), seed=1)
    g[1] = 0                                   # a zero map inside the batch
    ref[2] = g[2].abs().sum(0).flatten() / g[2].abs().sum()  # sample 2: I = ref exactly
    for kind in KINDS:
        want_loss, want_grad = saliency_dissim_reference(g.double(), ref.double(), kind, True)
        loss, grad = saliency_dissim_triton(g, ref, kind, True, out=_poisoned(g), path=path, block_n=16)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        assert torch.equal(grad[1], torch.zeros_like(grad[1])), "zero map: zero gradient"
        torch.testing.assert_close(loss[:2].double(), want_loss[:2], rtol=1e-5, atol=0)
        assert loss[2].abs() < 1e-5, "equal maps: loss ~ 0"
        assert_rel(grad[0], want_grad[0])
    zero_ref = torch.zeros_like(ref)
    loss, grad = saliency_dissim_triton(g, zero_ref, "cosine", True, path=path, block_n=16)
    assert torch.equal(loss, torch.ones_like(loss)) and torch.equal(grad, torch.zeros_like(grad))


def test_float64_inputs_compute_in_float64():
    for shape, path, block_n in CASES[:2]:
        g, ref = _inputs(shape, seed=2, dtype=torch.float64)
        for kind in KINDS:
            want = saliency_dissim_reference(g, ref, kind, True)
            got = saliency_dissim_triton(g, ref, kind, True, path=path, block_n=block_n)
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12 * b.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_upcast_in_registers(dtype):
    g, ref = _inputs((2, 3, 7, 9), seed=3, dtype=dtype)
    for path in ("single", "split"):
        loss, grad = saliency_dissim_triton(g, ref, "rel_l2", True, path=path, block_n=16)
        assert loss.dtype == dtype and grad.dtype == dtype
        want_loss, want_grad = saliency_dissim_reference(g.double(), ref.double(), "rel_l2", True)
        eps = torch.finfo(dtype).eps
        torch.testing.assert_close(loss.double(), want_loss, rtol=2 * eps, atol=0)
        assert_rel(grad, want_grad, rtol=2 * eps)


def test_strided_inputs_and_output_layout():
    base, ref_base = _inputs((2, 3, 11, 16), seed=4)
    views = {
        "channels_last": base.contiguous(memory_format=torch.channels_last),   # pixels equally spaced
        "sliced": base[:, :, ::2, 1:],                                         # needs h, w decomposition
    }
    assert _flat(11, 16, *views["channels_last"].stride()[2:]) and not _flat(6, 15, *views["sliced"].stride()[2:])
    ref = ref_base.view(2, 11, 16)[:, ::2, 1:].reshape(2, -1).t().contiguous().t()  # column-major ref
    for name, g in views.items():
        r = ref if name == "sliced" else ref_base
        for path in ("single", "split"):
            want_loss, want_grad = saliency_dissim_reference(g.double(), r.double(), "l2", True)
            loss, grad = saliency_dissim_triton(g, r, "l2", True, path=path, block_n=32)
            assert grad.stride() == torch.empty_like(g).stride(), name
            assert_rel(loss, want_loss)
            assert_rel(grad, want_grad)
    # out= with a layout of its own is written through its strides.
    g = base
    out_grad = torch.full_like(g, float("nan")).contiguous(memory_format=torch.channels_last)
    out_loss = torch.full((2,), float("nan"))
    saliency_dissim_triton(g, ref_base, "cosine", True, out=(out_loss, out_grad), path="split", block_n=32)
    assert_rel(out_grad, saliency_dissim_reference(g.double(), ref_base.double(), "cosine", True)[1])


def test_bad_inputs_raise_clear_errors():
    g, ref = _inputs((2, 3, 4, 5))
    with pytest.raises(ValueError, match="ref must have shape"):
        saliency_dissim_triton(g, ref[:, :7], "l2", True)
    with pytest.raises(ValueError, match="kind"):
        saliency_dissim_triton(g, ref, "topk", True)
    with pytest.raises(ValueError, match="g must be"):
        saliency_dissim_triton(g[0], ref, "l2", True)
    with pytest.raises(TypeError, match="g must be"):
        saliency_dissim_triton(g.to(torch.int32), ref, "l2", True)
    with pytest.raises(ValueError, match="out"):
        saliency_dissim_triton(g, ref, "l2", True, out=(torch.empty(3), torch.empty_like(g)))
    with pytest.raises(ValueError, match="path"):
        saliency_dissim_triton(g, ref, "l2", True, path="fast")


def test_op_dispatches_to_triton_and_gradcheck_matches(monkeypatch):
    """Through ``upi_fast::saliency_dissim`` with the triton backend: the launcher runs, the values
    equal the torch backend's, and the op's autograd passes gradcheck in float64."""
    import importlib
    spec = ops._REGISTRY["saliency_dissim"]["triton"]
    fn = spec if callable(spec) else getattr(importlib.import_module(spec.split(":")[0]), spec.split(":")[1])
    calls = []
    monkeypatch.setitem(ops._REGISTRY["saliency_dissim"], "triton", lambda *a: calls.append(1) or fn(*a))
    g = torch.randn(2, 2, 3, 5, dtype=torch.float64)
    ref = torch.rand(2, 15, dtype=torch.float64)
    results = {}
    for backend in ("torch", "triton"):
        ops.set_backend(backend)
        n0 = len(calls)
        results[backend] = [saliency_dissim(g, ref, kind) for kind in KINDS]
        gr = g.clone().requires_grad_(True)
        if backend == "triton":
            for kind in KINDS:
                assert torch.autograd.gradcheck(lambda t: fused_saliency_loss(t, ref, kind), (gr,), fast_mode=True)
            assert len(calls) > n0
        else:
            assert len(calls) == n0
    for (l0, g0), (l1, g1) in zip(results["torch"], results["triton"]):
        torch.testing.assert_close(l1, l0, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(g1, g0, rtol=1e-10, atol=1e-13)
