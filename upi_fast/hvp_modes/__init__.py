"""The HVP modes: one implementation each, shared by the reference step
(:func:`upi_fast.hvp.saliency_loss_grad`) and the fast step (:class:`upi_fast.accel.FastStep`).

Each mode computes, at the evaluation points ``xp = x + delta`` (B, C, H, W), the per-sample
dissimilarities and directions ``J_r(xp_i)^T u_i`` (:mod:`upi_fast.hvp` explains the maths), for
any saliency method (the method object of :mod:`upi_fast.methods` gives the points, weights, tangent
scales and input factor). The fast step's needs come in as :class:`~upi_fast.hvp_modes.hooks.Hooks`
(a layout function, the autocast context, the gradient of the target without host
synchronisation, the precomputed finite-difference scale); the reference passes
:data:`~upi_fast.hvp_modes.hooks.REFERENCE`.

* :mod:`.double_backward`: reverse-over-reverse (also the reduced gradient with respect to ``delta``);
* :mod:`.forward`: forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``);
* :mod:`.finite_difference`: central and one-sided differences of first-order gradients;
* :mod:`.piecewise_linear`: the exact two-pass HVP of piecewise-linear models.

The ``auto`` policy (:func:`upi_fast.piecewise.resolve_hvp`, the per-batch refusal fallback
:func:`upi_fast.piecewise.piecewise_or_fallback`) sits beside them, with the piecewise-linear
applicability check it relies on.
"""
from __future__ import annotations

DOUBLE_BACKWARD = "double_backward"
FORWARD = "forward"
FINITE_DIFFERENCE = "finite_difference"
FINITE_DIFFERENCE_ONESIDED = "finite_difference_onesided"
PIECEWISE_LINEAR = "piecewise_linear"
AUTO = "auto"

#: Names accepted by ``hvp=``: how the gradient through the saliency map is obtained.
HVP_MODES = (DOUBLE_BACKWARD, FORWARD, FINITE_DIFFERENCE, FINITE_DIFFERENCE_ONESIDED, PIECEWISE_LINEAR, AUTO)
#: Modes whose step is first order only (two or three plain gradients): valid under ``torch.compile``.
FIRST_ORDER_MODES = (FINITE_DIFFERENCE, FINITE_DIFFERENCE_ONESIDED)
#: Modes resolved on the first batch (:func:`upi_fast.piecewise.resolve_hvp`).
RESOLVED_MODES = (AUTO, PIECEWISE_LINEAR)

from .double_backward import double_backward  # noqa: E402
from .finite_difference import finite_difference, finite_difference_onesided  # noqa: E402
from .forward import forward  # noqa: E402
from .hooks import REFERENCE, Hooks  # noqa: E402
from .piecewise_linear import piecewise_linear  # noqa: E402

#: The per-sample direction of each first-order-input mode: ``fn(model, xp, target, I_ref, spec,
#: sg_noise, hooks, fd_step) -> (loss (B,), J^T u (B, C, H, W))`` at the evaluation points ``xp``
#: (:func:`double_backward` differentiates through ``x + delta`` itself).
DIRECTIONS = {FORWARD: forward,
              FINITE_DIFFERENCE: finite_difference, FINITE_DIFFERENCE_ONESIDED: finite_difference_onesided,
              PIECEWISE_LINEAR: piecewise_linear}

__all__ = ["HVP_MODES", "FIRST_ORDER_MODES", "RESOLVED_MODES", "DIRECTIONS", "Hooks", "REFERENCE",
           "double_backward", "forward", "finite_difference", "finite_difference_onesided", "piecewise_linear",
           "DOUBLE_BACKWARD", "FORWARD", "FINITE_DIFFERENCE", "FINITE_DIFFERENCE_ONESIDED", "PIECEWISE_LINEAR",
           "AUTO"]
