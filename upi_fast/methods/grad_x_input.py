"""``grad_x_input``: Grad x Input, the gradient times the input, ``(x - baseline) * grad_x target(x)``
(baseline default zero: captum's ``InputXGradient``)."""
from __future__ import annotations

from .base import SaliencyMethod, register


@register
class GradXInput(SaliencyMethod):
    """One point (``x``, weight 1, tangent 1), always multiplied by ``x - baseline``."""

    name = "grad_x_input"
    order = 30
    single_point = True
    multiplies_input = True
    uses = ("baseline",)
