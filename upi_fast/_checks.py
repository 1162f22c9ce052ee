"""Argument checks shared by the public API: every bad input gets a clear error naming the argument."""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Iterable, Iterator, Union

import torch
from torch import nn

__all__ = ["check_choice", "check_positive", "check_images", "check_labels", "check_model",
           "check_maps", "eval_mode", "check_delta", "ModelLike", "NormLike", "DeviceLike"]

#: A classifier: ``model(x)`` maps images (B, C, H, W) to logits (B, K); usually an ``nn.Module``.
ModelLike = Callable[[torch.Tensor], torch.Tensor]
#: A norm-ball choice: ``2`` / ``"2"`` / ``"l2"`` or ``math.inf`` / ``"inf"`` / ``"linf"``.
NormLike = Union[int, float, str]
#: A torch device or its name (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
DeviceLike = Union[str, torch.device]


def check_choice(name: str, value: Any, choices: Iterable) -> None:
    """ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_positive(name: str, value: Any, *, allow_zero: bool = False, integer: bool = False) -> None:
    """``value`` must be a finite number (an int with ``integer``) > 0 (>= 0 with ``allow_zero``)."""
    ok_type = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_type):
        raise TypeError(f"{name} must be a {'positive integer' if integer else 'number'}, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_images(name: str, x: Any) -> None:
    """``x`` must be a finite floating (B, C, H, W) tensor with B >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (batch size 0)")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_labels(name: str, y: Any, batch: int, num_classes: int | None = None) -> None:
    """``y`` must be an integer (batch,) tensor, with values in ``[0, num_classes)`` when given."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of class indices, got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != batch:
        raise ValueError(f"{name} must have shape ({batch},), got {tuple(y.shape)}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"{name} must hold integer class indices, got {y.dtype}")
    if num_classes is not None and batch and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{name} has labels outside [0, {num_classes - 1}] "
                         f"(min {int(y.min())}, max {int(y.max())}) for a model with {num_classes} outputs")


def check_model(model: Any) -> None:
    """``model`` must be callable (an ``nn.Module`` or a function of images)."""
    if not callable(model):
        raise TypeError(f"model must be a callable (an nn.Module), got {type(model).__name__}")


def check_maps(name: str, m: Any, batch: int | None = None, width: int | None = None) -> None:
    """``m`` must be a finite floating (B, N) tensor with ``batch`` rows and ``width`` columns when given."""
    if not isinstance(m, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(m).__name__}")
    if m.dim() != 2:
        raise ValueError(f"{name} must have shape (B, N), got {tuple(m.shape)}")
    if batch is not None and m.shape[0] != batch:
        raise ValueError(f"{name} must have {batch} rows, got {m.shape[0]}")
    if width is not None and m.shape[1] != width:
        raise ValueError(f"{name} must have {width} columns, got {m.shape[1]}")
    if not m.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {m.dtype}")
    if not bool(torch.isfinite(m).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


def check_delta(name: str, delta: Any, image_shape: tuple, batch: int | None = None) -> None:
    """``delta`` must be (C, H, W) matching ``image_shape``, or (B, C, H, W) with the batch size."""
    if not isinstance(delta, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(delta).__name__}")
    shp = tuple(delta.shape)
    ok = shp == tuple(image_shape) or (batch is not None and shp == (batch, *image_shape))
    if not ok:
        raise ValueError(f"{name} must have shape {tuple(image_shape)} (universal)"
                         + (f" or {(batch, *image_shape)} (per sample)" if batch is not None else "")
                         + f", got {shp}")
    if not delta.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {delta.dtype}")
    if not bool(torch.isfinite(delta).all()):
        raise ValueError(f"{name} contains NaN or Inf values")


# Modules whose output depends on train / eval mode.
_MODE_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Run ``model`` in eval mode and restore each submodule's mode afterwards.

    A model found in train mode triggers a warning (BatchNorm / Dropout would make saliency
    depend on the batch); BatchNorm running statistics are never updated by upi_fast.
    """
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    if any(t for _, t in modes):
        if any(t and isinstance(m, _MODE_DEPENDENT) for m, t in modes):
            warnings.warn("model is in train mode; upi_fast computes in eval mode and restores the mode "
                          "afterwards (BatchNorm statistics are not updated)", UserWarning, stacklevel=3)
        model.eval()
    try:
        yield
    finally:
        for m, t in modes:
            m.training = t
