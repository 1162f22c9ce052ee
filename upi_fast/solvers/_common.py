"""Machinery shared by the solvers: devices, the attack data stream, surrogate handling, defaults."""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import nn

from .._checks import check_choice, check_labels, check_positive, eval_mode
from ..data import as_batches
from ..hvp import HVP_MODES, SaliencySpec
from ..projection import parse_norm
from ..saliency import postprocess_maps, raw_gradient
from ..surrogate import softplus_surrogate

__all__ = ["resolve_device", "CleanBatches", "surrogate_context", "default_noise_std", "make_spec",
           "predict", "check_common"]


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
    allowed = {"steps", "baseline", "multiply_by_input", "smoothgrad_std", "n_samples", "k", "postprocess"}
    unknown = set(kw) - allowed
    if unknown:
        raise ValueError(f"saliency_kwargs has unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    return SaliencySpec(method=saliency, target_kind=target_kind, dissimilarity=dissimilarity, **kw)


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


def _model_check(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    try:
        with torch.no_grad():
            logits = model(x)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"the model cannot process images of shape {tuple(x.shape[1:])}: "
                         f"{str(exc).splitlines()[0]}") from None
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError("the model must return logits of shape (B, K)")
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("the model returned NaN or Inf logits")
    check_labels("labels in data", y, x.shape[0], logits.shape[1])
    return logits


class CleanBatches:
    """The attack data as mini-batches ``(x, y, I_ref)`` on ``device``, correctly classified
    samples only (judged by the real network), with the clean reference maps ``I_ref`` of the
    attacked network (the surrogate, when one is used).

    A tuple ``(X, y)`` of tensors is filtered and its reference maps computed once and cached
    (then reshuffled every epoch with ``generator``); a DataLoader is streamed (its own order),
    each batch filtered and mapped on the fly, nothing held across batches.
    """

    def __init__(self, model, data, batch_size: int, spec: SaliencySpec, device: torch.device,
                 generator: torch.Generator | None = None, shuffle: bool = True, cache: bool = True,
                 surrogate=None) -> None:
        self.model, self.data, self.batch_size, self.spec = model, data, batch_size, spec
        self.surrogate = surrogate
        self.device, self.generator, self.shuffle = device, generator, shuffle
        self.tensors = _as_tensors(data)
        self.n_seen = 0
        self.n_correct = 0
        self.input_shape: tuple | None = None
        self._cache = None
        if self.tensors is not None and cache:
            self._build_cache()

    def clean_maps(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Reference maps (B, N) of the attacked network (the surrogate, when one is used)."""
        s = self.spec
        with surrogate_context(self.model, self.surrogate):
            g = raw_gradient(self.model, x, y, s.method, s.target_kind, False, s.steps, s.baseline, s.multiply_by_input,
                             s.smoothgrad_std, s.n_samples, self.generator)
        return postprocess_maps(g, s.postprocess).detach()

    def _raw_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in as_batches(self.data, self.batch_size):
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _filter(self, x, y):
        if self.input_shape is None:
            self.input_shape = tuple(x.shape[1:])
        elif tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"data has images of shapes {self.input_shape} and {tuple(x.shape[1:])}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("data contains images with NaN or Inf values")
        logits = _model_check(self.model, x, y)
        keep = logits.argmax(1) == y
        return x[keep], y[keep]

    def _build_cache(self) -> None:
        xs, ys, ms = [], [], []
        for x, y in self._raw_batches():
            self.n_seen += x.shape[0]
            x, y = self._filter(x, y)
            if x.shape[0]:
                xs.append(x)
                ys.append(y)
                ms.append(self.clean_maps(x, y))
        if self.n_seen == 0:
            raise ValueError("data is empty")
        if not xs:
            raise ValueError("the model classifies none of the samples in data correctly")
        self._cache = (torch.cat(xs), torch.cat(ys), torch.cat(ms))
        self.n_correct = self._cache[0].shape[0]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self._cache is not None:
            X, Y, M = self._cache
            n = X.shape[0]
            if self.shuffle:
                dev = self.generator.device if self.generator is not None else X.device
                order = torch.randperm(n, generator=self.generator, device=dev).to(X.device)
            else:
                order = torch.arange(n, device=X.device)
            for i in range(0, n, self.batch_size):
                idx = order[i:i + self.batch_size]
                yield X[idx], Y[idx], M[idx]
            return
        seen = correct = 0
        for x, y in self._raw_batches():
            seen += x.shape[0]
            x, y = self._filter(x, y)
            if x.shape[0] == 0:
                continue
            correct += x.shape[0]
            yield x, y, self.clean_maps(x, y)
        self.n_seen, self.n_correct = seen, correct
        if seen == 0:
            raise ValueError("data is empty")
        if correct == 0:
            raise ValueError("the model classifies none of the samples in data correctly")


def _as_tensors(data):
    """``(X, y)`` when ``data`` is a pair of tensors (or a TensorSplit), else None (a loader)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    if hasattr(data, "X") and hasattr(data, "y") and isinstance(getattr(data, "X"), torch.Tensor):
        return data.X, data.y
    return None


def check_hvp(hvp: str) -> None:
    check_choice("hvp", hvp, HVP_MODES)


__all__ += ["check_hvp", "eval_mode"]
