"""Exact or refuse: hvp="auto" / "piecewise_linear" on a zoo of models built from functional and module ops.

Every model is run on a batch whose first samples (the ones the numerical spot check sees) stay away
from the model's thresholds (clamp bounds, ``where`` / ``masked_fill`` conditions, ``maximum``
constants) and whose later samples cross them. In float64 ``hvp="auto"`` must then either equal double
backward to 1e-6 (piecewise-linear models: and it must accept them) or refuse (smooth models: its
result is then double backward's, bit for bit). Plus randomly generated architectures (hypothesis),
the per-batch guard (a later batch that leaves the lists falls back), and each refusal rule.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import upi_fast as U
import upi_fast.linearization as L
import upi_fast.piecewise as P
from upi_fast.accel import FastStep
from upi_fast.hvp import SaliencySpec

F64 = torch.float64
C, S, K = 3, 8, 5  # channels, side, classes

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.numerics]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


class _Net(nn.Module):
    """conv -> body(h) -> conv -> ReLU -> global average -> linear; ``body`` is the op under test."""

    def __init__(self, body, seed: int = 0, width: int = C) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.c1 = nn.Conv2d(C, width, 3, padding=1)
        self.c2 = nn.Conv2d(width, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, K)
        self.body = body

    def forward(self, x):
        h = self.body(self.c1(x))
        h = F.adaptive_avg_pool2d(F.relu(self.c2(h)), 4)
        return self.fc(h.flatten(1))


class _Mod(nn.Module):
    """A module-op body (nn.Hardtanh, nn.LayerNorm, ...)."""

    def __init__(self, *mods) -> None:
        super().__init__()
        self.seq = nn.Sequential(*mods)

    def forward(self, h):
        return self.seq(h)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(C, 1, batch_first=True)

    def forward(self, h):
        B = h.shape[0]
        t = h.flatten(2).transpose(1, 2)
        out, _ = self.attn(t, t, t, need_weights=True)  # the math path (double backward exists for it)
        return (t + out).transpose(1, 2).reshape(B, C, S, S)


class _SDPA(nn.Module):
    def forward(self, h):
        t = h.flatten(2).transpose(1, 2)
        return F.scaled_dot_product_attention(t, t, t).transpose(1, 2).reshape(h.shape)


# body, whether it is piecewise linear (so that auto must accept it and match double backward)
T = 1.5  # threshold: the first samples' pre-activations stay inside (-T, T), the later ones cross it
ZOO = {
    "clamp": (lambda h: torch.clamp(h, -T, T), True),
    "clamp_method_min_only": (lambda h: h.clamp(min=-T), True),
    "clamp_min_max_funcs": (lambda h: torch.clamp_max(torch.clamp_min(h, -T), T), True),
    "clip_inplace": (lambda h: h.clone().clip_(-T, T), True),
    "clamp_tensor_bounds": (lambda h: torch.clamp(h, torch.full((1, C, 1, 1), -T, dtype=h.dtype),
                                                  torch.full((1, C, 1, 1), T, dtype=h.dtype)), True),
    "where": (lambda h: torch.where(h > T, 0.25 * h, h), True),
    "where_constant_branch": (lambda h: torch.where(h.abs() < T, h, torch.full_like(h, T)), True),
    "masked_fill": (lambda h: h.masked_fill(h > T, 0.5), True),
    "minimum_maximum": (lambda h: torch.minimum(torch.maximum(h, torch.tensor(-T, dtype=h.dtype)),
                                                torch.tensor(T, dtype=h.dtype)), True),
    "maximum_two_branches": (lambda h: torch.maximum(h, 0.5 * h.flip(-1) + T), True),
    "abs": (lambda h: torch.abs(h - T) + h, True),
    "hardtanh_module": (_Mod(nn.Hardtanh(-T, T)), True),
    "relu6_shifted": (lambda h: F.relu6(h + 6 - T) - 6 + T, True),
    "leaky_relu": (lambda h: F.leaky_relu(h - T, 0.2) + T, True),
    "threshold": (lambda h: F.threshold(h, T, 0.0), True),
    "prelu": (_Mod(nn.PReLU(C, 0.3)), True),
    "interpolate_bilinear": (lambda h: F.interpolate(F.interpolate(h, scale_factor=0.5, mode="bilinear"),
                                                     size=(S, S), mode="nearest").clamp(-T, T), True),
    "adaptive_pools": (lambda h: F.interpolate(F.adaptive_max_pool2d(h.clamp(max=T), 4) +
                                               F.adaptive_avg_pool2d(h, 4), size=(S, S)), True),
    "cat_split_view_permute": (lambda h: torch.cat([a.clamp(-T, T) for a in h.split([1, 2], 1)], 1)
                               .permute(0, 2, 3, 1).reshape(h.shape[0], S, S, C).permute(0, 3, 1, 2), True),
    "max_reduction_and_amax": (lambda h: h - h.amax(dim=(2, 3), keepdim=True).clamp(min=T)
                               + h.max(dim=1, keepdim=True).values.clamp(max=T), True),
    "sort_topk": (lambda h: h + h.flatten(2).topk(3, dim=-1).values.clamp(max=T).sum(-1, keepdim=True)
                  .unsqueeze(-1), True),
    "dropout_eval_and_bn": (_Mod(nn.Dropout(0.3), nn.BatchNorm2d(C).eval(), nn.Hardtanh(-T, T)), True),
    "comparison_mask_multiply": (lambda h: h * (h < T).to(h.dtype), True),
    "setitem_constant": (lambda h: _setitem(h), True),
    "silu": (lambda h: F.silu(h), False),
    "gelu_module": (_Mod(nn.GELU()), False),
    "layer_norm": (_Mod(nn.LayerNorm([C, S, S])), False),
    "attention_block": (_Attention(), False),
    "sdpa": (_SDPA(), False),
    "softmax_gate": (lambda h: h * torch.softmax(h, dim=1), False),
    "square": (lambda h: h * h, False),
    "divide_by_input": (lambda h: h / (h.abs() + 1), False),
    "tanh_after_clamp": (lambda h: torch.tanh(h.clamp(-T, T)), False),
}


def _setitem(h):
    out = h.clone()
    out[:, :1] = h[:, :1].clamp(-T, T)
    out[:, 2:] = 0.5
    return out


def _model(name: str, seed: int = 0) -> nn.Module:
    body, _ = ZOO[name]
    m = _Net(body, seed)
    if isinstance(body, nn.Module):
        m.body = body
    return m.to(F64).eval()


def _batch(model: nn.Module, n_calm: int = 2, n_cross: int = 4, seed: int = 0):
    """Inputs scaled so that the first ``n_calm`` samples' first-layer outputs lie inside (-T/2, T/2)
    and the later ones reach 3 T: the spot check sees no threshold crossed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_calm + n_cross, C, S, S, dtype=F64, generator=g)
    with torch.no_grad():
        amp = model.c1(x).abs().amax(dim=(1, 2, 3))
    target = torch.tensor([0.5 * T] * n_calm + [3 * T] * n_cross, dtype=F64)
    # c1 is affine: scale the input so that the largest |output| lands near the target
    bias = model.c1.bias.detach().abs().max()
    scale = ((target - bias).clamp_min(0.05) / (amp - bias).clamp_min(1e-6)).view(-1, 1, 1, 1)
    return x * scale


def _problem(model, seed=0):
    x = _batch(model, seed=seed)
    y = torch.arange(x.shape[0]) % K
    I_ref = U.saliency(model, x, y)
    delta = 0.05 * torch.randn(C, S, S, dtype=F64, generator=torch.Generator().manual_seed(seed + 1))
    return x, y, I_ref, delta


def _auto_vs_double_backward(model, x, y, I_ref, delta, **kw):
    want = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="double_backward", **kw)
    got = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="auto", **kw)
    accepted = P._status(model, (x + delta))[0]
    return want, got, accepted


def test_zoo_has_the_required_ops():
    assert len(ZOO) >= 20
    assert sum(pl for _, pl in ZOO.values()) >= 20 and sum(not pl for _, pl in ZOO.values()) >= 5


@pytest.mark.parametrize("name", sorted(ZOO))
def test_auto_equals_double_backward_or_refuses(name, caplog):
    model = _model(name)
    x, y, I_ref, delta = _problem(model)
    with torch.no_grad():  # the construction works: the later samples do cross T, the first ones do not
        pre = model.c1(x + delta).abs().amax(dim=(1, 2, 3))
    assert bool((pre[:2] < T).all()) and bool((pre[2:] > T).all())
    with caplog.at_level(logging.INFO, logger="upi_fast"):
        (l_want, want), (l_got, got), accepted = _auto_vs_double_backward(model, x, y, I_ref, delta)
    assert want.norm() > 0
    piecewise = ZOO[name][1]
    assert accepted == piecewise, [r.getMessage() for r in caplog.records]
    if piecewise:
        assert _rel(got, want) < 1e-6
        torch.testing.assert_close(l_got, l_want, rtol=1e-12, atol=0)
    else:
        assert torch.equal(got, want) and torch.equal(l_got, l_want)
        with pytest.raises(ValueError, match="does not apply"):
            U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="piecewise_linear")


@pytest.mark.parametrize("name", ["clamp", "where", "minimum_maximum", "abs"])
def test_fast_step_auto_is_exact_on_functional_ops(name):
    """UPIGrad(fast=True) turns double_backward into auto: the prepared step must stay exact."""
    model = _model(name)
    x, y, I_ref, delta = _problem(model)
    want = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="double_backward")[1]
    step = FastStep(model, SaliencySpec(), hvp="auto")
    got = step(x, y, I_ref, delta)[1]
    assert step.hvp_ == "piecewise_linear"
    assert _rel(got, want) < 1e-6


def test_solver_fast_path_matches_reference_trajectory_on_clamp_model():
    model = _model("clamp")
    x = _batch(model, n_calm=4, n_cross=12, seed=3)
    y = model(x).argmax(1).detach()
    kw = dict(epochs=2, batch_size=8, seed=0)
    ref = U.UPIGrad(model, 1.0, hvp="double_backward", **kw).fit((x, y))
    fast = U.UPIGrad(model, 1.0, hvp="double_backward", fast=True, **kw).fit((x, y))
    assert _rel(fast.delta_, ref.delta_) < 1e-6


class _Branchy(nn.Module):
    """Piecewise linear on calm batches; a batch with a large input takes a smooth branch."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _Net(lambda h: h.clamp(-T, T))

    def forward(self, x):
        h = self.inner.c1(x)
        if bool((h.abs() > 4 * T).any()):  # a piecewise-constant test, replayed in the tangent pass
            h = torch.tanh(h)
        h = F.adaptive_avg_pool2d(F.relu(self.inner.c2(h.clamp(-T, T))), 4)
        return self.inner.fc(h.flatten(1))


def test_a_later_batch_that_leaves_the_lists_falls_back(caplog):
    model = _Branchy().to(F64).eval()
    x = torch.randn(6, C, S, S, dtype=F64, generator=torch.Generator().manual_seed(0)) * 0.05
    y = torch.arange(6) % K
    I_ref = U.saliency(model, x, y)
    delta = 0.01 * torch.randn(C, S, S, dtype=F64, generator=torch.Generator().manual_seed(1))
    want = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="double_backward")[1]
    got = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="auto")[1]
    assert P._status(model, x)[0] and _rel(got, want) < 1e-6  # calm batch: the fast exact mode
    big = x * 400
    I_big = U.saliency(model, big, y)
    want = U.saliency_loss_grad(model, big, y, I_big, delta, hvp="double_backward")[1]
    with pytest.raises(ValueError, match="on this batch.*torch.tanh"):
        U.saliency_loss_grad(model, big, y, I_big, delta, hvp="piecewise_linear")
    with caplog.at_level(logging.INFO, logger="upi_fast"):
        got = U.saliency_loss_grad(model, big, y, I_big, delta, hvp="auto")[1]
    assert torch.equal(got, want)
    assert any("falling back" in r.getMessage() and "torch.tanh" in r.getMessage() for r in caplog.records)
    assert P.resolve_hvp(model, big, SaliencySpec(), "auto") == "double_backward"  # marked refused


class _Straight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h):
        return h.clamp(-T, T)

    @staticmethod
    def backward(ctx, g):  # straight-through: not the derivative of the forward
        return g


class _Noise(nn.Module):
    def forward(self, h):
        return h + 0.01 * torch.randn_like(h)


def _refusal_cases():
    return {
        "custom autograd Function": (lambda h: _Straight.apply(h), "custom autograd Function _Straight"),
        "random draw": (_Noise(), "draws random numbers"),
        "detach": (lambda h: h + (h.clamp(-T, T) - h).detach(), "out of autograd's sight"),
        "item": (lambda h: h * float(h.amax().item()), "out of autograd's sight"),
        "in-place write into a constant": (lambda h: torch.zeros_like(h).add_(h), "into a constant tensor"),
        "setitem into a constant": (lambda h: _setitem_const(h), "into a constant tensor"),
        "dropout in train mode": (lambda h: F.dropout(h, 0.1, training=True), "training mode"),
        "product of two tracked": (lambda h: torch.matmul(h, h.transpose(-1, -2)), "both depend on the input"),
        "tracked sampling grid": (lambda h: F.grid_sample(h, h[:, :2].permute(0, 2, 3, 1).clamp(-1, 1),
                                                          align_corners=False), "sampling grid must be constant"),
    }


def _setitem_const(h):
    out = torch.zeros_like(h)
    out[:, :1] = h[:, :1]
    return out


@pytest.mark.parametrize("case", sorted(_refusal_cases()))
def test_each_refusal_rule(case):
    body, match = _refusal_cases()[case]
    model = _Net(body).to(F64).eval()
    if isinstance(body, nn.Module):
        model.body = body
    x = torch.randn(3, C, S, S, dtype=F64)
    with pytest.raises(L.NotPiecewiseLinearError, match=match):
        L.Linearization(model, x)
    assert P.check_piecewise_linear(model, x, raise_error=False) is False


def test_refusal_names_the_module():
    model = _model("layer_norm")
    with pytest.raises(L.NotPiecewiseLinearError, match=r"in module 'body.seq.0' \(LayerNorm\).*layer_norm"):
        L.Linearization(model, torch.randn(2, C, S, S, dtype=F64))


def test_register_linear_function_accepts_a_declared_relayout():
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, h):
            return 2 * h

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    model = _Net(lambda h: Scale.apply(h).clamp(-T, T)).to(F64).eval()
    x, y, I_ref, delta = _problem(model)
    with pytest.raises(L.NotPiecewiseLinearError, match="Scale"):
        L.Linearization(model, x)
    L.register_linear_function(Scale)
    try:
        want = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="double_backward")[1]
        got = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="piecewise_linear")[1]
        assert _rel(got, want) < 1e-6
    finally:
        L.LINEAR_FUNCTIONS.discard(Scale)


# ------------------------------------------------------------------------------------------------
# Randomly generated architectures
# ------------------------------------------------------------------------------------------------

_PL_BLOCKS = {
    "conv": lambda m: (lambda h: m.conv(h)),
    "relu": lambda m: F.relu,
    "leaky": lambda m: (lambda h: F.leaky_relu(h, 0.1)),
    "clamp": lambda m: (lambda h: h.clamp(-T, T)),
    "hardtanh": lambda m: (lambda h: F.hardtanh(h, -T, T)),
    "abs": lambda m: (lambda h: h.abs() - 0.5 * h),
    "maximum": lambda m: (lambda h: torch.maximum(h, -h.roll(1, -1))),
    "where": lambda m: (lambda h: torch.where(h > 0.3, h, 0.1 * h)),
    "masked_fill": lambda m: (lambda h: h.masked_fill(h < -T, 0.0)),
    "residual": lambda m: (lambda h: h + m.conv(F.relu(h))),
    "cat_conv": lambda m: (lambda h: m.mix(torch.cat([h, -h.clamp(max=T)], 1))),
    "pool_up": lambda m: (lambda h: F.interpolate(F.max_pool2d(h, 2), scale_factor=2.0, mode="nearest")),
    "avg_up": lambda m: (lambda h: F.interpolate(F.avg_pool2d(h, 2), size=(S, S), mode="bilinear",
                                                 align_corners=False)),
    "permute": lambda m: (lambda h: h.permute(0, 3, 2, 1).contiguous().permute(0, 3, 2, 1)),
    "dropout_eval": lambda m: (lambda h: F.dropout(h, 0.5, training=False)),
    "amax": lambda m: (lambda h: h - h.amax(1, keepdim=True).clamp(min=0)),
}
_SMOOTH_BLOCKS = {
    "silu": lambda m: F.silu,
    "gelu": lambda m: F.gelu,
    "tanh": lambda m: torch.tanh,
    "layer_norm": lambda m: (lambda h: F.layer_norm(h, h.shape[1:])),
    "sigmoid_gate": lambda m: (lambda h: h * torch.sigmoid(h)),
    "square": lambda m: (lambda h: h * h / 4),
}
_BLOCKS = {**_PL_BLOCKS, **_SMOOTH_BLOCKS}


class _Random(nn.Module):
    def __init__(self, names: list[str], seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(C, C, 3, padding=1)
        self.mix = nn.Conv2d(2 * C, C, 1)
        self.inner = _Net(lambda h: h, seed)
        self.blocks = [_BLOCKS[n](self) for n in names]

    def forward(self, x):
        h = self.inner.c1(x)
        for b in self.blocks:
            h = b(h)
        return self.inner.fc(F.adaptive_avg_pool2d(F.relu(self.inner.c2(h)), 4).flatten(1))


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(names=st.lists(st.sampled_from(sorted(_BLOCKS)), min_size=1, max_size=6), seed=st.integers(0, 1000))
def test_random_architectures_auto_equals_double_backward_or_refuses(names, seed):
    model = _Random(names, seed).to(F64).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, C, S, S, dtype=F64, generator=g)
    x[2:] *= 4  # the later samples reach the thresholds more often
    y = torch.arange(5) % K
    I_ref = U.saliency(model, x, y)
    delta = 0.05 * torch.randn(C, S, S, dtype=F64, generator=g)
    (l_want, want), (l_got, got), accepted = _auto_vs_double_backward(model, x, y, I_ref, delta)
    piecewise = all(n in _PL_BLOCKS for n in names)
    if not want.norm() > 0:
        return  # every sample's map is zero here (e.g. every unit switched off): nothing to compare
    assert accepted == piecewise, names
    if piecewise:
        assert _rel(got, want) < 1e-6, names
    else:
        assert torch.equal(got, want), names


@pytest.mark.parametrize("channels_last", [False, True])
def test_prepared_resnet_step_is_proved_in_both_layouts(channels_last):
    """The prepared ResNet-18 (BatchNorm folded, NHWC max pooling, optionally channels_last) stays on
    the lists: every graph node of its relayouts is known, so auto keeps the exact two-pass mode."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=K).to(F64).eval()
    x = torch.rand(2, 3, 64, 64, dtype=F64)
    y = torch.tensor([1, 3])
    I_ref = U.saliency(model, x, y)
    delta = 0.01 * torch.randn(3, 64, 64, dtype=F64)
    want = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="double_backward")[1]
    step = FastStep(model, SaliencySpec(), hvp="auto", channels_last=channels_last)
    got = step(x, y, I_ref, delta)[1]
    assert step.hvp_ == "piecewise_linear", step.notes_
    assert _rel(got, want) < 1e-6
