import pytest
import torch
from torch import nn

import upi_fast as U
from upi_fast.saliency import raw_gradient, target_scores

from _models import relu_cnn, smooth_cnn

# float results compared between code paths: rerun by .ci/run with other CPU kernels forced
pytestmark = pytest.mark.numerics


def _loop_gradient(model, x, y, kind):
    out = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1].clone().requires_grad_(True)
        logits = model(xi)
        t = torch.softmax(logits, 1)[0, y[i]] if kind == "prob" else logits[0, y[i]]
        out.append(torch.autograd.grad(t, xi)[0])
    return torch.cat(out)


@pytest.mark.parametrize("kind", ["prob", "logit"])
def test_simple_matches_per_sample_loop_and_finite_differences(kind):
    m = smooth_cnn()
    x = torch.randn(5, 2, 7, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1])
    g = raw_gradient(m, x, y, "simple", kind)
    torch.testing.assert_close(g, _loop_gradient(m, x, y, kind), rtol=1e-10, atol=1e-12)
    # central finite differences of the target along random directions
    v = torch.randn_like(x)
    h = 1e-5
    f = lambda z: target_scores(m, z, y, kind)
    fd = (f(x + h * v) - f(x - h * v)) / (2 * h)
    torch.testing.assert_close((g * v).sum((1, 2, 3)), fd, rtol=1e-6, atol=1e-9)


def test_postprocess_shapes_and_normalisation():
    m = smooth_cnn()
    x = torch.randn(3, 2, 7, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    I = U.saliency(m, x, y)
    assert I.shape == (3, 42)
    torch.testing.assert_close(I.sum(1), torch.ones(3, dtype=torch.float64))
    assert (I >= 0).all()
    raw = U.saliency(m, x, y, postprocess="raw")
    assert raw.shape == (3, 2 * 42)
    S = raw.view(3, 2, 42).abs().sum(1)
    torch.testing.assert_close(I, S / S.sum(1, keepdim=True))


def test_integrated_gradients_completeness():
    m = smooth_cnn()
    x = torch.randn(3, 2, 7, 6, dtype=torch.float64)
    y = torch.tensor([2, 0, 1])
    b = torch.full_like(x[0], -0.5)
    ig = U.saliency(m, x, y, method="integrated", postprocess="raw", steps=400, baseline=b, multiply_by_input=True)
    gap = target_scores(m, x, y, "logit") - target_scores(m, b.expand_as(x), y, "logit")
    ig_logit = U.saliency(m, x, y, method="integrated", target_kind="logit", postprocess="raw", steps=400,
                          baseline=b, multiply_by_input=True)
    torch.testing.assert_close(ig_logit.sum(1), gap, rtol=1e-2, atol=1e-3)
    gap_p = target_scores(m, x, y, "prob") - target_scores(m, b.expand_as(x), y, "prob")
    torch.testing.assert_close(ig.sum(1), gap_p, rtol=1e-2, atol=1e-3)


def test_integrated_is_path_average_of_loop_gradients():
    m = smooth_cnn()
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    y = torch.tensor([1, 3])
    got = raw_gradient(m, x, y, "integrated", "prob", steps=5)
    want = sum(_loop_gradient(m, a * x, y, "prob") for a in torch.linspace(0, 1, 5).tolist()) / 5
    torch.testing.assert_close(got, want)


def test_smoothgrad_is_mean_of_noisy_gradients():
    m = smooth_cnn()
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    y = torch.tensor([1, 3])
    noise = 0.1 * torch.randn(4, *x.shape, dtype=torch.float64)
    got = raw_gradient(m, x, y, "smoothgrad", "prob", noise=noise)
    want = sum(_loop_gradient(m, x + n, y, "prob") for n in noise) / 4
    torch.testing.assert_close(got, want)
    g = torch.Generator().manual_seed(3)
    a = U.saliency(m, x, y, method="smoothgrad", noise_std=0.1, n_samples=3, generator=g)
    assert a.shape == (2, 42) and torch.isfinite(a).all()


def test_create_graph_makes_maps_differentiable_in_x():
    m = smooth_cnn()
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1, 3])
    I = U.saliency(m, x, y, create_graph=True)
    (gx,) = torch.autograd.grad(I.pow(2).sum(), x)
    assert gx.abs().sum() > 0
    # without create_graph the maps are detached
    assert not U.saliency(m, x.detach(), y).requires_grad


def test_train_mode_restored_and_batchnorm_untouched():
    m = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    m(torch.randn(4, 1, 6, 6))
    m.train()
    stats = m[1].running_mean.clone(), m[1].running_var.clone(), int(m[1].num_batches_tracked)
    x = torch.randn(3, 1, 6, 6)
    with pytest.warns(UserWarning, match="train mode"):
        I1 = U.saliency(m, x, torch.tensor([0, 1, 0]))
    assert m.training and m[1].training
    assert torch.equal(m[1].running_mean, stats[0]) and torch.equal(m[1].running_var, stats[1])
    assert int(m[1].num_batches_tracked) == stats[2]
    # per-sample independence (eval mode): the first sample alone gives the same map
    m.eval()
    I0 = U.saliency(m, x[:1], torch.tensor([0]))
    torch.testing.assert_close(I0, I1[:1])


def test_zero_gradient_map_is_zero_not_nan():
    m = relu_cnn(dtype=torch.float32)
    x = torch.full((2, 1, 8, 8), -100.0)  # every ReLU dead: gradient exactly zero
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.abs())
        m[0].bias.fill_(-1.0)
        m[0].weight.fill_(1.0)
    I = U.saliency(m, x, torch.tensor([0, 1]), target_kind="logit")
    assert torch.equal(I, torch.zeros_like(I))


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="lrp"), "method"),
    (dict(target_kind="proba"), "target_kind"),
    (dict(postprocess="abs"), "postprocess"),
    (dict(steps=0), "steps"),
    (dict(method="smoothgrad"), "noise_std"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    m = smooth_cnn()
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=match):
        U.saliency(m, x, torch.tensor([0, 1]), **kwargs)


def test_bad_inputs():
    m = smooth_cnn()
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="target"):
        U.saliency(m, x, torch.tensor([0, 9]))
    with pytest.raises(ValueError, match="target"):
        U.saliency(m, x, torch.tensor([0]))
    with pytest.raises(ValueError, match="x"):
        U.saliency(m, x[0], torch.tensor([0]))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        U.saliency(m, bad, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="does not depend"):
        const = nn.Sequential(nn.Flatten(), nn.Linear(84, 3))
        U.saliency(lambda z: const(z.detach()), x.float(), torch.tensor([0, 1]))
