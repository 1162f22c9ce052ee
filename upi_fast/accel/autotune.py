"""Autotuning of the fast step: :func:`autotune_step` (:mod:`upi_fast.accel`)."""
from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn

from .._checks import check_positive
from ..hvp import SaliencySpec
from .prepare import _model_device
from .step import FastStep, _lean_supported

__all__ = ["autotune_step"]


def _default_candidates(device: torch.device, spec: SaliencySpec) -> list[dict]:
    if device.type == "cuda":
        cands = [{"channels_last": True}]
        if _lean_supported(spec):
            cands.append({"channels_last": True, "cuda_graph": True})
        return cands
    return [{}, {"channels_last": True}, {"pool_channels_last": False},
            {"channels_last": True, "stem_space_to_depth": False}]


def autotune_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, I_ref: torch.Tensor, delta: torch.Tensor,
                  spec: SaliencySpec | None = None, *, candidates: list[dict] | None = None, repeat: int = 2,
                  **fixed: Any) -> FastStep:
    """The fastest :class:`FastStep` among option sets, timed on this batch (like cuDNN's benchmark mode).

    Each candidate (a dict of :class:`FastStep` options, merged over ``fixed``) is built, called once
    (warm-up, compilation, capture) and timed over ``repeat`` calls; the one with the smallest median
    is returned. Every default candidate computes the same function (layouts, kernel choices, graph
    capture), so tuning never changes the result beyond float rounding; ``fixed`` holds what must not
    vary (``hvp``, ``precision``, ...).

    Args:
        model, spec: as :class:`FastStep`.
        x, y, I_ref, delta: a representative batch (as :meth:`FastStep.__call__`).
        candidates: option sets to try (default: CPU: NCHW / channels_last, with and without the
            channels_last pooling and the space-to-depth stem; CUDA: channels_last, with and without a
            CUDA graph).
        repeat: timed calls per candidate (>= 1).
        **fixed: options common to every candidate.

    Returns:
        The chosen step, with ``tuning_``: a list of ``{"options", "median_s", "setup_s"}`` (or
        ``"error"``) per candidate, ``tuning_choice_`` (the chosen candidate's options) and
        ``tuning_time_s_``.
    """
    check_positive("repeat", repeat, integer=True)
    t_start = time.perf_counter()
    spec = spec if spec is not None else SaliencySpec()
    device = _model_device(model) if isinstance(model, nn.Module) else torch.device("cpu")
    cands = candidates if candidates is not None else _default_candidates(device, spec)
    if not cands:
        raise ValueError("candidates must hold at least one option set")
    rows, best, best_t = [], None, math.inf
    for opts in cands:
        if not isinstance(opts, dict):
            raise TypeError(f"each candidate must be a dict of FastStep options, got {type(opts).__name__}")
        options = {**fixed, **opts}
        try:
            step = FastStep(model, spec, **options)
            step(x, y, I_ref, delta)
            times = []
            for _ in range(repeat):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                step(x, y, I_ref, delta)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
        except (RuntimeError, ValueError, TypeError) as exc:
            rows.append({"options": opts, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"})
            continue
        med = sorted(times)[len(times) // 2]
        rows.append({"options": opts, "median_s": med, "setup_s": step.setup_time_s_, "notes": list(step.notes_)})
        if med < best_t:
            best, best_t, choice = step, med, opts
    if best is None:
        raise ValueError(f"every candidate failed: {rows}")
    best.tuning_, best.tuning_choice_ = rows, dict(choice)
    best.tuning_time_s_ = time.perf_counter() - t_start
    return best
