"""UPI-Grad's early stop: the rule and its epoch objectives, pure functions of the step-loss history.

The step losses (``UPIGrad.history_``) are global means from all-reduced sums, so every process of a
distributed run holds the same ones and reaches the same decision (rank 0's is broadcast as well); a
resumed run restores the history and the epoch boundaries from the checkpoint, so it stops where the
uninterrupted run stops.
"""
from __future__ import annotations

import math

import torch

__all__ = ["check_early_stop", "epoch_objectives", "should_stop"]


def epoch_objectives(history: list[float], epoch_ends: list[int]) -> list[float]:
    """The mean step loss of every finished epoch (``epoch_ends``: ``len(history)`` at each epoch's end;
    NaN for an epoch without steps)."""
    out, lo = [], 0
    for hi in epoch_ends:
        out.append(math.fsum(history[lo:hi]) / (hi - lo) if hi > lo else math.nan)
        lo = hi
    return out


def check_early_stop(patience, min_delta) -> tuple[int | None, float]:
    if patience is not None and (isinstance(patience, bool) or not isinstance(patience, int) or patience < 1):
        raise ValueError(f"patience must be a positive integer (epochs) or None, got {patience!r}")
    if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not math.isfinite(min_delta) \
            or min_delta < 0:
        raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
    if min_delta and patience is None:
        raise ValueError("min_delta needs patience (early stop is off without it)")
    return patience, float(min_delta)


def should_stop(objectives: list[float], patience: int, min_delta: float, comm) -> bool:
    """Whether the last ``patience`` epochs all failed to beat the best earlier epoch by more than
    ``min_delta``. A pure function of the epoch objectives (every process holds the same ones); rank
    0's answer is broadcast anyway, so that the processes never part ways."""
    best, wait = -math.inf, 0
    for v in objectives:
        if v > best + min_delta:  # NaN (an epoch without steps) never improves
            best, wait = v, 0
        else:
            wait += 1
    flag = torch.tensor([float(wait >= patience)], dtype=torch.float64)
    return bool(comm.broadcast_(flag).item())
