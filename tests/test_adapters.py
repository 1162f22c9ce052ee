"""Adapters to other libraries' calling conventions, with small stand-ins written here (neither
Quantus nor captum is installed or imported):

* ``quantus_explain_func``: called the way Quantus metrics call an ``explain_func`` (keyword
  arguments, numpy in and out, ``device`` injected), it returns upi_fast's saliency maps;
* ``quantus_perturb_func``: called the way Quantus robustness metrics call a ``perturb_func`` (one
  sample at a time, ``indices`` / ``indexed_axes``, extra noise keywords), it adds the UPI;
* a captum-style attribution object (``attribute(inputs, target=...)``) as the saliency method of
  ``upi_fast.evaluate``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import upi_fast
from upi_fast import adapters
from upi_fast.functional import raw_gradient, saliency
from upi_fast.io import save_perturbation

from _models import relu_cnn, smooth_cnn


@pytest.fixture(scope="module")
def setup():
    model = smooth_cnn(channels=2, size=(7, 6), classes=4, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    X = torch.rand(5, 2, 7, 6, generator=g)
    with torch.no_grad():
        y = model(X).argmax(1)
    delta = 0.2 * torch.randn(2, 7, 6, generator=g)
    return model, X, y, delta


def quantus_like_max_sensitivity(model, x_batch, y_batch, explain_func, explain_func_kwargs, perturb_func,
                                 perturb_func_kwargs, nr_samples=2, device="cpu"):
    """The calling conventions of a Quantus robustness metric (MaxSensitivity-like), written from its
    documented behaviour: numpy batches, keyword calls, ``device`` injected into the explain_func
    kwargs, ``perturb_func`` applied per sample with flat ``indices`` over ``indexed_axes`` and the
    metric's own noise keywords, attributions expanded to the input's dimensionality."""
    kwargs = dict(explain_func_kwargs)
    kwargs.setdefault("device", device)
    a = explain_func(model=model, inputs=x_batch, targets=y_batch, **kwargs)
    assert isinstance(a, np.ndarray) and a.shape[0] == x_batch.shape[0]
    sens = np.zeros(x_batch.shape[0])
    perturbed = []
    for _ in range(nr_samples):
        xp = np.copy(x_batch)
        indices = np.tile(np.arange(0, x_batch[0].size), (x_batch.shape[0], 1))
        for i in range(xp.shape[0]):
            xp[i] = perturb_func(arr=xp[i], indices=indices[i], indexed_axes=np.arange(0, x_batch[0].ndim),
                                 **perturb_func_kwargs)
        perturbed.append(xp)
        ap = explain_func(model=model, inputs=xp, targets=y_batch, **kwargs)
        for i in range(xp.shape[0]):
            s = np.linalg.norm(a[i].ravel() - ap[i].ravel()) / np.linalg.norm(x_batch[i].ravel())
            sens[i] = max(sens[i], s)
    return sens, perturbed


# --------------------------------------------------------------------------------------------- explain_func
def test_explain_func_returns_saliency_maps_as_numpy(setup):
    model, X, y, _ = setup
    fn = adapters.quantus_explain_func("simple", "prob")
    a = fn(model=model, inputs=X.numpy(), targets=y.numpy(), device="cpu")
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (5, 1, 7, 6)
    ref = saliency(model, X, y).reshape(5, 1, 7, 6).numpy()
    np.testing.assert_allclose(a, ref, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(a.reshape(5, -1).sum(1), 1.0, rtol=1e-5)
    raw = adapters.quantus_explain_func("simple", "logit", postprocess="raw")(model=model, inputs=X.numpy(),
                                                                              targets=y.numpy())
    assert raw.shape == (5, 2, 7, 6)
    np.testing.assert_allclose(raw, raw_gradient(model, X, y, target_kind="logit").numpy(), rtol=1e-5, atol=1e-7)


def test_explain_func_options_per_call_batching_and_targets(setup):
    model, X, y, _ = setup
    fn = adapters.QuantusExplainFunc(batch_size=2)
    whole = adapters.QuantusExplainFunc()(model=model, inputs=X.numpy(), targets=y.numpy())
    np.testing.assert_allclose(fn(model=model, inputs=X.numpy(), targets=y.numpy()), whole, rtol=1e-6, atol=1e-9)
    # explain_func_kwargs override the options for one call
    ig = fn(model=model, inputs=X.numpy(), targets=y.numpy(), method="integrated", steps=4)
    np.testing.assert_allclose(ig, saliency(model, X, y, method="integrated", steps=4).reshape(5, 1, 7, 6).numpy(),
                               rtol=1e-5, atol=1e-8)
    # a torch tensor input, a list of targets, one int target for all
    np.testing.assert_allclose(fn(model=model, inputs=X, targets=y.tolist()), whole, rtol=1e-6, atol=1e-9)
    one = fn(model=model, inputs=X.numpy(), targets=int(y[0]))
    np.testing.assert_allclose(one, saliency(model, X, torch.full((5,), int(y[0]))).reshape(5, 1, 7, 6).numpy(),
                               rtol=1e-6, atol=1e-9)


def test_explain_func_smoothgrad_is_a_function_of_its_input(setup):
    model, X, y, _ = setup
    fn = adapters.quantus_explain_func("smoothgrad", noise_std=0.1, n_samples=4, seed=7)
    a1 = fn(model=model, inputs=X.numpy(), targets=y.numpy())
    a2 = fn(model=model, inputs=X.numpy(), targets=y.numpy())
    np.testing.assert_array_equal(a1, a2)
    a3 = adapters.quantus_explain_func("smoothgrad", noise_std=0.1, n_samples=4, seed=8)(
        model=model, inputs=X.numpy(), targets=y.numpy())
    assert not np.array_equal(a1, a3)


def test_explain_func_unwraps_a_model_interface(setup):
    model, X, y, _ = setup

    class ModelInterfaceLike:  # Quantus wraps models; get_model() returns the network
        def __init__(self, m):
            self.m = m

        def get_model(self):
            return self.m

    fn = adapters.quantus_explain_func()
    np.testing.assert_array_equal(fn(model=ModelInterfaceLike(model), inputs=X.numpy(), targets=y.numpy()),
                                  fn(model=model, inputs=X.numpy(), targets=y.numpy()))


def test_explain_func_bad_input_is_a_clear_error(setup):
    model, X, y, _ = setup
    fn = adapters.quantus_explain_func()
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['abs'\\]"):
        fn(model=model, inputs=X.numpy(), targets=y.numpy(), abs=True)
    with pytest.raises(ValueError, match="inputs must have shape \\(B, C, H, W\\)"):
        fn(model=model, inputs=X[0].numpy(), targets=y.numpy())
    with pytest.raises(ValueError, match="targets must have 5 entries"):
        fn(model=model, inputs=X.numpy(), targets=y[:3].numpy())
    with pytest.raises(TypeError, match="targets must hold integer"):
        fn(model=model, inputs=X.numpy(), targets=y.numpy().astype(np.float32))
    with pytest.raises(TypeError, match="inputs must be a numpy array"):
        fn(model=model, inputs=X.tolist(), targets=y.numpy())
    with pytest.raises(ValueError, match="method must be one of"):
        fn(model=model, inputs=X.numpy(), targets=y.numpy(), method="Saliency")
    with pytest.raises(ValueError, match="noise_std must be > 0"):
        adapters.quantus_explain_func("smoothgrad")
    with pytest.raises(TypeError, match="model must be a callable"):
        fn(model=object(), inputs=X.numpy(), targets=y.numpy())
    with pytest.raises(ValueError, match="the model is on cpu but device='meta' was requested"):
        fn(model=model, inputs=X.numpy(), targets=y.numpy(), device="meta")


# --------------------------------------------------------------------------------------------- perturb_func
def test_perturb_func_adds_the_perturbation(setup, tmp_path):
    _, X, _, delta = setup
    fn = adapters.quantus_perturb_func(delta)
    x = X[0].numpy()
    out = fn(arr=x, indices=np.arange(x.size), indexed_axes=np.arange(x.ndim), lower_bound=0.2, perturb_std=0.1)
    assert out.dtype == x.dtype and out.shape == x.shape and out is not x
    np.testing.assert_allclose(out, x + delta.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(fn(X.numpy()), X.numpy() + delta.numpy()[None], atol=1e-6)  # a batch, no indices
    clipped = adapters.quantus_perturb_func(delta, scale=-2.0, clip=(0.0, 1.0))(x)
    np.testing.assert_allclose(clipped, np.clip(x - 2 * delta.numpy(), 0, 1), atol=1e-6)
    # from a perturbation file
    path = tmp_path / "upi.safetensors"
    save_perturbation(path, delta, {"method": "test"})
    np.testing.assert_allclose(adapters.quantus_perturb_func(str(path))(x), out, atol=1e-6)


def test_perturb_func_respects_indices_over_indexed_axes(setup):
    _, X, _, delta = setup
    fn = adapters.UPIPerturbFunc(delta)
    x = X[1].numpy()
    # spatial positions (axes 1, 2 of a (C, H, W) sample): every channel at those pixels
    flat = np.array([0, 5, 41])
    out = fn(x, indices=flat, indexed_axes=[1, 2])
    mask = np.zeros((7, 6), bool)
    mask.reshape(-1)[flat] = True
    np.testing.assert_allclose(out, x + delta.numpy() * mask[None], atol=1e-6)
    # channel 1 only (axis 0)
    out = fn(x, indices=[1], indexed_axes=[0])
    expect = x.copy()
    expect[1] += delta.numpy()[1]
    np.testing.assert_allclose(out, expect, atol=1e-6)
    # a tuple index expression over all axes
    out = fn(x, indices=(slice(None), slice(0, 2), slice(None)))
    expect = x.copy()
    expect[:, :2] += delta.numpy()[:, :2]
    np.testing.assert_allclose(out, expect, atol=1e-6)
    # a batch with one row of indices per sample
    xb = X[:2].numpy()
    rows = np.array([[0, 1], [2, 3]])
    out = fn(xb, indices=rows)
    for i in range(2):
        e = xb[i].copy().reshape(-1)
        e[rows[i]] += delta.numpy().reshape(-1)[rows[i]]
        np.testing.assert_allclose(out[i], e.reshape(xb[i].shape), atol=1e-6)


def test_perturb_func_bad_input_is_a_clear_error(setup):
    _, X, _, delta = setup
    fn = adapters.UPIPerturbFunc(delta)
    with pytest.raises(ValueError, match="arr must have shape"):
        fn(np.zeros((3, 7, 6), np.float32))
    with pytest.raises(TypeError, match="numpy array"):
        fn(X[0])
    with pytest.raises(ValueError, match="consecutive"):
        fn(X[0].numpy(), indices=[0], indexed_axes=[0, 2])
    with pytest.raises(ValueError, match="flat positions"):
        fn(X[0].numpy(), indices=[84])
    with pytest.raises(ValueError, match="delta must have shape"):
        adapters.UPIPerturbFunc(delta[0])
    with pytest.raises(ValueError, match="NaN"):
        adapters.UPIPerturbFunc(torch.full((1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="clip"):
        adapters.UPIPerturbFunc(delta, clip=(1.0, 0.0))


def test_quantus_style_robustness_metric_end_to_end(setup):
    model, X, y, delta = setup
    explain = adapters.quantus_explain_func("simple")
    sens, perturbed = quantus_like_max_sensitivity(model, X.numpy(), y.numpy(), explain, {},
                                                   adapters.quantus_perturb_func(delta),
                                                   {"lower_bound": 0.2, "upper_bound": None})
    # what the metric measured is exactly the change of upi_fast's maps under x + delta
    I, I_adv = saliency(model, X, y), saliency(model, X + delta, y)
    expect = (I_adv - I).norm(dim=1) / X.reshape(5, -1).norm(dim=1)
    np.testing.assert_allclose(sens, expect.double().numpy(), rtol=1e-4)
    np.testing.assert_allclose(perturbed[0], (X + delta).numpy(), atol=1e-6)
    assert (sens > 0).all()


# --------------------------------------------------------------------------------------------- captum-style
class CaptumLikeSaliency:
    """captum.attr.Saliency's calling convention: ``attribute(inputs, target=None, abs=True)`` returns
    the gradient of ``forward_func(inputs)[b, target[b]]`` (a logit) with respect to ``inputs``."""

    def __init__(self, forward_func):
        self.forward_func = forward_func

    def attribute(self, inputs, target=None, abs=True, additional_forward_args=None):
        out = self.forward_func(inputs)
        sel = out.gather(1, target.view(-1, 1)).sum()
        (grad,) = torch.autograd.grad(sel, inputs)
        return grad.abs() if abs else grad


def test_evaluate_accepts_a_captum_style_attribution(setup):
    model, X, y, delta = setup
    obj = CaptumLikeSaliency(model)
    assert isinstance(obj, adapters.AttributionMethod)
    ours = upi_fast.evaluate(model, delta, (X, y), saliency="simple", target_kind="logit",
                             metrics=("dissimilarity", "topk_intersection", "spearman"), return_per_sample=True)
    theirs = upi_fast.evaluate(model, delta, (X, y), saliency=obj,
                               metrics=("dissimilarity", "topk_intersection", "spearman"), return_per_sample=True)
    assert theirs["n"] == ours["n"] == 5
    for m in ("dissimilarity", "topk_intersection", "spearman"):
        torch.testing.assert_close(theirs["per_sample"][m], ours["per_sample"][m], rtol=1e-5, atol=1e-7)
    # and with a per-sample perturbation function, on a ReLU network left in train mode (restored after)
    relu = relu_cnn(channels=2, size=(7, 6), classes=4, dtype=torch.float32)
    with torch.no_grad():
        yr = relu(X).argmax(1)
    relu.train()
    res = upi_fast.evaluate(relu, upi_fast.baselines.per_sample_random(0.3), (X, yr), saliency=CaptumLikeSaliency(relu))
    assert relu.training and res["dissimilarity"] > 0 and res["n"] == 5


def test_evaluate_rejects_a_bad_attribution_object(setup):
    model, X, y, delta = setup

    class WrongShape:
        def attribute(self, inputs, target=None):
            return inputs.sum(1)

    with pytest.raises(ValueError, match="expected a tensor of shape"):
        upi_fast.evaluate(model, delta, (X, y), saliency=WrongShape())
