"""Tiny models for the reporting / sweep / transfer tests (``--model reporting_support:NAME``),
next to :mod:`hardening_support`, whose ImageFolder every image of which ``make_model`` classifies
correctly. Importable by subprocesses (``tests/`` on ``PYTHONPATH``); not a test module."""
from __future__ import annotations

import torch
from torch import nn

from hardening_support import make_model

__all__ = ["other_model", "wrong_model"]


def other_model() -> nn.Module:
    """:func:`make_model` with other weights: it classifies only some of the folder's images correctly."""
    return make_model(seed=2)


class _Shifted(nn.Module):
    """``model``'s logits rolled by one class: predicts ``(k + 1) mod K`` where ``model`` predicts ``k``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).roll(1, dims=1)


def wrong_model() -> nn.Module:
    """Classifies none of :func:`hardening_support.make_image_folder`'s images correctly."""
    return _Shifted(make_model()).eval()
