"""Grad x Input (``method="grad_x_input"``), the registry's worked example: its maps against a float64
autograd reference and captum's ``InputXGradient``, and every HVP mode's gradient against double
backward (``piecewise_linear`` on a ReLU model)."""
import pytest
import torch
from torch import nn

import upi_fast as U
from upi_fast.methods import METHODS, get
from upi_fast.saliency import METHODS as SALIENCY_METHODS
from upi_fast.saliency import postprocess_maps, raw_gradient

F64 = torch.float64


def _cnn(act, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), act(), nn.Conv2d(4, 4, 3, stride=2), act(), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 5)).to(F64).eval()


def _data(seed=1, B=4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 2, 7, 7, generator=g, dtype=F64), torch.tensor([0, 1, 2, 3, 4, 0][:B])


def _reference(model, x, y, baseline=None, target_kind="prob"):
    xr = x.clone().requires_grad_(True)
    z = model(xr)
    t = torch.softmax(z, 1) if target_kind == "prob" else z
    (g,) = torch.autograd.grad(t.gather(1, y.view(-1, 1)).sum(), xr)
    b = torch.zeros_like(x) if baseline is None else torch.broadcast_to(torch.as_tensor(baseline, dtype=F64), x.shape)
    return (x - b) * g


def test_registered_and_listed():
    assert "grad_x_input" in METHODS and METHODS == SALIENCY_METHODS
    m = get("grad_x_input")
    assert m.multiplies_input and m.single_point and not m.stochastic


@pytest.mark.parametrize("target_kind", ["prob", "logit"])
@pytest.mark.parametrize("baseline", [None, 0.25])
def test_maps_match_float64_autograd(target_kind, baseline):
    model = _cnn(nn.Tanh)
    x, y = _data()
    want = _reference(model, x, y, baseline, target_kind)
    got = raw_gradient(model, x, y, "grad_x_input", target_kind, baseline=baseline)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    maps = U.saliency(model, x, y, method="grad_x_input", target_kind=target_kind, baseline=baseline)
    torch.testing.assert_close(maps, postprocess_maps(want), rtol=1e-12, atol=1e-14)
    # the same as the simple gradient with multiply_by_input
    torch.testing.assert_close(got, raw_gradient(model, x, y, "simple", target_kind, baseline=baseline,
                                                 multiply_by_input=True), rtol=0, atol=0)


def test_maps_match_captum_input_x_gradient():
    captum = pytest.importorskip("captum.attr")
    model = _cnn(nn.Tanh)
    x, y = _data()
    want = captum.InputXGradient(model).attribute(x.clone().requires_grad_(True), target=y)
    got = raw_gradient(model, x, y, "grad_x_input", "logit")
    torch.testing.assert_close(got, want.detach(), rtol=1e-10, atol=1e-12)


def _problem(model, B=4):
    x, y = _data(B=B)
    I_ref = U.saliency(model, x, y, method="grad_x_input")
    delta = 0.05 * torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(3), dtype=F64)
    return x, y, I_ref, delta


@pytest.mark.parametrize("hvp,act,rtol", [("forward", nn.Tanh, 1e-9), ("finite_difference", nn.Tanh, 1e-3),
                                          ("finite_difference_onesided", nn.Tanh, 3e-2),
                                          ("piecewise_linear", nn.ReLU, 1e-9), ("auto", nn.ReLU, 1e-9)])
def test_every_hvp_mode_matches_double_backward(hvp, act, rtol):
    model = _cnn(act)
    x, y, I_ref, delta = _problem(model)
    kw = dict(method="grad_x_input", fd_step=1e-4)
    loss0, want = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="double_backward", **kw)
    loss, got = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp=hvp, **kw)
    assert want.norm() > 0
    torch.testing.assert_close(loss, loss0, rtol=1e-12, atol=1e-14)
    assert float((got - want).norm() / want.norm()) < rtol


def test_fast_step_runs_the_reference_for_it():
    from upi_fast.accel import FastStep
    from upi_fast.hvp import SaliencySpec
    x, y, I_ref, delta = (t.float() if t.is_floating_point() else t for t in _problem(_cnn(nn.ReLU)))
    model = _cnn(nn.ReLU).float()
    spec = SaliencySpec(method="grad_x_input")
    want = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="double_backward", method="grad_x_input")[1]
    got = FastStep(model, spec, hvp="double_backward")(x, y, I_ref, delta)[1]
    assert float((got - want).norm() / want.norm()) < 1e-4
