"""hvp="piecewise_linear": exact two-pass HVPs for piecewise-linear networks, and hvp="auto"."""
import logging
import re

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import upi_fast as U
import upi_fast.linearization as L
import upi_fast.piecewise as P
from upi_fast.hvp import SaliencySpec

from _models import relu_cnn

F64 = torch.float64


pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.numerics]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm statistics and affine parameters (so that BN scales and shifts matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                C = m.num_features
                m.running_mean.copy_(0.3 * torch.randn(C, generator=g))
                m.running_var.copy_(0.4 + torch.rand(C, generator=g))
                m.weight.copy_(0.5 + torch.rand(C, generator=g))
                m.bias.copy_(0.3 * torch.randn(C, generator=g))
    return model


def _bn_pool_cnn(seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU-MaxPool, Conv-BN-LeakyReLU-MaxPool(stride 1, padding), ReLU6 and AvgPool."""
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"), nn.BatchNorm2d(8), nn.LeakyReLU(0.1),
        nn.MaxPool2d(3, stride=1, padding=1), nn.ReLU6(), nn.AvgPool2d(2), nn.Dropout(0.5),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 12), nn.Hardtanh(-0.5, 0.7), nn.Linear(12, 5),
    )
    return _randomise(m, seed).to(F64).eval()


class _FunctionalNet(nn.Module):
    """ReLUs (function and method), max-pooling and a residual addition as functional calls in forward."""

    def __init__(self, inner=F.relu) -> None:
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4 * 4 * 4, 5)
        self.inner = inner

    def forward(self, x):
        h = F.max_pool2d(torch.relu(self.c1(x)), 2)
        h = h + self.inner(self.c2(h))
        h = F.adaptive_max_pool2d(self.c3(h).relu(), 4)
        return self.fc(h.flatten(1))


class _Constants(nn.Module):
    """An input normalisation ``(x - mean) / std`` and other constants mixed with the input: a
    constant channel concatenated, ``1 - x``, ``+ 0.5``, ``where`` with a constant branch, and a
    ReLU applied to a parameter (a constant branch of the graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4, -0.2]).view(1, 2, 1, 1))
        self.register_buffer("std", torch.tensor([0.5, 2.0]).view(1, 2, 1, 1))
        self.register_buffer("plane", torch.randn(1, 1, 8, 8))
        self.scale = nn.Parameter(0.5 + torch.rand(3, 1, 1))
        self.shift = nn.Parameter(torch.tensor([-1.0, 0.5, 2.0]).view(3, 1, 1))
        self.net = _bn_pool_cnn(seed=4).float()
        self.net[0] = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x):
        h = (x - self.mean) / self.std
        h = torch.cat([1 - h, self.plane.expand(h.shape[0], 1, 8, 8)], 1) * self.scale + F.relu(self.shift)
        h = torch.where(self.plane > 0, h, self.plane) + 0.5
        return self.net(h)


def _problem(model, shape, labels, seed=0, delta_scale=0.2, **sal):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), *shape, dtype=F64, generator=g)
    y = torch.tensor(labels)
    I_ref = U.saliency(model, x, y, **sal)
    delta = delta_scale * torch.randn(*shape, dtype=F64, generator=g)
    return x, y, I_ref, delta


def _both(model, x, y, I_ref, delta, **kw):
    want = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="double_backward", **kw)
    got = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="piecewise_linear", **kw)
    return want, got


@pytest.mark.parametrize("arch", ["resnet18", "vgg11", "mobilenet_v2"])
def test_matches_double_backward_on_torchvision_models(arch):
    torch.manual_seed(0)
    model = _randomise(getattr(torchvision.models, arch)(weights=None, num_classes=10), seed=1).to(F64).eval()
    x, y, I_ref, delta = _problem(model, (3, 32, 32), [1, 5, 7], delta_scale=0.1)
    assert P.check_piecewise_linear(model, x, y, n_check=1)  # what a solver does once per fit (cached)
    (l_want, want), (l_got, got) = _both(model, x, y, I_ref, delta)
    assert _rel(got, want) < 1e-6
    torch.testing.assert_close(l_got, l_want)


@pytest.mark.parametrize("factory,shape", [(_bn_pool_cnn, (2, 8, 8)), (_FunctionalNet, (1, 8, 8)),
                                           (lambda: relu_cnn(), (1, 8, 8)), (_Constants, (2, 8, 8))])
@pytest.mark.parametrize("kw", [dict(), dict(dissimilarity="cosine"),
                                dict(method="integrated", steps=4, multiply_by_input=True, baseline=-0.1),
                                dict(method="smoothgrad", smoothgrad_std=0.3, n_samples=3),
                                dict(multiply_by_input=True, dissimilarity="topk", k=9)])
def test_matches_double_backward_on_small_cnns(factory, shape, kw):
    model = factory().to(F64).eval()
    sal = {k: v for k, v in kw.items() if k in ("method", "steps", "multiply_by_input", "baseline")}
    if "smoothgrad_std" in kw:
        sal.update(method="smoothgrad", noise_std=kw["smoothgrad_std"], n_samples=kw["n_samples"],
                   generator=torch.Generator().manual_seed(3))
    x, y, I_ref, delta = _problem(model, shape, [0, 3, 4, 1], **sal)
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731  (same smoothgrad and Z draws for both)
    want = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="double_backward", generator=gen(), noise_std=0.05,
                                **kw)
    got = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="piecewise_linear", generator=gen(), noise_std=0.05,
                               **kw)
    assert want[1].norm() > 0
    assert _rel(got[1], want[1]) < 1e-6
    torch.testing.assert_close(got[0], want[0])


def test_per_sample_delta_and_auto_picks_piecewise(caplog):
    model = _bn_pool_cnn(seed=2)
    x, y, I_ref, _ = _problem(model, (2, 8, 8), [4, 3, 2])
    delta = 0.2 * torch.randn(3, 2, 8, 8, dtype=F64)
    want = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="double_backward")[1]
    with caplog.at_level(logging.INFO, logger="upi_fast"):
        got = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="auto")[1]
    assert got.shape == delta.shape and _rel(got, want) < 1e-6
    assert any("using hvp='piecewise_linear'" in r.getMessage() for r in caplog.records)
    assert P.resolve_hvp(model, x, SaliencySpec(), "auto") == "piecewise_linear"


def test_linearization_jvp_and_vjp_match_autograd():
    model = _bn_pool_cnn(seed=3)
    x = torch.randn(5, 2, 8, 8, dtype=F64)
    u = torch.randn_like(x)
    u0 = u.clone()
    lin = P.Linearization(model, x)
    torch.testing.assert_close(lin.logits, model(x).detach())
    want_ju = torch.func.jvp(model, (x,), (u,))[1]
    torch.testing.assert_close(lin.jvp(u), want_ju, rtol=1e-10, atol=1e-12)
    assert torch.equal(u, u0)  # the tangent is not modified in place
    v = torch.randn(5, 5, dtype=F64)
    xr = x.clone().requires_grad_(True)
    (want_jtv,) = torch.autograd.grad(model(xr), xr, v)
    torch.testing.assert_close(lin.vjp(v, retain_graph=False), want_jtv)
    with pytest.raises(RuntimeError, match="released"):
        lin.jvp(u)


class _Smooth(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), act, nn.Flatten(), nn.Linear(4 * 8 * 8, 5))

    def forward(self, x):
        return self.net(x)


class _HiddenTanh(nn.Module):
    """Only piecewise-linear modules, but forward calls torch.tanh: invisible to module inspection."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.relu, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Linear(4 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(torch.tanh(self.relu(self.conv(x))).flatten(1))


@pytest.mark.parametrize("make,match", [(lambda: _Smooth(nn.GELU()), r"\(GELU\).*gelu is not on the list"),
                                        (lambda: _Smooth(nn.Softplus()), r"\(Softplus\).*softplus"),
                                        (_HiddenTanh, r"\(_HiddenTanh\): torch.tanh is not on the list"),
                                        (lambda: _FunctionalNet(inner=torch.sigmoid),
                                         r"\(_FunctionalNet\): torch.sigmoid is not on the list")])
def test_non_piecewise_linear_models_are_refused_or_fall_back(make, match, caplog):
    model = make().to(F64).eval()
    x, y, I_ref, delta = _problem(model, (1, 8, 8), [0, 2, 4])
    with pytest.raises(ValueError, match=match):
        U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="piecewise_linear")
    with pytest.raises(ValueError, match=match):
        P.check_piecewise_linear(model, x)
    assert P.check_piecewise_linear(model, x, raise_error=False) is False
    want = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="double_backward")
    with caplog.at_level(logging.INFO, logger="upi_fast"):
        got = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="auto")
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    msgs = [r.getMessage() for r in caplog.records if r.name == "upi_fast" and r.levelno == logging.INFO]
    assert any("falling back to hvp='double_backward'" in m and re.search(match, m) for m in msgs), msgs


def test_logit_target_is_refused_and_auto_uses_finite_difference(caplog):
    model = relu_cnn(seed=4)
    x, y, I_ref, delta = _problem(model, (1, 8, 8), [0, 1, 2], target_kind="logit")
    for call in (lambda: U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="piecewise_linear", target_kind="logit"),
                 lambda: P.check_piecewise_linear(model, x, spec=SaliencySpec(target_kind="logit"))):
        with pytest.raises(ValueError, match="exact Hessian is zero") as err:
            call()
        assert "softplus_surrogate" in str(err.value) and "finite_difference" in str(err.value)
    want = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="finite_difference", target_kind="logit")
    with caplog.at_level(logging.INFO, logger="upi_fast"):
        got = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="auto", target_kind="logit")
    assert got[1].norm() > 0 and torch.equal(got[1], want[1])
    assert any("using hvp='finite_difference'" in r.getMessage() for r in caplog.records)


def test_confirmation_is_cached_per_model_and_structure(monkeypatch):
    calls = []
    confirm = P._confirm
    monkeypatch.setattr(P, "_confirm", lambda *a: calls.append(1) or confirm(*a))
    model = relu_cnn(seed=5)
    x, y, I_ref, delta = _problem(model, (1, 8, 8), [0, 1, 2])
    for _ in range(3):
        U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="piecewise_linear")
    assert len(calls) == 1
    U.saliency_loss_grad(model.float(), x.float(), y, I_ref.float(), delta.float(), hvp="piecewise_linear")
    assert len(calls) == 2  # new dtype
    assert P.check_piecewise_linear(model, x.float(), y)  # a fit's explicit re-check
    assert len(calls) == 3
    with U.softplus_surrogate(model):  # modules swapped: the structure changed, checked anew and refused
        with pytest.raises(ValueError, match="SoftplusSurrogate"):
            U.saliency_loss_grad(model, x.float(), y, I_ref.float(), delta.float(), hvp="piecewise_linear")
    assert len(calls) == 4
    U.saliency_loss_grad(model, x.float(), y, I_ref.float(), delta.float(), hvp="piecewise_linear")
    assert len(calls) == 4  # the original structure's verdict is still cached


def test_batch_statistics_and_bad_arguments_are_refused():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, track_running_stats=False), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 6 * 6, 4)).to(F64).eval()
    x = torch.randn(2, 1, 8, 8, dtype=F64)
    with pytest.raises(ValueError, match="batch statistics"):
        P.check_piecewise_linear(model, x)
    with pytest.raises(ValueError, match="target"):
        P.check_piecewise_linear(relu_cnn(), torch.randn(2, 1, 8, 8, dtype=F64), torch.tensor([0, 7]))
    with pytest.raises(TypeError, match="n_check"):
        P.check_piecewise_linear(relu_cnn(), x, n_check=1.5)
    with pytest.raises(TypeError, match="cls"):
        L.register_linear_function(int)
