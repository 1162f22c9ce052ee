"""``piecewise_linear``: ``H u = J^T C J u`` through the linearisation recorded during the primal
forward (exact for piecewise-linear models with the probability target; :mod:`upi_fast.piecewise`
explains it and holds the applicability check and the ``auto`` policy)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..linearization import Linearization
from ..linearization import check_logits as _check_logits
from .hooks import REFERENCE, Hooks

__all__ = ["piecewise_linear", "LOGIT_TARGET_MESSAGE"]

LOGIT_TARGET_MESSAGE = (
    "hvp='piecewise_linear' needs target_kind='prob': with the logit target the saliency map of a "
    "piecewise-linear network is piecewise constant in x, so its exact Hessian is zero almost everywhere "
    "and the attack gradient would be a silent zero. Use target_kind='prob', a smooth stand-in "
    "(`with upi_fast.softplus_surrogate(model): ...` with hvp='double_backward' or 'forward'), or "
    "hvp='finite_difference', which sees the activation switches.")


class _ProbTarget:
    """The softmax-probability target ``p_y(z)`` per row of logits ``z`` (P, K): ``s = d p_y / dz``
    and ``v -> C v`` with ``C = d^2 p_y / dz^2`` in O(K) per row. ``1 - p_y`` is computed as
    ``-expm1(log p_y)``, free of cancellation on confident rows."""

    def __init__(self, z: torch.Tensor, target: torch.Tensor) -> None:
        zc = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        logp = F.log_softmax(zc, dim=1)
        idx = target.view(-1, 1).to(torch.int64)
        log_py = logp.gather(1, idx)
        self.p, self.py = logp.exp(), log_py.exp()
        self.q = (-self.p).scatter_(1, idx, -torch.expm1(log_py))  # e_y - p
        self.dtype = z.dtype

    def grad(self) -> torch.Tensor:
        return (self.py * self.q).to(self.dtype)

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        v = v.to(self.p.dtype)
        qv = (self.q * v).sum(1, keepdim=True)
        pv = (self.p * v).sum(1, keepdim=True)
        return (self.py * (self.q * qv - self.p * (v - pv))).to(self.dtype)


def piecewise_linear(model, xp: torch.Tensor, target: torch.Tensor, I_ref: torch.Tensor, spec,
                     sg_noise: torch.Tensor | None = None, hooks: Hooks = REFERENCE,
                     fd_step: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss (B,), J_r(xp_i)^T u_i (B, C, H, W))`` at the evaluation points ``xp`` (B, C, H, W).

    The method's m*B evaluation points are one batch: point ``k`` gets the tangent ``t_k w_k w``
    (``t_k = d pt_k / d x``, ``w_k`` its weight in the averaged gradient; integrated gradients: the
    rule's node and weight, smoothgrad: ``1 / n``). Raises
    :class:`~upi_fast.linearization.NotPiecewiseLinearError` when this batch leaves the lists; the
    model must be in eval mode. ``fd_step`` is unused (the modes' common signature)."""
    if spec.target_kind != "prob":
        raise ValueError(LOGIT_TARGET_MESSAGE)
    dt = xp.dtype
    with hooks.autocast():
        xp = hooks.layout(xp.detach())
        B = xp.shape[0]
        pts = spec.saliency_method.points(xp, **spec.method_options(sg_noise))
        tgt = pts.targets(target)
        lin = Linearization(model, pts.points)
        if hooks.check_logits:
            _check_logits(lin.logits, pts.points.shape[0], tgt)
        prob = _ProbTarget(lin.logits, tgt)
        g = lin.vjp(prob.grad(), retain_graph=True)
        weights = pts.weights
        A0 = g if weights is None else (weights.view(-1, 1, 1, 1, 1) * g.view(pts.m, *xp.shape)).sum(0)
        loss, u, w = spec.loss_u_w(A0.to(dt), xp, I_ref)
        if weights is not None:
            scales = pts.tangents * weights
            w = (scales.view(-1, 1, 1, 1, 1) * w.unsqueeze(0)).reshape(pts.m * B, *xp.shape[1:])
        Hw = lin.vjp(prob.hvp(lin.jvp(hooks.layout(w.to(xp.dtype)))), retain_graph=False)
        if weights is not None:
            Hw = Hw.view(pts.m, *xp.shape).sum(0)
        if spec.multiplies_input:
            Hw = Hw + A0 * u
    return loss, Hw
