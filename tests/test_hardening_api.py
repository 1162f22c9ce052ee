"""Every bad input to the Python API gets a clear ValueError / TypeError / FileNotFoundError that
names the argument (cases already covered elsewhere are not repeated: see test_solvers,
test_saliency, test_io, test_models, test_data)."""
from __future__ import annotations

import math
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import upi_fast.ops as ops
from upi_fast import saliency
from upi_fast.checkpoint import CheckpointError, load_checkpoint
from upi_fast.evaluate import evaluate
from upi_fast.io import load_perturbation, save_perturbation
from upi_fast.models import load_state_dict_file
from upi_fast.pipeline import ComputeConfig, compute, option_of
from upi_fast.saved import evaluate_file
from upi_fast.solvers import UPIGrad, UPIPCA

from hardening_support import make_image_folder, train_mode_model

pytestmark = pytest.mark.usefixtures("single_thread")

SOLVERS = {"grad": lambda m, eps=0.3, **kw: UPIGrad(m, eps, epochs=1, batch_size=8, progress=False, **kw),
           "pca": lambda m, eps=0.3, **kw: UPIPCA(m, eps, batch_size=8, progress=False, **kw)}


@pytest.fixture(scope="module")
def tiny():
    """A smooth 3-class model on 1 x 6 x 6 images and 16 images it classifies (its own predictions)."""
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Softplus(beta=4), nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    X = torch.rand(16, 1, 6, 6, generator=g)
    with torch.no_grad():
        y = m(X).argmax(1)
    return m, X, y


def _fit_or_eval(what, model, data):
    if what == "evaluate":
        X = data[0] if isinstance(data, tuple) else next(iter(data))[0]
        return evaluate(model, torch.zeros(X.shape[1:]), data)
    return SOLVERS[what](model).fit(data)


ALL = ("grad", "pca", "evaluate")


# ------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("solver", ["grad", "pca"])
@pytest.mark.parametrize("eps, exc", [(float("inf"), ValueError), (float("-inf"), ValueError), (-1e-9, ValueError),
                                      (True, TypeError), ("0.3", TypeError), (None, TypeError)])
def test_bad_eps(tiny, solver, eps, exc):
    with pytest.raises(exc, match="eps"):
        SOLVERS[solver](tiny[0], eps)


@pytest.mark.parametrize("solver", ["grad", "pca"])
@pytest.mark.parametrize("norm", [1, 3, 0, "l1", "fro", None, float("nan"), -2])
def test_bad_norm(tiny, solver, norm):
    with pytest.raises(ValueError, match="norm must be 2 or inf"):
        SOLVERS[solver](tiny[0], norm=norm)


def test_bad_flags_and_counts(tiny):
    m = tiny[0]
    with pytest.raises(TypeError, match="oom_retry"):
        SOLVERS["grad"](m, oom_retry="yes")
    with pytest.raises(TypeError, match="oom_retry"):
        SOLVERS["pca"](m, oom_retry=1)
    with pytest.raises(ValueError, match="rounds"):
        SOLVERS["pca"](m, rounds=0)
    with pytest.raises(TypeError, match="batch_size"):
        UPIGrad(m, 0.3, batch_size=2.5)


# ------------------------------------------------------------------------------------------ data
@pytest.mark.parametrize("what", ALL)
def test_empty_data(tiny, what):
    m, X, y = tiny
    with pytest.raises(ValueError, match="empty"):
        _fit_or_eval(what, m, (X[:0], y[:0]))
    if what != "evaluate":
        with pytest.raises(ValueError, match="empty"):
            _fit_or_eval(what, m, DataLoader(TensorDataset(X[:0], y[:0]), batch_size=4))


@pytest.mark.parametrize("what", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_images(tiny, what, bad):
    m, X, y = tiny
    Xb = X.clone()
    Xb[5, 0, 2, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        _fit_or_eval(what, m, (Xb, y))
    with pytest.raises(ValueError, match="NaN or Inf"):  # streamed from a loader: found when read
        _fit_or_eval(what, m, DataLoader(TensorDataset(Xb, y), batch_size=4))


@pytest.mark.parametrize("what", ALL)
@pytest.mark.parametrize("shape", [(3, 6, 6), (1, 9, 9), (1, 6, 5)])
def test_images_that_do_not_fit_the_model(tiny, what, shape):
    m, X, y = tiny
    with pytest.raises(ValueError, match=rf"cannot process images of shape \({shape[0]}, {shape[1]}, {shape[2]}\)"):
        _fit_or_eval(what, m, (torch.rand(4, *shape), y[:4]))


@pytest.mark.parametrize("what", ALL)
@pytest.mark.parametrize("shift", [3, -5, 100])
def test_labels_out_of_range(tiny, what, shift):
    m, X, y = tiny
    bad = y.clone()
    bad[7] = 3 if shift == 3 else shift
    with pytest.raises(ValueError, match=r"labels outside \[0, 2\]"):
        _fit_or_eval(what, m, (X, bad))
    with pytest.raises(TypeError, match="integer class indices"):
        _fit_or_eval(what, m, (X, y.float()))


# ------------------------------------------------------------------------------------------ models
class _Const(nn.Module):
    """Logits that ignore the input."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.tensor([3.0, 0.0, -1.0]))

    def forward(self, x):
        return self.b.expand(x.shape[0], 3)


class _Wrap(nn.Module):
    def __init__(self, base, how):
        super().__init__()
        self.base, self.how = base, how

    def forward(self, x):
        if self.how == "detach":
            return self.base(x.detach())
        if self.how == "no_grad":
            with torch.no_grad():
                return self.base(x)
        if self.how == "round":  # differentiable almost nowhere: gradient zero everywhere
            return self.base(torch.round(x * 4) / 4)
        if self.how == "nan":
            return self.base(x) * float("nan")
        if self.how == "vector":
            return self.base(x).sum(1)
        return self.base(_OnceDifferentiable.apply(x))


class _OnceDifferentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z):
        return z * 1.0

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return g * 1.0


@pytest.mark.parametrize("what", ALL)
@pytest.mark.parametrize("how, match", [("const", "does not depend on its input"),
                                        ("detach", "does not depend on its input"),
                                        ("no_grad", "not differentiable with respect to its input"),
                                        ("round", "zero"),
                                        ("nan", "NaN or Inf logits"),
                                        ("vector", r"logits of shape \(B, K\)")])
def test_models_that_cannot_be_attacked(tiny, what, how, match):
    m, X, y = tiny
    model = _Const() if how == "const" else _Wrap(m, how)
    labels = torch.zeros_like(y) if how == "const" else y
    with pytest.raises(ValueError, match=match):
        _fit_or_eval(what, model, (X, labels))


@pytest.mark.parametrize("solver", ["grad", "pca"])
def test_model_without_second_derivative(tiny, solver):
    m, X, y = tiny
    model = _Wrap(m, "once")
    with pytest.raises(ValueError, match=r"cannot be differentiated as the attack needs \(hvp='double_backward'\)"):
        SOLVERS[solver](model).fit((X, y))
    SOLVERS[solver](model, hvp="finite_difference").fit((X, y))  # the suggested way out works
    evaluate(model, torch.zeros(1, 6, 6), (X, y))  # first order is enough to evaluate


def test_not_a_model(tiny):
    with pytest.raises(TypeError, match="model must be a callable"):
        UPIGrad("resnet18", 0.3)
    with pytest.raises(TypeError, match="model must be a callable"):
        evaluate(None, torch.zeros(1, 6, 6), tiny[1:])


# ------------------------------------------------------------------------------------------ train mode
def _bn_model_data():
    m = train_mode_model()
    g = torch.Generator().manual_seed(5)
    X = torch.rand(12, 3, 8, 8, generator=g)
    with torch.no_grad():
        y = m.eval()(X).argmax(1)
    return m.train(), X, y


def _state(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("what", ["grad", "pca", "evaluate", "saliency"])
def test_train_mode_model_is_computed_in_eval_mode_and_restored(what):
    m, X, y = _bn_model_data()
    m[3].training = False  # a mixed state must be restored exactly too
    modes = [mod.training for mod in m.modules()]
    before = _state(m)

    def run(model):
        if what == "saliency":
            return saliency(model, X, y)
        if what == "evaluate":
            return torch.tensor(list(evaluate(model, torch.full((3, 8, 8), 0.05), (X, y)).values()))
        return SOLVERS[what](model, eps=0.5, seed=1).fit((X, y)).delta_

    with pytest.warns(UserWarning, match="train mode"):
        got = run(m)
    assert [mod.training for mod in m.modules()] == modes
    after = _state(m)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)  # BN stats
    ref_model = train_mode_model().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an eval-mode model: no warning
        want = run(ref_model)
    assert torch.equal(got, want)  # dropout off, running statistics used


# ------------------------------------------------------------------------------------------ files
class _Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_perturbation_file_problems(tmp_path):
    good = tmp_path / "good.safetensors"
    save_perturbation(good, torch.rand(3, 8, 8) * 0.1, {"method": "UPI-Grad", "eps": 0.5})
    with pytest.raises(ValueError, match=r"\(3, 8, 8\), expected \(1, 8, 8\)"):
        load_perturbation(good, expected_shape=(1, 8, 8))
    raw = good.read_bytes()
    for cut in (9, len(raw) // 2, len(raw) - 1):
        (tmp_path / "cut.safetensors").write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="not a valid perturbation file"):
            load_perturbation(tmp_path / "cut.safetensors")
    (tmp_path / "pad.safetensors").write_bytes(raw + b"\0" * 8)
    with pytest.raises(ValueError, match="not a valid perturbation file"):
        load_perturbation(tmp_path / "pad.safetensors")
    half = tmp_path / "half.safetensors"  # float16 is a floating dtype: accepted, returned as float32
    from safetensors.torch import save_file
    save_file({"delta": torch.rand(3, 8, 8).half()}, str(half), metadata={"format": "upi_fast.perturbation/1"})
    assert load_perturbation(half)[0].dtype == torch.float32
    save_file({"delta": torch.ones(3, 8, 8, dtype=torch.int32)}, str(half),
              metadata={"format": "upi_fast.perturbation/1"})
    with pytest.raises(ValueError, match="floating point"):
        load_perturbation(half)
    torch.save({"delta": torch.zeros(3, 8, 8)}, tmp_path / "torch.pt")
    with pytest.raises(ValueError, match="not a valid perturbation file"):
        load_perturbation(tmp_path / "torch.pt")
    ck = tmp_path / "ckpt.safetensors"
    from upi_fast.checkpoint import save_checkpoint
    save_checkpoint(ck, {"delta": torch.zeros(3, 8, 8)}, {"step": 1})
    with pytest.raises(ValueError, match="marker"):
        load_perturbation(ck)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_perturbation(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not a regular file"):
        load_perturbation(tmp_path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch.load's note on a raw pickle
def test_malicious_pickles_execute_nothing_in_any_loader(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Payload(marker))
    assert not marker.exists()
    for name in ("p.safetensors", "p.pkl", "p.pt"):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ValueError, match="not a valid perturbation file"):
            load_perturbation(tmp_path / name)
        with pytest.raises(ValueError, match="weights"):
            load_state_dict_file(tmp_path / name)
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, tmp_path / "zip.pt")  # a torch zip archive
    with pytest.raises(ValueError, match="refusing to load weights"):
        load_state_dict_file(tmp_path / "zip.pt")
    with pytest.raises(ValueError, match="not a valid perturbation file"):
        load_perturbation(tmp_path / "zip.pt")
    (tmp_path / "ckpt-000000001.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "ckpt-000000001.safetensors")
    cifar = tmp_path / "cifar"
    cifar.mkdir()
    with open(cifar / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Payload(marker)}, f)
    from upi_fast.data import open_dataset
    with pytest.raises(ValueError, match="refusing to load global"):  # a ValueError (and an UnpicklingError)
        open_dataset(cifar)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ environment
def test_unknown_backend(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.set_backend("fast")
    monkeypatch.setattr(ops, "_state", {**ops._state, "backend": None})
    monkeypatch.setenv("UPI_FAST_BACKEND", "quantum")
    with pytest.raises(ValueError, match="UPI_FAST_BACKEND must be one of"):
        ops.get_backend()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
            ops.set_backend("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(tiny, tmp_path):
    m, X, y = tiny
    with pytest.raises(ValueError, match="CUDA is not available"):
        UPIPCA(m, 0.3, device="cuda", progress=False).fit((X, y))
    with pytest.raises(ValueError, match="CUDA is not available"):
        evaluate(m, torch.zeros(1, 6, 6), (X, y), device="cuda:1")
    data = make_image_folder(tmp_path / "imgs", per_class=2)
    with pytest.raises(ValueError, match="CUDA is not available") as info:
        compute(_config(data, tmp_path, device="cuda"))
    assert option_of(info.value) == "--device"


# ------------------------------------------------------------------------------------------ the pipeline API
def _config(data_dir, tmp_path, **kw):
    base = dict(data=str(data_dir), model="hardening_support:make_model", out=str(tmp_path / "out"), size=8, eps=0.5,
                attack_samples=3, eval_samples=3, epochs=1, batch_size=4, progress=False)
    return ComputeConfig(**{**base, **kw})


def test_pipeline_errors_are_typed_and_blame_an_option(tmp_path):
    data = make_image_folder(tmp_path / "imgs", per_class=2)
    five = make_image_folder(tmp_path / "five", classes=5, per_class=2)
    cases = [
        (dict(eps=None), ValueError, "exactly one of eps", "--eps"),
        (dict(eps=-1.0), ValueError, "eps must be > 0", "--eps"),
        (dict(norm="l1"), ValueError, "norm must be 2 or inf", "--norm"),
        (dict(method="svd"), ValueError, "method", "--method"),
        (dict(batch_size=0), ValueError, "batch_size", "--batch-size"),
        (dict(data=str(tmp_path / "nope")), FileNotFoundError, "nope", "--data"),
        (dict(model="hardening_support:grey_model"), ValueError, "cannot process images", "--model/--size"),
        (dict(data=five, attack_samples=8, eval_samples=2), ValueError, r"labels outside \[0, 2\]", "--data"),
        (dict(model="hardening_support:not_a_module"), ValueError, "not an nn.Module", "--model"),
        (dict(weights=str(tmp_path / "w.pt")), FileNotFoundError, "weights", "--weights"),
        (dict(mean=(0.5,), std=(0.0,)), ValueError, "std must be > 0", "--mean/--std"),
        (dict(attack_samples=100), ValueError, "exceeds the dataset size", "--attack-samples/--eval-samples"),
        (dict(precision="fp16"), ValueError, "needs a CUDA device", "--precision"),
        (dict(hvp="exact"), ValueError, "hvp", "--hvp"),
    ]
    for kw, exc, match, option in cases:
        with pytest.raises(exc, match=match) as info:
            compute(_config(data, tmp_path, **kw))
        assert option_of(info.value) == option, (kw, option_of(info.value))
    assert not (tmp_path / "out" / "upi.safetensors").exists()
    save_perturbation(tmp_path / "grey.safetensors", torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match=r"shape \(1, 8, 8\), expected \(3, 8, 8\)") as info:
        evaluate_file(str(tmp_path / "grey.safetensors"), data, "hardening_support:make_model", size=8,
                      log=lambda *a: None)
    assert option_of(info.value) == "perturbation"


# ------------------------------------------------------------------------------------------ zero maps
def _dead_relu_problem():
    """A ReLU model whose units are all dead on dark images (input gradient exactly zero, logits =
    the last bias: class 2) and alive on bright ones; 12 bright and 6 dark images, labelled by it."""
    g = torch.Generator().manual_seed(4)
    m = nn.Sequential(nn.Flatten(), nn.Linear(36, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        m[1].weight.copy_(torch.rand(5, 36, generator=g) / 36)
        m[1].bias.fill_(-0.3)
        m[3].weight.copy_(torch.randn(3, 5, generator=g))
        m[3].bias.copy_(torch.tensor([0.0, 0.0, 0.5]))
    X = torch.cat([0.5 + 0.5 * torch.rand(12, 1, 6, 6, generator=g), 0.1 * torch.rand(6, 1, 6, 6, generator=g)])
    X = X[torch.randperm(18, generator=g)]
    with torch.no_grad():
        y = m.eval()(X).argmax(1)
    zero = saliency(m, X, y).abs().sum(1) == 0
    assert 3 <= int(zero.sum()) <= 12
    return m, X, y, zero


@pytest.mark.numerics
@pytest.mark.parametrize("what", ["grad", "pca", "evaluate"])
def test_samples_with_a_zero_saliency_map_are_left_out(what):
    """A sample whose clean map is zero has no interpretation to attack or compare (rel_l2 would
    divide by zero): left out, like a misclassified sample; results equal those without it."""
    m, X, y, zero = _dead_relu_problem()
    # float64: the runs differ in batch composition, and a kernel's per-sample result may depend on the
    # batch size at rounding level (as float32 kernels on other CPUs do); 1e-9 is far above float64
    # rounding through this 2-layer network and far below any effect of a sample left in by mistake
    m64, X64 = m.double(), X.double()
    if what == "evaluate":
        delta = torch.full((1, 6, 6), 0.05, dtype=torch.float64)
        got, want = evaluate(m64, delta, (X64, y)), evaluate(m64, delta, (X64[~zero], y[~zero]))
        assert got.pop("n_total") == 18 and want.pop("n_total") == int((~zero).sum())
        assert got.keys() == want.keys() and got["n"] == want["n"] and math.isfinite(got["dissimilarity"])
        for key in got:
            assert math.isclose(got[key], want[key], rel_tol=1e-9, abs_tol=1e-12), (key, got[key], want[key])
    else:
        fit = lambda X_, y_: SOLVERS[what](m64, 0.5, dissimilarity="rel_l2", seed=2).fit((X_, y_))  # noqa: E731
        got, want = fit(X64, y), fit(X64[~zero], y[~zero])
        assert bool(torch.isfinite(got.delta_).all())
        assert float((got.delta_ - want.delta_).norm() / want.delta_.norm()) < 1e-9
        assert got.n_samples_ == want.n_samples_ == int((~zero).sum())
        loader = DataLoader(TensorDataset(X64, y), batch_size=8)  # streamed: filtered per batch
        assert bool(torch.isfinite(SOLVERS[what](m64, 0.5, dissimilarity="rel_l2").fit(loader).delta_).all())
    with pytest.raises(ValueError, match="input gradient is zero for every correctly classified sample|every clean "
                                         "saliency map is zero"):
        _fit_or_eval(what, m64, (X64[zero], y[zero]))
