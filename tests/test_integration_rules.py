"""Integrated-gradients path rules (``integration=``): captum's five rules and the authors' default.

* ``integration_rule`` gives captum 0.9's nodes and step sizes for its five names, and the
  documented ``uniform_endpoints`` rule (weight 1/M at k/(M-1)) for the default;
* standard IG (``multiply_by_input=True``, raw maps) equals ``captum.attr.IntegratedGradients`` in
  float64, on a small random model and on the digits CNN, with a non-zero baseline. captum
  multiplies by its step sizes after ``torch.tensor(step_sizes).float()`` (float32, even for
  float64 inputs), so the two agree to float64 rounding *plus* that documented float32 rounding of
  the weights; the test checks each half separately against a float64 reference built here;
* the default rule is not any captum rule (it gives the end points full weight 1/M);
* every HVP mode differentiates the same rule (against double backward, itself checked against an
  independent autograd reference);
* the option travels through the solvers, ``evaluate`` and ``upi-fast compute --integration``.
"""
from __future__ import annotations

import importlib
import json
import math

import pytest
import torch
from torch import nn

import upi_fast as U
from upi_fast.hvp import SaliencySpec
from upi_fast.saliency import DEFAULT_INTEGRATION, INTEGRATION_RULES, integration_rule, saliency, target_scores

from _models import relu_cnn, smooth_cnn

S = importlib.import_module("upi_fast.saliency")  # (the attribute upi_fast.saliency is the function)

captum_attr = pytest.importorskip("captum.attr")
from captum.attr._utils.approximation_methods import approximation_parameters  # noqa: E402

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.numerics]

F64 = torch.float64
EPS64 = torch.finfo(F64).eps
U32 = 2.0 ** -24  # unit roundoff of float32 (round to nearest): |fl32(w) - w| <= U32 |w|
CAPTUM_RULES = tuple(r for r in INTEGRATION_RULES if r != DEFAULT_INTEGRATION)


@pytest.fixture
def float64_default():
    """captum builds its Riemann nodes with ``torch.linspace`` in the default dtype: float64 here."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(old)


def _captum_rule(rule: str, M: int) -> tuple[list[float], list[float]]:
    """captum's (alphas, step sizes), built under a float64 default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        steps_fn, alphas_fn = approximation_parameters(rule)
        return alphas_fn(M), steps_fn(M)
    finally:
        torch.set_default_dtype(old)


def _reduction_size(model: nn.Module) -> int:
    """The longest dot product in a forward pass (a conv's C_in*kh*kw, a linear's in_features)."""
    n = 1
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            n = max(n, mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1])
        elif isinstance(mod, nn.Linear):
            n = max(n, mod.in_features)
    return n


def _point_grads(model, x, y, b, alphas) -> torch.Tensor:
    """(M, B, C, H, W): grad of p_y at each path point, one autograd call per point (the test's own
    reference, independent of the package's batching)."""
    out = []
    for a in alphas:
        p = (b + a * (x - b)).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(target_scores(model, p, y, "prob").sum(), p)
        out.append(g)
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------- the rule

@pytest.mark.parametrize("M", [2, 7, 10, 33])
@pytest.mark.parametrize("rule", CAPTUM_RULES)
def test_nodes_and_weights_are_captums(rule, M):
    a, w = integration_rule(rule, M, F64)
    ca, cw = _captum_rule(rule, M)
    assert a.shape == w.shape == (M,) and a.dtype == w.dtype == F64
    torch.testing.assert_close(a, torch.tensor(ca, dtype=F64), rtol=4 * EPS64, atol=EPS64)
    torch.testing.assert_close(w, torch.tensor(cw, dtype=F64), rtol=4 * EPS64, atol=0.0)
    # float32 nodes / weights are the float64 ones rounded once
    a32, w32 = integration_rule(rule, M, torch.float32)
    assert torch.equal(a32, a.float()) and torch.equal(w32, w.float())


@pytest.mark.parametrize("M", [1, 2, 7, 10])
def test_default_rule_is_uniform_weights_at_both_end_points(M):
    a, w = integration_rule(DEFAULT_INTEGRATION, M, F64)
    want_a = torch.ones(1, dtype=F64) if M == 1 else torch.arange(M, dtype=F64) / (M - 1)
    torch.testing.assert_close(a, want_a, rtol=4 * EPS64, atol=EPS64)
    assert torch.equal(w, torch.full((M,), 1.0 / M, dtype=F64))
    assert DEFAULT_INTEGRATION == "uniform_endpoints" and SaliencySpec().integration == DEFAULT_INTEGRATION
    # the legacy helper still returns the default nodes
    assert torch.equal(S.path_coefficients(M, F64), a)


def test_weights_sum_as_in_captum():
    """Every rule integrates a constant exactly except captum's trapezoid, whose step is 1/M
    (weights sum to (M-1)/M): kept, because the names promise captum's semantics."""
    for rule in INTEGRATION_RULES:
        for M in (2, 7, 10):
            w = integration_rule(rule, M, F64)[1]
            want = (M - 1) / M if rule == "riemann_trapezoid" else 1.0
            assert abs(float(w.sum()) - want) <= 4 * M * EPS64, (rule, M)


def test_bad_rules_are_refused_with_the_argument_named():
    model, x, y = smooth_cnn(), torch.randn(2, 2, 7, 6, dtype=F64), torch.tensor([0, 1])
    calls = [lambda: integration_rule("simpson", 5),
             lambda: saliency(model, x, y, "integrated", integration="simpson"),
             lambda: S.raw_gradient(model, x, y, "integrated", integration="simpson"),
             lambda: SaliencySpec(method="integrated", integration="simpson"),
             lambda: U.saliency_loss_grad(model, x, y, saliency(model, x, y), torch.zeros(2, 7, 6, dtype=F64),
                                          method="integrated", integration="simpson"),
             lambda: U.UPIGrad(model, 0.5, saliency="integrated", saliency_kwargs={"integration": "simpson"})]
    for call in calls:
        with pytest.raises(ValueError, match="integration must be one of") as err:
            call()
        assert all(r in str(err.value) for r in INTEGRATION_RULES) and "'simpson'" in str(err.value)
    # the option is checked even when the method does not use it (a typo is never silently ignored)
    with pytest.raises(ValueError, match="integration"):
        saliency(model, x, y, "simple", integration="Riemann_left")


def test_one_step_riemann_rules_are_refused_and_other_one_point_rules_work():
    model, x, y = smooth_cnn(), torch.randn(2, 2, 7, 6, dtype=F64), torch.tensor([0, 1])
    for rule in ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"):  # captum: n > 1
        for call in (lambda: integration_rule(rule, 1),
                     lambda: saliency(model, x, y, "integrated", steps=1, integration=rule),
                     lambda: SaliencySpec(method="integrated", steps=1, integration=rule)):
            with pytest.raises(ValueError, match=rf"integration='{rule}' needs steps >= 2.*steps=1"):
                call()
    # (a spec that does not integrate does not care about steps)
    SaliencySpec(method="simple", steps=1, integration="riemann_trapezoid")
    # one-point rules: a single gradient at alpha = 1/2 (Gauss-Legendre) and 1 (the default)
    for rule, alpha in (("gausslegendre", 0.5), (DEFAULT_INTEGRATION, 1.0)):
        got = saliency(model, x, y, "integrated", postprocess="raw", steps=1, baseline=0.3, integration=rule)
        want = saliency(model, 0.3 + alpha * (x - 0.3), y, "simple", postprocess="raw")
        torch.testing.assert_close(got, want, rtol=0, atol=4 * EPS64 * float(want.abs().max()))


# --------------------------------------------------------------------------------- standard IG vs captum

class _Prob(nn.Module):
    """captum's forward function: the same target as ``target_kind="prob"``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.softmax(self.model(x), dim=1)


@pytest.fixture(scope="module")
def digits_problem():
    from upi_fast.data import digits
    from upi_fast.models import digits_cnn
    X, y = digits().eval
    return digits_cnn().to(F64).eval(), X[:12].to(F64), y[:12]


def _problem(which, digits_problem):
    if which == "digits":
        model, x, y = digits_problem
        g = torch.Generator().manual_seed(4)
        b = 0.2 * torch.rand(1, *x.shape[1:], dtype=F64, generator=g)  # a non-zero, non-constant baseline
        return model, x, y, b
    g = torch.Generator().manual_seed(3)
    model = smooth_cnn(classes=4)
    x = torch.randn(5, 2, 7, 6, dtype=F64, generator=g)
    return model, x, torch.tensor([0, 1, 2, 3, 1]), torch.full((1, 2, 7, 6), -0.25, dtype=F64)


@pytest.mark.parametrize("M", [7, 10])
@pytest.mark.parametrize("which", ["small", "digits"])
@pytest.mark.parametrize("rule", CAPTUM_RULES)
def test_standard_ig_equals_captum(rule, which, M, digits_problem, float64_default):
    model, x, y, b = _problem(which, digits_problem)
    B = x.shape[0]
    ours = saliency(model, x, y, "integrated", postprocess="raw", steps=M, baseline=b, multiply_by_input=True,
                    integration=rule).view_as(x)
    theirs = captum_attr.IntegratedGradients(_Prob(model), multiply_by_inputs=True).attribute(
        x, baselines=b.expand_as(x), target=y, n_steps=M, method=rule)
    assert ours.dtype == theirs.dtype == F64 and theirs.shape == x.shape

    # the test's own float64 reference from captum's nodes and step sizes, and the same with the
    # step sizes rounded to float32 as captum does
    alphas, steps = _captum_rule(rule, M)
    g = _point_grads(model, x, y, b, alphas)
    w = torch.tensor(steps, dtype=F64).view(-1, 1, 1, 1, 1)
    ref = (x - b) * (w * g).sum(0)
    ref32w = (x - b) * (w.float().double() * g).sum(0)
    # float64 rounding: each gradient is a chain of dot products of length <= n, summed over M points;
    # scaled by the size of what is summed (sum_k w_k |g_k| |x - b|), per sample
    mag = ((x - b).abs() * (w * g.abs()).sum(0))
    scale = mag.reshape(B, -1).amax(1).view(B, 1, 1, 1)
    tol64 = 8 * (_reduction_size(model) + M) * EPS64 * scale
    assert ((ours - ref).abs() <= tol64).all(), float(((ours - ref).abs() / scale).max())
    assert ((theirs - ref32w).abs() <= tol64).all(), float(((theirs - ref32w).abs() / scale).max())
    # hence, directly: ours and captum differ by at most captum's float32 weights plus float64 rounding
    assert ((ours - theirs).abs() <= U32 * mag + 2 * tol64).all()
    assert float(ref.abs().max()) > 0


@pytest.mark.parametrize("which", ["small", "digits"])
def test_default_rule_differs_from_every_captum_rule(which, digits_problem, float64_default):
    """``uniform_endpoints`` (the authors' mean over k/(M-1)) is none of captum's rules at the same M:
    closest is captum's trapezoid, at the same nodes, which gives the two end points half weight
    1/(2M). The difference is exactly ``(x - b) (g(b) + g(x)) / (2M)``, far above rounding."""
    model, x, y, b = _problem(which, digits_problem)
    B, M = x.shape[0], 10
    kw = dict(postprocess="raw", steps=M, baseline=b, multiply_by_input=True)
    ours = saliency(model, x, y, "integrated", **kw).view_as(x)
    ig = captum_attr.IntegratedGradients(_Prob(model), multiply_by_inputs=True)
    g = _point_grads(model, x, y, b, _captum_rule("riemann_trapezoid", M)[0])  # nodes k / (M - 1)
    ends = (x - b) * (g[0] + g[-1]) / (2 * M)
    mag = (x - b).abs() * g.abs().sum(0) / M  # what the weighted sums add up, per element
    scale = mag.reshape(B, -1).amax(1).view(B, 1, 1, 1)
    for rule in CAPTUM_RULES:
        theirs = ig.attribute(x, baselines=b.expand_as(x), target=y, n_steps=M, method=rule)
        rel = (ours - theirs).reshape(B, -1).norm(dim=1) / theirs.reshape(B, -1).norm(dim=1)
        assert float(rel.max()) > 1e-3, (rule, rel)  # 1e-3: four orders above captum's float32 weights
        if rule == "riemann_trapezoid":
            tol = U32 * mag + 16 * (_reduction_size(model) + M) * EPS64 * scale
            assert ((ours - theirs - ends).abs() <= tol).all()


# ---------------------------------------------------------------------------- every HVP mode, same rule

def _independent_grad(model, x, y, I_ref, delta, rule, M, b, mbi):
    """d/d delta of mean_i ||post(r(x_i + delta)) - I_ref_i||_2 with the rule's weighted path sum,
    written out here with create_graph (no package code but target_scores / postprocess / dissimilarity)."""
    a, w = integration_rule(rule, M, F64)
    d = delta.detach().requires_grad_(True)
    xp = x + d
    A = 0
    for ak, wk in zip(a.tolist(), w.tolist()):
        p = b + ak * (xp - b)
        (gk,) = torch.autograd.grad(target_scores(model, p, y, "prob").sum(), p, create_graph=True)
        A = A + wk * gk
    r = (xp - b) * A if mbi else A
    loss = U.dissimilarity(S.postprocess_maps(r, "abs_sum_l1"), I_ref, "l2")
    (grad,) = torch.autograd.grad(loss.mean(), d)
    return grad


def _hvp_problem(model, shape, labels, rule, M, b, mbi, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), *shape, dtype=F64, generator=g)
    y = torch.tensor(labels)
    I_ref = saliency(model, x, y, "integrated", steps=M, baseline=b, multiply_by_input=mbi, integration=rule)
    delta = 0.2 * torch.randn(*shape, dtype=F64, generator=g)
    return x, y, I_ref, delta


def _exact_tol(model, M):
    """float64 rounding of a gradient through two differentiations of the network, normwise."""
    return 64 * (_reduction_size(model) + M) * EPS64


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("mbi", [False, True])
@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_left", DEFAULT_INTEGRATION])
def test_hvp_modes_differentiate_the_same_rule(rule, mbi):
    M, b = 7, -0.2
    kw = dict(method="integrated", steps=M, baseline=b, multiply_by_input=mbi, integration=rule)
    # a smooth model: double backward, forward-over-reverse, finite differences
    model = smooth_cnn()
    x, y, I_ref, delta = _hvp_problem(model, (2, 7, 6), [0, 3, 1], rule, M, b, mbi)
    want = _independent_grad(model, x, y, I_ref, delta, rule, M, b, mbi)
    loss_db, db = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="double_backward", **kw)
    assert db.norm() > 0 and _rel(db, want) <= _exact_tol(model, M)
    _, fw = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="forward", **kw)
    assert _rel(fw, db) <= _exact_tol(model, M)
    # central differences, O(h^2) with h = 1e-4 of the input scale: loosely
    _, fd = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="finite_difference", fd_step=1e-4, **kw)
    assert _rel(fd, db) < 1e-5
    # the rule matters: another rule's gradient is far from this one
    other = "riemann_right" if rule != "riemann_right" else "riemann_left"
    _, db_other = U.saliency_loss_grad(model, x, y, I_ref, delta, hvp="double_backward",
                                       **{**kw, "integration": other})
    assert _rel(db_other, db) > 1e-3
    # a ReLU model: the piecewise-linear mode
    relu = relu_cnn()
    x, y, I_ref, delta = _hvp_problem(relu, (1, 8, 8), [0, 3, 4, 1], rule, M, b, mbi, seed=1)
    want = _independent_grad(relu, x, y, I_ref, delta, rule, M, b, mbi)
    l_db, db = U.saliency_loss_grad(relu, x, y, I_ref, delta, hvp="double_backward", **kw)
    l_pw, pw = U.saliency_loss_grad(relu, x, y, I_ref, delta, hvp="piecewise_linear", **kw)
    assert db.norm() > 0 and _rel(db, want) <= _exact_tol(relu, M)
    assert _rel(pw, db) <= _exact_tol(relu, M)
    torch.testing.assert_close(l_pw, l_db, rtol=_exact_tol(relu, M), atol=0.0)


def test_one_point_rules_in_the_piecewise_and_forward_modes():
    """M = 1 with a node other than 1 (Gauss-Legendre: 1/2) and M = 2 left / middle rules (nodes 0 and
    1/4, 3/4): the tangent is scaled by each node."""
    relu = relu_cnn()
    for rule, M in (("gausslegendre", 1), ("riemann_left", 2), ("riemann_middle", 2)):
        kw = dict(method="integrated", steps=M, baseline=0.1, multiply_by_input=True, integration=rule)
        x, y, I_ref, delta = _hvp_problem(relu, (1, 8, 8), [0, 3], rule, M, 0.1, True, seed=2)
        _, db = U.saliency_loss_grad(relu, x, y, I_ref, delta, hvp="double_backward", **kw)
        _, pw = U.saliency_loss_grad(relu, x, y, I_ref, delta, hvp="piecewise_linear", **kw)
        _, fw = U.saliency_loss_grad(relu, x, y, I_ref, delta, hvp="forward", **kw)
        assert db.norm() > 0 and _rel(pw, db) <= _exact_tol(relu, M) and _rel(fw, db) <= _exact_tol(relu, M)


# ---------------------------------------------------------------------- solvers, evaluate, command line

def test_solvers_and_evaluate_carry_the_rule(monkeypatch):
    model = smooth_cnn(dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 2, 7, 6, generator=g), torch.tensor([0, 1, 2, 3, 0, 1])
    seen = []
    real = S.integration_rule

    def spy(integration=DEFAULT_INTEGRATION, steps=10, dtype=torch.float32, device=None):
        seen.append(integration)
        return real(integration, steps, dtype, device)

    monkeypatch.setattr(S, "integration_rule", spy)
    for solver in (U.UPIGrad(model, 0.5, epochs=1, batch_size=3, saliency="integrated", progress=False,
                             saliency_kwargs={"integration": "gausslegendre", "steps": 3}),
                   U.UPIPCA(model, 0.5, batch_size=3, saliency="integrated", progress=False,
                            saliency_kwargs={"integration": "gausslegendre", "steps": 3})):
        assert solver.spec.integration == "gausslegendre"
        seen.clear()
        solver.fit((x, y))
        assert seen and set(seen) == {"gausslegendre"}, set(seen)
    seen.clear()
    res = U.evaluate(model, torch.zeros(2, 7, 6), (x, y), saliency="integrated",
                     saliency_kwargs={"integration": "riemann_middle", "steps": 3})
    assert seen and set(seen) == {"riemann_middle"} and res["n"] > 0


def test_cli_integration_option(tmp_path, capsys, monkeypatch):
    from upi_fast.cli import build_parser, main

    from hardening_support import make_image_folder

    sub = build_parser()._subparsers._group_actions[0].choices
    # compute: the package default; evaluate / show: the perturbation file's rule unless given
    for cmd, default in (("compute", DEFAULT_INTEGRATION), ("evaluate", None), ("show", None)):
        opt = next(a for a in sub[cmd]._actions if "--integration" in a.option_strings)
        assert tuple(opt.choices) == INTEGRATION_RULES and opt.default == default
    assert "(default: uniform_endpoints:" in " ".join(sub["compute"].format_help().split())
    assert "(default: the perturbation file" in " ".join(sub["evaluate"].format_help().split())

    data = make_image_folder(tmp_path / "imgs", per_class=2)
    out = tmp_path / "out"
    argv = ["compute", "--no-progress", "--data", data, "--model", "hardening_support:make_model", "--size", "8",
            "--eps", "0.5", "--epochs", "1", "--batch-size", "3", "--attack-samples", "3", "--eval-samples", "3",
            "--out", str(out), "--saliency", "integrated"]
    capsys.readouterr()
    assert main(argv + ["--integration", "simpson"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--integration" in err[0] and "gausslegendre" in err[0]

    seen = []
    real = S.integration_rule
    monkeypatch.setattr(S, "integration_rule", lambda rule, *a, **k: seen.append(rule) or real(rule, *a, **k))
    assert main(argv + ["--integration", "gausslegendre"]) == 0
    assert seen and set(seen) == {"gausslegendre"}  # the solver and the evaluation both used it
    with open(out / "report.json", encoding="utf-8") as fh:
        report = json.load(fh)
    assert report["setup"]["integration"] == "gausslegendre"
    assert math.isfinite(report["results"][0]["dissimilarity"])
