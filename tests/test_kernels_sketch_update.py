"""Triton kernels of the in-place sketch update against the float64 reference, under the interpreter
on CPU tensors (conftest sets TRITON_INTERPRET=1)."""
import pytest
import torch

import upi_fast.ops as ops
from upi_fast.ops.sketch_update import rademacher_columns, sketch_update, sketch_update_reference

pytest.importorskip("triton")
from upi_fast.kernels.sketch_update import mix32_int, plan, sketch_update_triton  # noqa: E402

# float results compared between code paths: rerun by .ci/run with other CPU kernels forced
pytestmark = pytest.mark.numerics

# (row_offset, seed): the start, across 2^31 (int32 overflow), the very end of the 2^32 index range.
OFFSETS = [(0, 1), (2**31 - 5, 2**32 - 7), (2**32 - 37, 123456789)]


def _want(W0, A, row_offset, seed, normalize):
    """The float64 reference result of the update applied to ``W0``."""
    W = W0.double().clone()
    sketch_update_reference(W, A.double(), row_offset, seed, normalize)
    return W


def assert_rel(got, want, rtol=1e-5):
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rtol * scale, f"max error {err:.3e} vs scale {scale:.3e}"


def test_mix32_matches_the_torch_hash():
    from upi_fast.ops.sketch_update import mix32
    xs = [0, 1, 2**31 - 1, 2**31, 2**32 - 1, 0x9E3779B9]
    assert [mix32_int(x) for x in xs] == mix32(torch.tensor(xs, dtype=torch.int64)).tolist()


@pytest.mark.parametrize("use_dot", [True, False])
def test_generated_test_matrix_is_bit_identical(use_dot):
    """With A = I (no normalisation) the update writes Psi itself: every +-1 must match."""
    # k spans two k-tiles (128 rows per tile with tl.dot, 32 without); b two row chunks of 32.
    k, b = (130 if use_dot else 37), 37
    for row_offset, seed in OFFSETS:
        W = torch.zeros(k, b)
        sketch_update_triton(W, torch.eye(b), row_offset, seed, False, use_dot=use_dot, block_d=64)
        want = rademacher_columns(seed, torch.arange(row_offset, row_offset + b), k)
        assert torch.equal(W, want), f"offset {row_offset}, seed {seed}"


@pytest.mark.parametrize("use_dot", [True, False])
@pytest.mark.parametrize("normalize", [True, False])
def test_update_matches_float64_reference(use_dot, normalize):
    gen = torch.Generator().manual_seed(0)
    k, b, d = 5, 37, 301   # none a multiple of the tiles (16 / 32 / 64; norm splits of 128)
    for row_offset, seed in OFFSETS[:2] if use_dot else OFFSETS[1:2]:
        W0 = torch.randn(k, d, generator=gen)
        A = torch.randn(b, d, generator=gen) * torch.rand(b, 1, generator=gen) * 10
        A[3] = 0  # a zero row stays zero (no NaN from 0 / 0)
        W = W0.clone()
        sketch_update_triton(W, A, row_offset, seed, normalize, use_dot=use_dot, block_d=64, split_d=128)
        assert_rel(W, _want(W0, A, row_offset, seed, normalize))


def test_accumulates_in_place_and_leaves_the_rest_untouched():
    """W is a strided window of a larger buffer: only the window changes, by exactly the update,
    and two blocks of rows accumulate to the same sketch as one block (mergeability)."""
    gen = torch.Generator().manual_seed(1)
    k, b, d = 6, 19, 83
    buf = torch.randn(k + 3, d + 9, generator=gen)
    before = buf.clone()
    W = buf[1:k + 1, 4:d + 4]
    assert not W.is_contiguous()
    A = torch.randn(b, d, generator=gen)
    sketch_update_triton(W, A[:11], 500, 9, True, block_d=32)
    sketch_update_triton(W, A[11:], 511, 9, True, block_d=32)
    mask = torch.ones_like(buf, dtype=torch.bool)
    mask[1:k + 1, 4:d + 4] = False
    assert torch.equal(buf[mask], before[mask]), "elements outside W were written"
    assert_rel(W, _want(before[1:k + 1, 4:d + 4], A, 500, 9, True))


def test_float64_w_and_half_or_strided_a():
    gen = torch.Generator().manual_seed(2)
    k, b, d = 3, 10, 70
    W0 = torch.randn(k, d, dtype=torch.float64, generator=gen)
    A = torch.randn(b, d, dtype=torch.float64, generator=gen)
    W = W0.clone()
    sketch_update_triton(W, A, 7, 3, True, block_d=32)
    torch.testing.assert_close(W, _want(W0, A, 7, 3, True), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="use_dot"):
        sketch_update_triton(W, A, 7, 3, True, use_dot=True)
    At = A.float().t().contiguous().t()          # column-major rows
    W = W0.float().clone()
    sketch_update_triton(W, At, 7, 3, True, block_d=32)
    assert_rel(W, _want(W0.float(), At, 7, 3, True))
    for dtype in (torch.float16, torch.bfloat16):
        Ah = A.to(dtype)
        W = W0.float().clone()
        sketch_update_triton(W, Ah, 7, 3, True, block_d=32)
        assert_rel(W, _want(W0.float(), Ah, 7, 3, True))   # same half values, exact upcast


def test_plan_and_bad_inputs():
    cfg = plan(16, 150528)
    assert cfg["use_dot"] and cfg["block_k"] == 16 and cfg["k_tiles"] == 1 and cfg["nsplit"] <= 16
    assert plan(200, 1000)["k_tiles"] == 2
    assert not plan(16, 100, torch.float64)["use_dot"]
    W = torch.zeros(4, 9)
    with pytest.raises(ValueError, match="W must"):
        sketch_update_triton(W.to(torch.int32), torch.randn(3, 9), 0, 1, True)
    with pytest.raises(ValueError, match="A must have shape"):
        sketch_update_triton(W, torch.randn(3, 8), 0, 1, True)
    with pytest.raises(TypeError, match="A must be"):
        sketch_update_triton(W, torch.ones(3, 9, dtype=torch.int64), 0, 1, True)
    with pytest.raises(ValueError, match="row_offset"):
        sketch_update_triton(W, torch.randn(3, 9), 2**32 - 2, 1, True)
    with pytest.raises(ValueError, match="block_d"):
        sketch_update_triton(W, torch.randn(3, 9), 0, 1, True, block_d=24)
    sketch_update_triton(W, torch.randn(0, 9), 0, 1, True)
    assert torch.equal(W, torch.zeros(4, 9))


def test_op_dispatches_to_triton(monkeypatch):
    import importlib
    spec = ops._REGISTRY["sketch_update"]["triton"]
    fn = spec if callable(spec) else getattr(importlib.import_module(spec.split(":")[0]), spec.split(":")[1])
    calls = []
    monkeypatch.setitem(ops._REGISTRY["sketch_update"], "triton", lambda *a: calls.append(1) or fn(*a))
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(12, 40, generator=gen)
    out = {}
    for backend in ("torch", "triton"):
        ops.set_backend(backend)
        W = torch.zeros(4, 40)
        sketch_update(W, A[:5], 100, 77)
        sketch_update(W, A[5:], 105, 77)
        out[backend] = W
        assert len(calls) == (2 if backend == "triton" else 0)
    torch.testing.assert_close(out["triton"], out["torch"], rtol=1e-5, atol=1e-6)
