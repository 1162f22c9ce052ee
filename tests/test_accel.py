"""upi_fast.accel: every fast path computes the reference mode's gradient.

Exact paths (prepared models, layouts, static batches, kernel rewrites) agree with
:func:`upi_fast.saliency_loss_grad` on the unprepared model to float32 rounding (``F32_STEP``,
derived in tests/_tolerance.py: ~4e-5 relative; measured <= 3e-6 with AVX-512 or scalar kernels); compiled
steps agree with the same step uncompiled to 1e-5 (float64, where the finite-difference division by
the step does not amplify rounding); bf16 is checked for what it is: close, not exact.
"""
import copy

import pytest
import torch
from torch import nn

import upi_fast as U
from upi_fast.accel import (COMPILABLE_MODES, ChannelsLastMaxPool, FastStep, SpaceToDepthConv2d, autotune_step,
                            fast_step, fold_batchnorm, prepare_model)
from upi_fast.hvp import SaliencySpec

from _tolerance import f32_rtol

# float results compared between code paths: rerun by .ci/run with other CPU kernels forced
pytestmark = pytest.mark.numerics

# float32 rounding of _bn_cnn, both sides float32 (pair), norm-wise: its reductions (stem 3*5*5,
# c1 and c2 8*3*3, fc 8*4*3, out 12 terms) once for a forward pass (F32_FORWARD), four times for a
# saliency-loss gradient (forward, backward to the map, and the two passes of the HVP: F32_STEP).
# Finite differences (step 1e-2 of the input norm) divide the map's rounding by the step, but the
# map's error relative to the change is still inside: measured 4e-7 against 3e-6 for exact modes.
_BN_CNN_TERMS = (75, 72, 72, 96, 12)
F32_FORWARD = f32_rtol(_BN_CNN_TERMS, depth=1, pair=True, normwise=True)  # 9e-6
F32_STEP = f32_rtol(_BN_CNN_TERMS, depth=4, pair=True, normwise=True)  # 3.7e-5
EXACT_MODES = ("double_backward", "piecewise_linear", "forward")
ALL_MODES = EXACT_MODES + ("finite_difference", "finite_difference_onesided")


def _bn_cnn(dtype=torch.float32, seed=0) -> nn.Module:
    """A small ResNet-like ReLU CNN: strided 3-channel stem + BatchNorm, max pool, a residual block,
    BatchNorm after a linear layer; random running statistics (eval mode)."""
    torch.manual_seed(seed)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 5, stride=2, padding=2, bias=False)
            self.bn0 = nn.BatchNorm2d(8)
            self.pool = nn.MaxPool2d(3, 2, 1)
            self.c1 = nn.Conv2d(8, 8, 3, padding=1)
            self.bn1 = nn.BatchNorm2d(8)
            self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(8)
            self.fc = nn.Linear(8 * 4 * 3, 12)
            self.bnf = nn.BatchNorm1d(12)
            self.out = nn.Linear(12, 5)

        def forward(self, x):
            h = self.pool(torch.relu(self.bn0(self.stem(x))))
            r = torch.relu(self.bn1(self.c1(h)))
            h = torch.relu(h + self.bn2(self.c2(r)))
            h = torch.relu(self.bnf(self.fc(torch.flatten(h, 1))))
            return self.out(h)

    m = Net()
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.running_mean.uniform_(-0.3, 0.3)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m.to(dtype).eval()


def _problem(model, shape=(3, 15, 11), batch=5, classes=5, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *shape, generator=g).to(dtype)
    y = torch.randint(0, classes, (batch,), generator=g)
    delta = (0.1 * torch.randn(*shape, generator=g)).to(dtype)
    return x, y, U.saliency(model, x, y), delta


def _rel(a, b) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def test_fold_batchnorm_same_function_and_caller_untouched():
    m = _bn_cnn()
    before = copy.deepcopy(m.state_dict())
    folded, n = fold_batchnorm(m)
    assert n == 4  # bn0, bn1, bn2 after convs, bnf after the linear layer
    assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in folded.modules())
    x = torch.randn(4, 3, 15, 11)
    with torch.no_grad():
        assert _rel(folded(x), m(x)) < F32_FORWARD
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    # nothing foldable / not traceable: an unchanged copy
    plain = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    plain(torch.zeros(1, 1, 6, 6))
    copy_, n0 = fold_batchnorm(plain)
    assert n0 == 0 and copy_ is not plain
    with pytest.raises(TypeError, match="model"):
        fold_batchnorm(lambda x: x)


def test_train_mode_batchnorm_is_not_folded():
    m = _bn_cnn()
    m.bn1.train()
    folded, n = fold_batchnorm(m)
    assert n == 3
    assert isinstance(folded.get_submodule("bn1"), nn.BatchNorm2d)


@pytest.mark.parametrize("stride,k,pad,size", [(2, 7, 3, (17, 13)), (2, 5, 2, (16, 16)), (3, 4, 1, (11, 14)),
                                               (2, 3, 0, (9, 10))])
def test_space_to_depth_conv_equals_conv(stride, k, pad, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, k, stride=stride, padding=pad).double()
    s2d = SpaceToDepthConv2d(conv)
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    out, ref = s2d(x), conv(x)
    assert out.shape == ref.shape
    assert _rel(out, ref) < 1e-12
    go = torch.randn_like(ref)
    (g1,) = torch.autograd.grad(out, x, go)
    (g2,) = torch.autograd.grad(ref, x, go)
    assert _rel(g1, g2) < 1e-12
    assert not SpaceToDepthConv2d.applies(nn.Conv2d(3, 6, 3, stride=1))
    assert not SpaceToDepthConv2d.applies(nn.Conv2d(16, 6, 3, stride=2))
    with pytest.raises(ValueError, match="conv"):
        SpaceToDepthConv2d(nn.Conv2d(3, 6, 3, stride=1))


def test_channels_last_max_pool_equals_pool_and_its_gradient():
    pool = nn.MaxPool2d(3, 2, 1)
    wrapped = ChannelsLastMaxPool(pool)
    x = torch.randn(2, 4, 9, 8, requires_grad=True)
    out = wrapped(x)
    assert out.is_contiguous() and torch.equal(out, pool(x))
    go = torch.randn_like(out)
    (g1,) = torch.autograd.grad(out, x, go)
    (g2,) = torch.autograd.grad(pool(x), x, go)
    assert g1.is_contiguous() and torch.equal(g1, g2)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_fast_step_matches_reference_mode(mode):
    m = _bn_cnn()
    x, y, I_ref, delta = _problem(m)
    ref_loss, ref_grad = U.saliency_loss_grad(m, x, y, I_ref, delta, hvp=mode)
    variants = [dict(), dict(channels_last=True), dict(static_batch=2), dict(static_batch=8),
                dict(prepare=False), dict(fold_bn=False, stem_space_to_depth=False, pool_channels_last=False)]
    if mode == "forward":  # the slowest mode (torch.func transforms): the layout and batching variants only
        variants = variants[1:3]
    for kw in variants:
        step = FastStep(m, hvp=mode, **kw)
        loss, grad = step(x, y, I_ref, delta)
        assert step.hvp_ == mode
        assert grad.shape == delta.shape and grad.dtype == torch.float32
        assert _rel(grad, ref_grad) < F32_STEP, (mode, kw)
        # the loss: a forward pass, the map's normalisation and the l2 distance (165 pixels)
        assert float((loss - ref_loss).abs().max()) <= f32_rtol([*_BN_CNN_TERMS, 165, 165], pair=True) * float(
            ref_loss.abs().max()), (mode, kw)
        assert step.setup_time_s_ is not None and step.setup_time_s_ >= 0
    # per-sample perturbations, as UPI-PCA's directions
    per = delta.expand(x.shape[0], *delta.shape).contiguous() + 0.01 * torch.randn(x.shape[0], *delta.shape)
    _, ref_per = U.saliency_loss_grad(m, x, y, I_ref, per, hvp=mode)
    _, got = FastStep(m, hvp=mode, static_batch=2)(x, y, I_ref, per)
    assert got.shape == per.shape and _rel(got, ref_per) < F32_STEP


def test_fast_step_auto_resolves_and_caller_model_untouched():
    m = _bn_cnn()
    state = copy.deepcopy(m.state_dict())
    x, y, I_ref, delta = _problem(m)
    step = fast_step(m)
    _, grad = step(x, y, I_ref, delta)
    assert step.hvp_ == "piecewise_linear"
    _, ref = U.saliency_loss_grad(m, x, y, I_ref, delta, hvp="double_backward")
    assert _rel(grad, ref) < F32_STEP
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    assert all(p.requires_grad for p in m.parameters())
    assert not any(p.requires_grad for p in step.model_.parameters())


def test_fast_step_non_lean_specs_use_the_reference_code():
    m = _bn_cnn()
    x, y, _, delta = _problem(m)
    for spec in (SaliencySpec(method="integrated", steps=3), SaliencySpec(postprocess="raw"),
                 SaliencySpec(multiply_by_input=True, dissimilarity="cosine")):
        I_ref = U.saliency(m, x, y, method=spec.method, postprocess=spec.postprocess, steps=spec.steps,
                           multiply_by_input=spec.multiply_by_input)
        ref = U.saliency_loss_grad(m, x, y, I_ref, delta, dissimilarity=spec.dissimilarity, hvp="piecewise_linear",
                                   method=spec.method, postprocess=spec.postprocess, steps=spec.steps,
                                   multiply_by_input=spec.multiply_by_input)[1]
        got = FastStep(m, spec, hvp="piecewise_linear")(x, y, I_ref, delta)[1]
        assert _rel(got, ref) < (3 if spec.method == "integrated" else 1) * F32_STEP  # 3 gradient points
    # smoothgrad: the draws come from the caller's generator, as the solvers pass it
    I_ref = U.saliency(m, x, y)
    ref = U.saliency_loss_grad(m, x, y, I_ref, delta, hvp="piecewise_linear", method="smoothgrad",
                               smoothgrad_std=0.1, n_samples=2, generator=torch.Generator().manual_seed(5))[1]
    step = FastStep(m, SaliencySpec(method="smoothgrad", smoothgrad_std=0.1, n_samples=2), hvp="piecewise_linear")
    got = step(x, y, I_ref, delta, generator=torch.Generator().manual_seed(5))[1]
    assert _rel(got, ref) < 2 * F32_STEP  # 2 noisy samples


def test_compiled_first_order_step_equals_uncompiled():
    """One compilation (inductor, a few seconds): both first-order modes run on the compiled model."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).double().eval()
    x, y, I_ref, delta = _problem(m, shape=(1, 8, 8), batch=6, dtype=torch.float64)
    comp = FastStep(m, hvp="finite_difference_onesided", compile=True, static_batch=4)
    got = comp(x, y, I_ref, delta)
    assert comp.setup_time_s_ > 0 and comp.static_batch == 4
    for mode in COMPILABLE_MODES:
        comp.hvp_ = mode  # the same compiled model serves both first-order modes
        got = comp(x, y, I_ref, delta)
        plain = FastStep(m, hvp=mode, static_batch=4)(x, y, I_ref, delta)
        ref = U.saliency_loss_grad(m, x, y, I_ref, delta, hvp=mode)
        assert _rel(got[1], plain[1]) < 1e-5 and _rel(plain[1], ref[1]) < 1e-9
        assert float((got[0] - plain[0]).abs().max()) < 1e-7


def test_bf16_step_is_close_not_exact():
    m = _bn_cnn()
    x, y, I_ref, delta = _problem(m, batch=8)
    _, ref = U.saliency_loss_grad(m, x, y, I_ref, delta, hvp="piecewise_linear")
    step = FastStep(m, hvp="piecewise_linear", precision="bf16")
    loss, grad = step(x, y, I_ref, delta)
    assert step.channels_last and grad.dtype == torch.float32 and bool(torch.isfinite(grad).all())
    cos = float(torch.nn.functional.cosine_similarity(grad.flatten().double(), ref.flatten().double(), dim=0))
    assert cos > 0.8


def test_piecewise_confirmation_runs_in_full_precision_under_autocast():
    m = _bn_cnn(seed=3)  # a fresh model object: no cached verdict
    x, y, I_ref, delta = _problem(m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grad = U.saliency_loss_grad(m, x, y, I_ref, delta, hvp="piecewise_linear")
    assert bool(torch.isfinite(grad).all())


def test_autotune_picks_a_candidate_and_keeps_the_result():
    m = _bn_cnn()
    x, y, I_ref, delta = _problem(m)
    step = autotune_step(m, x, y, I_ref, delta, hvp="piecewise_linear", repeat=1,
                         candidates=[{}, {"channels_last": True}])
    assert isinstance(step, FastStep) and len(step.tuning_) == 2
    assert step.tuning_choice_ in [t["options"] for t in step.tuning_]
    _, ref = U.saliency_loss_grad(m, x, y, I_ref, delta, hvp="piecewise_linear")
    assert _rel(step(x, y, I_ref, delta)[1], ref) < F32_STEP
    bad = autotune_step(m, x, y, I_ref, delta, candidates=[{"precision": "fp16"}, {}], hvp="piecewise_linear")
    assert "error" in bad.tuning_[0] and bad.tuning_choice_ == {}
    with pytest.raises(ValueError, match="candidates"):
        autotune_step(m, x, y, I_ref, delta, candidates=[])


def test_bad_arguments_are_refused():
    m = _bn_cnn()
    x, y, I_ref, delta = _problem(m)
    with pytest.raises(ValueError, match="hvp"):
        FastStep(m, hvp="nope")
    with pytest.raises(ValueError, match="precision"):
        FastStep(m, precision="fp8")
    with pytest.raises(ValueError, match="fp16"):
        FastStep(m, precision="fp16")
    with pytest.raises(ValueError, match="cuda_graph"):
        FastStep(m, cuda_graph=True)
    with pytest.raises(ValueError, match="91469"):
        FastStep(m, hvp="double_backward", compile=True)
    with pytest.raises(ValueError, match="piecewise"):
        FastStep(m, hvp="piecewise_linear", compile=True)
    with pytest.raises(TypeError, match="spec"):
        FastStep(m, spec="simple")
    with pytest.raises(ValueError, match="static_batch"):
        FastStep(m, static_batch=0)
    step = FastStep(m, hvp="piecewise_linear")
    with pytest.raises(ValueError, match="I_ref"):
        step(x, y, I_ref[:, :-1], delta)
    with pytest.raises(ValueError, match="delta"):
        step(x, y, I_ref, delta[:, :-1])
    with pytest.raises(ValueError, match="y"):
        step(x, y[:-1], I_ref, delta)
    with pytest.raises(TypeError, match="model"):
        prepare_model(lambda t: t)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["piecewise_linear", "finite_difference_onesided", "double_backward"])
def test_cuda_graph_step_matches_eager(mode):
    m = _bn_cnn().cuda()
    x, y, I_ref, delta = (t.cuda() for t in _problem(m.cpu()))
    m = m.cuda()
    eager = FastStep(m, hvp=mode, static_batch=4)(x, y, I_ref, delta)
    step = FastStep(m, hvp=mode, cuda_graph=True, static_batch=4)
    for _ in range(2):
        got = step(x, y, I_ref, delta)
    assert step.cuda_graph, step.notes_
    assert _rel(got[1], eager[1]) < 1e-4


# -- the solver's fast option ------------------------------------------------------------------------

def _solver_data(model, n=24, shape=(3, 15, 11), dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    X = torch.randn(n, *shape, generator=g).to(dtype)
    with torch.no_grad():
        y = model(X).argmax(1)  # every sample correctly classified: all of them are attacked
    return X, y


@pytest.mark.parametrize("fast", [True, {"channels_last": True, "stem_space_to_depth": True}])
def test_upigrad_fast_follows_the_reference_trajectory(fast):
    """float64 model: the prepared step's gradient equals the reference's to ~1e-12, so the whole
    projected ascent (random start, noise, 3 epochs of normalised steps) ends at the same delta."""
    model = _bn_cnn(torch.float64)
    state = copy.deepcopy(model.state_dict())
    X, y = _solver_data(model)
    kw = dict(eps=0.5, epochs=3, batch_size=8, progress=False, seed=4)
    ref = U.UPIGrad(model, fast=False, **kw).fit((X, y))  # the reference code
    fast_run = U.UPIGrad(model, fast=fast, **kw).fit((X, y))
    assert ref.step_ is None and fast_run.step_ is not None
    assert fast_run.step_.hvp_ == "piecewise_linear"  # "double_backward" was upgraded to the exact "auto"
    assert _rel(fast_run.delta_, ref.delta_) < 1e-5
    assert fast_run.history_ == pytest.approx(ref.history_, rel=1e-6)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # caller's model untouched
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_upigrad_fast_keeps_the_surrogate_and_explicit_modes():
    model = _bn_cnn(torch.float64)
    X, y = _solver_data(model)
    kw = dict(eps=0.5, epochs=1, batch_size=8, progress=False, surrogate="softplus", target_kind="logit")
    ref = U.UPIGrad(model, fast=False, **kw).fit((X, y))  # the reference code
    fast_run = U.UPIGrad(model, fast=True, **kw).fit((X, y))
    assert fast_run.step_.hvp_ == "double_backward"  # softplus is not piecewise linear: auto keeps double backward
    assert _rel(fast_run.delta_, ref.delta_) < 1e-5
    fd = U.UPIGrad(model, fast=True, hvp="finite_difference_onesided", eps=0.5, epochs=1, batch_size=8,
                   progress=False).fit((X, y))
    assert fd.step_.hvp_ == "finite_difference_onesided"
    assert not any(isinstance(m, nn.Softplus) for m in model.modules())


def test_upigrad_fast_autotune_records_its_choice():
    model = _bn_cnn(torch.float32)
    X, y = _solver_data(model, dtype=torch.float32)
    run = U.UPIGrad(model, eps=0.5, epochs=1, batch_size=8, progress=False, fast="autotune").fit((X, y))
    assert len(run.step_.tuning_) >= 2 and run.step_.tuning_choice_ in [r["options"] for r in run.step_.tuning_]
    assert torch.isfinite(run.delta_).all() and float(run.delta_.norm()) <= 0.5 * (1 + 1e-5)


@pytest.mark.parametrize("fast, match", [("yes", "fast must be"), ({"hvp": "auto"}, "UPIGrad\\(hvp"),
                                         ({"precision": "bf16"}, "UPIGrad\\(precision"),
                                         ({"chanels_last": True}, "unknown FastStep option 'chanels_last'")])
def test_upigrad_fast_bad_values_name_the_argument(fast, match):
    with pytest.raises(ValueError, match=match):
        U.UPIGrad(_bn_cnn(), 0.5, fast=fast)
    with pytest.raises(TypeError, match="fast=True needs the model as a torch.nn.Module"):
        U.UPIGrad(lambda x: x.flatten(1), 0.5, fast=True)


def test_upigrad_fast_with_a_logit_target_stays_exact():
    """auto would pick finite differences for a ReLU net with a logit target: fast keeps double backward."""
    model = _bn_cnn(torch.float64)
    X, y = _solver_data(model)
    run = U.UPIGrad(model, eps=0.5, epochs=1, batch_size=8, progress=False, target_kind="logit",
                    fast=True).fit((X, y))
    assert run.step_.hvp_ == "double_backward"


@pytest.mark.parametrize("plus_lambda", [None, 1.0])
def test_upipca_fast_gives_the_reference_perturbation(plus_lambda):
    """float64 model: the per-sample directions through the prepared step equal the reference rows,
    so the exact solver returns the same singular vector, sign and singular values."""
    model = _bn_cnn(torch.float64)
    X, y = _solver_data(model, n=20)
    kw = dict(eps=0.5, batch_size=8, progress=False, solver="exact", plus_lambda=plus_lambda, rounds=2, seed=2)
    ref = U.UPIPCA(model, fast=False, **kw).fit((X, y))  # the reference code
    fast_run = U.UPIPCA(model, fast=True, **kw).fit((X, y))
    assert ref.step_ is None and fast_run.step_.hvp_ == "piecewise_linear"
    assert fast_run.sign_ == ref.sign_
    assert _rel(fast_run.delta_, ref.delta_) < 1e-5
    assert torch.allclose(fast_run.singular_values_, ref.singular_values_, rtol=1e-6)


def test_stem_and_pool_pair_computes_in_channels_last_and_is_the_same_function(monkeypatch):
    """A space-to-depth stem feeding a max pool through activations only is computed channels_last and
    the pool returns NCHW (one layout change, on the pooled tensor): the same function and input
    gradient as the unpaired copy (float64: to rounding) and as the model itself."""
    from upi_fast.accel import prepare as PR
    m = _bn_cnn(torch.float64)
    paired = prepare_model(m)
    assert paired.stem.channels_last_output and paired.pool.contiguous_output
    monkeypatch.setattr(PR, "_pair_stem_and_pool", lambda model: 0)
    plain = prepare_model(m)
    assert not plain.stem.channels_last_output and not plain.pool.contiguous_output
    x = torch.randn(4, 3, 16, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    h = paired.pool(torch.relu(paired.stem(x)))
    assert h.is_contiguous()  # the rest of the network keeps its NCHW kernels
    y = m(x).argmax(1)
    grads = [U.saliency(net, x, y, postprocess="raw") for net in (paired, plain, m)]
    assert grads[0].is_contiguous()
    assert _rel(grads[0], grads[1]) < 1e-12 and _rel(grads[0], grads[2]) < 1e-12
    torch.testing.assert_close(paired(x), m(x), rtol=1e-12, atol=1e-12)


def test_stem_and_pool_are_not_paired_when_the_stem_output_is_used_elsewhere_or_the_model_is_channels_last():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.pool = nn.MaxPool2d(2)
            self.fc = nn.Linear(4 * 4 * 4 + 4, 3)

        def forward(self, x):
            s = torch.relu(self.bn(self.stem(x)))
            return self.fc(torch.cat([self.pool(s).flatten(1), s.mean((2, 3))], 1))

    net = TwoUsers().eval()
    p = prepare_model(net)
    assert isinstance(p.stem, SpaceToDepthConv2d) and not p.stem.channels_last_output
    assert not p.pool.contiguous_output
    x = torch.randn(2, 3, 16, 16)
    assert _rel(p(x), net(x)) < 1e-5
    cl = prepare_model(_bn_cnn(), channels_last=True, pool_channels_last=True)
    assert not cl.stem.channels_last_output and not cl.pool.contiguous_output
