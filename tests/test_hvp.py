import pytest
import torch

import upi_fast as U
from upi_fast.saliency import postprocess_maps, target_scores

from _models import relu_cnn, smooth_cnn

# float results compared between code paths: rerun by .ci/run with other CPU kernels forced
pytestmark = pytest.mark.numerics


def _reference_grad(model, x, y, I_ref, delta, kind, method="simple", steps=5):
    """Per-sample loop: u_i by autograd on D, H u by torch.func.jvp(torch.func.grad(target)), float64."""
    B = x.shape[0]
    coeffs = [1.0] if method == "simple" else torch.linspace(0, 1, steps).tolist()
    total = torch.zeros_like(x[0])
    for i in range(B):
        yi = y[i:i + 1]
        gradf = torch.func.grad(lambda z: target_scores(model, z.unsqueeze(0), yi, "prob").sum())
        xi = x[i] + delta
        pts = [a * xi for a in coeffs]  # baseline 0
        A = (sum(gradf(p) for p in pts) / len(pts)).requires_grad_(True)
        d = U.dissimilarity(postprocess_maps(A.unsqueeze(0), "abs_sum_l1"), I_ref[i:i + 1], kind)
        (u,) = torch.autograd.grad(d.sum(), A)
        total += sum(a * torch.func.jvp(gradf, (p,), (u,))[1] for a, p in zip(coeffs, pts)) / len(pts)
    return total / B


@pytest.mark.parametrize("mode", ["double_backward", "forward", "finite_difference", "finite_difference_onesided"])
@pytest.mark.parametrize("kind", ["l2", "cosine", "topk"])
def test_modes_match_reference_on_smooth_cnn(mode, kind):
    m = smooth_cnn()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 2, 7, 6, dtype=torch.float64, generator=g)
    y = torch.tensor([0, 1, 2, 3])
    I_ref = U.saliency(m, x, y)
    delta = 0.3 * torch.randn(2, 7, 6, dtype=torch.float64, generator=g)
    want = _reference_grad(m, x, y, I_ref, delta, kind)
    fd_step, tol = {"finite_difference": (1e-4, 1e-6), "finite_difference_onesided": (1e-7, 1e-5)}.get(mode, (1e-2, 1e-6))
    loss, got = U.saliency_loss_grad(m, x, y, I_ref, delta, dissimilarity=kind, hvp=mode, fd_step=fd_step)
    assert got.shape == delta.shape and not got.requires_grad
    rel = (got - want).norm() / want.norm()
    assert rel < tol, rel
    want_loss = U.dissimilarity(U.saliency(m, x + delta, y), I_ref, kind)
    torch.testing.assert_close(loss, want_loss)


@pytest.mark.parametrize("mode", ["double_backward", "forward", "finite_difference"])
def test_integrated_gradients_modes_match_reference(mode):
    m = smooth_cnn()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 7, 6, dtype=torch.float64, generator=g)
    y = torch.tensor([3, 1, 0])
    I_ref = U.saliency(m, x, y, method="integrated", steps=5)
    delta = 0.3 * torch.randn(2, 7, 6, dtype=torch.float64, generator=g)
    want = _reference_grad(m, x, y, I_ref, delta, "l2", method="integrated", steps=5)
    _, got = U.saliency_loss_grad(m, x, y, I_ref, delta, hvp=mode, method="integrated", steps=5, fd_step=1e-4)
    assert (got - want).norm() / want.norm() < 1e-6


@pytest.mark.parametrize("mode", ["forward", "finite_difference"])
def test_multiply_by_input_and_smoothgrad_modes_agree_with_double_backward(mode):
    m = smooth_cnn()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 2, 7, 6, dtype=torch.float64, generator=g)
    y = torch.tensor([3, 1, 0])
    delta = 0.3 * torch.randn(2, 7, 6, dtype=torch.float64, generator=g)
    for kw in (dict(method="integrated", steps=4, multiply_by_input=True, baseline=-0.2),
               dict(method="smoothgrad", smoothgrad_std=0.2, n_samples=3),
               dict(method="simple", multiply_by_input=True)):
        sal_kw = {k: v for k, v in kw.items() if k not in ("smoothgrad_std",)}
        if "smoothgrad_std" in kw:
            sal_kw["noise_std"] = kw["smoothgrad_std"]
        I_ref = U.saliency(m, x, y, generator=torch.Generator().manual_seed(9), **sal_kw)
        _, want = U.saliency_loss_grad(m, x, y, I_ref, delta, hvp="double_backward",
                                       generator=torch.Generator().manual_seed(5), **kw)
        _, got = U.saliency_loss_grad(m, x, y, I_ref, delta, hvp=mode, fd_step=1e-4,
                                      generator=torch.Generator().manual_seed(5), **kw)
        assert (got - want).norm() / want.norm() < 1e-6, kw


def test_per_sample_delta_and_noise():
    m = smooth_cnn()
    x = torch.randn(3, 2, 7, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    I_ref = U.saliency(m, x, y)
    d = 0.1 * torch.randn(3, 2, 7, 6, dtype=torch.float64)
    _, g_each = U.saliency_loss_grad(m, x, y, I_ref, d)
    assert g_each.shape == d.shape
    for i in range(3):  # sample i's gradient only depends on sample i (scaled by 1/B)
        _, gi = U.saliency_loss_grad(m, x[i:i + 1], y[i:i + 1], I_ref[i:i + 1], d[i])
        torch.testing.assert_close(g_each[i] * 3, gi)
    l1, g1 = U.saliency_loss_grad(m, x, y, I_ref, d[0], noise_std=0.1, generator=torch.Generator().manual_seed(1))
    l2, g2 = U.saliency_loss_grad(m, x, y, I_ref, d[0], noise_std=0.1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(g1, g2) and torch.equal(l1, l2)
    l3, _ = U.saliency_loss_grad(m, x, y, I_ref, d[0], noise_std=0.1, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(l1, l3)


def test_finite_difference_sees_relu_kinks_with_logit_target():
    torch.manual_seed(0)
    m = relu_cnn()
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (16,))
    I_ref = U.saliency(m, x, y, target_kind="logit")
    delta = 0.2 * torch.randn(1, 8, 8, dtype=torch.float64)
    kw = dict(target_kind="logit")
    _, exact = U.saliency_loss_grad(m, x, y, I_ref, delta, hvp="double_backward", **kw)
    assert exact.abs().max() == 0  # a ReLU network's logit saliency is piecewise constant
    l0, fd = U.saliency_loss_grad(m, x, y, I_ref, delta, hvp="finite_difference", fd_step=0.05, **kw)
    assert fd.norm() > 0
    # ascent-consistent: a step along the direction increases the mean loss more than random steps do
    step = 0.05 * x.reshape(16, -1).norm(dim=1).mean()

    def mean_loss(d):
        return U.dissimilarity(U.saliency(m, x + d, y, target_kind="logit"), I_ref).mean()

    gain = mean_loss(delta + step * fd / fd.norm()) - mean_loss(delta)
    g = torch.Generator().manual_seed(0)
    rand = []
    for _ in range(10):
        v = torch.randn(delta.shape, generator=g, dtype=torch.float64)
        rand.append(mean_loss(delta + step * v / v.norm()) - mean_loss(delta))
    assert gain > 0 and gain > torch.stack(rand).mean()


def test_bad_arguments():
    m = smooth_cnn()
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64)
    y = torch.tensor([0, 1])
    I_ref = U.saliency(m, x, y)
    d = torch.zeros(2, 7, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="hvp"):
        U.saliency_loss_grad(m, x, y, I_ref, d, hvp="reverse")
    with pytest.raises(ValueError, match="dissimilarity"):
        U.saliency_loss_grad(m, x, y, I_ref, d, dissimilarity="l1")
    with pytest.raises(ValueError, match="delta"):
        U.saliency_loss_grad(m, x, y, I_ref, d[0])
    with pytest.raises(ValueError, match="I_ref"):
        U.saliency_loss_grad(m, x, y, I_ref[:, :5], d)
    with pytest.raises(ValueError, match="noise_std"):
        U.saliency_loss_grad(m, x, y, I_ref, d, noise_std=-1.0)
    with pytest.raises(ValueError, match="delta"):
        U.saliency_loss_grad(m, x, y, I_ref, torch.full_like(d, float("inf")))
