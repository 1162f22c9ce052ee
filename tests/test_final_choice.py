"""UPI-Grad's final choice (``upi_fast/solvers/_final_choice.py``): the start's per-sample losses are
taken from the UPI-PCA sign decision and the clean maps from the stream's cache, so one map pass per
batch remains; the result must be the one the full measurement gives (float64 models: 1e-9), and
anything the reuse cannot vouch for (rows not scored, another cache, loaders) is measured."""
import contextlib
import weakref

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import upi_fast as U
from upi_fast.solvers import _final_choice as FC
from upi_fast.solvers.upi_pca import UPIPCA
from upi_fast.solvers.upi_grad import UPIGrad

from _models import relu_cnn

pytestmark = pytest.mark.numerics

EPS = 2.0


def _problem(n=40):
    m = relu_cnn()
    X = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        y = m(X).argmax(1)
    return m, X, y


@pytest.fixture
def map_rows(monkeypatch):
    """Counts the samples whose saliency map the final choice computes."""
    count = [0]
    real = FC.raw_gradient

    def counting(model, x, *a, **k):
        count[0] += x.shape[0]
        return real(model, x, *a, **k)

    monkeypatch.setattr(FC, "raw_gradient", counting)
    return count


def _fit(m, data, **kw):
    return UPIGrad(m, EPS, epochs=2, batch_size=16, progress=False, seed=1, **kw).fit(data)


def _independent_scores(m, X, y, g):
    ref = U.saliency(m, X, y)
    score = lambda d: U.dissimilarity(U.saliency(m, X + d.double(), y), ref, "l2")
    return score(g.start_), score(g.delta_)


# measured: the default refines; steps blind to the clean objective (noise 1.0 on [0, 1] pixels) end below the start
@pytest.mark.parametrize("kw, refined", [({}, True), ({"noise_std": 1.0, "lr": 1.0, "lr_schedule": "constant"}, False)])
def test_reused_start_scores_equal_the_full_measurement(monkeypatch, map_rows, kw, refined):
    m, X, y = _problem()
    fast = _fit(m, (X, y), **kw)
    assert fast.refined_ == refined  # both branches of the rule are exercised
    assert map_rows[0] == fast.n_samples_  # one map per sample: the last iterate's
    d_start, d_last = _independent_scores(m, X, y, fast)
    assert fast.start_score_ == pytest.approx(float(d_start.mean()), rel=1e-9, abs=1e-12)
    if fast.refined_:
        assert fast.score_ == pytest.approx(float(d_last.mean()), rel=1e-9, abs=1e-12)
    gain = d_last - d_start  # the paired rule, recomputed by hand
    assert fast.refined_ == bool(gain.mean() > 2 * gain.std(unbiased=True) / len(gain) ** 0.5)

    original = UPIPCA._sign_scores

    def forgetful(self, *a):  # the sign decision keeps nothing: the start is measured again
        out = original(self, *a)
        self._sign_values = None
        return out

    monkeypatch.setattr(UPIPCA, "_sign_scores", forgetful)
    map_rows[0] = 0
    full = _fit(m, (X, y), **kw)
    assert map_rows[0] == 2 * full.n_samples_  # start and last iterate; the clean maps come from the cache
    assert torch.equal(full.delta_, fast.delta_) and full.refined_ == fast.refined_
    assert full.start_score_ == pytest.approx(fast.start_score_, rel=1e-9, abs=1e-12)
    assert full.score_ == pytest.approx(fast.score_, rel=1e-9, abs=1e-12)


def test_rows_the_sign_decision_did_not_score_are_measured(monkeypatch, map_rows):
    m, X, y = _problem()
    original = UPIPCA._sign_scores

    def half_known(self, *a):  # as if another process had scored the second half of the rows
        out = original(self, *a)
        ref, per = self._sign_values
        per[:, per.shape[1] // 2:] = float("nan")
        return out

    monkeypatch.setattr(UPIPCA, "_sign_scores", half_known)
    g = _fit(m, (X, y), lr=0.4)
    n = g.n_samples_
    assert n < map_rows[0] <= 2 * n  # the last iterate for every sample, the start for the batches with a NaN row
    d_start, d_last = _independent_scores(m, X, y, g)
    assert g.start_score_ == pytest.approx(float(d_start.mean()), rel=1e-9, abs=1e-12)


def test_start_values_of_another_cache_are_not_used(map_rows):
    m, X, y = _problem()
    g = _fit(m, (X, y), lr=0.4)
    stale = (weakref.ref(X), torch.zeros(2, g.n_samples_, dtype=torch.float64))  # X is not the stream's cache
    from upi_fast.solvers._batches import CleanBatches
    stream = CleanBatches(m, (X, y), 16, g.spec, torch.device("cpu"), shuffle=True, seed=1)
    map_rows[0] = 0
    (s0, s1), _, _ = FC.attack_scores(g, stream, (g.start_.double(), g.delta_.double()), contextlib.nullcontext,
                                      (stale[0], stale[1][0]))
    assert map_rows[0] == 2 * g.n_samples_  # both measured: zeros from a stale cache would have been wrong
    d_start, d_last = _independent_scores(m, X, y, g)
    assert s0 == pytest.approx(float(d_start.mean()), rel=1e-9) and s1 == pytest.approx(float(d_last.mean()), rel=1e-9)


def test_a_loader_measures_clean_start_and_last(map_rows):
    m, X, y = _problem()
    g = _fit(m, DataLoader(TensorDataset(X, y), batch_size=16), lr=0.4)
    assert map_rows[0] == 3 * g.n_samples_  # nothing cached: the clean maps too
    d_start, d_last = _independent_scores(m, X, y, g)
    assert g.start_score_ == pytest.approx(float(d_start.mean()), rel=1e-9, abs=1e-12)
    if g.refined_:
        assert g.score_ == pytest.approx(float(d_last.mean()), rel=1e-9, abs=1e-12)


def test_preserve_labels_adds_the_cross_entropy_of_both(map_rows):
    m, X, y = _problem()
    mu = 0.5
    g = _fit(m, (X, y), lr=0.4, preserve_labels=mu)
    assert map_rows[0] == g.n_samples_
    d_start, d_last = _independent_scores(m, X, y, g)
    ce = lambda d: torch.nn.functional.cross_entropy(m(X + d.double()), y, reduction="none").detach()
    assert g.start_score_ == pytest.approx(float((d_start - mu * ce(g.start_)).mean()), rel=1e-9, abs=1e-12)
