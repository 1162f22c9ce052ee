"""The ``"piecewise_linear"`` HVP mode: exact Hessian-vector products in two gradient passes, or a refusal.

In eval mode most attacked classifiers are piecewise linear in their input: convolutions and
linear layers, BatchNorm with running statistics, ReLU-family activations, clamps, max and average
pooling, residual additions (torchvision's ResNet, VGG, MobileNet-V2). Around a point ``x`` such a
network is affine, ``z(x') = J x' + c`` with ``J`` (K, C*H*W) the input Jacobian of the K logits, so
for the softmax-probability target ``p_y(z)``

    g = J^T s,        s = d p_y / d z   = p_y (e_y - p),
    H u = J^T C J u,  C = d^2 p_y / dz^2 = p_y [ (e_y - p)(e_y - p)^T - (diag(p) - p p^T) ],

and ``C`` is applied to a (K,) vector in O(K). :class:`upi_fast.linearization.Linearization` records
the linearisation during the primal forward that the gradient needs anyway, pushes ``u`` through it
(``J u``) and runs ``J^T v`` as a backward pass through the retained first-order graph: one step
costs one forward, one tangent forward and two first-order backward passes (about two gradients),
with no double-backward graph.

Exact or refuse. The proof is made at every step, on the batch at hand, by the linearisation itself
(:mod:`upi_fast.linearization`): every call that touches the input must be on an explicit list whose
linearisation is known and recorded, and every node of the primal autograd graph on a path from the
input to the logits must be the backward of such a call; anything else raises
:class:`NotPiecewiseLinearError` with the reason. Data-dependent control flow that reaches an
unlisted call on a later batch is therefore refused on that batch. On top of it, a numerical
confirmation (:func:`check_piecewise_linear`; the second line, not the guard) compares
``J^T diag(c) J u`` through the linearisation with the double-backward Hessian-vector product of
``psi(z) = sum_k a_k z_k + c_k z_k^2 / 2`` (random ``a``, ``c`` in [0.5, 1.5]) on a few samples, once
per model, dtype, device type and module structure. The exact Hessian of ``psi(z(x))`` is
``J^T diag(c) J + sum_k (a_k + c_k z_k) d^2 z_k / dx^2``, so it fails when the tangent forward is
wrong *or* when the logits have curvature. TF32 is disabled during the confirmation.

``hvp="auto"`` (:func:`resolve_hvp`) picks ``"piecewise_linear"`` when the confirmation passes; when
a later step's linearisation refuses, the step is recomputed with double backward and the model is
marked refused from then on (logged once): :func:`piecewise_or_fallback`, the one per-batch
fallback of the reference step (:mod:`upi_fast.hvp`) and the fast step (:mod:`upi_fast.accel`).
The mode's computation itself is :func:`upi_fast.hvp_modes.piecewise_linear`. With the logit target the exact Hessian of a
piecewise-linear network is zero almost everywhere: ``hvp="piecewise_linear"`` refuses it
(:data:`LOGIT_TARGET_MESSAGE`), and ``hvp="auto"`` picks ``"finite_difference"`` for it.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ._checks import check_images, check_labels, check_model, check_positive, eval_mode
from .hvp_modes import AUTO, DOUBLE_BACKWARD, FINITE_DIFFERENCE, PIECEWISE_LINEAR
from .hvp_modes.piecewise_linear import LOGIT_TARGET_MESSAGE, _ProbTarget  # noqa: F401
from .hvp_modes.piecewise_linear import piecewise_linear as _piecewise_linear
from .linearization import Linearization, NotPiecewiseLinearError
from .linearization import check_logits as _check_logits

__all__ = ["Linearization", "NotPiecewiseLinearError", "check_piecewise_linear", "resolve_hvp",
           "piecewise_loss_and_direction", "mark_refused", "piecewise_or_fallback", "LOGIT_TARGET_MESSAGE"]

logger = logging.getLogger("upi_fast")


def piecewise_loss_and_direction(model, xp: torch.Tensor, target: torch.Tensor, I_ref: torch.Tensor, spec,
                                 sg_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``"piecewise_linear"`` mode at the evaluation points ``xp`` (B, C, H, W), already perturbed.

    Returns ``(loss (B,), J_r(xp_i)^T u_i (B, C, H, W))`` per sample (not averaged), like
    :func:`upi_fast.hvp.loss_and_direction`. ``spec`` is a :class:`upi_fast.hvp.SaliencySpec` with
    ``target_kind="prob"``; ``sg_noise`` (n, B, C, H, W) the smoothgrad draws. For integrated
    gradients the M*B path points are one batch: point ``k`` gets the tangent ``a_k c_k w`` (``a_k``,
    ``c_k`` the nodes and weights of ``spec.integration``; its contribution to ``J_A^T w`` is
    ``c_k a_k H(pt_k) w``); for smoothgrad every draw gets ``w / n``.
    Exact only for piecewise-linear models (:func:`check_piecewise_linear`); the model must be in
    eval mode. The implementation: :func:`upi_fast.hvp_modes.piecewise_linear`.
    """
    return _piecewise_linear(model, xp, target, I_ref, spec, sg_noise)


def _refused_message(reason) -> str:
    return (f"hvp='piecewise_linear' does not apply to this model on this batch: {reason}. "
            "Use hvp='double_backward' (exact for any model) or hvp='auto'.")


def piecewise_or_fallback(model, xp: torch.Tensor | Callable[[], torch.Tensor], requested: str, mode: str,
                          run: Callable[[str], Any], on_refused: Callable[[str], None] | None = None) -> Any:
    """``run(mode)``; when ``mode`` is ``"piecewise_linear"`` and this batch's linearisation refuses
    (:class:`NotPiecewiseLinearError`): exact or refuse. With ``requested="auto"`` the model is marked
    refused (:func:`mark_refused`, at the evaluation points ``xp``: a tensor, or a function making it
    only then), ``on_refused(reason)`` is called and ``run("double_backward")`` returned; otherwise
    ValueError with the reason. The per-batch fallback of the reference step and of the fast step."""
    if mode != PIECEWISE_LINEAR:
        return run(mode)
    try:
        return run(mode)
    except NotPiecewiseLinearError as e:  # this batch left the lists: exact or refuse
        if requested != AUTO:
            raise ValueError(_refused_message(e)) from None
        mark_refused(model, xp() if callable(xp) else xp, str(e))
        if on_refused is not None:
            on_refused(str(e))
    return run(DOUBLE_BACKWARD)


# ----------------------------------------------------------------------------------------------
# Applicability: numerical confirmation (second line), cache, mode resolution, fallback
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _ieee_float32() -> Iterator[None]:
    """Disable TF32 convolutions / matmuls (CUDA) while confirming: they would blur a 1e-4 test
    (autocast is disabled beside it, in :func:`_confirm`)."""
    if not torch.cuda.is_available():
        yield
        return
    try:
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    except (RuntimeError, AttributeError):
        saved = None
    try:
        yield
    finally:
        if saved is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _confirm(model, x: torch.Tensor, n_check: int, rtol: float) -> tuple[bool, str]:
    """Linearise the first ``n_check`` samples (the lists' proof) and compare ``J^T diag(c) J u``
    through the linearisation with double backward (module docstring)."""
    xs = x[:n_check].detach()
    gen = torch.Generator(device=xs.device).manual_seed(1234)
    u = torch.randn(xs.shape, generator=gen, dtype=xs.dtype, device=xs.device)
    if xs.dtype in (torch.float16, torch.bfloat16):
        rtol = max(rtol, 32 * torch.finfo(xs.dtype).eps)
    try:
        # full precision: autocast (a solver's precision="bf16") would blur the 1e-4 comparison and the
        # verdict is cached for the float32 key
        with _ieee_float32(), torch.autocast(xs.device.type, enabled=False):
            lin = Linearization(model, xs)
            shape = lin.logits.shape
            a = torch.randn(shape, generator=gen, dtype=xs.dtype, device=xs.device)
            c = 0.5 + torch.rand(shape, generator=gen, dtype=xs.dtype, device=xs.device)
            ours = lin.vjp(c * lin.jvp(u), retain_graph=False)
            with torch.enable_grad():
                xr = xs.clone().requires_grad_(True)
                z = model(xr)
                psi = (a * z).sum() + 0.5 * (c * z * z).sum()
                (gr,) = torch.autograd.grad(psi, xr, create_graph=True)
                (ref,) = torch.autograd.grad((gr * u).sum(), xr, allow_unused=True)
    except NotPiecewiseLinearError as e:
        return False, str(e)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        return False, f"the linearisation failed on this model ({type(e).__name__}: {e})"
    ref = torch.zeros_like(xs) if ref is None else ref.detach()
    ref_norm = float(ref.norm())
    if not torch.isfinite(ref).all() or not torch.isfinite(ours).all():
        return False, "cannot confirm: the Hessian-vector product at the check samples is not finite"
    if not ref_norm > 0:  # the lists' proof stands; the numbers can only confirm that both are zero
        if float(ours.norm()) == 0:
            return True, ("every call on the lists (the numerical check was inconclusive: the Hessian-vector "
                          "product is zero at the check samples)")
        return False, "the linearised Hessian-vector product is not zero where double backward's is"
    rel = float((ours - ref).norm()) / ref_norm
    if not rel < rtol:
        return False, (f"the linearised Hessian-vector product differs from double backward (relative error "
                       f"{rel:.2e} >= {rtol:.0e}) although every call was on the lists: please report this model")
    return True, f"every call on the lists, and confirmed against double backward (relative error {rel:.1e})"


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOGGED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _fingerprint(model) -> tuple:
    if isinstance(model, nn.Module):
        return tuple(type(m) for m in model.modules())
    return ()


def _model_entry(table: "weakref.WeakKeyDictionary", model) -> dict:
    try:
        return table.setdefault(model, {})
    except TypeError:  # not weak-referenceable: no caching
        return {}


def _key(model, x: torch.Tensor) -> tuple:
    return (x.dtype, x.device.type, _fingerprint(model))


def _batch_norm_reason(model) -> str | None:
    if isinstance(model, nn.Module):
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
                return (f"module {name or '<model>'!r} ({type(m).__name__}) normalises with batch statistics "
                        "(needs eval mode with running statistics)")
    return None


def _status(model, x: torch.Tensor, *, recheck: bool = False, n_check: int = 1, rtol: float = 1e-4
            ) -> tuple[bool, str]:
    """(applies, reason), cached per model object, dtype, device type and module structure. The
    automatic resolution (:func:`resolve_hvp`) confirms on one sample: every step's linearisation
    repeats the lists' proof on its own batch, the confirmation is the second line, and one random
    probe ``u, a, c`` exposes a wrong tangent pass or curved logits as surely as two (it costs about
    half of two: on ResNet-18 at 64x64, 0.43 s instead of 0.85 s, measured side by side)."""
    entry = _model_entry(_CACHE, model)
    key = _key(model, x)
    if recheck or key not in entry:
        reason = _batch_norm_reason(model)
        entry[key] = (False, reason) if reason is not None else _confirm(model, x, n_check, rtol)
    return entry[key]


def mark_refused(model, x: torch.Tensor, reason: str) -> None:
    """Record that a step's linearisation refused ``model`` (for ``x``'s dtype, device and the model's
    structure): ``hvp="auto"`` resolves to double backward from then on, and the reason is logged once."""
    _model_entry(_CACHE, model)[_key(model, x)] = (False, reason)
    _log_once(model, x, f"hvp='auto': falling back to hvp='double_backward': {reason}")


def _log_once(model, x: torch.Tensor, message: str) -> None:
    seen = _model_entry(_LOGGED, model)
    key = (*_key(model, x), message)
    if key not in seen:
        seen[key] = True
        logger.info(message)


def check_piecewise_linear(model, x: torch.Tensor, target: torch.Tensor | None = None, spec=None, *,
                           raise_error: bool = True, recheck: bool = True, n_check: int = 2,
                           rtol: float = 1e-4) -> bool:
    """Whether ``hvp="piecewise_linear"`` applies to ``model`` at ``x`` (see the module docstring).

    Linearises the first ``n_check`` samples (every call on the lists, every autograd node known) and
    confirms the result numerically against double backward. The verdict is cached for
    :func:`resolve_hvp` (per model object, dtype, device type and module structure). It is not a
    guarantee for other inputs: each step's linearisation repeats the lists' proof on its own batch
    and refuses when it fails.

    Args:
        model: classifier returning logits (B, K); checked in eval mode (restored afterwards).
        x: sample inputs (B, C, H, W) in model units; the first ``n_check`` are used.
        target: optional labels (B,), checked against the number of logits.
        spec: optional :class:`upi_fast.hvp.SaliencySpec`; a logit target is refused
            (:data:`LOGIT_TARGET_MESSAGE`).
        raise_error: raise ``ValueError`` with the reason instead of returning False.
        recheck: ignore the cache and check again (the new verdict is cached).
        n_check: samples used by the check.
        rtol: largest accepted relative error against double backward (raised to 32 x machine
            epsilon for 16-bit dtypes).

    Returns:
        True when the mode applies; False (``raise_error=False``) otherwise.
    """
    check_model(model)
    check_images("x", x)
    check_positive("n_check", n_check, integer=True)
    check_positive("rtol", rtol)
    if spec is not None and spec.target_kind != "prob":
        if raise_error:
            raise ValueError(LOGIT_TARGET_MESSAGE)
        return False
    if target is not None:
        check_labels("target", target, x.shape[0])
    with eval_mode(model):
        if target is not None:
            with torch.no_grad():
                _check_logits(model(x[:1].detach()), 1, target)
        ok, reason = _status(model, x, recheck=recheck, n_check=n_check, rtol=rtol)
    if not ok and raise_error:
        raise ValueError(f"hvp='piecewise_linear' does not apply to this model: {reason}. "
                         "Use hvp='double_backward' (exact for any model) or hvp='auto'.")
    return ok


def resolve_hvp(model, x: torch.Tensor, spec, hvp: str = "auto") -> str:
    """The concrete HVP mode for ``hvp`` (``"auto"`` or ``"piecewise_linear"``; others are returned as is).

    ``"piecewise_linear"``: returned when it applies, else ``ValueError`` with the reason (a logit
    target is always refused). ``"auto"``: ``"piecewise_linear"`` when it applies (about two
    gradients per step, the fastest exact mode); ``"finite_difference"`` for a piecewise-linear model
    with the logit target (its exact Hessian is zero); ``"double_backward"`` otherwise. The choice
    and its reason are logged once per model at INFO on logger ``"upi_fast"``. The model should be
    in eval mode; ``x`` (B, C, H, W) are evaluation points (the first one is checked, once per model,
    dtype, device type and structure). A step that then refuses falls back (:func:`mark_refused`).
    """
    if hvp not in (AUTO, PIECEWISE_LINEAR):
        return hvp
    logit = spec.target_kind != "prob"
    if hvp == PIECEWISE_LINEAR:
        if logit:
            raise ValueError(LOGIT_TARGET_MESSAGE)
        ok, reason = _status(model, x)
        if not ok:
            raise ValueError(f"hvp='piecewise_linear' does not apply to this model: {reason}. "
                             "Use hvp='double_backward' (exact for any model) or hvp='auto'.")
        return hvp
    ok, reason = _status(model, x)
    if ok and logit:
        choice = FINITE_DIFFERENCE
        msg = ("hvp='auto': piecewise-linear model with target_kind='logit', whose exact Hessian is zero almost "
               "everywhere; using hvp='finite_difference' (or attack a softplus_surrogate with an exact mode)")
    elif ok:
        choice, msg = PIECEWISE_LINEAR, f"hvp='auto': using hvp='piecewise_linear' ({reason})"
    else:
        choice, msg = DOUBLE_BACKWARD, f"hvp='auto': falling back to hvp='double_backward': {reason}"
    _log_once(model, x, msg)
    return choice
