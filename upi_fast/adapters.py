"""Adapters to the calling conventions of other interpretability libraries, by duck typing only.

Neither Quantus nor captum is imported (or needed) here; the objects below follow their calling
conventions so they can be handed to those libraries directly.

* :func:`quantus_explain_func` -- an ``explain_func`` for Quantus-style metrics (robustness,
  faithfulness, ...): Quantus calls ``explain_func(model=..., inputs=np.ndarray (B, C, H, W),
  targets=np.ndarray (B,), **explain_func_kwargs)`` and expects a numpy array of attributions.
* :func:`quantus_perturb_func` -- a ``perturb_func`` for Quantus-style robustness metrics that adds
  a universal perturbation (e.g. a UPI loaded from a file) to its inputs: Quantus 0.6 calls
  ``perturb_func(arr=x_batch.reshape(B, -1), indices=(B, M) flat positions, **perturb_func_kwargs)``
  (older versions: ``arr`` one (C, H, W) sample with ``indices`` / ``indexed_axes``) and expects the
  perturbed array back, in the shape it passed.
* captum attribution objects (anything with ``attribute(inputs, target=...)``, see
  :class:`AttributionMethod`) are accepted as the saliency method of :func:`upi_fast.evaluate`
  as they are: ``upi_fast.evaluate(model, delta, data, saliency=captum.attr.Saliency(model))``.

Units: arrays are in the model's input units (the same units as the perturbation); attributions
are returned as float32 numpy arrays.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ._checks import DeviceLike, ModelLike, check_choice, check_positive
from .evaluate import AttributionMethod
from .methods import get as get_method
from .saliency import DEFAULT_INTEGRATION, INTEGRATION_RULES, POSTPROCESS, TARGET_KINDS, saliency
from .solvers._common import resolve_device

__all__ = ["quantus_explain_func", "QuantusExplainFunc", "quantus_perturb_func", "UPIPerturbFunc",
           "AttributionMethod"]

# Options of :class:`QuantusExplainFunc` that may also be given per call (explain_func_kwargs).
_SALIENCY_OPTIONS = ("method", "target_kind", "postprocess", "steps", "baseline", "multiply_by_input",
                     "noise_std", "n_samples", "integration")


def _unwrap_model(model: Any) -> ModelLike:
    """The callable network: ``model`` itself, or ``model.get_model()`` for a Quantus-style
    ``ModelInterface`` wrapper (which is not itself a function of tensors)."""
    if not isinstance(model, nn.Module) and callable(getattr(model, "get_model", None)):
        model = model.get_model()
    if not callable(model):
        raise TypeError(f"model must be a callable classifier (an nn.Module), got {type(model).__name__}")
    return model


def _as_tensor(name: str, a: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        t = a.detach()
    elif isinstance(a, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(a))
    else:
        raise TypeError(f"{name} must be a numpy array or a torch.Tensor, got {type(a).__name__}")
    return t.to(device=device, dtype=dtype)


def _targets(targets: Any, batch: int, device: torch.device) -> torch.Tensor:
    if isinstance(targets, (int, np.integer)) and not isinstance(targets, bool):
        return torch.full((batch,), int(targets), dtype=torch.int64, device=device)
    if isinstance(targets, (list, tuple)):
        targets = np.asarray(targets)
    if isinstance(targets, np.ndarray):
        if targets.dtype.kind not in "iu":
            raise TypeError(f"targets must hold integer class indices, got dtype {targets.dtype}")
        targets = torch.from_numpy(np.ascontiguousarray(targets))
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be an int, a numpy array or a tensor of class indices, "
                        f"got {type(targets).__name__}")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise TypeError(f"targets must hold integer class indices, got {targets.dtype}")
    targets = targets.reshape(-1)
    if targets.numel() != batch:
        raise ValueError(f"targets must have {batch} entries (one per input), got {targets.numel()}")
    return targets.to(device=device, dtype=torch.int64)


class QuantusExplainFunc:
    """A Quantus-compatible ``explain_func`` computing upi_fast saliency maps.

    Called as ``explain_func(model=..., inputs=..., targets=..., **kwargs)``, it returns the maps
    of ``model`` at ``inputs`` for the classes ``targets`` as a float32 numpy array: (B, 1, H, W)
    for the default ``"abs_sum_l1"`` post-processing (channels summed in absolute value, each map
    summing to 1), (B, C, H, W) for ``"raw"``. Each call is a pure function of its inputs
    (smoothgrad noise is re-drawn from ``seed`` on every call), so robustness metrics measure the
    explanation's sensitivity, not its sampling noise.

    Args:
        method: ``"simple"``, ``"integrated"`` or ``"smoothgrad"``.
        target_kind: ``"prob"`` (softmax probability of the target, default) or ``"logit"``.
        postprocess: ``"abs_sum_l1"`` (default) or ``"raw"``.
        steps: integrated-gradients path points (>= 1).
        baseline: integrated-gradients baseline, broadcastable to the inputs (default zeros).
        multiply_by_input: multiply the gradient by ``inputs - baseline``.
        noise_std: smoothgrad noise standard deviation (model input units).
        n_samples: smoothgrad draws.
        integration: integrated-gradients rule (:data:`upi_fast.saliency.INTEGRATION_RULES`: the
            authors' ``"uniform_endpoints"`` default, or captum's ``"riemann_*"`` / ``"gausslegendre"``).
        batch_size: compute at most this many inputs at a time (None: all at once).
        device: where to compute (default: the model's device). Quantus passes its own ``device``
            keyword on each call, which takes precedence.
        seed: seed of the smoothgrad noise.

    Per-call keyword arguments (Quantus's ``explain_func_kwargs``) may override ``device`` and any
    of ``method``, ``target_kind``, ``postprocess``, ``steps``, ``baseline``,
    ``multiply_by_input``, ``noise_std``, ``n_samples``, ``integration``; any other keyword is a TypeError.
    """

    def __init__(self, method: str = "simple", target_kind: str = "prob", postprocess: str = "abs_sum_l1",
                 steps: int = 10, baseline: Any = None, multiply_by_input: bool = False, noise_std: float = 0.0,
                 n_samples: int = 1, batch_size: int | None = None, device: DeviceLike | None = None,
                 seed: int = 0, integration: str = DEFAULT_INTEGRATION) -> None:
        self.options = self._check({"method": method, "target_kind": target_kind, "postprocess": postprocess,
                                    "steps": steps, "baseline": baseline, "multiply_by_input": multiply_by_input,
                                    "noise_std": noise_std, "n_samples": n_samples, "integration": integration})
        if batch_size is not None:
            check_positive("batch_size", batch_size, integer=True)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        self.batch_size, self.device, self.seed = batch_size, device, seed

    @staticmethod
    def _check(opts: dict) -> dict:
        method = get_method(opts["method"])
        check_choice("target_kind", opts["target_kind"], TARGET_KINDS)
        check_choice("postprocess", opts["postprocess"], POSTPROCESS)
        check_positive("steps", opts["steps"], integer=True)
        check_positive("noise_std", opts["noise_std"], allow_zero=True)
        check_positive("n_samples", opts["n_samples"], integer=True)
        method.check(steps=opts["steps"], noise_std=opts["noise_std"], n_samples=opts["n_samples"],
                     integration=opts["integration"])
        check_choice("integration", opts["integration"], INTEGRATION_RULES)
        return opts

    def __call__(self, model: Any, inputs: np.ndarray | torch.Tensor, targets: Any, **kwargs: Any) -> np.ndarray:
        """Attributions of ``model`` at ``inputs`` (B, C, H, W) for ``targets`` (B,) as a float32
        numpy array, (B, 1, H, W) or (B, C, H, W) (see the class docstring)."""
        unknown = sorted(set(kwargs) - set(_SALIENCY_OPTIONS) - {"device"})
        if unknown:
            raise TypeError(f"explain_func got unexpected keyword arguments {unknown}; accepted: "
                            f"{['device', *_SALIENCY_OPTIONS]}")
        opts = self._check({**self.options, **{k: v for k, v in kwargs.items() if k in _SALIENCY_OPTIONS}})
        net = _unwrap_model(model)
        dev = resolve_device(kwargs.get("device", self.device), net)
        params = list(net.parameters()) if isinstance(net, nn.Module) else []
        if params:
            have = params[0].device
            if have.type != dev.type or (dev.index is not None and have.index not in (None, dev.index)):
                raise ValueError(f"the model is on {have} but device={str(dev)!r} was requested; "
                                 f"move the model or pass the model's device")
            dev = have  # "cuda" (Quantus's spelling) means the model's own cuda:N
        dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
        x = _as_tensor("inputs", inputs, dtype, dev)
        if x.dim() != 4:
            raise ValueError(f"inputs must have shape (B, C, H, W) (channels first), got {tuple(x.shape)}")
        y = _targets(targets, x.shape[0], dev)
        step = self.batch_size or max(1, x.shape[0])
        gen = torch.Generator(device=dev) if get_method(opts["method"]).stochastic else None
        out = []
        for i in range(0, x.shape[0], step):
            if gen is not None:
                gen.manual_seed(self.seed + i)
            maps = saliency(net, x[i:i + step], y[i:i + step], method=opts["method"],
                            target_kind=opts["target_kind"], postprocess=opts["postprocess"], steps=opts["steps"],
                            baseline=opts["baseline"], multiply_by_input=opts["multiply_by_input"],
                            noise_std=opts["noise_std"], n_samples=opts["n_samples"], generator=gen,
                            integration=opts["integration"])
            out.append(maps.detach())
        maps = torch.cat(out) if out else x.new_zeros((0,))
        B, C, H, W = x.shape
        shape = (B, 1, H, W) if opts["postprocess"] == "abs_sum_l1" else (B, C, H, W)
        return maps.reshape(shape).to(device="cpu", dtype=torch.float32).numpy()

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k != "baseline" or v is not None)
        return f"QuantusExplainFunc({opts})"


def quantus_explain_func(method: str = "simple", target_kind: str = "prob", **options: Any) -> QuantusExplainFunc:
    """An ``explain_func`` for Quantus-style metrics: ``fn(model=..., inputs=..., targets=...)``
    returns upi_fast saliency maps as a float32 numpy array (B, 1, H, W) (or (B, C, H, W) with
    ``postprocess="raw"``).

    Args:
        method: ``"simple"``, ``"integrated"`` or ``"smoothgrad"``.
        target_kind: ``"prob"`` (default) or ``"logit"``.
        **options: the other arguments of :class:`QuantusExplainFunc` (``postprocess``, ``steps``,
            ``baseline``, ``multiply_by_input``, ``noise_std``, ``n_samples``, ``batch_size``,
            ``device``, ``seed``).

    Example::

        metric = quantus.MaxSensitivity(nr_samples=10)
        scores = metric(model=model, x_batch=x, y_batch=y,
                        explain_func=upi_fast.adapters.quantus_explain_func("simple"))
    """
    return QuantusExplainFunc(method=method, target_kind=target_kind, **options)


def _consecutive_axes(indexed_axes: Any, ndim: int) -> tuple[int, ...]:
    if indexed_axes is None:
        return tuple(range(ndim))
    axes = tuple(int(a) for a in np.asarray(indexed_axes).reshape(-1))
    if not axes or any(a < 0 or a >= ndim for a in axes) or axes != tuple(range(axes[0], axes[0] + len(axes))):
        raise ValueError(f"indexed_axes must be consecutive axes of a {ndim}-d sample, got {list(axes)}")
    if axes[0] != 0 and axes[-1] != ndim - 1:
        raise ValueError(f"indexed_axes must include the first or the last axis, got {list(axes)}")
    return axes


def _mask(shape: tuple[int, ...], indices: Any, axes: tuple[int, ...]) -> np.ndarray | None:
    """Boolean mask broadcastable to ``shape`` selecting ``indices`` over ``axes`` (None: all)."""
    if indices is None:
        return None
    sub = tuple(shape[a] for a in axes)
    m = np.zeros(sub, dtype=bool)
    if isinstance(indices, tuple):
        m[indices] = True  # already an index expression over the indexed axes (slices / arrays)
    else:
        flat = np.asarray(indices).reshape(-1)
        if flat.size and flat.dtype.kind not in "iu":
            raise TypeError(f"indices must be integer positions, got dtype {flat.dtype}")
        if flat.size and (flat.min() < -m.size or flat.max() >= m.size):
            raise ValueError(f"indices must be flat positions in [0, {m.size}) over the indexed axes {list(axes)}")
        m.reshape(-1)[flat] = True
    lead, trail = axes[0], len(shape) - 1 - axes[-1]
    return m.reshape((1,) * lead + sub + (1,) * trail)


class UPIPerturbFunc:
    """A Quantus-compatible ``perturb_func`` that adds a fixed perturbation ``delta`` (C, H, W).

    Called as ``fn(arr, indices=None, indexed_axes=None, **kwargs)``, it returns
    ``arr + scale * delta`` (same shape and dtype, a new array; ``scale * delta`` is rounded to
    ``arr``'s dtype before the addition, as ``x + delta`` in torch), restricted to the positions
    ``indices`` when given, and clipped to ``clip`` when set. ``arr`` is a numpy float array in
    model input units, channels first, in one of four layouts (N = C*H*W):

    * ``(B, N)``: a flattened batch, what Quantus 0.6's robustness metrics pass
      (``arr=x_batch.reshape(B, -1)``, ``indices`` a (B, M) array of flat positions, one row per
      sample; MaxSensitivity, AvgSensitivity, LocalLipschitzEstimate, RelativeInputStability, ...);
    * ``(B, C, H, W)``: a batch;
    * ``(C, H, W)`` or ``(N,)``: one sample (what older Quantus versions pass, sample by sample).

    ``indices`` are integer positions over the axes ``indexed_axes`` of a sample (flattened,
    C-order; default: all axes; the axes must be consecutive and include the first or the last
    one, Quantus's convention), or a tuple index expression over those axes. For a batch, a 2-D
    integer array gives each sample its own row, anything else applies to every sample. Other
    keyword arguments (e.g. the noise parameters ``lower_bound`` / ``perturb_std`` a Quantus metric
    passes to its default perturbation) are accepted and ignored.

    Args:
        delta: the perturbation (C, H, W), a tensor or numpy array in model input units.
        scale: multiplies ``delta`` (e.g. ``-1`` for the opposite direction), finite.
        clip: ``(low, high)`` bounds of the valid input range, or None.
    """

    def __init__(self, delta: torch.Tensor | np.ndarray, scale: float = 1.0,
                 clip: tuple[float, float] | None = None) -> None:
        if isinstance(delta, torch.Tensor):
            d = delta.detach().to("cpu", torch.float64).numpy()
        elif isinstance(delta, np.ndarray):
            d = np.asarray(delta, dtype=np.float64)
        else:
            raise TypeError(f"delta must be a torch.Tensor or a numpy array (C, H, W), got {type(delta).__name__}")
        if d.ndim != 3 or d.size == 0:
            raise ValueError(f"delta must have shape (C, H, W), got {d.shape}")
        if not np.isfinite(d).all():
            raise ValueError("delta contains NaN or Inf values")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not np.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}")
        if clip is not None:
            if len(clip) != 2 or not all(isinstance(c, (int, float)) and np.isfinite(c) for c in clip) \
                    or clip[0] > clip[1]:
                raise ValueError(f"clip must be (low, high) with finite low <= high, got {clip!r}")
            clip = (float(clip[0]), float(clip[1]))
        self.delta, self.scale, self.clip = d, float(scale), clip

    def _apply(self, arr: np.ndarray, sample: tuple[int, ...], indices: Any, indexed_axes: Any,
               batched: bool) -> np.ndarray:
        """``arr`` (B, *sample) if ``batched`` else ``sample``, perturbed at ``indices``."""
        step = (self.scale * self.delta).reshape(sample).astype(arr.dtype)
        axes = _consecutive_axes(indexed_axes, len(sample))
        if indices is None:
            m = None
        elif batched and not isinstance(indices, tuple) and np.ndim(indices) == 2:
            if len(indices) != arr.shape[0]:
                raise ValueError(f"indices has {len(indices)} rows for a batch of {arr.shape[0]} samples "
                                 f"(one row of positions per sample)")
            m = np.stack([_mask(sample, row, axes) for row in indices])
        else:
            m = _mask(sample, indices, axes)
            if batched:
                m = m[None]
        out = arr + (step if m is None else step * m)
        if self.clip is not None:
            out = np.clip(out, *self.clip)
        return out.astype(arr.dtype, copy=False)

    def __call__(self, arr: np.ndarray, indices: Any = None, indexed_axes: Sequence[int] | None = None,
                 **kwargs: Any) -> np.ndarray:
        """``arr`` (B, N), (B, C, H, W), (C, H, W) or (N,) plus the perturbation (see the class
        docstring), same shape and dtype."""
        if isinstance(arr, torch.Tensor):
            raise TypeError("arr must be a numpy array (Quantus passes numpy); convert the tensor with .numpy()")
        if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
            raise TypeError(f"arr must be a floating numpy array, got "
                            f"{arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__}")
        shape, n = self.delta.shape, self.delta.size
        if arr.shape == shape or arr.shape == (n,):
            return self._apply(arr, arr.shape, indices, indexed_axes, batched=False)
        if arr.ndim == 4 and arr.shape[1:] == shape:
            return self._apply(arr, shape, indices, indexed_axes, batched=True)
        if arr.ndim == 2 and arr.shape[1] == n:
            return self._apply(arr, (n,), indices, indexed_axes, batched=True)
        raise ValueError(f"arr must be one sample {shape} or ({n},), or a batch (B, *{shape}) or flattened "
                         f"(B, {n}) (Quantus's robustness metrics), for delta of shape {shape}; got {arr.shape}")

    def __repr__(self) -> str:
        return f"UPIPerturbFunc(delta shape {self.delta.shape}, scale={self.scale}, clip={self.clip})"


def quantus_perturb_func(delta: torch.Tensor | np.ndarray | str | os.PathLike, scale: float = 1.0,
                         clip: tuple[float, float] | None = None) -> UPIPerturbFunc:
    """A ``perturb_func`` for Quantus-style robustness metrics that adds a universal perturbation.

    Args:
        delta: the perturbation (C, H, W) in model input units, or the path of a perturbation file
            written by :func:`upi_fast.io.save_perturbation` (e.g. ``upi-fast compute``'s
            ``upi.safetensors``; loaded safely).
        scale: multiplies ``delta``.
        clip: ``(low, high)`` valid input range (e.g. ``(0, 1)`` for pixels), or None.

    Returns:
        A :class:`UPIPerturbFunc`: ``fn(arr, indices=None, indexed_axes=None, **kwargs)`` ->
        ``arr + scale * delta``, for ``arr`` a flattened batch (B, C*H*W) (what Quantus 0.6's
        robustness metrics pass), a batch (B, C, H, W) or one sample.

    Example (``nr_samples=1``: the perturbation is deterministic, so one draw is the metric)::

        metric = quantus.MaxSensitivity(nr_samples=1, perturb_func=upi_fast.adapters.quantus_perturb_func(
            "upi_out/upi.safetensors", clip=(0, 1)))
        scores = metric(model=model, x_batch=x, y_batch=y, device="cpu",
                        explain_func=upi_fast.adapters.quantus_explain_func("simple"))
    """
    if isinstance(delta, (str, os.PathLike)):
        from .io import load_perturbation
        delta, _ = load_perturbation(delta)
    return UPIPerturbFunc(delta, scale=scale, clip=clip)
