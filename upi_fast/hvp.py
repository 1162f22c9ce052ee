"""Gradient of the saliency dissimilarity with respect to a shared perturbation: batched HVPs.

For samples ``x_i`` with labels ``y_i``, reference maps ``I_ref_i``, smoothing noise ``z_i`` and a
perturbation ``delta``, the loss is

    L(delta) = (1/B) sum_i D( post(r(x_i + z_i + delta)), I_ref_i ),

with ``r`` the raw attribution (:func:`upi_fast.saliency.raw_gradient`). Its gradient is
``(1/B) sum_i J_r(x_i')^T u_i`` with ``u_i = dD/dr`` (the dissimilarity pushed back through the
post-processing). For the simple, integrated and smoothgrad gradients ``J_r`` is a weighted sum of
Hessians of the target, hence symmetric; with ``multiply_by_input`` (``r = (x - b) * A(x)``)
``J_r^T u = A * u + J_A ((x - b) * u)``. Modes:

* ``double_backward``: reverse-over-reverse through ``create_graph=True`` (exact);
* ``forward``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` (exact);
* ``finite_difference``: central differences of first-order gradients along ``w = J``-input
  ``u``, ``(A(x' + h w) - A(x' - h w)) / 2h`` (two extra gradients, no second derivatives);
* ``finite_difference_onesided``: ``(A(x' + h w) - A(x')) / h``, reusing the gradient already
  computed at ``x'`` (one extra gradient).
* ``piecewise_linear``: exact for piecewise-linear models (ReLU-family activations, convolutions,
  BatchNorm with running statistics, pooling, residual additions) and the probability target:
  ``H u = J^T C J u`` through the linearisation recorded during the primal forward, about two
  gradients per step (:mod:`upi_fast.piecewise`);
* ``auto``: ``piecewise_linear`` when it applies, ``finite_difference`` for a piecewise-linear model
  with the logit target (exact Hessian zero), ``double_backward`` otherwise (logged once per model).

Finite-difference step, per sample: ``h_i = fd_step * mean_j ||x'_j||_2 / ||w_i||_2``, i.e. the
probe ``h_i w_i`` has norm ``fd_step`` (default 1e-2) times the batch's mean input norm. On a ReLU
network this sees the activation kinks that the exact Hessian misses (see docs/calibration.md).
"""
from __future__ import annotations

from typing import Callable

import torch

from ._checks import ModelLike, check_choice, check_delta, check_images, check_labels, check_maps, check_model, \
    check_positive, eval_mode
from .dissimilarity import KINDS as DISSIMILARITIES
from .dissimilarity import dissimilarity as dissimilarity_fn
from .ops.saliency_dissim import KINDS as FUSED_KINDS
from .ops.saliency_dissim import fused_saliency_loss, saliency_dissim
from .piecewise import NotPiecewiseLinearError, mark_refused, piecewise_loss_and_direction, resolve_hvp
from .saliency import DEFAULT_INTEGRATION, Baseline, _baseline_like, _path_points, _weighted_sum, \
    averaged_gradient, check_saliency_args, postprocess_maps, smoothgrad_noise, target_scores

__all__ = ["saliency_loss_grad", "HVP_MODES", "loss_and_direction", "SaliencySpec"]

#: Names accepted by ``hvp=``: how the gradient through the saliency map is obtained (see the module docstring).
HVP_MODES = ("double_backward", "forward", "finite_difference", "finite_difference_onesided",
             "piecewise_linear", "auto")


class SaliencySpec:
    """The interpretation map being attacked: method, target, post-processing, dissimilarity.

    A small value object so that solvers, HVP modes and kernels agree on one definition. Arguments
    as in :func:`upi_fast.saliency.saliency` (``smoothgrad_std``, ``n_samples``: smoothgrad's
    ``noise_std`` and ``n_samples``; ``integration``: the integrated-gradients path rule, one of
    :data:`upi_fast.saliency.INTEGRATION_RULES`, default ``"uniform_endpoints"``), ``dissimilarity``
    one of :data:`upi_fast.dissimilarity.KINDS` and ``k`` the top-k size of the ``topk`` loss.
    Every HVP mode and the solvers' ``saliency_kwargs`` go through this object.
    """

    def __init__(self, method: str = "simple", target_kind: str = "prob", postprocess: str = "abs_sum_l1",
                 dissimilarity: str = "l2", steps: int = 10, baseline=None, multiply_by_input: bool = False,
                 smoothgrad_std: float = 0.0, n_samples: int = 1, k: int | None = None,
                 integration: str = DEFAULT_INTEGRATION) -> None:
        check_saliency_args(method, target_kind, postprocess, steps, smoothgrad_std, n_samples, integration)
        check_choice("dissimilarity", dissimilarity, DISSIMILARITIES)
        self.method, self.target_kind, self.postprocess = method, target_kind, postprocess
        self.dissimilarity, self.steps, self.baseline = dissimilarity, steps, baseline
        self.multiply_by_input, self.smoothgrad_std, self.n_samples, self.k = (
            multiply_by_input, smoothgrad_std, n_samples, k)
        self.integration = integration

    @property
    def fused(self) -> bool:
        """Whether post-processing + dissimilarity run as the fused ``upi_fast::saliency_dissim`` op."""
        return self.postprocess == "abs_sum_l1" and self.dissimilarity in FUSED_KINDS

    def loss(self, r: torch.Tensor, I_ref: torch.Tensor) -> torch.Tensor:
        """Per-sample dissimilarity (B,) of the raw attribution ``r``, differentiable in ``r``."""
        if self.fused:
            return fused_saliency_loss(r, I_ref, self.dissimilarity)
        return dissimilarity_fn(postprocess_maps(r, self.postprocess), I_ref, self.dissimilarity, k=self.k)

    def loss_and_u(self, r: torch.Tensor, I_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss (B,), u = d loss_i / d r_i (B, C, H, W))``, first order, no graph kept."""
        if self.fused:
            return saliency_dissim(r.detach(), I_ref, self.dissimilarity, True)
        with torch.enable_grad():
            rr = r.detach().requires_grad_(True)
            loss = self.loss(rr, I_ref)
            (u,) = torch.autograd.grad(loss.sum(), rr)
        return loss.detach(), u

    def loss_u_w(self, A: torch.Tensor, xp: torch.Tensor,
                 I_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """From the averaged input gradient ``A`` (B, C, H, W) at the evaluation points ``xp``:
        ``(loss (B,), u, w)``, ``u`` as in :meth:`loss_and_u` of the raw map ``r`` and ``w`` the vector
        the target's Hessian is applied to (``u``, times ``xp - baseline`` with ``multiply_by_input``,
        where ``r = (xp - baseline) * A``)."""
        if not self.multiply_by_input:
            loss, u = self.loss_and_u(A, I_ref)
            return loss, u, u
        bvec = xp - _baseline_like(self.baseline, xp)
        loss, u = self.loss_and_u(bvec * A, I_ref)
        return loss, u, bvec * u


def _noise(x: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    if std == 0:
        return torch.zeros_like(x)
    return std * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _avg_grad_func(model, target: torch.Tensor, spec: SaliencySpec, sg_noise) -> Callable[[torch.Tensor], torch.Tensor]:
    """``A(p)`` written with ``torch.func.grad`` so that ``torch.func.jvp`` can push tangents through it."""

    def tsum(q, tgt):
        return target_scores(model, q, tgt, spec.target_kind).sum()

    grad_fn = torch.func.grad(tsum)

    def A(p: torch.Tensor) -> torch.Tensor:
        B = p.shape[0]
        if spec.method == "simple":
            return grad_fn(p, target)
        if spec.method == "integrated":
            pts, _, w = _path_points(p, spec.baseline, spec.integration, spec.steps)
            return _weighted_sum(w, grad_fn(pts, target.repeat(spec.steps)), p.shape)
        n = sg_noise.shape[0]
        pts = (p.unsqueeze(0) + sg_noise).reshape(n * B, *p.shape[1:])
        return grad_fn(pts, target.repeat(n)).view(n, *p.shape).mean(0)

    return A


def loss_and_direction(model, xp: torch.Tensor, target: torch.Tensor, I_ref: torch.Tensor, spec: SaliencySpec,
                       hvp: str, sg_noise: torch.Tensor | None = None, fd_step: float = 1e-2
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order modes at the evaluation points ``xp`` (B, C, H, W), already perturbed:
    returns ``(loss (B,), J_r(xp_i)^T u_i (B, C, H, W))`` (per sample, not averaged)."""

    def A_eval(p):
        return averaged_gradient(model, p, target, method=spec.method, target_kind=spec.target_kind,
                                 create_graph=False, steps=spec.steps, baseline=spec.baseline, noise=sg_noise,
                                 integration=spec.integration)

    A0 = A_eval(xp)
    loss, u, w = spec.loss_u_w(A0, xp, I_ref)
    if hvp == "forward":
        _, Hw = torch.func.jvp(_avg_grad_func(model, target, spec, sg_noise), (xp,), (w,))
    else:
        B = xp.shape[0]
        scale = xp.reshape(B, -1).norm(dim=1).mean()
        wn = w.reshape(B, -1).norm(dim=1)
        h = torch.where(wn > 0, fd_step * scale / wn.clamp_min(1e-30), torch.zeros_like(wn)).view(B, 1, 1, 1)
        safe_h = torch.where(h > 0, h, torch.ones_like(h))
        if hvp == "finite_difference":
            Hw = (A_eval(xp + h * w) - A_eval(xp - h * w)) / (2 * safe_h)
        else:
            Hw = (A_eval(xp + h * w) - A0) / safe_h
        Hw = torch.where(h > 0, Hw, torch.zeros_like(Hw))
    if spec.multiply_by_input:
        Hw = Hw + A0 * u
    return loss, Hw


def saliency_loss_grad(model: ModelLike, x: torch.Tensor, target: torch.Tensor, I_ref: torch.Tensor, delta: torch.Tensor,
                       dissimilarity: str = "l2", hvp: str = "double_backward", noise_std: float = 0.0, *,
                       generator: torch.Generator | None = None, fd_step: float = 1e-2, method: str = "simple",
                       target_kind: str = "prob", postprocess: str = "abs_sum_l1", steps: int = 10,
                       baseline: Baseline = None, multiply_by_input: bool = False, smoothgrad_std: float = 0.0,
                       n_samples: int = 1, k: int | None = None,
                       integration: str = DEFAULT_INTEGRATION) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample dissimilarities and the gradient of their mean with respect to ``delta``.

    Args:
        model: classifier returning logits (B, K); run in eval mode.
        x: clean images (B, C, H, W), model input units.
        target: labels (B,) whose saliency is attacked.
        I_ref: reference maps (B, N), usually ``saliency(model, x, target, ...)`` of the clean images
            (N = H*W for ``abs_sum_l1``, C*H*W for ``raw``).
        delta: the perturbation, (C, H, W) shared by all samples, or (B, C, H, W) one per sample.
        dissimilarity: ``"l2"``, ``"rel_l2"``, ``"cosine"`` or ``"topk"``.
        hvp: one of :data:`HVP_MODES` (module docstring).
        noise_std: standard deviation of the smoothing noise ``Z`` added to every sample (model units).
        generator: random generator for ``Z`` and the smoothgrad noise.
        fd_step: relative finite-difference step (see module docstring).
        method, target_kind, postprocess, steps, baseline, multiply_by_input: as in
            :func:`upi_fast.saliency`; ``smoothgrad_std`` and ``n_samples`` are smoothgrad's
            ``noise_std`` and ``n_samples``; ``k`` the top-k size of the ``topk`` loss.
        integration: integrated-gradients path rule (:data:`upi_fast.saliency.INTEGRATION_RULES`,
            default ``"uniform_endpoints"``); every ``hvp`` mode differentiates the same rule.

    Returns:
        ``(loss, grad)``: loss (B,) detached, ``D(I(x_i + z_i + delta), I_ref_i)``; grad shaped like
        ``delta``, the gradient of ``loss.mean()`` with respect to ``delta``.
    """
    check_model(model)
    check_images("x", x)
    check_labels("target", target, x.shape[0])
    check_choice("hvp", hvp, HVP_MODES)
    check_positive("noise_std", noise_std, allow_zero=True)
    check_positive("fd_step", fd_step)
    spec = SaliencySpec(method, target_kind, postprocess, dissimilarity, steps, baseline, multiply_by_input,
                        smoothgrad_std, n_samples, k, integration)
    B = x.shape[0]
    width = x.shape[2] * x.shape[3] if postprocess == "abs_sum_l1" else x[0].numel()
    check_maps("I_ref", I_ref, B, width)
    check_delta("delta", delta, tuple(x.shape[1:]), B)
    return _loss_grad(model, x, target, I_ref.to(x.dtype), delta.to(x.dtype), spec, hvp, noise_std, generator, fd_step)


def _loss_grad(model, x, target, I_ref, delta, spec: SaliencySpec, hvp: str, noise_std: float,
               generator, fd_step: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`saliency_loss_grad` without argument checks (the solvers' hot path)."""
    B = x.shape[0]
    x_eval = x + _noise(x, noise_std, generator)
    sg_noise = (smoothgrad_noise(x, spec.smoothgrad_std, spec.n_samples, generator)
                if spec.method == "smoothgrad" else None)
    with eval_mode(model):
        requested = hvp
        if hvp in ("auto", "piecewise_linear"):
            hvp = resolve_hvp(model, (x_eval + delta).detach(), spec, hvp)
        if hvp == "piecewise_linear":
            xp = (x_eval + delta).detach()
            try:
                loss, jtu = piecewise_loss_and_direction(model, xp, target, I_ref, spec, sg_noise)
            except NotPiecewiseLinearError as e:  # this batch left the lists: exact or refuse
                if requested != "auto":
                    raise ValueError(f"hvp='piecewise_linear' does not apply to this model on this batch: {e}. "
                                     "Use hvp='double_backward' (exact for any model) or hvp='auto'.") from None
                mark_refused(model, xp, str(e))
                hvp = "double_backward"
            else:
                jtu = jtu.detach() / B
                return loss.detach(), (jtu.sum(0) if delta.dim() == 3 else jtu)
        if hvp == "double_backward":
            with torch.enable_grad():
                d = delta.detach().requires_grad_(True)
                xp = x_eval + d
                r = averaged_gradient(model, xp, target, method=spec.method, target_kind=spec.target_kind,
                                      create_graph=True, steps=spec.steps, baseline=spec.baseline, noise=sg_noise,
                                      integration=spec.integration)
                if spec.multiply_by_input:
                    r = (xp - _baseline_like(spec.baseline, xp)) * r
                loss = spec.loss(r, I_ref)
                (grad,) = torch.autograd.grad(loss.sum() / B, d)
            return loss.detach(), grad
        xp = (x_eval + delta).detach()
        loss, jtu = loss_and_direction(model, xp, target, I_ref, spec, hvp, sg_noise, fd_step)
    jtu = jtu.detach() / B
    return loss.detach(), (jtu.sum(0) if delta.dim() == 3 else jtu)
