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

import torch

from ._checks import ModelLike, check_choice, check_delta, check_images, check_labels, check_maps, check_model, \
    check_positive, eval_mode
from .dissimilarity import KINDS as DISSIMILARITIES
from .dissimilarity import dissimilarity as dissimilarity_fn
from .hvp_modes import DIRECTIONS, DOUBLE_BACKWARD, HVP_MODES, double_backward
from .methods import get as get_method
from .ops.saliency_dissim import KINDS as FUSED_KINDS
from .ops.saliency_dissim import fused_saliency_loss, saliency_dissim
from .piecewise import piecewise_or_fallback, resolve_hvp
from . import saliency as _saliency
from .saliency import DEFAULT_INTEGRATION, Baseline, check_saliency_args, postprocess_maps

__all__ = ["saliency_loss_grad", "HVP_MODES", "loss_and_direction", "SaliencySpec"]

# HVP_MODES (names accepted by ``hvp=``) and the modes themselves live in :mod:`upi_fast.hvp_modes`.


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
    def saliency_method(self):
        """The method object (:mod:`upi_fast.methods`) of ``method``."""
        return get_method(self.method)

    def method_options(self, noise: torch.Tensor | None = None) -> dict:
        """The keyword options of the method's :meth:`~upi_fast.methods.SaliencyMethod.points`."""
        return {"steps": self.steps, "baseline": self.baseline, "integration": self.integration, "noise": noise,
                "rule": _saliency.integration_rule}  # looked up at call time: one public rule function

    @property
    def stochastic(self) -> bool:
        """Whether the method draws noise (its callers seed a generator for it)."""
        return self.saliency_method.stochastic

    def draw_noise(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """The method's noise draws for ``x`` (smoothgrad: (n_samples, B, C, H, W)), or None."""
        return self.saliency_method.draw_noise(x, self.smoothgrad_std, self.n_samples, generator)

    @property
    def multiplies_input(self) -> bool:
        """Whether the raw map is ``(x - baseline) * A(x)`` (``multiply_by_input``, or the method's own)."""
        return self.saliency_method.multiplies(self.multiply_by_input)

    def input_factor(self, xp: torch.Tensor) -> torch.Tensor:
        """What the averaged gradient at ``xp`` is multiplied by (``xp - baseline``)."""
        return self.saliency_method.input_factor(xp, self.baseline)

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
        if not self.multiplies_input:
            loss, u = self.loss_and_u(A, I_ref)
            return loss, u, u
        bvec = self.input_factor(xp)
        loss, u = self.loss_and_u(bvec * A, I_ref)
        return loss, u, bvec * u


def _noise(x: torch.Tensor, std: float, generator: torch.Generator | None) -> torch.Tensor:
    if std == 0:
        return torch.zeros_like(x)
    return std * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def loss_and_direction(model, xp: torch.Tensor, target: torch.Tensor, I_ref: torch.Tensor, spec: SaliencySpec,
                       hvp: str, sg_noise: torch.Tensor | None = None, fd_step: float = 1e-2
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order modes at the evaluation points ``xp`` (B, C, H, W), already perturbed:
    returns ``(loss (B,), J_r(xp_i)^T u_i (B, C, H, W))`` (per sample, not averaged); ``hvp`` one of
    ``"forward"``, ``"finite_difference"``, ``"finite_difference_onesided"`` (and
    ``"piecewise_linear"``: :mod:`upi_fast.hvp_modes`)."""
    return DIRECTIONS[hvp](model, xp, target, I_ref, spec, sg_noise, fd_step=fd_step)


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
    sg_noise = spec.draw_noise(x, generator)

    def reduced(mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        if mode == DOUBLE_BACKWARD:
            return double_backward(model, x_eval, delta, target, I_ref, spec, sg_noise, wrt_delta=True)
        loss, jtu = DIRECTIONS[mode](model, x_eval + delta, target, I_ref, spec, sg_noise, fd_step=fd_step)
        jtu = jtu.detach() / B
        return loss.detach(), (jtu.sum(0) if delta.dim() == 3 else jtu)

    with eval_mode(model):
        xp = (x_eval + delta).detach()
        mode = resolve_hvp(model, xp, spec, hvp)
        return piecewise_or_fallback(model, xp, hvp, mode, reduced)
