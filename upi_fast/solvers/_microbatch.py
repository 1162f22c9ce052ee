"""Out-of-memory handling of the solvers' per-batch work: a clear error, or micro-batches.

Every per-batch computation of the solvers (the clean forward pass and reference maps, the attack
gradient of UPI-Grad, the direction rows of UPI-PCA, the sign scores) is separable over samples:
a batch's result is the sum (gradients) or the concatenation (per-sample rows, maps, losses) of the
results of any split of the batch. :class:`MicroBatcher` runs such a computation over the whole
batch; when the device runs out of memory it either raises :class:`BatchOutOfMemoryError` (a
message naming the batch size to lower) or, with ``oom_retry``, splits the batch into micro-batches
of half the size, logs it on the ``upi_fast`` logger, and tries again (down to one sample). The
smaller size is kept for the rest of the run. Random generators the computation draws from are
rewound before a retry, so a retried step consumes the same random numbers as an unsplit one.

Splitting does not change what is computed: the exact HVP modes (``double_backward``, ``forward``,
``piecewise_linear``) give the unsplit result to rounding. Two things depend on the batch as a
whole and are computed per micro-batch instead: the probe size of the finite-difference HVP modes
(``fd_step`` times the batch's mean input norm) and SmoothGrad's noise draws inside the attack
gradient (same distribution, different draws).
"""
from __future__ import annotations

import gc
import logging
from typing import Any, Callable, Iterable

import torch

__all__ = ["BatchOutOfMemoryError", "MicroBatcher", "is_out_of_memory"]

_log = logging.getLogger("upi_fast")


class BatchOutOfMemoryError(torch.OutOfMemoryError):
    """The device ran out of memory on a batch (a ``torch.OutOfMemoryError``, hence a ``RuntimeError``).

    The message names the batch size to lower and the ``oom_retry`` option. Attributes:
    ``batch_size`` (the solver's), ``samples`` (in the failing computation), ``argument``
    (``"batch_size"``, the setting to change).
    """

    batch_size: int
    samples: int
    argument = "batch_size"


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` reports an exhausted device (``torch.OutOfMemoryError``, or a ``RuntimeError``
    saying "out of memory" (CUDA, MPS), "can't allocate memory" (CPU allocator) or
    ``CUBLAS_STATUS_ALLOC_FAILED``)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    msg = str(exc)
    return "out of memory" in msg.lower() or "can't allocate memory" in msg or "CUBLAS_STATUS_ALLOC_FAILED" in msg


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _release(device: torch.device | None) -> None:
    """Return the failed attempt's memory to the device: its tensors are freed with the exception's
    frames (a collection catches any cycle), then the CUDA cache is emptied."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()


class MicroBatcher:
    """Runs a sample-separable computation over a batch, whole or in micro-batches.

    Args:
        retry: on an out-of-memory error, halve the micro-batch and try again (else raise
            :class:`BatchOutOfMemoryError` at once).
        batch_size: the solver's batch size (named in the error message).
        device: where the computation runs (its cache is emptied before a retry).

    Attributes:
        limit: the current micro-batch size (None: whole batches). Only ever decreases.
        retries: how many times a batch was split further.
    """

    def __init__(self, retry: bool = False, batch_size: int | None = None,
                 device: torch.device | None = None) -> None:
        self.retry, self.batch_size, self.device = bool(retry), batch_size, device
        self.limit: int | None = None
        self.retries = 0

    def run(self, fn: Callable[[int, int], Any], n: int, what: str,
            generators: Iterable[torch.Generator | None] = ()) -> list[tuple[int, int, Any]]:
        """``[(lo, hi, fn(lo, hi)), ...]`` over consecutive chunks covering samples ``[0, n)``: one
        chunk unless an earlier out-of-memory error lowered :attr:`limit`. ``what`` names the
        computation in messages; ``generators`` are rewound to their current state before a retry."""
        if n <= 0:
            return []
        gens = [g for g in generators if g is not None]
        states = [g.get_state() for g in gens] if self.retry else []
        while True:
            chunk = n if self.limit is None else max(1, min(self.limit, n))
            detail = None
            try:
                return [(lo, min(lo + chunk, n), fn(lo, min(lo + chunk, n))) for lo in range(0, n, chunk)]
            except RuntimeError as exc:
                if isinstance(exc, BatchOutOfMemoryError) or not is_out_of_memory(exc):
                    raise
                detail = _first_line(exc)
            _release(self.device)  # the failed attempt's frames are released with the exception
            if not self.retry or chunk <= 1:
                raise self._error(what, n, chunk, detail) from None
            self.limit = chunk // 2
            self.retries += 1
            _log.warning("upi_fast: out of device memory computing %s for %d samples; retrying in micro-batches "
                         "of %d (results are summed, as for the whole batch)", what, chunk, self.limit)
            for g, s in zip(gens, states):
                g.set_state(s)

    def _error(self, what: str, n: int, chunk: int, detail: str) -> BatchOutOfMemoryError:
        bs = self.batch_size if self.batch_size is not None else n
        if self.retry:
            msg = (f"out of device memory computing {what} even for a micro-batch of {chunk} sample(s) "
                   f"(batch_size={bs}); use a device with more memory or smaller images ({detail})")
        else:
            msg = (f"out of device memory computing {what} for a batch of {n} samples: lower batch_size "
                   f"(now {bs}, --batch-size), or pass oom_retry=True (--oom-retry) to split batches into "
                   f"micro-batches automatically ({detail})")
        err = BatchOutOfMemoryError(msg)
        err.batch_size, err.samples = bs, n
        return err
