"""Frequent Directions: the deterministic guarantee, before and after merges, and bad input.

Guarantee tested (Liberty 2013; Ghashami et al. 2016), for unit x and k < ell:
    0 <= ||A x||^2 - ||B x||^2 <= Delta <= ||A - A_k||_F^2 / (ell - k),
with Delta the tracked total shrinkage. Checked on random unit x, on A's top singular vectors and
on the worst x (top eigenvector of A^T A - B^T B), in float64 (tolerance 1e-9 relative to ||A||_F^2).
"""
import pytest
import torch

from upi_fast.linalg import FrequentDirections, PlantedRows


pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.numerics]


def _tail2(S, k):
    return float((S[k:] ** 2).sum())


def _check_guarantee(A, fd, ks):
    A = A.double()
    B = fd.sketch.double()
    D = A.T @ A - B.T @ B
    lam = torch.linalg.eigvalsh(D)
    tol = 1e-9 * float(A.square().sum())
    assert float(lam[0]) >= -tol  # ||Ax||^2 >= ||Bx||^2 for every x
    assert float(lam[-1]) <= fd.delta_total + tol  # worst x is within the tracked Delta
    S = torch.linalg.svdvals(A)
    for k in ks:
        assert fd.delta_total <= _tail2(S, k) / (fd.ell - k) + tol
    X = torch.randn(A.shape[1], 20, dtype=torch.float64)
    X /= X.norm(dim=0)
    gap = (A @ X).square().sum(0) - (B @ X).square().sum(0)
    assert float(gap.min()) >= -tol and float(gap.max()) <= fd.delta_total + tol
    assert fd.fro2 == pytest.approx(float(A.square().sum()), rel=1e-10)


@pytest.mark.parametrize("kind", ["fast", "slow"])
def test_guarantee_on_planted_spectra(kind):
    src = PlantedRows.preset(kind, 1000, 200, r=60, seed=1, dtype=torch.float64)
    A = src.materialize()
    fd = FrequentDirections(200, ell=16, dtype=torch.float64)
    for _, blk in src.blocks(77):
        fd.update(blk)
    assert fd.delta_total > 0  # shrinks happened
    _check_guarantee(A, fd, ks=(0, 1, 4, 10))
    S, Vh = fd.finalize(2)
    S_true = torch.linalg.svdvals(A)[:2]
    assert bool((S <= S_true + 1e-9).all())
    assert bool((S ** 2 >= S_true ** 2 - fd.delta_total - 1e-9).all())


def test_guarantee_holds_after_merge():
    src = PlantedRows.preset("gap", 1200, 150, r=40, seed=2, dtype=torch.float64)
    A = src.materialize()
    parts = [FrequentDirections(150, ell=12, dtype=torch.float64) for _ in range(3)]
    for i, (_, blk) in enumerate(src.blocks(100)):
        parts[i % 3].update(blk)
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert merged.n_rows == 1200
    # the rows were dealt round-robin; the guarantee concerns the stacked matrix (any row order)
    _check_guarantee(A, merged, ks=(0, 1, 5))


def test_fast_decay_recovers_top_vectors():
    src = PlantedRows.preset("fast", 800, 300, r=30, seed=3, dtype=torch.float64)
    A = src.materialize()
    fd = FrequentDirections(300, ell=20, dtype=torch.float64)
    fd.update(A)
    S, Vh = fd.finalize(2)
    _, S_true, Vh_true = torch.linalg.svd(A, full_matrices=False)
    cos = (Vh * Vh_true[:2]).sum(1).abs()
    assert float(cos.min()) > 1 - 1e-6
    assert torch.allclose(S, S_true[:2], rtol=1e-5)


def test_float32_buffer_and_state_dict():
    A = torch.randn(300, 64)
    fd = FrequentDirections(64, ell=8)
    fd.update(A[:150])
    restored = FrequentDirections(64, ell=8)
    restored.load_state_dict(fd.state_dict())
    fd.update(A[150:])
    restored.update(A[150:])
    assert torch.equal(fd.sketch, restored.sketch)
    assert fd.delta_total == restored.delta_total
    B = fd.sketch.double()
    lam = torch.linalg.eigvalsh(A.double().T @ A.double() - B.T @ B)
    assert float(lam[0]) >= -1e-4 * fd.fro2 and float(lam[-1]) <= fd.delta_total * (1 + 1e-4)


def test_bad_inputs_leave_sketch_unchanged():
    fd = FrequentDirections(10, ell=4)
    fd.update(torch.randn(6, 10))
    before = fd.sketch.clone(), fd.fro2, fd.n_rows
    bad = torch.randn(3, 10)
    bad[2, 2] = float("inf")
    cases = [(bad, "NaN or Inf"), (torch.randn(3, 9), "shape"), (torch.ones(3, 10, dtype=torch.int64), "floating")]
    for rows, word in cases:
        with pytest.raises(ValueError, match=word):
            fd.update(rows)
    assert torch.equal(fd.sketch, before[0]) and fd.fro2 == before[1] and fd.n_rows == before[2]
    with pytest.raises(ValueError, match="ell - 1"):
        fd.finalize(4)
    with pytest.raises(ValueError, match="ell"):
        FrequentDirections(10, ell=1)
    with pytest.raises(ValueError, match="ell"):
        fd.merge(FrequentDirections(10, ell=5))
    with pytest.raises(ValueError, match="width"):
        fd.merge(FrequentDirections(11, ell=4))
    with pytest.raises(ValueError, match="no rows"):
        FrequentDirections(10, ell=4).finalize(1)
