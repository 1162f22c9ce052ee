"""The saliency-method interface and its registry.

A method says how its attribution is built from gradients of the target, as an affine function of
the input ``x`` (B, C, H, W):

* its evaluation points ``pt_k = c_k + t_k x`` (k < m), stacked point-major as (m*B, C, H, W)
  (:meth:`SaliencyMethod.points`): the per-point tangent scale ``t_k = d pt_k / d x`` and the
  per-point weights ``w_k`` of the averaged gradient ``A(x) = sum_k w_k grad target(pt_k)``;
* its noise draws, if any, from a generator (:meth:`SaliencyMethod.draw_noise`);
* whether the attribution multiplies ``A`` by the input, and by what (``x - baseline``);
* its option validation (:meth:`SaliencyMethod.check`).

Every consumer (the maps in :mod:`upi_fast.saliency`, each HVP mode in :mod:`upi_fast.hvp_modes`,
the fast step in :mod:`upi_fast.accel` and :mod:`upi_fast.evaluate`) asks the method object; no
module outside this package branches on a method's name. Methods register themselves with
:func:`register`; :mod:`upi_fast.methods` imports every module of the package (so a new method is
one new file).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Union

import torch

from .._checks import check_choice

__all__ = ["SaliencyMethod", "Points", "register", "get", "names", "options_used", "REGISTRY", "baseline_like", "Baseline"]

#: A baseline: a tensor or number broadcastable to the images, or None (zeros).
Baseline = Union[torch.Tensor, float, None]

#: name -> method object, filled by :func:`register` (import :mod:`upi_fast.methods` to fill it).
REGISTRY: dict[str, "SaliencyMethod"] = {}


def baseline_like(baseline: Baseline, x: torch.Tensor) -> torch.Tensor:
    """``baseline`` broadcast to ``x``'s shape, dtype and device (zeros for None)."""
    if baseline is None:
        return torch.zeros_like(x)
    b = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    try:
        return torch.broadcast_to(b, x.shape)
    except RuntimeError:
        raise ValueError(f"baseline of shape {tuple(b.shape)} does not broadcast to x's shape {tuple(x.shape)}") from None


class Points(NamedTuple):
    """A method's evaluation points at ``x`` (B, C, H, W).

    ``points`` (m*B, C, H, W), point ``k`` of sample ``i`` at row ``k*B + i``; ``m`` points per
    sample; ``weights`` (m,) of the averaged gradient and ``tangents`` (m,) ``d pt_k / d x``, both
    None for a single point of weight 1 and tangent 1 (``pt = x``)."""
    points: torch.Tensor
    m: int
    weights: torch.Tensor | None
    tangents: torch.Tensor | None

    def targets(self, target: torch.Tensor) -> torch.Tensor:
        """The labels of the m*B points."""
        return target if self.weights is None else target.repeat(self.m)


class SaliencyMethod:
    """One saliency method (subclass it and decorate the class with :func:`register`).

    Attributes:
        name: the ``method=`` / ``saliency=`` name.
        order: position in :data:`upi_fast.saliency.METHODS` (smaller first).
        stochastic: whether it draws noise (:meth:`draw_noise`); its callers then seed a generator.
        single_point: whether ``A(x)`` is the gradient at ``x`` itself (one point, weight 1).
        multiplies_input: whether the attribution is always ``(x - baseline) * A(x)`` (otherwise only
            with ``multiply_by_input=True``).
        uses: the saliency options it reads (``steps``, ``integration``, ``baseline``, ``noise_std``,
            ``n_samples``).
    """

    name: str = ""
    order: int = 100
    stochastic: bool = False
    single_point: bool = False
    multiplies_input: bool = False
    #: The :func:`upi_fast.saliency.saliency` options the method reads (besides ``target_kind``,
    #: ``postprocess`` and ``multiply_by_input``, which every method takes).
    uses: tuple[str, ...] = ()

    # -- options -----------------------------------------------------------------------------------
    def check(self, *, steps: int, noise_std: float, n_samples: int, integration: str) -> None:
        """ValueError naming the first option this method cannot use (the generic checks, types and
        ranges, are made before, in :func:`upi_fast.saliency.check_saliency_args`)."""

    # -- noise ---------------------------------------------------------------------------------------
    def draw_noise(self, x: torch.Tensor, noise_std: float, n_samples: int,
                   generator: torch.Generator | None = None) -> torch.Tensor | None:
        """The method's noise draws for ``x`` (None when it draws none)."""
        return None

    # -- evaluation points -----------------------------------------------------------------------------
    def points(self, x: torch.Tensor, *, steps: int = 10, baseline: Baseline = None, integration: str = "",
               noise: torch.Tensor | None = None, rule: Callable | None = None) -> Points:
        """The evaluation points at ``x`` (:class:`Points`); the default: ``x`` itself.

        Options: ``steps``, ``baseline``, ``integration`` (a path rule's name), ``noise`` (the draws of
        :meth:`draw_noise`) and ``rule``, the function giving a path rule's nodes and weights
        (:func:`upi_fast.saliency.integration_rule`, looked up there at call time; None: the default)."""
        return Points(x, 1, None, None)

    def average(self, g: torch.Tensor, pts: Points, shape: torch.Size) -> torch.Tensor:
        """``A = sum_k w_k g_k`` (B, ...) from the gradients ``g`` (m*B, ...) at ``pts``."""
        if pts.weights is None:
            return g
        w = pts.weights
        return (w.view(-1, *([1] * len(shape))) * g.view(w.shape[0], *shape)).sum(0)

    def gradient(self, grad_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                 target: torch.Tensor, **options) -> torch.Tensor:
        """The averaged gradient ``A(x)`` (B, C, H, W) with ``grad_fn(points, labels) -> gradients``
        (autograd, ``torch.func.grad``, ...); ``options`` as :meth:`points`."""
        pts = self.points(x, **options)
        return self.average(grad_fn(pts.points, pts.targets(target)), pts, x.shape)

    # -- input multiplication ------------------------------------------------------------------------
    def multiplies(self, multiply_by_input: bool) -> bool:
        """Whether the attribution is ``(x - baseline) * A(x)`` given the caller's flag."""
        return bool(multiply_by_input) or self.multiplies_input

    def input_factor(self, x: torch.Tensor, baseline: Baseline) -> torch.Tensor:
        """What ``A(x)`` is multiplied by: ``x - baseline``."""
        return x - baseline_like(baseline, x)

    def __repr__(self) -> str:
        return f"<saliency method {self.name!r}>"


def register(cls: type) -> type:
    """Class decorator: register one instance of the :class:`SaliencyMethod` subclass ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, SaliencyMethod)) or not cls.name:
        raise TypeError(f"register needs a named SaliencyMethod subclass, got {cls!r}")
    if cls.name in REGISTRY and type(REGISTRY[cls.name]) is not cls:
        raise ValueError(f"saliency method {cls.name!r} is already registered")
    REGISTRY[cls.name] = cls()
    return cls


def names() -> tuple[str, ...]:
    """The registered methods' names, by ``order`` then name."""
    return tuple(sorted(REGISTRY, key=lambda n: (REGISTRY[n].order, n)))


def options_used(method: str) -> tuple[str, ...]:
    """The saliency options the method named ``method`` reads (:attr:`SaliencyMethod.uses`; () for
    a name that is not registered)."""
    m = REGISTRY.get(method) if isinstance(method, str) else None
    return m.uses if m is not None else ()


def get(method: str) -> SaliencyMethod:
    """The method object named ``method`` (ValueError naming the registered ones otherwise)."""
    m = REGISTRY.get(method) if isinstance(method, str) else None
    if m is None:
        check_choice("method", method, names())
    return m
