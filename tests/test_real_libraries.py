"""The adapters against the real libraries (test requirements: captum, quantus==0.6.0,
adversarial-robustness-toolbox), on the embedded digits data and CNN:

* Quantus 0.6 robustness metrics (MaxSensitivity, AvgSensitivity, LocalLipschitzEstimate,
  RelativeInputStability) with ``quantus_perturb_func`` + ``quantus_explain_func`` as the docstrings
  say to use them: the score shape, NaN exactly where the label flips, 0 for a zero perturbation,
  the UPI above random perturbations of the same norm, and MaxSensitivity equal to
  ``upi_fast.evaluate``'s dissimilarity;
* Quantus faithfulness metrics (PixelFlipping, FaithfulnessCorrelation) with ``quantus_explain_func``:
  saliency beats a random explanation; ``quantus_explain_func`` equals ``quantus.explain("Saliency")``;
* captum attributions as the saliency of ``upi_fast.evaluate``: ``Saliency`` and
  ``IntegratedGradients`` equal the built-in methods; ``NoiseTunnel`` and the built-in smoothgrad
  score a zero perturbation 0 (common random numbers) and leave the global RNG as it was;
* ART imports alongside and wraps the digits CNN.

Tolerances are derived from the float32 reductions of the digits CNN (``DIGITS_CHAIN``) or, for
float64 models, of ``_models.smooth_cnn``.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import quantus
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

import upi_fast
from upi_fast import adapters
from upi_fast.data import digits
from upi_fast.models import digits_cnn
from upi_fast.saliency import postprocess_maps
from upi_fast.solvers import UPIPCA
from upi_fast.solvers.baselines import universal_random

from _models import smooth_cnn

# float results compared between libraries and code paths: .ci/run reruns them with other CPU kernels forced
pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.numerics,
              pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning",
                                         "ignore::UserWarning")]

EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)
# The digits CNN's reductions (conv 1*3*3, conv 16*3*3, linear 32*4*4, linear 64), made by a forward
# and again by a backward pass; a saliency map also sums its 16*16 pixels to normalise.
DIGITS_CHAIN = 2 * (9 + 144 + 512 + 64)
N_PIX = 16 * 16
ROBUSTNESS = [quantus.MaxSensitivity, quantus.AvgSensitivity, quantus.LocalLipschitzEstimate,
              quantus.RelativeInputStability]


@pytest.fixture(scope="module")
def digits_setup():
    """The digits CNN, 64 correctly classified eval images, and a UPI-PCA perturbation fitted on
    128 attack images with the norm budget of tests/test_solvers.py (10% of the mean image norm)."""
    splits = digits()
    model = digits_cnn()
    X, y = splits.eval
    with torch.no_grad():
        ok = model(X).argmax(1) == y
    X, y = X[ok][:64].contiguous(), y[ok][:64].contiguous()
    eps = float(0.1 * splits.eval.X.reshape(splits.eval.X.shape[0], -1).norm(dim=1).mean())
    upi = UPIPCA(model, eps, progress=False).fit((splits.attack.X[:128], splits.attack.y[:128])).delta_.detach()
    return model, X, y, upi, eps


@pytest.fixture
def numpy_seed():
    """Quantus draws from numpy's global RNG: seed it for the test, restore it afterwards."""
    state = np.random.get_state()
    np.random.seed(0)
    yield
    np.random.set_state(state)


def _robustness(metric_cls, delta, **kw):
    """A Quantus robustness metric applying the deterministic perturbation ``delta`` once."""
    return metric_cls(nr_samples=1, perturb_func=adapters.quantus_perturb_func(delta), disable_warnings=True,
                      return_nan_when_prediction_changes=True, **kw)


def _score(metric, model, X, y, explain=None):
    """The metric's scores on (X, y) in one Quantus batch (so that the clean and the perturbed maps
    are computed on batches of the same shape), as float64."""
    explain = explain or adapters.quantus_explain_func("simple")
    return np.asarray(metric(model=model, x_batch=X.numpy(), y_batch=y.numpy(), explain_func=explain,
                             device="cpu", batch_size=X.shape[0]), dtype=np.float64)


# --------------------------------------------------------------------------------------------- Quantus
@pytest.mark.parametrize("metric_cls", ROBUSTNESS, ids=lambda c: c.__name__)
def test_quantus_robustness_metric_with_the_upi(metric_cls, digits_setup):
    model, X, y, upi, eps = digits_setup
    B = X.shape[0]
    # a zero perturbation: the maps do not change, every score is exactly 0 (no label changes)
    zero = _score(_robustness(metric_cls, torch.zeros_like(upi)), model, X, y)
    assert zero.shape == (B,)
    np.testing.assert_array_equal(zero, 0.0)
    # the UPI: one score per sample, NaN exactly where the UPI changes the predicted label
    s_upi = _score(_robustness(metric_cls, upi), model, X, y)
    with torch.no_grad():
        flipped = (model(X + upi).argmax(1) != y).numpy()
    assert s_upi.shape == (B,)
    np.testing.assert_array_equal(np.isnan(s_upi), flipped)
    assert not flipped.all() and (s_upi[~flipped] > 0).all()
    # it changes the explanations more than random perturbations of the same norm (the method's claim)
    s_rand = np.mean([np.nanmean(_score(_robustness(metric_cls, universal_random(tuple(upi.shape), eps, seed=s)),
                                        model, X, y)) for s in range(3)])
    print(f"{metric_cls.__name__}: UPI {np.nanmean(s_upi):.4g} (NaN {int(flipped.sum())}), random {s_rand:.4g}")
    assert np.nanmean(s_upi) > 1.3 * s_rand > 0


def test_quantus_max_sensitivity_equals_evaluate_dissimilarity(digits_setup):
    """With one deterministic perturbation, MaxSensitivity's ``||a' - a||_F / ||a||_F`` is
    upi_fast.evaluate's relative L2 dissimilarity, sample by sample (the same maps, the same
    perturbed inputs: the adapter adds delta in float32 as evaluate does)."""
    model, X, y, upi, _ = digits_setup
    metric = quantus.MaxSensitivity(nr_samples=1, perturb_func=adapters.quantus_perturb_func(upi), normalise=False,
                                    abs=False, disable_warnings=True, return_nan_when_prediction_changes=False)
    q = _score(metric, model, X, y)
    ev = upi_fast.evaluate(model, upi, (X, y), batch_size=X.shape[0], metrics=("dissimilarity",),
                           return_per_sample=True)
    assert ev["n"] == X.shape[0]
    d = ev["per_sample"]["dissimilarity"].numpy()
    # map errors r = (DIGITS_CHAIN + 2 N_PIX) eps32 relative; |d(I', I) error| <= r (2 + 2 d)
    np.testing.assert_allclose(q, d, rtol=0, atol=float((DIGITS_CHAIN + 2 * N_PIX) * EPS32 * (2 + 2 * d.max())))
    assert d.mean() > 0.1


def test_quantus_explain_func_equals_quantus_saliency(digits_setup):
    """``quantus.explain(method="Saliency")`` is captum's |d logit / d x| summed over channels:
    ``quantus_explain_func("simple", "logit")`` is the same map normalised to sum 1, and its raw
    gradient gives Quantus's map exactly."""
    model, X, y, _, _ = digits_setup
    x, t = X.numpy(), y.numpy()
    q = np.asarray(quantus.explain(model, x, t, method="Saliency"), dtype=np.float64)
    assert q.shape == (64, 1, 16, 16)
    ours = adapters.quantus_explain_func("simple", "logit")(model=model, inputs=x, targets=t, device="cpu")
    ref = q / q.reshape(64, -1).sum(1)[:, None, None, None]
    for i in range(64):  # per sample: each map has its own scale
        np.testing.assert_allclose(ours[i], ref[i], rtol=0, atol=(DIGITS_CHAIN + 2 * N_PIX) * EPS32 * ref[i].max())
    raw = adapters.quantus_explain_func("simple", "logit", postprocess="raw")(model=model, inputs=x, targets=t)
    got = np.abs(raw.astype(np.float64)).sum(1, keepdims=True)
    for i in range(64):
        np.testing.assert_allclose(got[i], q[i], rtol=0, atol=DIGITS_CHAIN * EPS32 * q[i].max())


def _random_explanation(model, inputs, targets, **kwargs):
    """An explanation that knows nothing about the model (fixed uniform noise)."""
    return np.random.default_rng(0).random((inputs.shape[0], 1, *inputs.shape[2:])).astype(np.float32)


def test_quantus_pixel_flipping_prefers_saliency_to_random(digits_setup, numpy_seed):
    """Removing pixels in saliency order lowers the target prediction faster than in random order."""
    model, X, y, _, _ = digits_setup
    metric = quantus.PixelFlipping(features_in_step=16, perturb_baseline="black", disable_warnings=True)
    curves = {}
    for name, explain in [("saliency", adapters.quantus_explain_func("simple")),
                          ("integrated", adapters.quantus_explain_func("integrated", "logit", steps=8,
                                                                       multiply_by_input=True)),
                          ("random", _random_explanation)]:
        curves[name] = _score(metric, model, X, y, explain)
        assert curves[name].shape == (64, N_PIX // 16) and np.isfinite(curves[name]).all()
    auc = {k: v.mean() for k, v in curves.items()}
    assert auc["saliency"] < 0.75 * auc["random"] and auc["integrated"] < 0.75 * auc["random"], auc


def test_quantus_faithfulness_correlation_prefers_saliency_to_random(digits_setup, numpy_seed):
    model, X, y, _, _ = digits_setup
    metric = quantus.FaithfulnessCorrelation(nr_runs=50, subset_size=32, perturb_baseline="black", abs=False,
                                             normalise=True, return_aggregate=False, disable_warnings=True)
    ours = _score(metric, model, X, y, adapters.quantus_explain_func("simple", "logit"))
    rand = _score(metric, model, X, y, _random_explanation)
    assert ours.shape == rand.shape == (64,) and np.isfinite(ours).all() and np.isfinite(rand).all()
    assert (np.abs(ours) <= 1 + 1e-12).all()  # Pearson correlations
    # 50 runs per sample, 64 samples: the mean correlation's sampling error is about 0.02
    assert ours.mean() > rand.mean() + 0.15, (ours.mean(), rand.mean())


# --------------------------------------------------------------------------------------------- captum
@pytest.fixture(scope="module")
def smooth64():
    model = smooth_cnn(channels=2, size=(7, 6), classes=4, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    X = torch.rand(6, 2, 7, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(X).argmax(1)
    delta = 0.2 * torch.randn(2, 7, 6, generator=g, dtype=torch.float64)
    return model, X, y, delta


SMOOTH_CHAIN = 2 * (2 * 9 + 5 * 9 + 4 * 4 * 3) + 2 * 7 * 6  # smooth_cnn's reductions + the normalisation


@pytest.mark.parametrize("kind", ["saliency", "integrated"])
def test_evaluate_with_captum_equals_the_builtin_method(kind, smooth64):
    """captum ``Saliency`` (|d logit / d x|) is saliency="simple" with target_kind="logit";
    captum ``IntegratedGradients`` (Gauss-Legendre by default, x - baseline times the path mean) is
    saliency="integrated" with the same rule, ``multiply_by_input`` and target_kind="logit"."""
    model, X, y, delta = smooth64
    mets = ("dissimilarity", "spearman", "center_of_mass_shift")
    if kind == "saliency":
        obj, kw, ours_kw = Saliency(model), None, None
        ours_name = "simple"
    else:
        obj, kw = IntegratedGradients(model), {"n_steps": 6, "method": "gausslegendre"}
        ours_name, ours_kw = "integrated", {"steps": 6, "integration": "gausslegendre", "multiply_by_input": True}
    assert isinstance(obj, adapters.AttributionMethod)
    theirs = upi_fast.evaluate(model, delta, (X, y), saliency=obj, saliency_kwargs=kw, metrics=mets,
                               return_per_sample=True)
    ours = upi_fast.evaluate(model, delta, (X, y), saliency=ours_name, target_kind="logit", saliency_kwargs=ours_kw,
                             metrics=mets, return_per_sample=True)
    assert theirs["n"] == ours["n"] == X.shape[0]
    d = ours["per_sample"]["dissimilarity"]
    # float64 throughout, except that captum rounds the integration weights to float32
    # (integrated_gradients.py: ``torch.tensor(step_sizes).float()``): one eps32 more, relative
    r = SMOOTH_CHAIN * EPS64 + (EPS32 if kind == "integrated" else 0.0)
    tol = float(r * (2 + 2 * d.max()))
    for m in mets:
        scale = 7.0 if m == "center_of_mass_shift" else 1.0  # pixels: at most the image size
        torch.testing.assert_close(theirs["per_sample"][m], ours["per_sample"][m], rtol=0, atol=scale * tol)
    assert float(d.min()) > 0


@pytest.mark.parametrize("case", ["nt_saliency", "nt_integrated", "smoothgrad"])
def test_evaluate_sampling_saliency_uses_common_random_numbers(case, digits_setup):
    """A zero perturbation scores exactly 0 with a sampling attribution (the clean and the perturbed
    map draw the same noise), and the caller's global RNG state is left alone."""
    model, X, y, upi, _ = digits_setup
    if case == "nt_saliency":
        sal, kw = NoiseTunnel(Saliency(model)), {"nt_samples": 4, "stdevs": 0.1}
    elif case == "nt_integrated":
        sal, kw = NoiseTunnel(IntegratedGradients(model)), {"nt_samples": 3, "stdevs": 0.1, "n_steps": 4}
    else:
        sal, kw = "smoothgrad", {"smoothgrad_std": 0.1, "n_samples": 4}
    mets = ("dissimilarity", "topk_intersection", "spearman", "fooling_rate")
    state = torch.get_rng_state()
    zero = upi_fast.evaluate(model, torch.zeros_like(upi), (X, y), saliency=sal, saliency_kwargs=kw, metrics=mets,
                             batch_size=32)
    assert torch.equal(torch.get_rng_state(), state)
    assert zero["n"] == X.shape[0]
    assert zero["dissimilarity"] == 0.0 and zero["topk_intersection"] == 1.0 and zero["fooling_rate"] == 0.0
    assert abs(zero["spearman"] - 1.0) <= N_PIX * EPS64  # identical ranks; float64 sums of N_PIX terms
    # a nonzero perturbation is measured, reproducibly for a seed
    a = upi_fast.evaluate(model, upi, (X, y), saliency=sal, saliency_kwargs=kw, batch_size=32, seed=5,
                          return_per_sample=True)
    b = upi_fast.evaluate(model, upi, (X, y), saliency=sal, saliency_kwargs=kw, batch_size=32, seed=5,
                          return_per_sample=True)
    assert a["dissimilarity"] > 0.05
    torch.testing.assert_close(a["per_sample"]["dissimilarity"], b["per_sample"]["dissimilarity"], rtol=0, atol=0)


def test_evaluate_noise_tunnel_maps_are_drawn_from_the_seed(digits_setup):
    """What evaluate computes for batch 0 with NoiseTunnel: the clean and the perturbed attribution
    both drawn right after ``torch.manual_seed(seed)``."""
    model, X, y, upi, _ = digits_setup
    X, y = X[:16], y[:16]
    nt, kw = NoiseTunnel(Saliency(model)), {"nt_samples": 3, "stdevs": 0.1}
    res = upi_fast.evaluate(model, upi, (X, y), saliency=nt, saliency_kwargs=kw, seed=9, metrics=("dissimilarity",),
                            return_per_sample=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(9)
        I = postprocess_maps(nt.attribute(X.clone().requires_grad_(True), target=y, **kw).detach())
        torch.manual_seed(9)
        I_adv = postprocess_maps(nt.attribute((X + upi).requires_grad_(True), target=y, **kw).detach())
    expect = ((I_adv - I).norm(dim=1) / I.norm(dim=1)).double()
    torch.testing.assert_close(res["per_sample"]["dissimilarity"], expect, rtol=0,
                               atol=float((DIGITS_CHAIN + 2 * N_PIX) * EPS32 * (2 + 2 * expect.max())))
    # with independent draws (the old behaviour) the same samples would score differently
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10)
        I_other = postprocess_maps(nt.attribute(X.clone().requires_grad_(True), target=y, **kw).detach())
    assert float(((I_other - I).norm(dim=1) / I.norm(dim=1)).mean()) > 0.1


# --------------------------------------------------------------------------------------------- ART
def test_art_imports_and_wraps_the_digits_cnn(digits_setup):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from art.estimators.classification import PyTorchClassifier
    model, X, _, _, _ = digits_setup
    clf = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 16, 16), nb_classes=10,
                            clip_values=(0.0, 1.0), device_type="cpu")
    got = clf.predict(X.numpy(), batch_size=X.shape[0])
    with torch.no_grad():
        ref = model(X).numpy()
    assert got.shape == (64, 10)
    np.testing.assert_allclose(got, ref, rtol=0, atol=DIGITS_CHAIN * EPS32 * float(np.abs(ref).max()))
