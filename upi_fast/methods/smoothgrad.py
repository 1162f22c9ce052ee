"""``smoothgrad``: the mean of ``g(x + n)`` over ``n_samples`` draws ``n ~ N(0, noise_std^2 I)``."""
from __future__ import annotations

import torch

from .base import Points, SaliencyMethod, register


def smoothgrad_noise(x: torch.Tensor, noise_std: float, n_samples: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """(n_samples, B, C, H, W) Gaussian draws of standard deviation ``noise_std``."""
    return noise_std * torch.randn((n_samples, *x.shape), generator=generator, dtype=x.dtype, device=x.device)


@register
class SmoothGrad(SaliencyMethod):
    """Points ``x + n_j`` (tangent 1), weights ``1 / n``; the noise ``(n, B, C, H, W)`` is drawn by the
    caller (:meth:`draw_noise`) so that nearby evaluations share it."""

    name = "smoothgrad"
    order = 20
    stochastic = True
    uses = ("noise_std", "n_samples")

    def check(self, *, steps, noise_std, n_samples, integration) -> None:
        if noise_std == 0:
            raise ValueError("noise_std must be > 0 for method='smoothgrad'")

    def draw_noise(self, x, noise_std, n_samples, generator=None):
        return smoothgrad_noise(x, noise_std, n_samples, generator)

    def points(self, x, *, steps=10, baseline=None, integration="", noise=None, rule=None) -> Points:
        if noise is None:
            raise ValueError("smoothgrad needs its noise draws")
        n = noise.shape[0]
        pts = (x.unsqueeze(0) + noise).reshape(n * x.shape[0], *x.shape[1:])
        w = torch.full((n,), 1.0 / n, dtype=x.dtype, device=x.device)
        return Points(pts, n, w, torch.ones_like(w))

    def average(self, g, pts, shape):
        return g.view(pts.m, *shape).mean(0)
