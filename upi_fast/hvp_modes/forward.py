"""``forward``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` (exact)."""
from __future__ import annotations

import torch

from ..saliency import target_scores
from .hooks import REFERENCE, Hooks, averaged_gradient

__all__ = ["forward"]


def forward(model, xp: torch.Tensor, target: torch.Tensor, I_ref: torch.Tensor, spec,
            sg_noise: torch.Tensor | None = None, hooks: Hooks = REFERENCE,
            fd_step: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss (B,), J_r(xp_i)^T u_i (B, C, H, W))`` at the evaluation points ``xp``."""
    def tsum(q, tgt):
        return target_scores(model, q, tgt, spec.target_kind).sum()

    grad_fn = torch.func.grad(tsum)
    meth, opts = spec.saliency_method, spec.method_options(sg_noise)

    def A(p: torch.Tensor) -> torch.Tensor:
        return meth.gradient(grad_fn, p, target, **opts)

    with hooks.autocast():
        xp = hooks.layout(xp.detach())
        A0 = averaged_gradient(model, xp, target, spec, sg_noise, hooks)
        loss, u, w = spec.loss_u_w(A0.to(xp.dtype), xp, I_ref)
        _, Hw = torch.func.jvp(A, (xp,), (hooks.layout(w),))
        if spec.multiplies_input:
            Hw = Hw + A0 * u
    return loss, Hw
