"""What the fast step changes in an HVP mode, as hooks; :data:`REFERENCE` is the reference step's."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from ..saliency import _grad_at

__all__ = ["Hooks", "REFERENCE", "averaged_gradient"]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class Hooks:
    """Args:
        layout: applied to the evaluation points and to every tangent / probe fed to the model (the
            fast step's channels_last copy).
        autocast: a context manager factory entered around the mode (the fast step's bf16 / fp16).
        grad_at: ``grad_at(model, points, labels, target_kind, create_graph) -> gradient``: the
            target's input gradient (the reference checks the logits; the fast step's does not
            synchronise with the host).
        check_logits: check the logits' shape and label range in the piecewise-linear mode.
        fd_scale: the finite-difference scale ``mean_j ||x'_j||`` (None: from the points given; the
            fast step computes it once over the whole batch before cutting it into chunks).
    """
    layout: Callable[[torch.Tensor], torch.Tensor] = _identity
    autocast: Callable[[], ContextManager] = contextlib.nullcontext
    grad_at: Callable = _grad_at
    check_logits: bool = True
    fd_scale: torch.Tensor | None = None


#: The reference step's hooks: no relayout, no autocast, checked gradients, per-batch scale.
REFERENCE = Hooks()


def averaged_gradient(model, p: torch.Tensor, target: torch.Tensor, spec, sg_noise, hooks: Hooks,
                      create_graph: bool = False) -> torch.Tensor:
    """The spec's averaged gradient ``A(p)`` (B, C, H, W) through ``hooks.grad_at``."""

    def grad_fn(points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return hooks.grad_at(model, points, labels, spec.target_kind, create_graph)

    return spec.saliency_method.gradient(grad_fn, p, target, **spec.method_options(sg_noise))
