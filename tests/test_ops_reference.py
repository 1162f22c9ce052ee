"""The pure-PyTorch op implementations against independent autograd compositions (float64)."""
import pytest
import torch

import upi_fast as U
from upi_fast.ops.saliency_dissim import saliency_dissim, saliency_dissim_reference
from upi_fast.ops.sketch_update import rademacher_columns, sketch_update
from upi_fast.ops.softplus import softplus
from upi_fast.saliency import postprocess_maps

# float results compared between code paths: rerun by .ci/run with other CPU kernels forced
pytestmark = pytest.mark.numerics


@pytest.mark.parametrize("kind", ["l2", "rel_l2", "cosine"])
@pytest.mark.parametrize("shape", [(3, 1, 5, 7), (2, 3, 13, 11), (1, 2, 1, 1)])
def test_saliency_dissim_reference_matches_autograd(kind, shape):
    g = torch.randn(shape, dtype=torch.float64)
    ref = torch.rand(shape[0], shape[2] * shape[3], dtype=torch.float64)
    ref /= ref.sum(1, keepdim=True)
    gg = g.clone().requires_grad_(True)
    want = U.dissimilarity(postprocess_maps(gg, "abs_sum_l1"), ref, kind)
    (want_grad,) = torch.autograd.grad(want.sum(), gg)
    loss, grad = saliency_dissim_reference(g, ref, kind, True)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
    loss2, empty = saliency_dissim(g, ref, kind, compute_grad=False)
    torch.testing.assert_close(loss2, loss)
    assert empty.numel() == 0


@pytest.mark.parametrize("kind", ["l2", "rel_l2", "cosine"])
def test_saliency_dissim_zero_map_and_equal_maps_are_defined(kind):
    g = torch.zeros(2, 3, 4, 5, dtype=torch.float64)
    ref = torch.full((2, 20), 1 / 20, dtype=torch.float64)
    loss, grad = saliency_dissim(g, ref, kind)
    assert torch.isfinite(loss).all() and torch.equal(grad, torch.zeros_like(grad))
    g = torch.rand(2, 3, 4, 5, dtype=torch.float64) + 0.1
    ref = postprocess_maps(g, "abs_sum_l1")
    loss, grad = saliency_dissim(g, ref, kind)
    assert loss.abs().max() < 1e-7 and torch.isfinite(grad).all()


def test_saliency_dissim_gradcheck_and_bad_input():
    g = torch.randn(2, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    ref = torch.rand(2, 15, dtype=torch.float64)
    for kind in ("l2", "rel_l2", "cosine"):
        assert torch.autograd.gradcheck(lambda t: saliency_dissim(t, ref, kind)[0], (g,))
    with pytest.raises(ValueError, match="ref"):
        saliency_dissim(g, ref[:, :5])
    with pytest.raises(ValueError, match="kind"):
        saliency_dissim(g, ref, "topk")
    with pytest.raises(ValueError, match="g must"):
        saliency_dissim(g[0], ref)


def test_softplus_matches_torch_and_twice_differentiable():
    x = torch.randn(37, dtype=torch.float64) * 3
    torch.testing.assert_close(softplus(x, 10.0), torch.nn.functional.softplus(x, beta=10.0))
    xr = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: softplus(t, 2.5), (xr,))
    assert torch.autograd.gradgradcheck(lambda t: softplus(t, 2.5), (xr,))
    with pytest.raises(ValueError, match="beta"):
        softplus(x, 0.0)


def test_rademacher_columns_are_pure_functions_of_seed_and_row():
    a = rademacher_columns(5, torch.arange(100, 200), 8)
    b = rademacher_columns(5, torch.arange(150, 160), 8)
    torch.testing.assert_close(a[:, 50:60], b)
    assert set(a.unique().tolist()) == {-1.0, 1.0}
    c = rademacher_columns(6, torch.arange(100, 200), 8)
    assert not torch.equal(a, c)
    big = rademacher_columns(0, torch.arange(0, 20000), 16)
    assert abs(big.mean().item()) < 0.02  # balanced
    corr = (big @ big.T / 20000 - torch.eye(16)).abs().max()
    assert corr < 0.05  # rows nearly orthogonal


def test_sketch_update_reference():
    W = torch.zeros(4, 9, dtype=torch.float64)
    A = torch.randn(7, 9, dtype=torch.float64)
    A[2] = 0
    sketch_update(W, A[:3], 10, 42)
    sketch_update(W, A[3:], 13, 42)
    An = A / A.norm(dim=1, keepdim=True).clamp_min(1e-300)
    want = rademacher_columns(42, torch.arange(10, 17), 4, torch.float64) @ An
    torch.testing.assert_close(W, want)
    with pytest.raises(ValueError, match="A must"):
        sketch_update(W, torch.randn(3, 8, dtype=torch.float64), 0, 1)
