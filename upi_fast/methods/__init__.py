"""Saliency methods: one module per method, found by itself (``pkgutil`` over this package).

Every module here other than :mod:`.base` (and private ``_`` modules) is imported on first use of
the package; its :class:`~upi_fast.methods.base.SaliencyMethod` subclasses register themselves with
:func:`~upi_fast.methods.base.register`. Adding a method is adding one file. :data:`METHODS` are the
registered names (``simple``, ``integrated``, ``smoothgrad``, ``grad_x_input``, ...), :func:`get`
the method object of a name.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import REGISTRY, Baseline, Points, SaliencyMethod, baseline_like, get, names, options_used, register

__all__ = ["METHODS", "SaliencyMethod", "Points", "register", "get", "names", "options_used", "REGISTRY", "baseline_like",
           "Baseline"]


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_discover()

#: The registered saliency methods' names (plain gradient, integrated gradients, SmoothGrad, ...).
METHODS: tuple[str, ...] = names()
