"""Smooth surrogate for ReLU networks: ``softplus(beta x) / beta`` in place of ``relu`` while attacking.

With the logit target, the saliency map of a ReLU network is piecewise constant in x, so its
exact Hessian is zero almost everywhere; the attack needs a smooth stand-in (METHOD.md).
Evaluation always uses the real network: the context manager restores it, even on error.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ._checks import check_positive
from .ops.softplus import SoftplusSurrogate, softplus

__all__ = ["softplus_surrogate", "SoftplusSurrogate"]

_RELU_FUNCS = {F.relu, torch.relu, torch.Tensor.relu, torch.relu_, torch.Tensor.relu_}


class _FunctionalReLUToSoftplus(TorchFunctionMode):
    """Intercepts functional ``relu`` calls made inside ``forward`` (invisible to module swapping)."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _RELU_FUNCS:
            out = softplus(args[0], self.beta)
            if func in (torch.relu_, torch.Tensor.relu_) or kwargs.get("inplace", False):
                return out  # in-place relu in a forward: return the new tensor instead of mutating
            return out
        return func(*args, **kwargs)


@contextlib.contextmanager
def softplus_surrogate(model: nn.Module, beta: float = 10.0, functional: bool = True) -> Iterator[nn.Module]:
    """Within the block, every ``nn.ReLU`` of ``model`` computes ``softplus(beta x) / beta``.

    Args:
        model: the network; its ``nn.ReLU`` submodules are swapped for :class:`SoftplusSurrogate`
            and put back on exit (also when an exception escapes).
        beta: sharpness (> 0); 10 by default as in METHOD.md.
        functional: also replace functional ``F.relu`` / ``torch.relu`` / ``Tensor.relu`` calls made
            anywhere inside the block (a ``TorchFunctionMode``; it applies to all code run in the
            block on this thread).

    Yields:
        The same ``model`` object, modified in place for the duration of the block.
    """
    check_positive("beta", beta)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.ReLU:
                    swapped.append((parent, name, child))
                    setattr(parent, name, SoftplusSurrogate(beta))
        if functional:
            with _FunctionalReLUToSoftplus(float(beta)):
                yield model
        else:
            yield model
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)
