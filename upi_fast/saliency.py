"""Gradient-based interpretation maps I(x), batched and differentiable with respect to x.

Units: ``x`` is in the model's own input units (after any preprocessing), shape (B, C, H, W).
The gradient target is the softmax probability of the label (``target_kind="prob"``, the default
and the authors' choice) or its logit (``"logit"``). Methods:

* ``simple``:     ``g(x) = grad_x target(x)``;
* ``integrated``: the weighted path sum ``A(x) = sum_{k=0}^{M-1} w_k grad target(b + a_k (x - b))``,
  M = ``steps``, baseline ``b`` (default: zeros in model units; pass the black image of your
  preprocessing), nodes ``a_k`` and weights ``w_k`` from the ``integration`` rule below; with
  ``multiply_by_input`` the standard integrated gradients ``(x - b) * A(x)``;
* ``smoothgrad``: mean of ``g(x + n)`` over ``n_samples`` draws ``n ~ N(0, noise_std^2 I)``;
* ``grad_x_input``: Grad x Input, ``(x - b) * g(x)`` (baseline ``b`` default zeros).

Each method is one object of the registry in :mod:`upi_fast.methods` (one module per method);
:data:`METHODS` are its names.

Integration rules (``integration=``, :data:`INTEGRATION_RULES`, :func:`integration_rule`):

* ``uniform_endpoints`` (default): ``a_k = k / (M - 1)``, ``w_k = 1 / M`` (``a = [1]`` when M = 1),
  i.e. the plain mean over M equally spaced points *including both end points with equal weight*.
  This is the rule of the authors' code (tf-explain's ``IntegratedGradients``: ``linspace(0, 1, M)``
  and a mean) and of METHOD.md. It is **not** captum's trapezoid rule (which halves the end
  weights) nor any other captum rule: at equal M the maps differ (digits CNN, eval split, M = 10,
  probability target: per-sample relative L2 difference of the maps median 2-17%, up to 47%,
  depending on the captum rule, smallest for ``riemann_trapezoid``).
* captum's five rules, with captum 0.9's nodes and weights
  (``captum.attr._utils.approximation_methods``):
  ``riemann_left`` (``a_k = k / M``), ``riemann_right`` (``a_k = (k + 1) / M``), ``riemann_middle``
  (``a_k = (k + 1/2) / M``), all with ``w_k = 1 / M``; ``riemann_trapezoid`` (``a_k = k / (M - 1)``,
  ``w_k = 1 / M`` halved at both ends, so the weights sum to ``(M - 1) / M`` exactly as in captum;
  needs M >= 2); ``gausslegendre`` (M-point Gauss-Legendre nodes and weights mapped to [0, 1],
  captum's default). captum itself refuses M = 1 for every Riemann rule; here left / right / middle
  accept it (one node, weight 1). captum multiplies by float32-rounded weights even for float64
  inputs; these weights are exact in the computation's dtype.

Post-processing ``abs_sum_l1`` (default): ``S = sum_c |g_c|``, ``I = S / ||S||_1`` (an H*W map per
sample; a zero map stays zero). ``raw``: the gradient itself, flattened to C*H*W.

Every sample's map depends on that sample alone: the model runs in eval mode (BatchNorm with
running statistics), so one batched backward pass gives all the per-sample gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._checks import ModelLike, check_choice, check_images, check_labels, check_model, check_positive, eval_mode
from .methods import METHODS, Baseline, get as get_method
from .methods.base import baseline_like as _baseline_like
from .methods.integrated import (DEFAULT_INTEGRATION, INTEGRATION_RULES, _rule_float64, check_integration,  # noqa: F401
                                 integration_rule, path_coefficients)
from .methods.integrated import path_points as _path_points  # noqa: F401
from .methods.smoothgrad import smoothgrad_noise

__all__ = ["saliency", "raw_gradient", "averaged_gradient", "postprocess_maps", "target_scores", "integration_rule",
           "METHODS", "TARGET_KINDS", "POSTPROCESS", "INTEGRATION_RULES", "DEFAULT_INTEGRATION"]

# METHODS: the registered saliency methods (:mod:`upi_fast.methods`): plain gradient, integrated
# gradients, SmoothGrad, Grad x Input, ...
#: What is differentiated: the softmax probability of the target class, or its logit.
TARGET_KINDS = ("prob", "logit")
#: Post-processing of the raw gradient: ``abs_sum_l1`` -> (B, H*W) maps summing to 1; ``raw`` -> (B, C*H*W).
POSTPROCESS = ("abs_sum_l1", "raw")


def target_scores(model: ModelLike, x: torch.Tensor, target: torch.Tensor, target_kind: str = "prob",
                  logits: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample gradient target (B,): ``softmax(model(x))[b, target[b]]`` (a probability in
    [0, 1], ``target_kind="prob"``) or the logit ``model(x)[b, target[b]]`` (``"logit"``).

    ``x`` is (B, C, H, W) in model input units, ``target`` (B,) class indices; ``logits`` (B, K),
    when given, are used instead of calling ``model`` again."""
    if logits is None:
        logits = model(x)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(f"model must return logits of shape (B, K) = ({x.shape[0]}, K), got "
                         f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    K = logits.shape[1]
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= K):
        raise ValueError(f"target has labels outside [0, {K - 1}] for a model with {K} outputs")
    idx = target.view(-1, 1).to(torch.int64)
    if target_kind == "prob":
        return F.log_softmax(logits, dim=1).gather(1, idx).squeeze(1).exp()
    return logits.gather(1, idx).squeeze(1)


def _grad_at(model: ModelLike, points: torch.Tensor, target: torch.Tensor, target_kind: str,
             create_graph: bool) -> torch.Tensor:
    """Gradient of each sample's target with respect to ``points`` (same shape as ``points``)."""
    with torch.enable_grad():
        p = points if points.requires_grad else points.detach().requires_grad_(True)
        scores = target_scores(model, p, target, target_kind)
        if not scores.requires_grad:
            raise ValueError("the model's output is not differentiable with respect to its input x (computed "
                             "without gradient tracking: torch.no_grad, .detach() or a non-differentiable op inside)")
        (g,) = torch.autograd.grad(scores.sum(), p, create_graph=create_graph, allow_unused=True)
    if g is None:
        raise ValueError("the model's output does not depend on its input x (no gradient path)")
    return g


def _weighted_sum(w: torch.Tensor, g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``sum_k w[k] g_k`` for ``g`` (M*B, ...) stacked point-major, reshaped to ``shape`` (B, ...)."""
    return (w.view(-1, *([1] * len(shape))) * g.view(w.shape[0], *shape)).sum(0)


def averaged_gradient(model: ModelLike, x: torch.Tensor, target: torch.Tensor, *, method: str = "simple",
                      target_kind: str = "prob", create_graph: bool = False, steps: int = 10,
                      baseline: Baseline = None, noise: torch.Tensor | None = None,
                      integration: str = DEFAULT_INTEGRATION) -> torch.Tensor:
    """The path- or noise-averaged gradient ``A(x)`` (B, C, H, W), before any input multiplication.

    ``noise`` (smoothgrad only): (n_samples, B, C, H, W) draws, fixed by the caller so that two
    evaluations at nearby points use the same noise. ``integration`` (integrated only): the path
    rule, one of :data:`INTEGRATION_RULES` (the weighted sum of :func:`integration_rule`).
    """
    meth = get_method(method)

    def grad_fn(points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _grad_at(model, points, labels, target_kind, create_graph)

    return meth.gradient(grad_fn, x, target, steps=steps, baseline=baseline, integration=integration, noise=noise,
                         rule=integration_rule)


def raw_gradient(model: ModelLike, x: torch.Tensor, target: torch.Tensor, method: str = "simple",
                 target_kind: str = "prob", create_graph: bool = False, steps: int = 10, baseline: Baseline = None,
                 multiply_by_input: bool = False, noise_std: float = 0.0, n_samples: int = 1,
                 generator: torch.Generator | None = None, noise: torch.Tensor | None = None, *,
                 integration: str = DEFAULT_INTEGRATION) -> torch.Tensor:
    """The attribution before post-processing, (B, C, H, W) in ``x``'s dtype: the gradient of the
    target (probability or logit) with respect to ``x``, in target units per model input unit.

    Arguments as in :func:`saliency`, plus ``noise``: pre-drawn smoothgrad noise
    (n_samples, B, C, H, W) in model input units, used instead of drawing from ``noise_std``,
    ``n_samples`` and ``generator``; ``integration`` the integrated-gradients path rule (an unknown
    rule still raises ValueError). ``multiply_by_input`` applies to ``integrated`` (standard
    integrated gradients) and to the other methods alike (gradient x input). Feed the result to
    :func:`postprocess_maps` or to the fused :func:`upi_fast.functional.saliency_dissim`.

    This is the unchecked fast path (no argument validation, the model's train / eval mode is
    left as it is); :func:`saliency` checks its arguments and computes in eval mode.
    """
    meth = get_method(method)
    if noise is None:
        noise = meth.draw_noise(x, noise_std, n_samples, generator)
    avg = averaged_gradient(model, x, target, method=method, target_kind=target_kind, create_graph=create_graph,
                            steps=steps, baseline=baseline, noise=noise, integration=integration)
    if meth.multiplies(multiply_by_input):
        return meth.input_factor(x, baseline) * avg
    return avg


def postprocess_maps(g: torch.Tensor, kind: str = "abs_sum_l1") -> torch.Tensor:
    """Turn raw gradients (B, C, H, W) into maps: (B, H*W) for ``abs_sum_l1``, (B, C*H*W) for ``raw``.

    ``abs_sum_l1``: ``S = sum_c |g_c|``, ``I = S / ||S||_1``; a sample whose gradient is exactly
    zero gets the zero map (never NaN). Differentiable (``|.|`` has subgradient 0 at 0).
    """
    if kind == "raw":
        return g.reshape(g.shape[0], -1)
    if kind != "abs_sum_l1":
        raise ValueError(f"postprocess must be one of {POSTPROCESS}, got {kind!r}")
    S = g.abs().sum(1).reshape(g.shape[0], -1)
    n1 = S.sum(1, keepdim=True)
    return torch.where(n1 > 0, S / n1.clamp_min(1e-30), torch.zeros_like(S))


def check_saliency_args(method: str, target_kind: str, postprocess_kind: str, steps: int, noise_std: float,
                        n_samples: int, integration: str = DEFAULT_INTEGRATION) -> None:
    """ValueError / TypeError naming the first bad saliency option."""
    get_method(method)
    check_choice("target_kind", target_kind, TARGET_KINDS)
    check_choice("postprocess", postprocess_kind, POSTPROCESS)
    check_positive("steps", steps, integer=True)
    check_positive("noise_std", noise_std, allow_zero=True)
    check_positive("n_samples", n_samples, integer=True)
    check_choice("integration", integration, INTEGRATION_RULES)
    get_method(method).check(steps=steps, noise_std=noise_std, n_samples=n_samples, integration=integration)


def saliency(model: ModelLike, x: torch.Tensor, target: torch.Tensor, method: str = "simple", target_kind: str = "prob",
             postprocess: str = "abs_sum_l1", create_graph: bool = False, steps: int = 10, baseline: Baseline = None,
             multiply_by_input: bool = False, noise_std: float = 0.0, n_samples: int = 1,
             generator: torch.Generator | None = None, *, integration: str = DEFAULT_INTEGRATION) -> torch.Tensor:
    """Batched interpretation maps of ``model`` at ``x`` for the labels ``target``.

    Args:
        model: classifier returning logits (B, K); computed in eval mode (restored afterwards).
        x: images (B, C, H, W) in model input units.
        target: class indices (B,), int64.
        method: ``"simple"``, ``"integrated"`` or ``"smoothgrad"``.
        target_kind: ``"prob"`` (softmax probability, default) or ``"logit"``.
        postprocess: ``"abs_sum_l1"`` -> (B, H*W) maps summing to 1; ``"raw"`` -> (B, C*H*W).
        create_graph: keep the graph so the maps are differentiable with respect to ``x``.
        steps: integrated-gradients path points M (>= 1; >= 2 for ``riemann_trapezoid``).
        baseline: integrated-gradients baseline, broadcastable to x (default zeros).
        multiply_by_input: multiply the averaged gradient by ``x - baseline``.
        noise_std: smoothgrad noise standard deviation (model units).
        n_samples: smoothgrad draws.
        generator: random generator for the smoothgrad noise.
        integration: integrated-gradients path rule, one of :data:`INTEGRATION_RULES`: the default
            ``"uniform_endpoints"`` (weight 1/M at k/(M-1), the authors' rule) or captum's
            ``"riemann_left"``, ``"riemann_right"``, ``"riemann_middle"``, ``"riemann_trapezoid"``,
            ``"gausslegendre"`` (same nodes and weights as captum; see :func:`integration_rule`).

    Returns:
        The maps, (B, H*W) or (B, C*H*W), in ``x``'s dtype.
    """
    check_model(model)
    check_images("x", x)
    check_saliency_args(method, target_kind, postprocess, steps, noise_std, n_samples, integration)
    check_labels("target", target, x.shape[0])
    with eval_mode(model):
        g = raw_gradient(model, x, target, method, target_kind, create_graph, steps, baseline, multiply_by_input,
                         noise_std, n_samples, generator, integration=integration)
    maps = postprocess_maps(g, postprocess)
    return maps if create_graph else maps.detach()
