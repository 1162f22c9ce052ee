"""The adapters' own semantics, library-independent (the real Quantus, captum and ART are exercised
in tests/test_real_libraries.py):

* ``quantus_explain_func``: keyword calls, numpy in and out, ``device`` injected, per-call options,
  batching, targets, a ModelInterface-like wrapper, clear errors;
* ``quantus_perturb_func``: every layout it accepts (the flattened batch Quantus 0.6 passes, a
  batch, one sample, a flat sample), ``indices`` / ``indexed_axes``, clipping, a perturbation file;
* ``upi_fast.evaluate`` with an attribution object: shape check, keyword forwarding, seeds.

Tolerances: a float32 result is compared with a float64 reference within a bound derived from the
reductions involved (``_f32_bound``); where the point is batching semantics the maps are computed in
float64 (a float64 model), so that only the final rounding to float32 remains.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import upi_fast
from upi_fast import adapters
from upi_fast.functional import raw_gradient, saliency
from upi_fast.io import save_perturbation

from _models import smooth_cnn

# float results compared between code paths: rerun by .ci/run with other CPU kernels forced
pytestmark = pytest.mark.numerics

EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)
# smooth_cnn(channels=2, size=(7, 6)): the reductions a forward pass makes (conv 2*3*3, conv 5*3*3,
# linear 4*4*3) and a backward pass makes again; rounding errors add up along the chain.
CHAIN = 2 * (2 * 9 + 5 * 9 + 4 * 4 * 3)
N_PIX = 7 * 6  # the L1 normalisation of a map sums this many entries


def _f32_bound(ref: np.ndarray, n: int = CHAIN + 2 * N_PIX) -> float:
    """Worst-case absolute error of a float32 computation of ``ref`` through ``n`` accumulated
    roundings: ``n * eps32 * max |ref|`` (maps and gradients are compared in max norm)."""
    return n * EPS32 * float(np.abs(ref).max())


@pytest.fixture(scope="module")
def setup():
    model = smooth_cnn(channels=2, size=(7, 6), classes=4, dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    X = torch.rand(5, 2, 7, 6, generator=g)
    with torch.no_grad():
        y = model(X).argmax(1)
    delta = 0.2 * torch.randn(2, 7, 6, generator=g)
    return model, X, y, delta


@pytest.fixture(scope="module")
def model64(setup):
    return smooth_cnn(channels=2, size=(7, 6), classes=4, dtype=torch.float64)


# --------------------------------------------------------------------------------------------- explain_func
def test_explain_func_returns_saliency_maps_as_numpy(setup, model64):
    model, X, y, _ = setup
    fn = adapters.quantus_explain_func("simple", "prob")
    a = fn(model=model, inputs=X.numpy(), targets=y.numpy(), device="cpu")
    assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == (5, 1, 7, 6)
    ref = saliency(model64, X.double(), y).reshape(5, 1, 7, 6).numpy()  # the same network in float64
    np.testing.assert_allclose(a, ref, rtol=0, atol=_f32_bound(ref))
    # each map sums to 1: N_PIX float32 roundings in the normalisation and as many in this sum
    np.testing.assert_allclose(a.reshape(5, -1).astype(np.float64).sum(1), 1.0, rtol=0, atol=2 * N_PIX * EPS32)
    raw = adapters.quantus_explain_func("simple", "logit", postprocess="raw")(model=model, inputs=X.numpy(),
                                                                              targets=y.numpy())
    assert raw.shape == (5, 2, 7, 6) and raw.dtype == np.float32
    ref = raw_gradient(model64, X.double(), y, target_kind="logit").numpy()
    np.testing.assert_allclose(raw, ref, rtol=0, atol=_f32_bound(ref, CHAIN))


def test_explain_func_options_per_call_batching_and_targets(model64, setup):
    """Batching, per-call options and target forms change nothing but the float32 rounding: the
    maps are computed in float64 (a float64 model), so batched and whole-batch results agree to the
    final rounding (one float32 ulp, ``rtol = eps32``) plus the float64 error (``CHAIN * eps64``)."""
    _, X, y, _ = setup
    model = model64
    fn = adapters.QuantusExplainFunc(batch_size=2)
    whole = adapters.QuantusExplainFunc()(model=model, inputs=X.numpy(), targets=y.numpy())
    assert whole.dtype == np.float32

    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=EPS32, atol=(CHAIN + 2 * N_PIX) * EPS64 * float(np.abs(b).max()))

    close(fn(model=model, inputs=X.numpy(), targets=y.numpy()), whole)
    # explain_func_kwargs override the options for one call
    ig = fn(model=model, inputs=X.numpy(), targets=y.numpy(), method="integrated", steps=4)
    close(ig, saliency(model, X.double(), y, method="integrated", steps=4).reshape(5, 1, 7, 6).numpy())
    assert not np.allclose(ig, whole)  # the override took effect
    # a torch tensor input, a list of targets, one int target for all
    close(fn(model=model, inputs=X, targets=y.tolist()), whole)
    one = fn(model=model, inputs=X.numpy(), targets=int(y[0]))
    close(one, saliency(model, X.double(), torch.full((5,), int(y[0]))).reshape(5, 1, 7, 6).numpy())


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
# The perturbation is added in the array's dtype (``arr + float32(scale * delta)``), exactly as
# ``x + delta`` in torch: the expected values below are computed the same way and compared exactly.
def test_perturb_func_adds_the_perturbation(setup, tmp_path):
    _, X, _, delta = setup
    fn = adapters.quantus_perturb_func(delta)
    d = delta.numpy()
    x = X[0].numpy()
    out = fn(arr=x, indices=np.arange(x.size), indexed_axes=np.arange(x.ndim), lower_bound=0.2, perturb_std=0.1)
    assert out.dtype == x.dtype and out.shape == x.shape and out is not x
    np.testing.assert_array_equal(out, x + d)
    np.testing.assert_array_equal(fn(X.numpy()), X.numpy() + d[None])  # a batch, no indices
    np.testing.assert_array_equal(fn(x.reshape(-1)), (x + d).reshape(-1))  # one flat sample
    clipped = adapters.quantus_perturb_func(delta, scale=-2.0, clip=(0.0, 1.0))(x)
    np.testing.assert_array_equal(clipped, np.clip(x - 2 * d, 0, 1))  # -2 * delta is exact in float32
    assert clipped.min() == 0.0 and clipped.max() == 1.0  # the clip was active
    # float64 input: the float64 perturbation, nothing rounded
    x64 = X[0].double().numpy()
    np.testing.assert_array_equal(fn(x64), x64 + d.astype(np.float64))
    # from a perturbation file
    path = tmp_path / "upi.safetensors"
    save_perturbation(path, delta, {"method": "test"})
    np.testing.assert_array_equal(adapters.quantus_perturb_func(str(path))(x), out)


def test_perturb_func_accepts_quantus_flattened_batches(setup):
    """Quantus 0.6's robustness metrics call ``perturb_func(arr=x.reshape(B, -1),
    indices=np.tile(np.arange(N), (B, 1)), **perturb_func_kwargs)`` and reshape the result back."""
    _, X, _, delta = setup
    fn = adapters.quantus_perturb_func(delta)
    xb = X.numpy()
    B, N = xb.shape[0], xb[0].size
    flat = xb.reshape(B, -1)
    out = fn(arr=flat, indices=np.tile(np.arange(0, N), (B, 1)), lower_bound=0.2, upper_bound=None)
    assert out.shape == (B, N) and out.dtype == flat.dtype
    np.testing.assert_array_equal(out.reshape(xb.shape), xb + delta.numpy()[None])
    np.testing.assert_array_equal(fn(flat), out)  # no indices: everywhere
    # one row of positions per sample: only those positions move
    rows = np.array([[0, 5, 83], [1, 2, 3], [10, 11, 12], [0, 1, 2], [40, 41, 42]])
    out = fn(flat, indices=rows)
    expect = flat.copy()
    for i in range(B):
        expect[i, rows[i]] = flat[i, rows[i]] + delta.numpy().reshape(-1)[rows[i]]
    np.testing.assert_array_equal(out, expect)
    # one 1-D set of positions for every sample
    out = fn(flat, indices=np.array([7, 9]))
    expect = flat.copy()
    expect[:, [7, 9]] += delta.numpy().reshape(-1)[[7, 9]]
    np.testing.assert_array_equal(out, expect)


def test_perturb_func_respects_indices_over_indexed_axes(setup):
    _, X, _, delta = setup
    fn = adapters.UPIPerturbFunc(delta)
    d = delta.numpy()
    x = X[1].numpy()
    # spatial positions (axes 1, 2 of a (C, H, W) sample): every channel at those pixels
    flat = np.array([0, 5, 41])
    out = fn(x, indices=flat, indexed_axes=[1, 2])
    mask = np.zeros((7, 6), bool)
    mask.reshape(-1)[flat] = True
    np.testing.assert_array_equal(out, x + d * mask[None])
    # channel 1 only (axis 0)
    out = fn(x, indices=[1], indexed_axes=[0])
    expect = x.copy()
    expect[1] += d[1]
    np.testing.assert_array_equal(out, expect)
    # a tuple index expression over all axes
    out = fn(x, indices=(slice(None), slice(0, 2), slice(None)))
    expect = x.copy()
    expect[:, :2] += d[:, :2]
    np.testing.assert_array_equal(out, expect)
    # a (B, C, H, W) batch with one row of indices per sample
    xb = X[:2].numpy()
    rows = np.array([[0, 1], [2, 3]])
    out = fn(xb, indices=rows)
    for i in range(2):
        e = xb[i].copy().reshape(-1)
        e[rows[i]] += d.reshape(-1)[rows[i]]
        np.testing.assert_array_equal(out[i], e.reshape(xb[i].shape))


def test_perturb_func_bad_input_is_a_clear_error(setup):
    _, X, _, delta = setup
    fn = adapters.UPIPerturbFunc(delta)
    with pytest.raises(ValueError, match="arr must be one sample \\(2, 7, 6\\) or \\(84,\\).*got \\(3, 7, 6\\)"):
        fn(np.zeros((3, 7, 6), np.float32))
    with pytest.raises(ValueError, match="flattened \\(B, 84\\).*got \\(5, 83\\)"):
        fn(np.zeros((5, 83), np.float32))
    with pytest.raises(TypeError, match="numpy array"):
        fn(X[0])
    with pytest.raises(TypeError, match="floating numpy array"):
        fn(np.zeros((2, 7, 6), np.int64))
    with pytest.raises(ValueError, match="consecutive"):
        fn(X[0].numpy(), indices=[0], indexed_axes=[0, 2])
    with pytest.raises(ValueError, match="flat positions"):
        fn(X[0].numpy(), indices=[84])
    with pytest.raises(ValueError, match="flat positions"):
        fn(X.numpy().reshape(5, -1), indices=np.tile(np.arange(85), (5, 1)))
    with pytest.raises(ValueError, match="indices has 2 rows for a batch of 5 samples"):
        fn(X.numpy().reshape(5, -1), indices=np.tile(np.arange(84), (2, 1)))
    with pytest.raises(TypeError, match="integer positions"):
        fn(X[0].numpy(), indices=np.array([0.5]))
    with pytest.raises(ValueError, match="delta must have shape"):
        adapters.UPIPerturbFunc(delta[0])
    with pytest.raises(ValueError, match="NaN"):
        adapters.UPIPerturbFunc(torch.full((1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="clip"):
        adapters.UPIPerturbFunc(delta, clip=(1.0, 0.0))
    with pytest.raises(ValueError, match="scale must be a finite number"):
        adapters.UPIPerturbFunc(delta, scale=float("inf"))


# --------------------------------------------------------------------------------------------- evaluate + objects
def test_evaluate_rejects_a_bad_attribution_object(setup):
    model, X, y, delta = setup

    class WrongShape:
        def attribute(self, inputs, target=None):
            return inputs.sum(1)

    with pytest.raises(ValueError, match="expected a tensor of shape"):
        upi_fast.evaluate(model, delta, (X, y), saliency=WrongShape())
    with pytest.raises(TypeError, match="seed must be an integer"):
        upi_fast.evaluate(model, delta, (X, y), seed=1.5)


def test_evaluate_forwards_saliency_kwargs_and_seeds_an_attribution_object(setup):
    """``saliency_kwargs`` other than ``postprocess`` reach ``attribute``; each batch is computed
    from the global RNG seeded with ``seed + batch`` for both its clean and its perturbed map, and
    the caller's RNG state is restored."""
    model, X, y, delta = setup
    calls = []

    class Recording:  # a noisy attribution: gradient-free, its value is the noise itself
        def attribute(self, inputs, target=None, scale=1.0):
            noise = torch.randn(inputs.shape)
            calls.append((scale, noise))
            return scale * noise + 0 * inputs

    state = torch.get_rng_state()
    res = upi_fast.evaluate(model, delta, (X, y), saliency=Recording(), saliency_kwargs={"scale": 2.0},
                            batch_size=3, seed=11, metrics=("dissimilarity",))
    assert torch.equal(torch.get_rng_state(), state)
    assert [c[0] for c in calls] == [2.0] * 4  # clean + perturbed, for each of the 2 batches
    for i, (b, n) in enumerate([(0, 3), (1, 2)]):
        expect = torch.randn((n, *X.shape[1:]), generator=torch.Generator().manual_seed(11 + b))
        assert torch.equal(calls[2 * i][1], expect) and torch.equal(calls[2 * i + 1][1], expect)
    assert res["dissimilarity"] == 0.0  # the "attribution" is the noise only: same draws, same maps
    with pytest.raises(TypeError, match="unexpected keyword"):
        upi_fast.evaluate(model, delta, (X, y), saliency=Recording(), saliency_kwargs={"steps": 3})


def test_explain_func_integration_rule_matches_saliency(setup, model64):
    """The integration rule reaches the maps (constructor and per call), and a bad rule names the argument."""
    model, X, y, _ = setup
    X64 = X.double()
    for rule in ("gausslegendre", "riemann_middle"):
        ref = saliency(model64, X64, y, method="integrated", steps=7, integration=rule).reshape(5, 1, 7, 6).numpy()
        got = adapters.QuantusExplainFunc(method="integrated", steps=7, integration=rule)(model, X.numpy(), y.numpy())
        np.testing.assert_allclose(got, ref, rtol=0, atol=_f32_bound(ref))  # the same network in float64
        per_call = adapters.QuantusExplainFunc(method="integrated", steps=7)(model, X.numpy(), y.numpy(),
                                                                            integration=rule)
        np.testing.assert_array_equal(per_call, got)
    default = saliency(model64, X64, y, method="integrated", steps=7).reshape(5, 1, 7, 6).numpy()
    assert np.abs(default - ref).max() > 100 * _f32_bound(ref)  # the rules differ far beyond rounding
    with pytest.raises(ValueError, match="integration"):
        adapters.QuantusExplainFunc(method="integrated", integration="trapezoid")
    with pytest.raises(ValueError, match="integration='riemann_left' needs steps >= 2"):
        adapters.QuantusExplainFunc(method="integrated", steps=1, integration="riemann_left")
