"""Lanczos top eigenpair and the PCA+ direction, against dense eigh on small d; the authors' iteration."""
import pytest
import torch

from upi_fast.linalg import (FrequentDirections, PlantedRows, authors_ascent, lanczos_top, pca_plus_eigenvector,
                             TensorRows)


pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.numerics]


def _dense_pca_plus(G, V, lam):
    G, V = G.double(), V.double()
    return G.T @ G / G.square().sum() - lam * V.T @ V / V.square().sum()


def _problem(d=300, seed=0):
    G = PlantedRows.preset("slow", 500, d, r=60, seed=seed).materialize()
    V = PlantedRows.preset("fast", 400, d, r=30, seed=seed + 100).materialize()
    return G, V


@pytest.mark.parametrize("lam", [0.0, 1.0, 3.0])
def test_pca_plus_matches_dense_eigh(lam):
    G, V = _problem()
    A = _dense_pca_plus(G, V, lam)
    w, E = torch.linalg.eigh(A)
    v, theta, residual, n_mv = pca_plus_eigenvector(G, V, lam=lam, tol=1e-9, block_size=128)
    assert theta == pytest.approx(float(w[-1]), abs=1e-10)
    assert float((v @ E[:, -1]).abs()) > 1 - 1e-8
    assert residual <= 1e-9 * float(w.abs().max()) * 1.01
    assert float((A @ v - theta * v).norm()) == pytest.approx(residual, rel=1e-3, abs=1e-12)
    assert n_mv < 150  # far fewer than d = 300 operator applications


def test_authors_iteration_stays_at_its_start_while_lanczos_converges():
    """Projected ascent v <- normalize(v + 1e-4 A v), 5000 steps, moves v by about exp(0.5 A):
    from a random start its |cos| with the top eigenvector stays at the random level (~1/sqrt(d))."""
    G, V = _problem()
    A = _dense_pca_plus(G, V, 1.0)
    w, E = torch.linalg.eigh(A)
    top = E[:, -1]
    v_auth, v0 = authors_ascent(lambda x: A @ x, 300, eta=1e-4, steps=5000, seed=3)
    start_cos = float((v0 @ top).abs())
    final_cos = float((v_auth @ top).abs())
    assert final_cos < 0.2 and final_cos < 3 * start_cos + 0.05  # still essentially random
    assert float((v_auth - v0).norm()) < 0.2  # barely moved
    res_auth = float((A @ v_auth - (v_auth @ A @ v_auth) * v_auth).norm())
    v, theta, residual, _ = pca_plus_eigenvector(G, V, lam=1.0, tol=1e-8)
    assert float((v @ top).abs()) > 1 - 1e-8
    assert residual < 1e-6 * res_auth  # ours converged, theirs did not


def test_lanczos_largest_algebraic_with_restarts():
    torch.manual_seed(0)
    Q = torch.linalg.qr(torch.randn(200, 200, dtype=torch.float64))[0]
    ev = torch.cat([torch.tensor([1.0, 0.97]), torch.linspace(-5.0, 0.9, 198)]).double()
    A = Q @ torch.diag(ev) @ Q.T
    r = lanczos_top(lambda x: A @ x, 200, tol=1e-10, basis_size=15, keep=5, max_iter=2000)
    assert r.converged
    assert r.value == pytest.approx(1.0, abs=1e-9)
    assert float((r.vector @ Q[:, 0]).abs()) > 1 - 1e-8
    assert float((A @ r.vector - r.value * r.vector).norm()) <= 1e-10 * 5 * 1.01


def test_lanczos_invariant_subspace_and_max_iter():
    A = torch.diag(torch.tensor([3.0, 1.0, 0.5, 0.0], dtype=torch.float64))
    # A start inside an invariant subspace yields that subspace's exact top pair (a Krylov method
    # cannot see beyond it): documented; the default start is a random Gaussian vector.
    r = lanczos_top(lambda x: A @ x, 4, v0=torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64), tol=1e-12)
    assert r.value == pytest.approx(1.0) and r.residual < 1e-14 and r.converged and r.n_matvecs == 2
    r = lanczos_top(lambda x: A @ x, 4, tol=1e-12)
    assert r.value == pytest.approx(3.0) and r.converged and r.n_matvecs <= 4
    slow = lanczos_top(lambda x: A @ x, 4, max_iter=1)
    assert slow.n_matvecs == 1 and not slow.converged


def test_pca_plus_from_frequent_directions_sketches():
    G, V = _problem(d=200, seed=5)
    fdG = FrequentDirections(200, ell=40, dtype=torch.float64)
    fdV = FrequentDirections(200, ell=40, dtype=torch.float64)
    fdG.update(G)
    fdV.update(V)
    A = _dense_pca_plus(G, V, 1.0)
    w, E = torch.linalg.eigh(A)
    v, theta, residual, _ = pca_plus_eigenvector(fdG, fdV, lam=1.0, tol=1e-9)
    # FD perturbs each normalised Gram by at most Delta / ||.||_F^2 in spectral norm
    pert = fdG.delta_total / fdG.fro2 + fdV.delta_total / fdV.fro2
    assert abs(theta - float(w[-1])) <= pert + 1e-9
    assert float((v @ E[:, -1]).abs()) > 0.95


def test_pca_plus_bad_inputs():
    G, V = torch.randn(20, 10), torch.randn(15, 10)
    with pytest.raises(ValueError, match="width"):
        pca_plus_eigenvector(G, torch.randn(15, 11))
    with pytest.raises(ValueError, match="lam"):
        pca_plus_eigenvector(G, V, lam=-1.0)
    with pytest.raises(ValueError, match="F"):
        pca_plus_eigenvector(torch.zeros(20, 10), V)
    bad = V.clone()
    bad[4, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        pca_plus_eigenvector(G, bad)
    with pytest.raises(ValueError, match="v0"):
        lanczos_top(lambda x: x, 10, v0=torch.zeros(10))
    with pytest.raises(ValueError, match="matvec"):
        lanczos_top(lambda x: x[:5], 10)
    with pytest.raises(ValueError, match="source"):
        pca_plus_eigenvector("G", V)
    assert isinstance(TensorRows(G).shape, tuple)
