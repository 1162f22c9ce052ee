import pytest
import torch
import torch.nn.functional as F
from torch import nn

import upi_fast as U
from upi_fast.ops.softplus import SoftplusSurrogate

from _models import relu_cnn

# float results compared between code paths: rerun by .ci/run with other CPU kernels forced
pytestmark = pytest.mark.numerics


class FunctionalNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def test_swaps_relu_and_restores():
    m = relu_cnn(dtype=torch.float32)
    relus = [mod for mod in m.modules() if type(mod) is nn.ReLU]
    x = torch.randn(2, 1, 8, 8)
    before = m(x)
    with U.softplus_surrogate(m, beta=10.0) as sm:
        assert sm is m
        assert not any(type(mod) is nn.ReLU for mod in m.modules())
        assert sum(isinstance(mod, SoftplusSurrogate) for mod in m.modules()) == len(relus)
        smooth = m(x)
    assert [mod for mod in m.modules() if type(mod) is nn.ReLU] == relus
    assert torch.equal(m(x), before)
    assert not torch.equal(smooth, before)
    with U.softplus_surrogate(m, beta=1e4):  # very sharp: close to ReLU
        torch.testing.assert_close(m(x), before, rtol=1e-3, atol=1e-3)


def test_restores_on_error():
    m = relu_cnn(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="boom"):
        with U.softplus_surrogate(m):
            raise RuntimeError("boom")
    assert sum(type(mod) is nn.ReLU for mod in m.modules()) == 3


def test_functional_relu_is_intercepted():
    m = FunctionalNet()
    x = torch.randn(4, 1, 2, 3)
    ref = m(x)
    with U.softplus_surrogate(m, beta=2.0):
        got = m(x)
    want = m.fc2(F.softplus(m.fc1(x.flatten(1)), beta=2.0))
    torch.testing.assert_close(got, want)
    with U.softplus_surrogate(m, beta=2.0, functional=False):
        torch.testing.assert_close(m(x), ref)


def test_surrogate_gives_nonzero_logit_hessian():
    m = relu_cnn()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    I_ref = U.saliency(m, x, y, target_kind="logit")
    d = 0.1 * torch.randn(1, 8, 8, dtype=torch.float64)
    with U.softplus_surrogate(m, beta=10.0):
        _, g = U.saliency_loss_grad(m, x, y, I_ref, d, target_kind="logit")
        _, gf = U.saliency_loss_grad(m, x, y, I_ref, d, target_kind="logit", hvp="forward")
    assert g.norm() > 0
    torch.testing.assert_close(g, gf)


def test_bad_beta():
    with pytest.raises(ValueError, match="beta"):
        with U.softplus_surrogate(relu_cnn(), beta=-1):
            pass
