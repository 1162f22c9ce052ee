"""Baselines at the same norm as a UPI: universal and per-sample random noise, a classification
UAP (Shafahi et al. 2020), and the per-image interpretation attack (the upper bound)."""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from .._checks import (DeviceLike, ModelLike, NormLike, check_choice, check_images, check_labels, check_model,
                       check_positive, eval_mode)
from ..dissimilarity import dissimilarity as dissimilarity_fn
from ..hvp import HVP_MODES, _loss_grad
from ..projection import parse_norm, project, random_in_ball, steepest_step
from ..saliency import postprocess_maps, raw_gradient
from ._batches import CleanBatches
from ._common import DataLike, SurrogateLike, check_common, make_spec, resolve_device, surrogate_context

__all__ = ["universal_random", "per_sample_random", "classification_uap", "per_image_attack"]


def _uniform_scaled(shape: tuple, eps: float, norm: float, generator: torch.Generator, device=None) -> torch.Tensor:
    """Uniform in [-1, 1]^d, rescaled so that its norm is exactly ``eps`` (per leading sample when
    ``shape`` has 4 dims)."""
    u = 2 * torch.rand(shape, generator=generator, device=device) - 1
    flat = u.reshape(shape[0], -1) if len(shape) == 4 else u.reshape(1, -1)
    n = flat.abs().amax(1, keepdim=True) if norm == math.inf else flat.norm(dim=1, keepdim=True)
    return (flat * (eps / n.clamp_min(1e-30))).reshape(shape)


def universal_random(shape: tuple, eps: float, norm: NormLike = 2, seed: int = 0) -> torch.Tensor:
    """One random perturbation (C, H, W): uniform in [-1, 1]^d rescaled to norm ``eps``."""
    check_positive("eps", eps)
    p = parse_norm(norm)
    if len(shape) != 3 or any(int(s) <= 0 for s in shape):
        raise ValueError(f"shape must be (C, H, W) with positive sizes, got {tuple(shape)}")
    return _uniform_scaled(tuple(int(s) for s in shape), float(eps), p, torch.Generator().manual_seed(seed))


def per_sample_random(eps: float, norm: NormLike = 2,
                      seed: int = 0) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A perturbation *function* for :func:`upi_fast.evaluate`: a fresh uniform draw of norm
    ``eps`` for every sample, ``fn(x, y) -> (B, C, H, W)``."""
    check_positive("eps", eps)
    p = parse_norm(norm)
    gen = torch.Generator().manual_seed(seed)

    def fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _uniform_scaled(tuple(x.shape), float(eps), p, gen).to(x.device, x.dtype)

    fn.__name__ = "per_sample_random"
    return fn


def classification_uap(model: ModelLike, data: DataLike, eps: float, norm: NormLike = 2, epochs: int = 5,
                       batch_size: int = 128,
                       lr: float | None = None, clamp: float = 10.0, seed: int = 0,
                       device: DeviceLike | None = None, progress: bool = False) -> torch.Tensor:
    """A universal perturbation against the *label* (Shafahi et al. 2020): stochastic ascent on the
    clamped cross-entropy ``mean_i min(CE(f(x_i + delta), y_i), clamp)`` with steepest-ascent steps
    for the norm (``lr`` default 0.1 eps) and projection. Returns (C, H, W) float32 on the CPU."""
    check_model(model)
    p = check_common(eps, norm, batch_size, seed)
    check_positive("epochs", epochs, integer=True)
    check_positive("clamp", clamp)
    dev = resolve_device(device, model)
    gen = torch.Generator(device=dev).manual_seed(seed)
    lr = 0.1 * eps if lr is None else lr
    spec = make_spec("simple", "prob", "l2", None)
    with eval_mode(model):
        batches = CleanBatches(model, data, batch_size, spec, dev, shuffle=True, seed=seed)
        shape = batches.input_shape
        delta = random_in_ball(shape, eps * 0.5, p, generator=gen, device=dev)
        for _ in tqdm(range(epochs), desc="classification UAP", disable=None if progress else True, leave=False):
            for x, y, _ in batches:
                with torch.enable_grad():
                    d = delta.detach().requires_grad_(True)
                    ce = torch.nn.functional.cross_entropy(model(x + d), y, reduction="none")
                    (g,) = torch.autograd.grad(ce.clamp_max(clamp).mean(), d)
                delta = project(delta + lr * steepest_step(g, p), eps, p).detach()
    return delta.float().cpu()


def per_image_attack(model: ModelLike, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 40,
                     norm: NormLike = 2,
                     lr: float | None = None, saliency: str = "simple", target_kind: str = "prob",
                     dissimilarity: str = "l2", hvp: str = "double_backward", noise_std: float = 0.0,
                     surrogate: SurrogateLike = None, seed: int = 0, saliency_kwargs: dict | None = None,
                     batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """The per-image interpretation attack (PGD on each sample's own dissimilarity): the upper
    bound a universal perturbation is compared with.

    Every sample gets its own ``delta_i`` in the ball, ``steps`` steepest-ascent steps of size
    ``lr`` (default ``2.5 eps / steps``) from a random start, and the best iterate by its own
    loss is returned. Returns (B, C, H, W) on ``x``'s device.
    """
    check_model(model)
    check_images("x", x)
    check_labels("y", y, x.shape[0])
    p = check_common(eps, norm, batch_size, seed)
    check_positive("steps", steps, integer=True)
    check_choice("hvp", hvp, HVP_MODES)
    spec = make_spec(saliency, target_kind, dissimilarity, saliency_kwargs)
    lr = 2.5 * eps / steps if lr is None else lr
    gen = torch.Generator(device=x.device).manual_seed(seed)
    out = []
    with eval_mode(model):
        for i in tqdm(range(0, x.shape[0], batch_size), desc="per-image attack", disable=None if progress else True, leave=False):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            B = xb.shape[0]
            with surrogate_context(model, surrogate):
                ref = postprocess_maps(raw_gradient(model, xb, yb, spec.method, spec.target_kind, False, spec.steps,
                                                    spec.baseline, spec.multiply_by_input,
                                                    integration=spec.integration), spec.postprocess)
                delta = torch.stack([random_in_ball(tuple(xb.shape[1:]), 0.1 * eps, p, generator=gen,
                                                    device=x.device, dtype=x.dtype) for _ in range(B)])
                best, best_loss = delta.clone(), torch.full((B,), -1.0, dtype=x.dtype, device=x.device)
                for _ in range(steps):
                    loss, g = _loss_grad(model, xb, yb, ref, delta, spec, hvp, noise_std, gen, 1e-2)
                    better = loss > best_loss
                    best[better], best_loss[better] = delta[better], loss[better]
                    delta = project(delta + lr * steepest_step(g, p, per_sample=True), eps, p, per_sample=True)
                # the last iterate has not been scored yet
                final = postprocess_maps(raw_gradient(model, xb + delta, yb, spec.method, spec.target_kind, False,
                                                      spec.steps, spec.baseline, spec.multiply_by_input,
                                                      integration=spec.integration), spec.postprocess)
                better = dissimilarity_fn(final, ref, spec.dissimilarity, k=spec.k) > best_loss
                best[better] = delta[better]
            out.append(best.detach())
    return torch.cat(out)
