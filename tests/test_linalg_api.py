"""top_singular_vectors dispatch, exact_svd, the public names of upi_fast.linalg."""
import pytest
import torch

import upi_fast.linalg as L
from upi_fast.linalg import PlantedRows, exact_svd, randomized_svd, top_singular_vectors


pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.numerics]


def test_public_names_exported():
    for name in L.__all__:
        assert hasattr(L, name), name
    for mod in (L.sources, L.sketch, L.frequent_directions, L.krylov, L.eigsh, L.planted):
        assert all(hasattr(mod, n) for n in mod.__all__)


@pytest.mark.parametrize("shape,direct_max", [((300, 200), 4_000_000), ((500, 300), 1000), ((300, 500), 1000)])
def test_exact_svd_all_routes_match_float64_svd(shape, direct_max, monkeypatch):
    """Routes: direct SVD (small), A^T A (d < n), A A^T (n <= d). Top-3 values to 1e-10 relative."""
    monkeypatch.setattr(L, "_DIRECT_MAX_ELEMENTS", direct_max)
    n, d = shape
    A = PlantedRows.preset("gap", n, d, r=30, seed=1, dtype=torch.float64).materialize()
    S, Vh = exact_svd(A, 3)
    lam, E = torch.linalg.eigh(A.T @ A) if d <= n else torch.linalg.eigh(A @ A.T)
    S_ref = lam.flip(0)[:3].sqrt()
    assert torch.allclose(S, S_ref, rtol=1e-10)
    assert torch.allclose(Vh @ Vh.T, torch.eye(3, dtype=torch.float64), atol=1e-8)
    assert torch.allclose((A @ Vh.T).norm(dim=0), S_ref, rtol=1e-10)


def test_auto_uses_exact_when_it_fits_and_krylov_otherwise():
    src = PlantedRows.preset("fast", 600, 300, r=20, seed=2, dtype=torch.float64)
    A = src.materialize()
    S_exact, V_exact = exact_svd(A, 2)
    S, Vh = top_singular_vectors(A, k=2)  # 600*300*8 bytes << 1 GiB
    assert torch.equal(S, S_exact) and torch.equal(Vh, V_exact)
    S2, Vh2 = top_singular_vectors(src, k=2, memory_budget_bytes=10_000, n_iter=3, seed=5)
    r = randomized_svd(src, k=2, method="block_krylov", n_iter=3, seed=5)
    assert torch.equal(S2, r.S) and torch.equal(Vh2, r.Vh)
    assert torch.allclose(S2, S_exact, rtol=1e-9)


@pytest.mark.parametrize("method", ["exact", "sketch", "subspace", "block_krylov", "frequent_directions"])
def test_every_method_finds_the_fast_decay_top_vector(method):
    A = PlantedRows.preset("fast", 800, 250, r=20, seed=3).materialize()
    lam, E = torch.linalg.eigh(A.double().T @ A.double())
    S, Vh = top_singular_vectors(A, k=2, method=method)
    assert S.shape == (2,) and Vh.shape == (2, 250)
    assert float((Vh[0].double() @ E[:, -1]).abs()) > 1 - 1e-5
    assert float(S[0]) == pytest.approx(float(lam[-1].sqrt()), rel=1e-3)


def test_one_shot_iterables_use_single_pass_methods():
    A = PlantedRows.preset("fast", 500, 120, r=15, seed=4).materialize()
    ref = L.StreamingSketch(120, k=1)
    ref.update(A)
    S, Vh = top_singular_vectors(iter(A.split(100)), k=1)
    assert torch.allclose(S, ref.finalize()[0])
    pairs = ((i * 100, blk) for i, blk in enumerate(A.split(100)))
    S2, _ = top_singular_vectors(pairs, k=1, method="sketch")
    assert torch.allclose(S2, S)
    S3, _ = top_singular_vectors(iter(A.split(100)), k=1, method="frequent_directions", ell=10)
    assert float(S3[0]) <= float(torch.linalg.svdvals(A.double())[0]) * (1 + 1e-6)
    with pytest.raises(ValueError, match="re-readable"):
        top_singular_vectors(iter(A.split(100)), k=1, method="subspace")
    with pytest.raises(ValueError, match="empty"):
        top_singular_vectors(iter([]), k=1)


def test_bad_arguments():
    A = torch.randn(30, 20)
    with pytest.raises(ValueError, match="method"):
        top_singular_vectors(A, method="power")
    with pytest.raises(ValueError, match=r"k=21"):
        top_singular_vectors(A, k=21)
    with pytest.raises(ValueError, match="memory_budget_bytes"):
        top_singular_vectors(A, memory_budget_bytes=0)
    with pytest.raises(ValueError, match="source"):
        top_singular_vectors(42)
    B = A.clone()
    B[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN"):
        top_singular_vectors(B, method="exact")
