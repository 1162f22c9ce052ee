"""Machinery shared by the solvers: devices, precision, surrogate handling, defaults.

The attack data stream lives in :mod:`._batches`, checkpoint plumbing in :mod:`._state`."""
from __future__ import annotations

import contextlib
import hashlib
import math
from typing import Callable, ContextManager, Iterable, Iterator, Union

import torch
from torch import nn

from .._checks import check_choice, check_labels, check_positive, eval_mode
from ..hvp import HVP_MODES, SaliencySpec
from ..projection import parse_norm
from ..surrogate import softplus_surrogate
from ._microbatch import is_out_of_memory

__all__ = ["resolve_device", "surrogate_context", "default_noise_std", "make_spec", "predict", "check_common",
           "model_check", "PRECISIONS", "check_precision", "autocast_factory", "spec_fields", "autograd_errors",
           "check_flag"]

PRECISIONS = ("fp32", "bf16", "fp16")

#: Attack data: tensors ``(X, y)`` (X (N, C, H, W) in model units, y (N,) int64 class indices), a
#: DataLoader yielding such pairs, or any iterable of them.
DataLike = Union[tuple[torch.Tensor, torch.Tensor], Iterable[tuple[torch.Tensor, torch.Tensor]]]
#: The attacked network: None (the real one), ``"softplus"`` (ReLU -> softplus, beta 10) or a beta.
SurrogateLike = Union[str, float, None]
#: ``UPIGrad(fast=...)``: ``"auto"``, False, True, ``"autotune"`` or a dict of :class:`upi_fast.accel.FastStep` options.
FastLike = Union[bool, str, dict, None]

#: FastStep options the solver sets from its own arguments (``hvp``, ``precision``, ``fd_step``).
_FAST_OWN = {"hvp": "hvp", "precision": "precision", "fd_step": "fd_step", "validate": None, "spec": None}


def resolve_device(device, model) -> torch.device:
    """``device`` if given (``"cuda"`` on a machine without CUDA is a clear error), else the
    device of the model's first parameter, else the CPU."""
    if device is None:
        if isinstance(model, nn.Module):
            p = next(iter(model.parameters()), None)
            if p is not None:
                return p.device
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was requested but CUDA is not available on this machine")
    return dev


def check_common(eps, norm, batch_size, seed) -> float:
    check_positive("eps", eps)
    check_positive("batch_size", batch_size, integer=True)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    return parse_norm(norm)


def make_spec(saliency: str, target_kind: str, dissimilarity: str, saliency_kwargs: dict | None) -> SaliencySpec:
    kw = dict(saliency_kwargs or {})
    allowed = {"steps", "baseline", "multiply_by_input", "smoothgrad_std", "n_samples", "k", "postprocess", "integration"}
    unknown = set(kw) - allowed
    if unknown:
        raise ValueError(f"saliency_kwargs has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    return SaliencySpec(method=saliency, target_kind=target_kind, dissimilarity=dissimilarity, **kw)


def spec_fields(spec: SaliencySpec) -> dict:
    """The settings of ``spec`` as JSON-able values (a tensor baseline by shape and checksum)."""
    out = {}
    for k, v in sorted(vars(spec).items()):
        if isinstance(v, torch.Tensor):
            data = v.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
            v = f"tensor{tuple(v.shape)}:{hashlib.sha256(data).hexdigest()[:16]}"
        out[k] = v
    return out


def default_noise_std(eps: float, norm: float, d: int) -> float:
    """Smoothing noise ``Z``: ``||Z||_2 ~ 0.1 eps`` for L2 (sigma = 0.1 eps / sqrt(d)), sigma = 0.1 eps for Linf."""
    return 0.1 * eps / math.sqrt(d) if norm == 2 else 0.1 * eps


@contextlib.contextmanager
def surrogate_context(model, surrogate) -> Iterator[None]:
    """``surrogate``: None (the real network), a positive beta, or ``"softplus"`` (beta = 10)."""
    if surrogate is None or surrogate is False:
        yield
        return
    beta = 10.0 if surrogate in ("softplus", True) else surrogate
    if isinstance(beta, str):
        raise ValueError(f"surrogate must be None, 'softplus' or a positive beta, got {surrogate!r}")
    with softplus_surrogate(model, beta=float(beta)):
        yield


def predict(model, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Predicted labels (B,) without gradients."""
    with torch.no_grad():
        return torch.cat([model(x[i:i + chunk]).argmax(1) for i in range(0, x.shape[0], chunk)])


def model_check(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Logits (B, K) of the real network on a batch, with clear errors for a model that cannot
    process the images, returns something else, or NaN / Inf, and for bad labels."""
    try:
        with torch.no_grad():
            logits = model(x)
    except (RuntimeError, ValueError) as exc:
        if is_out_of_memory(exc):
            raise
        raise ValueError(f"the model cannot process images of shape {tuple(x.shape[1:])}: "
                         f"{_first_line(exc)}") from exc
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError("the model must return logits of shape (B, K)")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the model returned NaN or Inf logits")
    check_labels("labels in data", y, x.shape[0], logits.shape[1])
    return logits


def check_precision(precision: str) -> None:
    check_choice("precision", precision, PRECISIONS)


def check_fast(fast, model) -> bool | str | dict:
    """Validate ``UPIGrad(fast=...)``; returns False, True, ``"autotune"`` or a copy of the dict.
    ``"auto"`` (the solvers' default) is True for an ``nn.Module`` (the prepared step needs one to
    copy) and False for a plain callable."""
    if fast is None or fast is False:
        return False
    if isinstance(fast, str) and fast == "auto":
        return isinstance(model, nn.Module)
    if fast is not True and fast != "autotune" and not isinstance(fast, dict):
        raise ValueError(f"fast must be 'auto', False, True, 'autotune' or a dict of FastStep options, got {fast!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"fast={fast!r} needs the model as a torch.nn.Module (it prepares a copy), "
                        f"got {type(model).__name__}")
    if isinstance(fast, dict):
        import inspect

        from ..accel import FastStep
        allowed = set(inspect.signature(FastStep.__init__).parameters) - {"self", "model"}
        for key in fast:
            if key in _FAST_OWN:
                own = _FAST_OWN[key]
                raise ValueError(f"fast: {key!r} is set by the solver" + (f"; pass UPIGrad({own}=...) instead"
                                                                           if own else ""))
            if key not in allowed:
                raise ValueError(f"fast: unknown FastStep option {key!r}; "
                                 f"expected one of {sorted(allowed - set(_FAST_OWN))}")
        return dict(fast)
    return fast


def autocast_factory(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """The context of the saliency / HVP passes for ``precision``: nothing for ``"fp32"``, else
    ``torch.autocast(device.type, bf16 | fp16)``. The perturbation, the optimiser state and the
    sketches stay float32 (results are cast back); ``"fp16"`` needs a CUDA device (CPU autocast
    supports bf16 only here; bf16 on the CPU works but is usually slower and is mostly for testing)."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext
    if device.type != "cuda" and precision == "fp16":
        raise ValueError(f"precision='fp16' needs a CUDA device, got device {str(device)!r}; "
                         "use precision='bf16' or 'fp32' on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def check_hvp(hvp: str) -> None:
    check_choice("hvp", hvp, HVP_MODES)


def check_flag(name: str, value) -> bool:
    """``value`` must be a bool (TypeError naming ``name`` otherwise)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


_AUTOGRAD_WORDS = ("grad", "differentiat", "derivative")


@contextlib.contextmanager
def autograd_errors(hvp: str) -> Iterator[None]:
    """Turn autograd's failures on a model that cannot be differentiated as the attack needs (no
    gradient path, ``torch.no_grad`` / ``.detach()`` inside, an op without a second derivative) into
    a ValueError naming the model and ``hvp``; out-of-memory and other errors pass through."""
    try:
        yield
    except RuntimeError as exc:
        msg = _first_line(exc)
        if is_out_of_memory(exc) or not any(w in msg.lower() for w in _AUTOGRAD_WORDS):
            raise
        raise ValueError(f"the model cannot be differentiated as the attack needs (hvp={hvp!r}): {msg}. The model "
                         "must be differentiable in its input (no torch.no_grad, .detach() or rounding inside) and, "
                         "for hvp='double_backward' or 'forward', twice differentiable (else use "
                         "hvp='finite_difference')") from exc


__all__ += ["check_hvp", "eval_mode", "DataLike", "SurrogateLike", "FastLike", "check_fast"]
