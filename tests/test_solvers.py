"""UPI-Grad, UPI-PCA, PCA+ and the baselines on the embedded default and on small models."""
import math

import pytest
import torch
from torch import nn

import upi_fast as U
from upi_fast.data import digits, make_loader
from upi_fast.evaluate import evaluate
from upi_fast.models import digits_cnn
from upi_fast.projection import norm_of
from upi_fast.solvers import UPIGrad, UPIPCA
from upi_fast.solvers.baselines import classification_uap, per_image_attack, per_sample_random, universal_random

# float results compared between code paths: rerun by .ci/run with other CPU kernels forced
pytestmark = pytest.mark.numerics


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    splits = digits()
    model = digits_cnn(cache_dir=tmp_path_factory.mktemp("cache"))
    Xe = splits.eval.X
    eps = float(0.1 * Xe.reshape(Xe.shape[0], -1).norm(dim=1).mean())
    return model, splits, eps


def test_integration_upi_beats_random_and_pca_plus_keeps_labels(default):
    """The properties of a correct implementation on the embedded default (README records them)."""
    model, splits, eps = default
    ev = splits.eval
    rand = sum(evaluate(model, universal_random((1, 16, 16), eps, seed=s), ev)["dissimilarity"] for s in range(5)) / 5
    grad = UPIGrad(model, eps, epochs=20, batch_size=32, hvp="finite_difference", progress=False).fit(splits.attack)
    pca = UPIPCA(model, eps, progress=False).fit(splits.attack)
    plus = UPIPCA(model, eps, plus_lambda=1.0, progress=False).fit(splits.attack)
    r_grad, r_pca, r_plus = (evaluate(model, s.delta_, ev) for s in (grad, pca, plus))
    print(f"random {rand:.3f} grad {r_grad} pca {r_pca} plus {r_plus}")
    assert r_grad["dissimilarity"] >= 1.8 * rand
    assert r_pca["dissimilarity"] >= 1.8 * rand
    assert r_plus["fooling_rate"] < r_pca["fooling_rate"]
    for s in (grad, pca, plus):
        assert norm_of(s.delta_).item() <= eps * (1 + 1e-5)
    assert plus.residual_ < 1e-6 * abs(plus.eigenvalue_) + 1e-9
    assert len(grad.history_) == grad.n_steps_ == 20 * math.ceil(grad.n_samples_ / 32)


def test_upi_grad_default_is_seed_robust_on_the_embedded_default(default):
    """The demo's UPI-Grad (``upi-fast demo``: epochs 20, batches of 32, the default UPI-PCA start),
    seeds 0-3, full configuration (about 2 s a seed on one core). From a random start
    (``init="random"``) seed 0 lands in a worse optimum: evaluation dissimilarity 0.567 against
    0.600-0.601 for seeds 1-3 (spread 0.034), below UPI-PCA's 0.608-0.609. The default must not
    depend on the seed that way: spread at most 0.01, every seed at least UPI-PCA of the same seed
    minus 0.005, the per-image attack still above all, and never below its own start on the attack
    split. (Not "the best UPI-PCA seed minus 0.005": with the scalar CPU kernels forced, the CNN
    trained here differs and UPI-PCA's own seeds spread by 0.0056.)"""
    model, splits, eps = default
    grad, pca = [], []
    for seed in range(4):
        g = UPIGrad(model, eps, epochs=20, batch_size=32, seed=seed, progress=False).fit(splits.attack)
        assert g.init == "pca" and g.score_ >= g.start_score_
        grad.append(evaluate(model, g.delta_, splits.eval)["dissimilarity"])
        p = UPIPCA(model, eps, seed=seed, progress=False).fit(splits.attack)
        pca.append(evaluate(model, p.delta_, splits.eval)["dissimilarity"])
    per_image = evaluate(model, lambda x, y: per_image_attack(model, x, y, eps, steps=40), splits.eval)
    print(f"UPI-Grad {[round(v, 4) for v in grad]}  UPI-PCA {[round(v, 4) for v in pca]}  "
          f"per-image {per_image['dissimilarity']:.4f}")
    assert max(grad) - min(grad) <= 0.01
    assert all(g >= p - 0.005 for g, p in zip(grad, pca)), (grad, pca)
    assert per_image["dissimilarity"] > max(grad + pca)


def test_upi_grad_pca_start_is_upi_pca_and_is_kept_when_better():
    """``init="pca"`` starts at UPIPCA's perturbation (same settings) and returns the better of start
    and last iterate by the attack objective on the attack data (clean maps, no noise)."""
    m, X, y = _tiny()
    kw = dict(epochs=2, batch_size=16, progress=False, seed=3)
    g = UPIGrad(m, 0.3, **kw).fit((X, y))
    p = UPIPCA(m, 0.3, batch_size=16, progress=False, seed=3).fit((X, y))
    torch.testing.assert_close(g.start_, p.delta_, rtol=0, atol=0)
    ref = U.saliency(m, X, y)
    mean_d = lambda d: float(U.dissimilarity(U.saliency(m, X + d, y), ref, "l2").mean())
    assert g.start_score_ == pytest.approx(mean_d(g.start_), rel=1e-5)
    assert g.score_ == pytest.approx(mean_d(g.delta_), rel=1e-5) and g.score_ >= g.start_score_
    assert g.refined_ == (not torch.equal(g.delta_, g.start_))
    # smoothing noise 3x the pixel range: steps nearly blind to the clean objective end below the start, which is kept
    blind = UPIGrad(m, 0.3, noise_std=1.0, lr=0.3, lr_schedule="constant", **kw).fit((X, y))
    assert not blind.refined_ and torch.equal(blind.delta_, blind.start_)
    assert blind.score_ == blind.start_score_ == pytest.approx(mean_d(blind.start_), rel=1e-5)
    # with preserve_labels the objective compared is the one ascended: D - mu * CE
    mu = 2.0
    lab = UPIGrad(m, 0.3, preserve_labels=mu, **kw).fit((X, y))
    ce = lambda d: float(torch.nn.functional.cross_entropy(m(X + d), y).detach())
    assert lab.score_ == pytest.approx(mean_d(lab.delta_) - mu * ce(lab.delta_), rel=1e-4)


def test_upi_grad_random_init_is_the_plain_method():
    """``init="random"``: a uniform point of the ball from ``seed``, the large default step, the last iterate."""
    from upi_fast.projection import project, random_in_ball, steepest_step
    m, X, y = _tiny()
    g = UPIGrad(m, 0.3, init="random", epochs=1, batch_size=40, noise_std=0.0, lr_schedule="constant",
                progress=False, seed=5).fit((X, y))
    start = random_in_ball((1, 6, 6), 0.3, 2, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(g.start_, start, rtol=0, atol=0)
    assert g.start_score_ is None and g.score_ is None and g.refined_ and g.n_steps_ == 1
    _, grad = U.saliency_loss_grad(m, X, y, U.saliency(m, X, y), start)  # the one full-batch step, by hand
    torch.testing.assert_close(g.delta_, project(start + 0.5 * 0.3 * steepest_step(grad, 2), 0.3, 2))
    with pytest.raises(ValueError, match="init"):
        UPIGrad(m, 0.3, init="zeros")


def _tiny():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Softplus(beta=4), nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    X = torch.rand(40, 1, 6, 6)
    y = m(X).argmax(1)  # every sample correctly classified
    return m, X, y


@pytest.mark.parametrize("norm", [2, math.inf])
@pytest.mark.parametrize("optimizer", ["normalized", "sign", "adam"])
def test_upi_grad_stays_in_ball_and_is_deterministic(norm, optimizer):
    m, X, y = _tiny()
    kw = dict(norm=norm, optimizer=optimizer, epochs=2, batch_size=16, progress=False, seed=3)
    a = UPIGrad(m, 0.3, **kw).fit((X, y))
    b = UPIGrad(m, 0.3, **kw).fit((X, y))
    assert torch.equal(a.delta_, b.delta_)
    assert a.delta_.shape == (1, 6, 6)
    assert norm_of(a.delta_, norm).item() <= 0.3 * (1 + 1e-5)
    assert len(a.history_) == 6 and all(math.isfinite(h) for h in a.history_)
    c = UPIGrad(m, 0.3, **{**kw, "seed": 4}).fit((X, y))
    assert not torch.equal(a.delta_, c.delta_)


def test_upi_grad_increases_loss_and_accepts_loader_and_modes():
    m, X, y = _tiny()
    ds = torch.utils.data.TensorDataset(X, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=10)
    for hvp in ("double_backward", "finite_difference_onesided", "forward"):
        s = UPIGrad(m, 0.5, epochs=4, batch_size=10, hvp=hvp, progress=False, noise_std=0.0).fit(loader)
        first = sum(s.history_[:4]) / 4
        last = sum(s.history_[-4:]) / 4
        assert last > first, (hvp, s.history_)
    s = UPIGrad(m, 0.5, epochs=1, batch_size=10, preserve_labels=1.0, progress=False).fit((X, y))
    assert torch.isfinite(s.delta_).all()


def test_upi_pca_sign_on_attack_split_and_solution_is_top_singular_vector():
    m, X, y = _tiny()
    s = UPIPCA(m, 0.5, progress=False, noise_std=0.05, n_components=2, batch_size=40, seed=5).fit((X, y))
    # recompute the direction matrix independently (same noise draws) and compare with the exact SVD
    ref = U.saliency(m, X, y)
    _, g = U.saliency_loss_grad(m, X, y, ref, torch.zeros(40, 1, 6, 6), noise_std=0.05,
                                generator=torch.Generator().manual_seed(5))
    G = (g.reshape(40, -1) / g.reshape(40, -1).norm(dim=1, keepdim=True)).double()
    _, S, Vh = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(s.singular_values_.double(), S[:2], rtol=1e-4, atol=1e-6)
    cos = (s.delta_.reshape(-1).double() @ Vh[0]).abs() / s.delta_.norm()
    assert cos > 0.9999
    assert s.sign_ in (1, -1)
    assert s.sign_scores_["+1" if s.sign_ == 1 else "-1"] >= s.sign_scores_["-1" if s.sign_ == 1 else "+1"]
    assert abs(s.delta_.norm().item() - 0.5) < 1e-5


def test_upi_pca_rounds_and_linf():
    m, X, y = _tiny()
    s = UPIPCA(m, 0.1, norm="inf", rounds=2, progress=False).fit((X, y))
    assert s.delta_.abs().max().item() == pytest.approx(0.1)
    vals = s.delta_.abs().unique()
    assert ((vals - 0.1).abs() < 1e-6).all()  # a corner of the cube: eps * sign(v)
    one = UPIPCA(m, 0.1, norm="inf", rounds=1, progress=False).fit((X, y))
    assert not torch.equal(one.components_, s.components_)  # round 2 re-linearises at x + delta_1


def test_fit_never_touches_evaluation_data():
    m, X, y = _tiny()

    class Recording(torch.utils.data.Dataset):
        def __init__(self):
            self.seen = set()

        def __len__(self):
            return X.shape[0]

        def __getitem__(self, i):
            self.seen.add(int(i))
            return X[i], y[i]

    ds = Recording()
    att, ev = torch.arange(0, 25), torch.arange(25, 40)
    loader = make_loader(ds, att, 8)
    UPIGrad(m, 0.2, epochs=2, batch_size=8, progress=False).fit(loader)
    UPIPCA(m, 0.2, batch_size=8, progress=False).fit(loader)
    UPIPCA(m, 0.2, batch_size=8, plus_lambda=1.0, progress=False).fit(loader)
    assert ds.seen and ds.seen <= set(att.tolist())
    assert not ds.seen & set(ev.tolist())


def test_baselines_shapes_and_norms():
    m, X, y = _tiny()
    r = universal_random((1, 6, 6), 0.7, seed=1)
    assert r.shape == (1, 6, 6) and r.norm().item() == pytest.approx(0.7, rel=1e-5)
    r_inf = universal_random((1, 6, 6), 0.2, norm="inf", seed=1)
    assert r_inf.abs().max().item() == pytest.approx(0.2, rel=1e-6)
    assert not torch.equal(r, universal_random((1, 6, 6), 0.7, seed=2))
    fn = per_sample_random(0.3)
    d = fn(X[:5], y[:5])
    assert d.shape == (5, 1, 6, 6)
    torch.testing.assert_close(d.reshape(5, -1).norm(dim=1), torch.full((5,), 0.3))
    c = classification_uap(m, (X, y), 0.5, epochs=2)
    assert c.shape == (1, 6, 6) and c.norm() <= 0.5 + 1e-5
    ce = lambda dd: torch.nn.functional.cross_entropy(m(X + dd), y).item()
    assert ce(c) > ce(torch.zeros(1, 6, 6))
    p = per_image_attack(m, X[:6], y[:6], 0.5, steps=5)
    assert p.shape == (6, 1, 6, 6)
    assert (p.reshape(6, -1).norm(dim=1) <= 0.5 + 1e-5).all()
    ref = U.saliency(m, X[:6], y[:6])
    gain = U.dissimilarity(U.saliency(m, X[:6] + p, y[:6]), ref)
    assert (gain > 0).all()


def test_evaluate_metrics_and_per_sample_functions():
    m, X, y = _tiny()
    zero = evaluate(m, torch.zeros(1, 6, 6), (X, y), metrics=("dissimilarity", "topk_intersection", "spearman",
                                                              "fooling_rate", "center_of_mass_shift"))
    assert zero["dissimilarity"] == 0 and zero["topk_intersection"] == 1 and zero["fooling_rate"] == 0
    assert zero["spearman"] == pytest.approx(1.0) and zero["center_of_mass_shift"] == 0
    assert zero["n"] == 40 == zero["n_total"]
    res = evaluate(m, per_sample_random(0.5), (X, y), return_per_sample=True)
    assert res["dissimilarity"] > 0 and res["per_sample"]["dissimilarity"].shape == (40,)
    wrong = y.clone()
    wrong[:10] = (y[:10] + 1) % 3
    assert evaluate(m, torch.zeros(1, 6, 6), (X, wrong))["n"] == 30


@pytest.mark.parametrize("make, match", [
    (lambda m: UPIGrad(m, 0.0), "eps"),
    (lambda m: UPIGrad(m, float("nan")), "eps"),
    (lambda m: UPIGrad(m, 1.0, norm=1), "norm"),
    (lambda m: UPIGrad(m, 1.0, optimizer="sgd"), "optimizer"),
    (lambda m: UPIGrad(m, 1.0, hvp="magic"), "hvp"),
    (lambda m: UPIPCA(m, 1.0, solver="qr"), "solver"),
    (lambda m: UPIPCA(m, -1.0), "eps"),
    (lambda m: UPIGrad(m, 1.0, saliency_kwargs={"stepz": 3}), "saliency_kwargs"),
])
def test_bad_solver_arguments(make, match):
    m, X, y = _tiny()
    with pytest.raises((ValueError, TypeError), match=match):
        make(m)


def test_bad_data():
    m, X, y = _tiny()
    with pytest.raises(ValueError, match="empty"):
        UPIGrad(m, 0.1, progress=False).fit((X[:0], y[:0]))
    bad = X.clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        UPIGrad(m, 0.1, progress=False).fit((bad, y))
    with pytest.raises(ValueError, match="labels"):
        UPIGrad(m, 0.1, progress=False).fit((X, y + 5))
    with pytest.raises(ValueError, match="shape"):
        UPIGrad(m, 0.1, progress=False).fit((torch.rand(4, 3, 6, 6), y[:4]))
    with pytest.raises(ValueError, match="delta"):
        evaluate(m, torch.zeros(1, 5, 5), (X, y))
    with pytest.raises(ValueError, match="CUDA"):
        if torch.cuda.is_available():
            raise ValueError("CUDA present: nothing to test")
        UPIGrad(m, 0.1, device="cuda", progress=False).fit((X, y))


@pytest.mark.parametrize("solver", ["sketch", "frequent_directions", "subspace", "block_krylov"])
def test_upi_pca_streaming_solvers_match_exact(solver, tmp_path):
    m, X, y = _tiny()
    kw = dict(progress=False, batch_size=16, seed=2)
    exact = UPIPCA(m, 0.5, solver="exact", **kw).fit((X, y))
    got = UPIPCA(m, 0.5, solver=solver, spill_dir=str(tmp_path), **kw).fit((X, y))
    cos = (exact.components_[0] @ got.components_[0]).abs() / (exact.components_[0].norm() * got.components_[0].norm())
    assert cos > 0.99, (solver, cos)
    torch.testing.assert_close(got.singular_values_, exact.singular_values_, rtol=0.05, atol=1e-4)
    plus_exact = UPIPCA(m, 0.5, solver="exact", plus_lambda=1.0, **kw).fit((X, y))
    plus = UPIPCA(m, 0.5, solver=solver, plus_lambda=1.0, spill_dir=str(tmp_path), **kw).fit((X, y))
    assert plus.residual_ is not None and plus.residual_ >= 0
    if solver in ("subspace", "block_krylov"):  # spilled rows: the exact operator
        assert plus.residual_ < 1e-5
        c = (plus.delta_.reshape(-1) @ plus_exact.delta_.reshape(-1)).abs() / 0.25
        assert c > 0.999
    assert not list(tmp_path.iterdir())  # spill files are removed


def test_upi_pca_auto_solver_spills_when_matrix_exceeds_budget(tmp_path):
    from upi_fast.solvers._accumulators import resolve_solver
    assert resolve_solver("auto", 100, 10, 10**6) == "exact"
    assert resolve_solver("auto", 100, 10**5, 10**6) == "block_krylov"
    with pytest.warns(UserWarning, match="single-pass"):
        assert resolve_solver("auto", 100, 10**5, 10**6, multi_pass_ok=False) == "sketch"
    m, X, y = _tiny()
    exact = UPIPCA(m, 0.5, solver="exact", progress=False, seed=2).fit((X, y))
    auto = UPIPCA(m, 0.5, solver="auto", memory_budget=1000, spill_dir=str(tmp_path), progress=False,
                  seed=2).fit((X, y))
    cos = (exact.components_[0] @ auto.components_[0]).abs()
    assert cos > 0.999 and not list(tmp_path.iterdir())
