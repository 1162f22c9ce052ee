"""``finite_difference`` / ``finite_difference_onesided``: differences of first-order gradients along
``w = J``-input ``u`` (no second derivatives).

Step per sample: ``h_i = fd_step * scale / ||w_i||_2`` with ``scale = mean_j ||x'_j||_2`` (the
fast step precomputes it over the whole batch, ``hooks.fd_scale``), so that the probe ``h_i w_i``
has norm ``fd_step`` times the batch's mean input norm; a zero ``w_i`` gives a zero direction.
"""
from __future__ import annotations

import torch

from .hooks import REFERENCE, Hooks, averaged_gradient

__all__ = ["finite_difference", "finite_difference_onesided"]


def _differences(model, xp, target, I_ref, spec, sg_noise, hooks: Hooks, fd_step: float, central: bool):
    dt = xp.dtype
    with hooks.autocast():
        xp = hooks.layout(xp.detach())

        def A(p):
            return averaged_gradient(model, p, target, spec, sg_noise, hooks).to(dt)

        A0 = A(xp)
        loss, u, w = spec.loss_u_w(A0, xp, I_ref)
        B = xp.shape[0]
        scale = hooks.fd_scale if hooks.fd_scale is not None else xp.reshape(B, -1).norm(dim=1).mean()
        wn = w.reshape(B, -1).norm(dim=1)
        h = torch.where(wn > 0, fd_step * scale / wn.clamp_min(1e-30), torch.zeros_like(wn)).view(B, 1, 1, 1)
        safe_h = torch.where(h > 0, h, torch.ones_like(h))
        hw = hooks.layout((h * w).to(xp.dtype))
        if central:
            Hw = (A(xp + hw) - A(xp - hw)) / (2 * safe_h)
        else:
            Hw = (A(xp + hw) - A0) / safe_h
        Hw = torch.where(h > 0, Hw, torch.zeros_like(Hw))
        if spec.multiplies_input:
            Hw = Hw + A0 * u
    return loss, Hw


def finite_difference(model, xp: torch.Tensor, target: torch.Tensor, I_ref: torch.Tensor, spec,
                      sg_noise: torch.Tensor | None = None, hooks: Hooks = REFERENCE,
                      fd_step: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences ``(A(x' + h w) - A(x' - h w)) / 2h`` (two extra gradients):
    ``(loss (B,), J_r^T u (B, C, H, W))`` at the evaluation points ``xp``."""
    return _differences(model, xp, target, I_ref, spec, sg_noise, hooks, fd_step, True)


def finite_difference_onesided(model, xp: torch.Tensor, target: torch.Tensor, I_ref: torch.Tensor, spec,
                               sg_noise: torch.Tensor | None = None, hooks: Hooks = REFERENCE,
                               fd_step: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """One-sided differences ``(A(x' + h w) - A(x')) / h``, reusing the gradient at ``x'`` (one extra
    gradient)."""
    return _differences(model, xp, target, I_ref, spec, sg_noise, hooks, fd_step, False)
