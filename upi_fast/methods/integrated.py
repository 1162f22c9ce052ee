"""``integrated``: integrated gradients, ``A(x) = sum_{k<M} w_k grad target(b + a_k (x - b))``, and its
integration rules (:data:`INTEGRATION_RULES`, :func:`integration_rule`; documented in
:mod:`upi_fast.saliency`)."""
from __future__ import annotations

import functools

import torch

from .._checks import check_choice, check_positive
from .base import Points, SaliencyMethod, baseline_like, register

__all__ = ["IntegratedGradients", "INTEGRATION_RULES", "DEFAULT_INTEGRATION", "integration_rule",
           "check_integration", "path_coefficients", "path_points"]

#: Integrated-gradients quadrature rules (``integration=``): the authors' ``uniform_endpoints``
#: (weight 1/M at k/(M-1), the default) and captum's five rules (module docstring).
INTEGRATION_RULES = ("uniform_endpoints", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid",
                     "gausslegendre")
#: The default integration rule: ``uniform_endpoints``, the authors' (tf-explain's) path mean.
DEFAULT_INTEGRATION = "uniform_endpoints"


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


def path_points(x: torch.Tensor, baseline, integration: str, steps: int,
                rule=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The M*B path points (M*B, C, H, W), point ``k`` of sample ``i`` at row ``k*B + i``, and the
    rule's nodes and weights (M,) in ``x``'s dtype (from ``rule``, default :func:`integration_rule`)."""
    b = baseline_like(baseline, x)
    a, w = (rule or integration_rule)(integration, steps, x.dtype, x.device)
    pts = (b.unsqueeze(0) + a.view(-1, 1, 1, 1, 1) * (x - b).unsqueeze(0)).reshape(steps * x.shape[0], *x.shape[1:])
    return pts, a, w


@register
class IntegratedGradients(SaliencyMethod):
    """Points ``b + a_k (x - b)`` (tangent ``a_k``), weights ``w_k`` of the ``integration`` rule; with
    ``multiply_by_input`` the standard integrated gradients ``(x - b) * A(x)``."""

    name = "integrated"
    order = 10
    uses = ("steps", "integration", "baseline")

    def check(self, *, steps, noise_std, n_samples, integration) -> None:
        check_integration(integration, steps)

    def points(self, x, *, steps=10, baseline=None, integration=DEFAULT_INTEGRATION, noise=None,
               rule=None) -> Points:
        pts, a, w = path_points(x, baseline, integration, steps, rule)
        return Points(pts, steps, w, a)
