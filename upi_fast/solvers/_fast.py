"""The solvers' ``fast`` option: their attack steps through :class:`upi_fast.accel.FastStep`.

One object per fit: built at the start of ``fit`` (or, with ``fast="autotune"``, tuned on the first
batch), called with the same arguments as the reference ``_loss_grad`` minus the spec and mode.
"""
from __future__ import annotations

import torch

from ..hvp import SaliencySpec
from ..hvp_modes import AUTO, DOUBLE_BACKWARD
from ._common import autograd_errors, surrogate_context

__all__ = ["FastSteps", "fast_config"]


class FastSteps:
    """Holds the prepared step of one fit.

    Args:
        fast: the solver's validated ``fast`` (True, ``"autotune"`` or a dict of FastStep options).
        model, spec, hvp, precision, fd_step, surrogate: the solver's.

    With ``spec.target_kind == "prob"``, ``hvp="double_backward"`` becomes ``"auto"`` (exact: the
    piecewise-linear HVP where it applies, double backward otherwise); with a logit target ``auto``
    could pick finite differences, so the mode is kept.
    """

    def __init__(self, fast, model, spec: SaliencySpec, hvp: str, precision: str, fd_step: float,
                 surrogate) -> None:
        self.model, self.spec, self.hvp, self.surrogate = model, spec, hvp, surrogate
        upgrade = hvp == DOUBLE_BACKWARD and spec.target_kind == "prob"
        self.options = {"hvp": AUTO if upgrade else hvp, "precision": precision, "fd_step": fd_step,
                        "validate": False}
        if isinstance(fast, dict):
            self.options.update(fast)
        self.step = None
        if fast != "autotune":
            from ..accel import FastStep
            with surrogate_context(model, surrogate):  # the prepared copy keeps the swapped ReLU modules
                self.step = FastStep(model, spec, **self.options)

    @classmethod
    def for_solver(cls, solver) -> "FastSteps | None":
        """The step for a solver's ``fit`` (its ``fast``, ``model``, ``spec``, ``hvp``, ``precision``,
        ``fd_step`` and ``surrogate``), or None when ``fast`` is off."""
        if solver.fast is False:
            return None
        return cls(solver.fast, solver.model, solver.spec, solver.hvp, solver.precision, solver.fd_step,
                   solver.surrogate)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, I_ref: torch.Tensor, delta: torch.Tensor,
                 generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss (B,), grad)`` as :func:`upi_fast.saliency_loss_grad` (``x`` already noised)."""
        # functional relu calls inside forward need the surrogate context at every call
        with autograd_errors(self.hvp), surrogate_context(self.model, self.surrogate):
            if self.step is None:  # fast="autotune": tuned on the first batch
                from ..accel import autotune_step
                self.step = autotune_step(self.model, x, y, I_ref, delta, self.spec, **self.options)
            return self.step(x, y, I_ref, delta, generator)


def fast_config(fast) -> bool | str | list:
    """``fast`` as it goes into a checkpoint's configuration (a dict as its sorted items)."""
    return sorted(fast.items()) if isinstance(fast, dict) else fast
