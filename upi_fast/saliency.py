"""Gradient-based interpretation maps I(x), batched and differentiable with respect to x.

Units: ``x`` is in the model's own input units (after any preprocessing), shape (B, C, H, W).
The gradient target is the softmax probability of the label (``target_kind="prob"``, the default
and the authors' choice) or its logit (``"logit"``). Methods:

* ``simple``:     ``g(x) = grad_x target(x)``;
* ``integrated``: the weighted path sum ``A(x) = sum_{k=0}^{M-1} w_k grad target(b + a_k (x - b))``,
  M = ``steps``, baseline ``b`` (default: zeros in model units; pass the black image of your
  preprocessing), nodes ``a_k`` and weights ``w_k`` from the ``integration`` rule below; with
  ``multiply_by_input`` the standard integrated gradients ``(x - b) * A(x)``;
* ``smoothgrad``: mean of ``g(x + n)`` over ``n_samples`` draws ``n ~ N(0, noise_std^2 I)``.

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

import functools
from typing import Union

import torch
import torch.nn.functional as F

from ._checks import ModelLike, check_choice, check_images, check_labels, check_model, check_positive, eval_mode

__all__ = ["saliency", "raw_gradient", "averaged_gradient", "postprocess_maps", "target_scores", "integration_rule",
           "METHODS", "TARGET_KINDS", "POSTPROCESS", "INTEGRATION_RULES", "DEFAULT_INTEGRATION"]

#: Saliency methods: plain gradient, integrated gradients, SmoothGrad.
METHODS = ("simple", "integrated", "smoothgrad")
#: What is differentiated: the softmax probability of the target class, or its logit.
TARGET_KINDS = ("prob", "logit")
#: Post-processing of the raw gradient: ``abs_sum_l1`` -> (B, H*W) maps summing to 1; ``raw`` -> (B, C*H*W).
POSTPROCESS = ("abs_sum_l1", "raw")
#: Integrated-gradients quadrature rules (``integration=``): the authors' ``uniform_endpoints``
#: (weight 1/M at k/(M-1), the default) and captum's five rules (module docstring).
INTEGRATION_RULES = ("uniform_endpoints", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
                     "gausslegendre")
#: The default integration rule: ``uniform_endpoints``, the authors' (tf-explain's) path mean.
DEFAULT_INTEGRATION = "uniform_endpoints"

#: An integrated-gradients baseline: a tensor or number broadcastable to the images, or None (zeros).
Baseline = Union[torch.Tensor, float, None]


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


def _baseline_like(baseline: Baseline, x: torch.Tensor) -> torch.Tensor:
    if baseline is None:
        return torch.zeros_like(x)
    b = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    try:
        return torch.broadcast_to(b, x.shape)
    except RuntimeError:
        raise ValueError(f"baseline of shape {tuple(b.shape)} does not broadcast to x's shape {tuple(x.shape)}") from None


def check_integration(integration: str, steps: int) -> None:
    """ValueError naming ``integration`` unless it is one of :data:`INTEGRATION_RULES` usable with
    ``steps`` path points (captum's Riemann rules need ``steps >= 2``, as in captum)."""
    check_choice("integration", integration, INTEGRATION_RULES)
    if integration.startswith("riemann_") and steps < 2:
        raise ValueError(f"integration={integration!r} needs steps >= 2 (captum's Riemann rules refuse "
                         f"n_steps=1 too), got steps={steps}")


@functools.lru_cache(maxsize=64)
def _rule_float64(integration: str, steps: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(alphas, weights) of the rule in float64, as Python floats (cached: a solver asks every step)."""
    M = steps
    if integration == "gausslegendre":
        import numpy as np  # captum's own construction: numpy's Gauss-Legendre nodes on [-1, 1]
        nodes, wts = np.polynomial.legendre.leggauss(M)
        return tuple((0.5 * (1 + nodes)).tolist()), tuple((0.5 * wts).tolist())
    weights = [1.0 / M] * M
    if integration == "uniform_endpoints":
        alphas = torch.linspace(0.0, 1.0, M, dtype=torch.float64) if M > 1 else torch.ones(1, dtype=torch.float64)
    elif integration == "riemann_trapezoid":
        alphas = torch.linspace(0.0, 1.0, M, dtype=torch.float64)
        weights[0] /= 2
        weights[-1] /= 2
    elif integration == "riemann_left":
        alphas = torch.linspace(0.0, 1.0 - 1.0 / M, M, dtype=torch.float64)
    elif integration == "riemann_right":
        alphas = torch.linspace(1.0 / M, 1.0, M, dtype=torch.float64)
    else:  # riemann_middle
        alphas = torch.linspace(1.0 / (2 * M), 1.0 - 1.0 / (2 * M), M, dtype=torch.float64)
    return tuple(alphas.tolist()), tuple(weights)


_RULE_TENSORS: dict = {}  # (rule, steps, dtype, device) -> (alphas, weights), never handed out (clones are)


def integration_rule(integration: str = DEFAULT_INTEGRATION, steps: int = 10, dtype: torch.dtype = torch.float32,
                     device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights of an integrated-gradients path rule: ``(alphas (M,), weights (M,))``.

    The path points are ``b + alphas[k] (x - b)`` (``alphas`` dimensionless, in [0, 1]) and the
    averaged gradient is ``sum_k weights[k] grad target(point_k)``; M = ``steps``. Computed in
    float64 and rounded once to ``dtype`` on ``device``. ``integration``, one of
    :data:`INTEGRATION_RULES`:

    * ``uniform_endpoints`` (default, the authors' / tf-explain's rule): ``a_k = k / (M - 1)``,
      ``w_k = 1 / M`` (both end points at full weight; ``a = [1]`` for M = 1). Not a captum rule;
    * captum 0.9's rules, same nodes and weights: ``riemann_left`` ``a_k = k / M``,
      ``riemann_right`` ``(k + 1) / M``, ``riemann_middle`` ``(k + 1/2) / M`` (all ``w_k = 1 / M``);
      ``riemann_trapezoid`` ``a_k = k / (M - 1)``, ``w_k = 1 / M`` halved at both ends (sum
      ``(M - 1) / M``, as captum); ``gausslegendre`` the M-point Gauss-Legendre rule on [0, 1]. The
      Riemann rules need M >= 2, as in captum.

    Raises ValueError for an unknown rule, a non-positive ``steps`` or a Riemann rule with
    ``steps`` = 1.
    """
    check_positive("steps", steps, integer=True)
    check_integration(integration, steps)
    key = (integration, steps, dtype, None if device is None else torch.device(device))
    hit = _RULE_TENSORS.get(key)
    if hit is None:  # built once per device: no host-to-device copy (a synchronisation) per call
        alphas, weights = _rule_float64(integration, steps)
        hit = (torch.tensor(alphas, dtype=dtype, device=device), torch.tensor(weights, dtype=dtype, device=device))
        if len(_RULE_TENSORS) < 256:
            _RULE_TENSORS[key] = hit
    return hit[0].clone(), hit[1].clone()


def path_coefficients(steps: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The default rule's nodes ``a_k = k / (M - 1)`` (``[1.0]`` when M = 1); kept for older callers,
    see :func:`integration_rule` for the nodes and weights of every rule."""
    return integration_rule(DEFAULT_INTEGRATION, steps, dtype, device)[0]


def _path_points(x: torch.Tensor, baseline: Baseline, integration: str,
                 steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The M*B path points (M*B, C, H, W), point ``k`` of sample ``i`` at row ``k*B + i``, and the
    rule's nodes and weights (M,) in ``x``'s dtype."""
    b = _baseline_like(baseline, x)
    a, w = integration_rule(integration, steps, x.dtype, x.device)
    pts = (b.unsqueeze(0) + a.view(-1, 1, 1, 1, 1) * (x - b).unsqueeze(0)).reshape(steps * x.shape[0], *x.shape[1:])
    return pts, a, w


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
    B = x.shape[0]
    if method == "simple":
        return _grad_at(model, x, target, target_kind, create_graph)
    if method == "integrated":
        pts, _, w = _path_points(x, baseline, integration, steps)
        g = _grad_at(model, pts, target.repeat(steps), target_kind, create_graph)
        return _weighted_sum(w, g, x.shape)
    if method == "smoothgrad":
        if noise is None:
            raise ValueError("smoothgrad needs its noise draws")
        n = noise.shape[0]
        pts = (x.unsqueeze(0) + noise).reshape(n * B, *x.shape[1:])
        g = _grad_at(model, pts, target.repeat(n), target_kind, create_graph)
        return g.view(n, *x.shape).mean(0)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


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
    if method == "smoothgrad" and noise is None:
        noise = smoothgrad_noise(x, noise_std, n_samples, generator)
    avg = averaged_gradient(model, x, target, method=method, target_kind=target_kind, create_graph=create_graph,
                            steps=steps, baseline=baseline, noise=noise, integration=integration)
    if multiply_by_input:
        return (x - _baseline_like(baseline, x)) * avg
    return avg


def smoothgrad_noise(x: torch.Tensor, noise_std: float, n_samples: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(n_samples, B, C, H, W) Gaussian draws of standard deviation ``noise_std``."""
    return noise_std * torch.randn((n_samples, *x.shape), generator=generator, dtype=x.dtype, device=x.device)


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
    check_choice("method", method, METHODS)
    check_choice("target_kind", target_kind, TARGET_KINDS)
    check_choice("postprocess", postprocess_kind, POSTPROCESS)
    check_positive("steps", steps, integer=True)
    check_positive("noise_std", noise_std, allow_zero=True)
    check_positive("n_samples", n_samples, integer=True)
    check_choice("integration", integration, INTEGRATION_RULES)
    if method == "integrated":
        check_integration(integration, steps)
    if method == "smoothgrad" and noise_std == 0:
        raise ValueError("noise_std must be > 0 for method='smoothgrad'")


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
