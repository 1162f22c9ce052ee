"""Ops ``upi_fast::softplus``, ``upi_fast::softplus_backward``, ``upi_fast::softplus_double_backward``:
the smooth ReLU surrogate ``y = softplus(beta * x) / beta`` with a backward that is itself
differentiable, each pass one fused elementwise kernel.

With ``s = sigmoid(beta * x)``:

* forward:          ``y = log1p(exp(beta x)) / beta``  (``= x`` where ``beta x > 20``, as torch);
* backward:         ``grad_x = grad_y * s``;
* double backward:  given ``gg`` (the gradient flowing into ``grad_x``),
  ``grad_grad_y = gg * s`` and ``grad_x = gg * grad_y * beta * s * (1 - s)``.

Reverse-over-reverse Hessian-vector products through a surrogate network call the double
backward once per activation instead of a chain of small elementwise kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["softplus", "SoftplusSurrogate", "softplus_reference", "softplus_backward_reference",
           "softplus_double_backward_reference"]

_THRESHOLD = 20.0

# The schemas and the implementations (torch reference, Triton, CUDA) are in upi_fast/ops/table.py.


@torch.library.register_fake("upi_fast::softplus")
def _fake_fwd(x, beta):
    return torch.empty_like(x)


@torch.library.register_fake("upi_fast::softplus_backward")
def _fake_bwd(grad_y, x, beta):
    return torch.empty_like(x)


@torch.library.register_fake("upi_fast::softplus_double_backward")
def _fake_bwd2(gg, grad_y, x, beta):
    return torch.empty_like(x), torch.empty_like(x)


def softplus_reference(x: torch.Tensor, beta: float) -> torch.Tensor:
    """``softplus(beta x) / beta`` in pure PyTorch."""
    return F.softplus(x, beta=beta, threshold=_THRESHOLD)


def softplus_backward_reference(grad_y: torch.Tensor, x: torch.Tensor, beta: float) -> torch.Tensor:
    """``grad_y * sigmoid(beta x)`` in pure PyTorch."""
    return grad_y * torch.sigmoid(beta * x)


def softplus_double_backward_reference(gg: torch.Tensor, grad_y: torch.Tensor, x: torch.Tensor,
                                       beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gg * s, gg * grad_y * beta * s * (1 - s))`` with ``s = sigmoid(beta x)``."""
    s = torch.sigmoid(beta * x)
    return gg * s, gg * grad_y * (beta * s * (1.0 - s))


def _fwd_setup(ctx, inputs, output):
    x, beta = inputs
    ctx.save_for_backward(x)
    ctx.beta = beta


def _fwd_backward(ctx, grad_y):
    (x,) = ctx.saved_tensors
    return torch.ops.upi_fast.softplus_backward(grad_y.contiguous(), x, ctx.beta), None


def _bwd_setup(ctx, inputs, output):
    grad_y, x, beta = inputs
    ctx.save_for_backward(grad_y, x)
    ctx.beta = beta


def _bwd_backward(ctx, gg):
    grad_y, x = ctx.saved_tensors
    g_grad_y, g_x = torch.ops.upi_fast.softplus_double_backward(gg.contiguous(), grad_y, x, ctx.beta)
    return g_grad_y, g_x, None


def _bwd2_setup(ctx, inputs, output):
    gg, grad_y, x, beta = inputs
    ctx.save_for_backward(gg, grad_y, x)
    ctx.beta = beta


def _bwd2_backward(ctx, go1, go2):
    # Third order (rarely needed): composed from differentiable PyTorch ops.
    gg, grad_y, x = ctx.saved_tensors
    beta = ctx.beta
    with torch.enable_grad():
        gg_, gy_, x_ = (t.detach().requires_grad_(True) for t in (gg, grad_y, x))
        o1, o2 = softplus_double_backward_reference(gg_, gy_, x_, beta)
        outs = torch.autograd.grad((o1, o2), (gg_, gy_, x_),
                                   (go1 if go1 is not None else torch.zeros_like(o1),
                                    go2 if go2 is not None else torch.zeros_like(o2)),
                                   create_graph=torch.is_grad_enabled())
    return outs[0], outs[1], outs[2], None


torch.library.register_autograd("upi_fast::softplus", _fwd_backward, setup_context=_fwd_setup)
torch.library.register_autograd("upi_fast::softplus_backward", _bwd_backward, setup_context=_bwd_setup)
torch.library.register_autograd("upi_fast::softplus_double_backward", _bwd2_backward, setup_context=_bwd2_setup)


def softplus(x: torch.Tensor, beta: float = 10.0) -> torch.Tensor:
    """Smooth ReLU ``softplus(beta x) / beta`` (same shape as ``x``), twice differentiable through
    fused kernels. ``beta`` must be positive; larger is closer to ReLU.

    Under ``torch.func`` transforms (``jvp``, ``grad``, ``vmap``), which custom ops registered with
    ``torch.library.register_autograd`` do not support, the same function is computed by
    ``torch.nn.functional.softplus`` instead."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
    if not (isinstance(beta, (int, float)) and beta > 0 and beta == beta and beta != float("inf")):
        raise ValueError(f"beta must be a finite positive number, got {beta!r}")
    if torch._C._are_functorch_transforms_active():
        return softplus_reference(x, float(beta))
    return torch.ops.upi_fast.softplus(x.contiguous(), float(beta))


class SoftplusSurrogate(torch.nn.Module):
    """``nn.Module`` form of :func:`softplus`, the stand-in for ``nn.ReLU`` while attacking."""

    def __init__(self, beta: float = 10.0) -> None:
        super().__init__()
        self.beta = float(beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``softplus(beta x) / beta`` of ``x`` (any shape)."""
        return softplus(x, self.beta)

    def extra_repr(self) -> str:
        return f"beta={self.beta}"
