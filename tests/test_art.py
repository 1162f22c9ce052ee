"""upi_fast.art: UPI-Grad and UPI-PCA as attacks of the real Adversarial Robustness Toolbox.

On the embedded digits CNN wrapped in ART's ``PyTorchClassifier``, without preprocessing (ART units
= pixels in [0, 1]) and with ``preprocessing=(-1, 2)`` (ART units = ``2 * pixel - 1`` in [-1, 1]):

* ``import upi_fast`` does not import ART; ``upi_fast.art`` without ART says how to install it;
* ``generate`` returns float32 images of ``x``'s shape equal to ``clip(x + noise)``, one ``noise``
  for every row, ``||noise|| <= eps`` in ART units (``eps / std`` in model units), inside
  ``clip_values``; ``fooling_rate`` / ``dissimilarity_`` are what ART's ``predict`` and
  ``upi_fast.evaluate`` give on the returned images;
* units: through ``preprocessing=(-1, 2)`` the ART perturbation is exactly 2x the bare model's UPI of
  the same images in pixel units with eps / 2 (both methods);
* UPI-PCA via ART equals ``UPIPCA(...).fit`` directly (same seed; labels as indices or one-hot);
* on held-out images, the ART-produced images' saliency dissimilarity is far above that of random
  universal perturbations of the same norm (clipped alike);
* a ``channels_first=False`` classifier gives the same perturbation, transposed;
* bad parameters raise ValueError naming the parameter (at construction and in ``set_params``).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from art.defences.preprocessor import SpatialSmoothing
    from art.estimators.classification import PyTorchClassifier
    from art.exceptions import EstimatorError

from upi_fast import UPIPCA, UPIGrad, evaluate
from upi_fast.art import UPIGradAttack, UPIPCAAttack, art_model
from upi_fast.data import digits
from upi_fast.models import Normalized, digits_cnn
from upi_fast.solvers.baselines import universal_random

from _tolerance import f32_rtol, rel_err

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.numerics,
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ART preprocessing (mean, std): ART units are 2 * pixel - 1. std is a power of two so that the
# scaling between ART and model units is exact in float32.
MEAN, STD = -1.0, 2.0
# Two runs of the same float32 operations (up to exact power-of-two scalings) agree to rounding: the
# digits CNN's reductions (conv 1*3*3, conv 16*3*3, linear 32*4*4, linear 64), a Hessian-vector
# product = four chained passes, both sides rounded.
SAME_OPS = f32_rtol([9, 144, 512, 64], depth=4, pair=True, normwise=True)
ATTACKS = {"pca": (UPIPCAAttack, {}), "grad": (UPIGradAttack, {"epochs": 2, "batch_size": 64})}


@pytest.fixture(scope="module")
def setup():
    """The digits CNN, 128 attack and 128 held-out eval images (pixels in [0, 1]) and the norm
    budget of tests/test_solvers.py (10% of the mean eval image L2 norm), in pixel units."""
    splits = digits()
    model = digits_cnn()
    Xe = splits.eval.X
    eps = float(0.1 * Xe.reshape(Xe.shape[0], -1).norm(dim=1).mean())
    return dict(model=model, X=splits.attack.X[:128], y=splits.attack.y[:128], Xe=Xe[:128], ye=splits.eval.y[:128],
                eps=eps)


def _classifier(model: nn.Module, pre: bool, clip: bool = True, channels_first: bool = True) -> PyTorchClassifier:
    shape = (1, 16, 16) if channels_first else (16, 16, 1)
    kw = dict(preprocessing=(MEAN, STD)) if pre else {}
    if clip:
        kw["clip_values"] = (MEAN, MEAN + STD) if pre else (0.0, 1.0)
    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=shape, nb_classes=10,
                             channels_first=channels_first, device_type="cpu", **kw)


def _art_units(X: torch.Tensor, pre: bool) -> np.ndarray:
    return (X * STD + MEAN).numpy() if pre else X.numpy().copy()


def _norm(a, norm) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    return float(np.abs(a).max()) if norm == math.inf else float(np.linalg.norm(a))


# --------------------------------------------------------------------------------------------- optional import
def test_art_is_optional():
    code = ("import sys, upi_fast\n"
            "assert 'art' not in sys.modules, 'import upi_fast imported ART'\n"
            "assert not hasattr(upi_fast, 'UPIPCAAttack')\n"
            "sys.modules['art'] = None  # ART not installed: 'import art' raises ImportError\n"
            "try:\n"
            "    import upi_fast.art\n"
            "except ImportError as e:\n"
            "    print('IMPORT-ERROR:', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert "IMPORT-ERROR:" in res.stdout and "pip install adversarial-robustness-toolbox" in res.stdout, res.stdout


# --------------------------------------------------------------------------------------------- generate
@pytest.mark.parametrize("method", ["pca", "grad"])
@pytest.mark.parametrize("norm", [2, math.inf])
@pytest.mark.parametrize("pre", [False, True], ids=["no-preprocessing", "preprocessing"])
def test_generate_is_a_clipped_universal_perturbation_in_the_ball(setup, method, norm, pre):
    clf = _classifier(setup["model"], pre)
    x = _art_units(setup["X"], pre)
    cls, kw = ATTACKS[method]
    eps_model = setup["eps"] if norm == 2 else setup["eps"] / 16  # Linf: the same per-pixel scale as L2 / sqrt(d)
    eps = eps_model * (STD if pre else 1.0)  # ART units
    attack = cls(clf, eps=eps, norm=norm, **kw)
    out = attack.generate(x)

    assert out.shape == x.shape and out.dtype == np.float32
    noise = attack.noise
    assert noise.shape == (1, 1, 16, 16) and noise.dtype == np.float32
    np.testing.assert_array_equal(attack.delta_.numpy(), noise[0])
    # in the ball, in ART units and, mapped through the preprocessing, in model units
    assert 0.5 * eps < _norm(noise, norm) <= eps * (1 + 1e-6)
    assert _norm(noise / (STD if pre else 1.0), norm) <= eps_model * (1 + 1e-6)
    # universal and clipped: out = clip(x + noise), one noise for every row
    lo, hi = clf.clip_values
    np.testing.assert_array_equal(out, np.clip(x + noise, lo, hi))
    assert out.min() >= lo and out.max() <= hi
    assert ((x + noise) < lo).any(), "the test should exercise clipping"
    inside = ((x + noise) > lo) & ((x + noise) < hi)
    diff = (out - x)[inside]
    ref = np.broadcast_to(noise, x.shape)[inside]
    assert np.abs(diff - ref).max() <= 4 * np.finfo(np.float32).eps * max(abs(lo), abs(hi))
    assert inside.all(axis=0).sum() > 0 and np.ptp((out - x)[:, inside.all(axis=0)], axis=0).max() <= 1e-6
    # predictions on the result are meaningful: the attack targets interpretations, few labels flip
    pred_clean = clf.predict(x).argmax(1)
    assert (pred_clean == setup["y"].numpy()).mean() > 0.9
    pred_adv = clf.predict(out).argmax(1)
    assert attack.fooling_rate == pytest.approx(float((pred_adv != pred_clean).mean()), abs=1e-12)
    assert attack.fooling_rate < 0.3
    # dissimilarity_ is upi_fast.evaluate's on the returned images
    Xt, yt = torch.from_numpy(x), torch.from_numpy(pred_clean)
    res = evaluate(art_model(clf), lambda xb, yb: torch.from_numpy(attack.perturb(xb.numpy())) - xb, (Xt, yt),
                   metrics=("dissimilarity",))
    assert attack.dissimilarity_ == pytest.approx(res["dissimilarity"], rel=1e-6)
    assert attack.dissimilarity_ > 0.3


@pytest.mark.parametrize("method", ["pca", "grad"])
def test_preprocessing_maps_units_exactly(setup, method):
    """ART units u = 2 p - 1 (p: pixels): the UPI in ART units with eps is 2x the bare model's UPI in
    pixel units with eps / 2 (saliency maps are L1-normalised, so their direction does not depend on
    the scale). Without smoothing noise, whose rounding in either unit system would differ."""
    clf = _classifier(setup["model"], pre=True)
    x = _art_units(setup["X"], pre=True)
    X_pix = (torch.from_numpy(x) - MEAN) / STD  # what ART's StandardisationMeanStdPyTorch hands the model
    cls, kw = ATTACKS[method]
    attack = cls(clf, eps=STD * setup["eps"], noise_std=0.0, seed=5, **kw)
    attack.generate(x, y=setup["y"].numpy())
    solver = UPIPCA if method == "pca" else UPIGrad
    direct = solver(setup["model"], setup["eps"], noise_std=0.0, seed=5, progress=False, **kw).fit(
        (X_pix, setup["y"]))
    assert rel_err(attack.delta_, STD * direct.delta_) <= SAME_OPS


@pytest.mark.parametrize("pre", [False, True], ids=["no-preprocessing", "preprocessing"])
def test_upipca_via_art_equals_upipca_fit(setup, pre):
    clf = _classifier(setup["model"], pre)
    x = _art_units(setup["X"], pre)
    eps = setup["eps"] * (STD if pre else 1.0)
    y = setup["y"].numpy()
    a_idx = UPIPCAAttack(clf, eps=eps, seed=3, batch_size=64)
    a_idx.generate(x, y=y)
    a_hot = UPIPCAAttack(clf, eps=eps, seed=3, batch_size=64)
    a_hot.generate(x, y=np.eye(10, dtype=np.float32)[y])
    net = Normalized(setup["model"], (MEAN,), (STD,)) if pre else setup["model"]
    direct = UPIPCA(net, eps, seed=3, batch_size=64, progress=False).fit((torch.from_numpy(x), setup["y"]))
    assert rel_err(a_idx.delta_, direct.delta_) <= SAME_OPS
    np.testing.assert_array_equal(a_hot.noise, a_idx.noise)
    assert a_idx.solver_.n_samples_ == direct.n_samples_
    # another seed, another perturbation: the comparison above is not vacuous
    other = UPIPCAAttack(clf, eps=eps, seed=4, batch_size=64)
    other.generate(x, y=y)
    assert rel_err(other.delta_, direct.delta_) > 1e3 * SAME_OPS


@pytest.mark.parametrize("method", ["pca", "grad"])
def test_heldout_saliency_dissimilarity_far_above_random(setup, method):
    """Fitted on attack images, applied by ART (``perturb``: clip(x + noise)) to held-out images; random
    universal perturbations of the same L2 norm, clipped alike, change the maps about half as much
    (measured: UPI 0.59, random 0.30-0.32 on these 128 images)."""
    clf = _classifier(setup["model"], pre=True)
    eps = STD * setup["eps"]
    cls, kw = ATTACKS[method]
    attack = cls(clf, eps=eps, **kw)
    attack.generate(_art_units(setup["X"], pre=True))
    xe = torch.from_numpy(_art_units(setup["Xe"], pre=True))
    data, net = (xe, setup["ye"]), art_model(clf)
    upi = evaluate(net, lambda xb, yb: torch.from_numpy(attack.perturb(xb.numpy())) - xb, data,
                   metrics=("dissimilarity",))["dissimilarity"]
    lo, hi = clf.clip_values
    rand = []
    for s in range(3):
        r = universal_random((1, 16, 16), eps, seed=s)
        assert float(r.norm()) == pytest.approx(eps, rel=1e-5)
        rand.append(evaluate(net, lambda xb, yb: (xb + r).clamp(float(lo), float(hi)) - xb, data,
                             metrics=("dissimilarity",))["dissimilarity"])
    print(f"{method}: UPI {upi:.3f}, random {rand}")
    assert upi >= 1.5 * max(rand)


def test_channels_last_classifier_gives_the_transposed_perturbation(setup):
    class NHWC(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x.permute(0, 3, 1, 2))

    x = _art_units(setup["X"], pre=True)
    eps = STD * setup["eps"]
    first = UPIPCAAttack(_classifier(setup["model"], pre=True), eps=eps)
    first.generate(x)
    clf_last = _classifier(NHWC(setup["model"]), pre=True, channels_first=False)
    last = UPIPCAAttack(clf_last, eps=eps)
    x_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    out = last.generate(x_last)
    assert out.shape == x_last.shape and last.noise.shape == (1, 16, 16, 1)
    assert rel_err(torch.from_numpy(last.noise.transpose(0, 3, 1, 2).copy()), torch.from_numpy(first.noise)) <= SAME_OPS
    np.testing.assert_array_equal(out, np.clip(x_last + last.noise, *clf_last.clip_values))


# --------------------------------------------------------------------------------------------- errors
BAD = [
    (UPIPCAAttack, {"eps": -1.0}, "eps"), (UPIPCAAttack, {"eps": 0}, "eps"), (UPIPCAAttack, {"eps": math.nan}, "eps"),
    (UPIPCAAttack, {"norm": 1}, "norm"), (UPIPCAAttack, {"norm": "l1"}, "norm"),
    (UPIPCAAttack, {"batch_size": 0}, "batch_size"), (UPIPCAAttack, {"seed": 1.5}, "seed"),
    (UPIPCAAttack, {"verbose": 1}, "verbose"), (UPIPCAAttack, {"saliency": "gradcam"}, "saliency"),
    (UPIPCAAttack, {"target_kind": "score"}, "target_kind"), (UPIPCAAttack, {"dissimilarity": "l7"}, "dissimilarity"),
    (UPIPCAAttack, {"hvp": "magic"}, "hvp"), (UPIPCAAttack, {"noise_std": -0.1}, "noise_std"),
    (UPIPCAAttack, {"saliency_kwargs": {"stepz": 3}}, "saliency_kwargs"),
    (UPIPCAAttack, {"solver_kwargs": {"nope": 1}}, "solver_kwargs"),
    (UPIPCAAttack, {"solver_kwargs": {"seed": 1}}, "solver_kwargs"),
    (UPIPCAAttack, {"rounds": 0}, "rounds"), (UPIPCAAttack, {"plus_lambda": -1.0}, "plus_lambda"),
    (UPIPCAAttack, {"solver": "qr"}, "solver"), (UPIPCAAttack, {"normalize_rows": "yes"}, "normalize_rows"),
    (UPIGradAttack, {"epochs": 0}, "epochs"), (UPIGradAttack, {"lr": -1.0}, "lr"),
    (UPIGradAttack, {"optimizer": "sgd"}, "optimizer"), (UPIGradAttack, {"init": "zeros"}, "init"),
]


@pytest.mark.parametrize("cls,kw,name", BAD, ids=[f"{c.__name__}-{n}-{i}" for i, (c, _, n) in enumerate(BAD)])
def test_bad_params_raise_value_error_naming_the_param(setup, cls, kw, name):
    clf = _classifier(setup["model"], pre=False)
    args = {"eps": 0.5, **kw}
    with pytest.raises(ValueError, match=name):
        cls(clf, **args)
    attack = cls(clf, eps=0.5)
    with pytest.raises(ValueError, match=name):
        attack.set_params(**args)


def test_bad_estimator_inputs_and_calls(setup):
    with pytest.raises(EstimatorError):
        UPIPCAAttack(setup["model"], eps=0.5)
    numpy_defence = PyTorchClassifier(model=setup["model"], loss=nn.CrossEntropyLoss(), input_shape=(1, 16, 16),
                                      nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu",
                                      preprocessing_defences=SpatialSmoothing(window_size=3))
    with pytest.raises(ValueError, match="preprocessing"):
        UPIPCAAttack(numpy_defence, eps=0.5)
    attack = UPIPCAAttack(_classifier(setup["model"], pre=False), eps=0.5)
    x = setup["X"].numpy()
    with pytest.raises(ValueError, match="perturb"):
        attack.perturb(x)
    with pytest.raises(ValueError, match="x must have shape"):
        attack.generate(x[:, 0])
    with pytest.raises(ValueError, match="NaN"):
        attack.generate(np.full_like(x, np.nan))
    with pytest.raises(ValueError, match="y has 3 labels"):
        attack.generate(x, y=np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="y has labels outside"):
        attack.generate(x, y=np.full(x.shape[0], 10))
    with pytest.raises(ValueError, match="y must be"):
        attack.generate(x, y=np.zeros((x.shape[0], 4)))
    with pytest.raises(ValueError, match="keyword"):
        attack.generate(x, mask=np.ones_like(x))
    with pytest.raises(ValueError, match='"foo" cannot be set'):
        attack.set_params(foo=1)
