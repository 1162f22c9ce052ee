"""``simple``: the plain gradient ``g(x) = grad_x target(x)`` (one point, weight 1)."""
from __future__ import annotations

from .base import SaliencyMethod, register


@register
class Simple(SaliencyMethod):
    """The gradient at ``x`` itself; with ``multiply_by_input`` the gradient times ``x - baseline``."""

    name = "simple"
    order = 0
    single_point = True
