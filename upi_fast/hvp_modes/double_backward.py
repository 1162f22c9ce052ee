"""``double_backward``: reverse-over-reverse through ``create_graph=True`` (exact for any model)."""
from __future__ import annotations

import torch

from .hooks import REFERENCE, Hooks, averaged_gradient

__all__ = ["double_backward"]


def double_backward(model, x: torch.Tensor, delta: torch.Tensor, target: torch.Tensor, I_ref: torch.Tensor, spec,
                    sg_noise: torch.Tensor | None = None, hooks: Hooks = REFERENCE, *,
                    wrt_delta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss (B,) at ``x + delta`` and, with ``wrt_delta``, the gradient of the batch mean with respect to
    ``delta`` (shaped like it); otherwise the per-sample directions ``J_r^T u`` (B, C, H, W), the
    gradient of the summed loss with respect to the points."""
    B = x.shape[0]
    with hooks.autocast(), torch.enable_grad():
        if wrt_delta:
            leaf = delta.detach().requires_grad_(True)
            xp = hooks.layout(x + leaf)
        else:
            leaf = xp = hooks.layout(x + delta.detach()).requires_grad_(True)
        r = averaged_gradient(model, xp, target, spec, sg_noise, hooks, create_graph=True)
        if spec.multiplies_input:
            r = spec.input_factor(xp) * r
        loss = spec.loss(r.to(x.dtype), I_ref)
        (grad,) = torch.autograd.grad(loss.sum() / B if wrt_delta else loss.sum(), leaf)
    return loss.detach(), grad

