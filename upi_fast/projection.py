"""Norm balls: projection, random points inside, steepest-ascent steps (p = 2 or inf).

``delta`` is either one perturbation (C, H, W) or a batch of them (B, C, H, W) when
``per_sample=True`` (then every sample is projected / stepped on its own).
"""
from __future__ import annotations

import math

import torch

from ._checks import DeviceLike, NormLike, check_positive

__all__ = ["project", "random_in_ball", "steepest_step", "norm_of", "parse_norm", "NORMS"]

#: The supported norms: L2 and Linf.
NORMS = (2, math.inf)


def parse_norm(norm: NormLike) -> float:
    """Accept 2, 2.0, "2", "l2", inf, "inf", "linf" and return 2.0 or math.inf; else ValueError."""
    if isinstance(norm, str):
        key = norm.strip().lower()
        table = {"2": 2.0, "l2": 2.0, "inf": math.inf, "linf": math.inf, "infinity": math.inf}
        if key in table:
            return table[key]
    elif isinstance(norm, (int, float)) and not isinstance(norm, bool):
        if norm == 2:
            return 2.0
        if norm == math.inf:
            return math.inf
    raise ValueError(f"norm must be 2 or inf, got {norm!r}")


def _flat(delta: torch.Tensor, per_sample: bool) -> torch.Tensor:
    return delta.reshape(delta.shape[0], -1) if per_sample else delta.reshape(1, -1)


def norm_of(delta: torch.Tensor, norm: NormLike = 2, per_sample: bool = False) -> torch.Tensor:
    """The L2 or Linf norm of ``delta`` (C, H, W) -> (1,), or of each of (B, C, H, W) -> (B,) when
    ``per_sample``; in ``delta``'s units and dtype."""
    p = parse_norm(norm)
    f = _flat(delta, per_sample)
    return f.abs().amax(1) if p == math.inf else f.norm(dim=1)


def project(delta: torch.Tensor, eps: float, norm: NormLike = 2, per_sample: bool = False) -> torch.Tensor:
    """Euclidean projection onto ``{||delta||_p <= eps}`` (a new tensor, same shape and dtype).

    Args:
        delta: one perturbation (C, H, W) (or any shape), or a batch (B, C, H, W) with ``per_sample``.
        eps: the radius (> 0), in ``delta``'s units.
        norm: 2 or inf (see :func:`parse_norm`).
        per_sample: project each ``delta[b]`` on its own instead of the whole tensor.

    L2: radial scaling when outside; Linf: clamping to [-eps, eps].
    """
    check_positive("eps", eps)
    p = parse_norm(norm)
    if p == math.inf:
        return delta.clamp(-eps, eps)
    f = _flat(delta, per_sample)
    n = f.norm(dim=1, keepdim=True)
    scale = torch.where(n > eps, eps / n.clamp_min(1e-30), torch.ones_like(n))
    return (f * scale).reshape(delta.shape)


def random_in_ball(shape: tuple[int, ...], eps: float, norm: NormLike = 2, generator: torch.Generator | None = None,
                   dtype: torch.dtype = torch.float32, device: DeviceLike | None = None) -> torch.Tensor:
    """A point of shape ``shape`` (e.g. (C, H, W)) drawn uniformly from the ball of radius ``eps``
    (L2: Gaussian direction, radius ``eps * U^(1/d)``, d = prod(shape); Linf: uniform in the cube),
    in the units of ``eps``."""
    check_positive("eps", eps)
    p = parse_norm(norm)
    if p == math.inf:
        u = torch.rand(shape, generator=generator, dtype=dtype, device=device)
        return (2 * u - 1) * eps
    d = math.prod(shape)
    g = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    r = torch.rand((), generator=generator, dtype=dtype, device=device) ** (1.0 / d)
    return g / g.norm().clamp_min(1e-30) * (eps * r)


def steepest_step(grad: torch.Tensor, norm: NormLike = 2, per_sample: bool = False) -> torch.Tensor:
    """Unit steepest-ascent direction for the norm, same shape as ``grad`` ((C, H, W), or
    (B, C, H, W) normalised per sample with ``per_sample``): ``grad / ||grad||_2`` (L2, zero stays
    zero) or ``sign(grad)`` (Linf). Dimensionless: multiply by a step size in input units."""
    p = parse_norm(norm)
    if p == math.inf:
        return grad.sign()
    f = _flat(grad, per_sample)
    n = f.norm(dim=1, keepdim=True)
    return torch.where(n > 0, f / n.clamp_min(1e-30), torch.zeros_like(f)).reshape(grad.shape)
