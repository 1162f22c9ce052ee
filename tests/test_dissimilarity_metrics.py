import math

import numpy as np
import pytest
import torch

import upi_fast as U
from upi_fast import metrics


def test_dissimilarity_hand_computed():
    I_ref = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    I = torch.tensor([[0.0, 0.5, 0.5, 0.0]])
    assert U.dissimilarity(I, I_ref, "l2").item() == pytest.approx(math.sqrt(0.5))
    assert U.dissimilarity(I, I_ref, "rel_l2").item() == pytest.approx(math.sqrt(0.5) / math.sqrt(0.5))
    assert U.dissimilarity(I, I_ref, "cosine").item() == pytest.approx(1 - 0.25 / 0.5)
    # top-2 of I_ref = pixels 0, 1; I has mass 0.5 there
    assert U.dissimilarity(I, I_ref, "topk", k=2).item() == pytest.approx(0.5)
    assert U.dissimilarity(I, I_ref, "l2", reduction="mean").dim() == 0


@pytest.mark.parametrize("kind", ["l2", "rel_l2", "cosine", "topk"])
def test_dissimilarity_gradients_defined_at_equality_and_zero(kind):
    r = torch.rand(3, 10, dtype=torch.float64)
    I = r.clone().requires_grad_(True)
    d = U.dissimilarity(I, r, kind)
    (g,) = torch.autograd.grad(d.sum(), I)
    assert torch.isfinite(g).all()
    z = torch.zeros(3, 10, dtype=torch.float64, requires_grad=True)
    d = U.dissimilarity(z, r, kind)
    assert torch.isfinite(d).all()
    (g,) = torch.autograd.grad(d.sum(), z)
    assert torch.isfinite(g).all()


def test_dissimilarity_bad_input():
    with pytest.raises(ValueError, match="kind"):
        U.dissimilarity(torch.rand(2, 3), torch.rand(2, 3), "l1")
    with pytest.raises(ValueError, match="same shape"):
        U.dissimilarity(torch.rand(2, 3), torch.rand(2, 4))
    with pytest.raises(ValueError, match="reduction"):
        U.dissimilarity(torch.rand(2, 3), torch.rand(2, 3), reduction="max")


def test_topk_intersection_hand_computed():
    I_ref = torch.tensor([[9.0, 8.0, 7.0, 1.0, 0.0]])
    I = torch.tensor([[9.0, 0.0, 7.0, 8.0, 1.0]])
    assert metrics.topk_intersection(I, I_ref, k=3).item() == pytest.approx(2 / 3)
    assert metrics.topk_intersection(I_ref, I_ref, k=2).item() == 1.0


def test_spearman_matches_formula_without_ties():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, 50, generator=g, dtype=torch.float64)
    b = a + 0.7 * torch.randn(4, 50, generator=g, dtype=torch.float64)
    got = metrics.spearman(a, b)
    n = 50
    for i in range(4):
        ra = np.argsort(np.argsort(a[i].numpy())) + 1
        rb = np.argsort(np.argsort(b[i].numpy())) + 1
        want = 1 - 6 * ((ra - rb) ** 2).sum() / (n * (n * n - 1))
        assert got[i].item() == pytest.approx(want, abs=1e-12)
    assert metrics.spearman(a, a).sub(1).abs().max() < 1e-12
    assert metrics.spearman(a, -a).add(1).abs().max() < 1e-12


def test_rankdata_ties_get_average_rank():
    x = torch.tensor([[3.0, 1.0, 3.0, 2.0, 3.0]])
    torch.testing.assert_close(metrics.rankdata(x), torch.tensor([[4.0, 1.0, 4.0, 2.0, 4.0]], dtype=torch.float64))
    assert metrics.spearman(torch.ones(1, 5), torch.rand(1, 5)).item() == 0.0


def test_center_of_mass_shift():
    a = torch.zeros(1, 4, 4)
    b = torch.zeros(1, 4, 4)
    a[0, 0, 0] = 1
    b[0, 3, 3] = 2
    assert metrics.center_of_mass_shift(a, b).item() == pytest.approx(math.sqrt(18))
    assert metrics.center_of_mass_shift(a.view(1, 16), b.view(1, 16)).item() == pytest.approx(math.sqrt(18))
    with pytest.raises(ValueError, match="shape"):
        metrics.center_of_mass_shift(torch.rand(1, 12), torch.rand(1, 12))
    assert metrics.center_of_mass_shift(torch.rand(1, 12), torch.rand(1, 12), shape=(3, 4)).shape == (1,)


def test_relative_l2_and_fooling_rate():
    r = torch.tensor([[3.0, 4.0]])
    assert metrics.relative_l2(torch.tensor([[0.0, 4.0]]), r).item() == pytest.approx(3 / 5)
    assert metrics.fooling_rate(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 0, 3, 0])) == 0.5
    with pytest.raises(ValueError):
        metrics.fooling_rate(torch.tensor([1]), torch.tensor([1, 2]))
