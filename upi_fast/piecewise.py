"""Exact Hessian-vector products for piecewise-linear networks in two gradient passes.

In eval mode most attacked classifiers are piecewise linear in their input: convolutions and
linear layers, BatchNorm with running statistics, ReLU / LeakyReLU / ReLU6 / Hardtanh, max and
average pooling, residual additions (torchvision's ResNet, VGG, MobileNet-V2). Around a point
``x`` such a network is affine, ``z(x') = J x' + c`` with ``J`` (K, C*H*W) the input Jacobian of the
K logits, so for the softmax-probability target ``p_y(z)``

    g = J^T s,        s = d p_y / d z   = p_y (e_y - p),
    H u = J^T C J u,  C = d^2 p_y / dz^2 = p_y [ (e_y - p)(e_y - p)^T - (diag(p) - p p^T) ],

and ``C`` is applied to a (K,) vector in O(K). :class:`Linearization` records, during the primal
forward that the gradient needs anyway, what each nonlinear op needs (ReLU / ReLU6 / Hardtanh /
LeakyReLU outputs, max-pooling indices); :meth:`Linearization.jvp` then pushes a tangent ``u``
through the *same* linearisation (the model's own ``forward`` re-run on ``u`` with activation masks
and pooling indices from the primal, biases dropped, BatchNorm reduced to its scale), and
:meth:`Linearization.vjp` runs ``J^T v`` as a backward pass through the retained first-order primal
graph. One step costs one forward, one tangent forward and two first-order backward passes (about
two gradients), with no double-backward graph.

Mechanism: a ``TorchFunctionMode`` sees the functional calls made by modules and by ``forward``
code alike (``F.relu``, ``F.max_pool2d``, ``F.conv2d``, ``F.batch_norm``, ...), so functional
ReLUs and pools in a hand-written ``forward`` are linearised too. In the tangent pass the tensors
derived from the tangent are tracked: calls on constants only (buffers, constant branches) run
unchanged, and constant terms combined additively with the tangent are dropped (``x - mean`` of
an input normalisation, ``x + 1``, a constant block in ``cat``, the constant side of ``where``).
Every other call (``flatten``, views, residual additions, average pooling, interpolation, ...)
is passed through, which is exact only when it is linear in the tangent; a ``forward`` that
applies a smooth function (``torch.tanh``) is caught by the confirmation below.

Applicability (:func:`check_piecewise_linear`): (1) every leaf module is of a known
piecewise-linear kind (:data:`PIECEWISE_LINEAR_MODULES`, extensible with
:func:`register_piecewise_linear`; modules with children are containers whose ``forward`` is
checked by (2)); (2) confirmed numerically once per model, dtype, device type and module
structure: on a few samples and a fixed random direction ``u``, ``J^T diag(c) J u`` from the
linearisation must equal the double-backward Hessian-vector product of
``psi(z) = sum_k a_k z_k + c_k z_k^2 / 2`` (random ``a``, ``c`` in [0.5, 1.5]) to a relative
error below ``rtol`` (1e-4). The exact Hessian of ``psi(z(x))`` is
``J^T diag(c) J + sum_k (a_k + c_k z_k) d^2 z_k / dx^2``, so the test fails when the tangent
forward is wrong *or* when the logits have curvature; a well-conditioned ``psi`` keeps it free of
the softmax's cancellation on confident samples. TF32 is disabled during the confirmation.

With the logit target the exact Hessian of a piecewise-linear network is zero almost everywhere:
``hvp="piecewise_linear"`` refuses it (:data:`LOGIT_TARGET_MESSAGE`), and ``hvp="auto"`` picks
``"finite_difference"`` for it (:func:`resolve_hvp`).
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
import torch.utils.weak
from torch import nn
from torch.overrides import TorchFunctionMode

from ._checks import check_images, check_labels, check_model, check_positive, eval_mode
from .saliency import _baseline_like, path_coefficients

__all__ = ["Linearization", "NotPiecewiseLinearError", "check_piecewise_linear", "resolve_hvp",
           "piecewise_loss_and_direction", "register_piecewise_linear", "PIECEWISE_LINEAR_MODULES",
           "LOGIT_TARGET_MESSAGE"]

logger = logging.getLogger("upi_fast")

LOGIT_TARGET_MESSAGE = (
    "hvp='piecewise_linear' needs target_kind='prob': with the logit target the saliency map of a "
    "piecewise-linear network is piecewise constant in x, so its exact Hessian is zero almost everywhere "
    "and the attack gradient would be a silent zero. Use target_kind='prob', a smooth stand-in "
    "(`with upi_fast.softplus_surrogate(model): ...` with hvp='double_backward' or 'forward'), or "
    "hvp='finite_difference', which sees the activation switches.")


class NotPiecewiseLinearError(ValueError):
    """The model (or one call in its forward) cannot be linearised by :class:`Linearization`."""


# ----------------------------------------------------------------------------------------------
# Known piecewise-linear leaf modules
# ----------------------------------------------------------------------------------------------

_pad = nn.modules.padding
PIECEWISE_LINEAR_MODULES: list[type] = [
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
    nn.modules.batchnorm._BatchNorm,
    nn.ReLU, nn.Hardtanh, nn.LeakyReLU,  # nn.ReLU6 is a Hardtanh
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.Flatten, nn.Unflatten, nn.Identity, nn.modules.dropout._DropoutNd,
    _pad._ConstantPadNd, _pad._ReflectionPadNd, _pad._ReplicationPadNd, _pad._CircularPadNd,
    nn.Upsample, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle,
]
"""Leaf module types accepted by the structural check (subclasses included)."""


def register_piecewise_linear(cls: type) -> type:
    """Accept leaf modules of type ``cls`` (usable as a class decorator). The numerical
    confirmation still runs: registering a module that is not piecewise linear only moves the
    refusal from the structural check to the confirmation."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"cls must be an nn.Module subclass, got {cls!r}")
    if cls not in PIECEWISE_LINEAR_MODULES:
        PIECEWISE_LINEAR_MODULES.append(cls)
    return cls


def _structural_reason(model) -> str | None:
    """Why the module tree is not piecewise linear, or None when every leaf is of a known kind."""
    if not isinstance(model, nn.Module):
        return None  # a plain callable: only the numerical confirmation can judge it
    known = tuple(PIECEWISE_LINEAR_MODULES)
    for name, m in model.named_modules():
        where = f"module {name or '<model>'!r} ({type(m).__name__})"
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None):
            return f"{where} normalises with batch statistics (needs eval mode with running statistics)"
        if next(m.children(), None) is not None:
            continue  # a container: its forward's own functional calls are confirmed numerically
        if not isinstance(m, known):
            return f"{where} is not a known piecewise-linear kind (see upi_fast.piecewise.PIECEWISE_LINEAR_MODULES)"
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training:
            return f"{where} is in train mode"
    return None


def _fingerprint(model) -> tuple:
    if isinstance(model, nn.Module):
        return tuple(type(m) for m in model.modules())
    return ()


# ----------------------------------------------------------------------------------------------
# Argument helpers for functional calls
# ----------------------------------------------------------------------------------------------

def _arg(args: tuple, kwargs: dict, i: int, name: str, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _with_arg(args: tuple, kwargs: dict, i: int, name: str, value) -> tuple[tuple, dict]:
    if len(args) > i:
        args = args[:i] + (value,) + args[i + 1:]
    else:
        kwargs = {**kwargs, name: value}
    return args, kwargs


# ----------------------------------------------------------------------------------------------
# Nonlinear calls: what the primal records, how the tangent goes through
# ----------------------------------------------------------------------------------------------

class _Entry:
    """One recorded nonlinear call: its kind, input shape and the tangent map ``u -> output``."""
    __slots__ = ("kind", "shape", "tangent")

    def __init__(self, kind: str, shape: torch.Size, tangent: Callable) -> None:
        self.kind, self.shape, self.tangent = kind, shape, tangent


def _unchanged(out: torch.Tensor, version: int) -> None:
    if out._version != version:
        raise NotPiecewiseLinearError("an activation's output was modified in place later in the forward; its "
                                      "mask can no longer be read back")


def _activation_params(func, args, kwargs) -> tuple[str, bool, tuple]:
    """(kind, in_place, parameters) of a ReLU-like call."""
    if func in (torch.relu, torch.Tensor.relu):
        return "relu", False, ()
    if func in (torch.relu_, torch.Tensor.relu_):
        return "relu", True, ()
    if func is F.relu:
        return "relu", bool(_arg(args, kwargs, 1, "inplace", False)), ()
    if func is F.relu6:
        return "hardtanh", bool(_arg(args, kwargs, 1, "inplace", False)), (0.0, 6.0)
    if func in (F.hardtanh, F.hardtanh_):
        inplace = func is F.hardtanh_ or bool(_arg(args, kwargs, 3, "inplace", False))
        return "hardtanh", inplace, (float(_arg(args, kwargs, 1, "min_val", -1.0)),
                                     float(_arg(args, kwargs, 2, "max_val", 1.0)))
    # leaky ReLU
    inplace = func is F.leaky_relu_ or bool(_arg(args, kwargs, 2, "inplace", False))
    return "leaky_relu", inplace, (float(_arg(args, kwargs, 1, "negative_slope", 0.01)),)


def _record_activation(records: list, func, args, kwargs):
    kind, inplace, params = _activation_params(func, args, kwargs)
    x = args[0]
    mask = None
    if kind == "leaky_relu" and params[0] <= 0:
        mask = x.detach() > 0  # the output's sign no longer tells the branch: keep the input's
    out = func(*args, **kwargs)
    ref, version = out.detach(), out._version

    def tangent(u: torch.Tensor) -> torch.Tensor:
        if mask is not None:
            res = torch.where(mask, u, u * params[0])
        else:
            _unchanged(out, version)
            if kind == "relu":
                res = torch.ops.aten.threshold_backward(u, ref, 0)
            elif kind == "hardtanh":
                res = torch.ops.aten.hardtanh_backward(u, ref, params[0], params[1])
            else:
                res = torch.ops.aten.leaky_relu_backward(u, ref, params[0], True)
        if inplace:
            return u.copy_(res)
        return res

    records.append(_Entry(kind, x.shape, tangent))
    return out


def _channels_last(t: torch.Tensor) -> bool:
    """Stored NHWC (and not also plain contiguous, as size-1 dimensions can make a tensor both)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


# max pooling: func -> (with-indices function, spatial dims, adaptive, returns a tuple whatever its args)
_MAX_POOLS: dict = {}
for _n, _f, _fi, _t in ((1, F.max_pool1d, F.max_pool1d_with_indices, torch.max_pool1d),
                        (2, F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d),
                        (3, F.max_pool3d, F.max_pool3d_with_indices, torch.max_pool3d)):
    _MAX_POOLS[_f] = (_fi, _n, False, False)
    _MAX_POOLS[_fi] = (_fi, _n, False, True)
    _MAX_POOLS[_t] = (_fi, _n, False, False)
for _n, _f, _fi in ((1, F.adaptive_max_pool1d, F.adaptive_max_pool1d_with_indices),
                    (2, F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices),
                    (3, F.adaptive_max_pool3d, F.adaptive_max_pool3d_with_indices)):
    _MAX_POOLS[_f] = (_fi, _n, True, False)
    _MAX_POOLS[_fi] = (_fi, _n, True, True)
_MAX_POOLS[torch.max_pool1d_with_indices] = (F.max_pool1d_with_indices, 1, False, True)
_MAX_POOLS[torch.adaptive_max_pool1d] = (F.adaptive_max_pool1d_with_indices, 1, True, True)


def _record_max_pool(records: list, func, args, kwargs):
    with_indices, nd, adaptive, always_tuple = _MAX_POOLS[func]
    x = args[0]
    if adaptive:
        out, idx = with_indices(x, _arg(args, kwargs, 1, "output_size"))
        want_indices = always_tuple or bool(_arg(args, kwargs, 2, "return_indices", False))
    else:
        stride = _arg(args, kwargs, 2, "stride", None)
        if stride is not None and not isinstance(stride, int) and len(stride) == 0:
            stride = None  # torch.max_pool2d's "same as kernel_size"
        out, idx = with_indices(x, _arg(args, kwargs, 1, "kernel_size"), stride, _arg(args, kwargs, 3, "padding", 0),
                                _arg(args, kwargs, 4, "dilation", 1), bool(_arg(args, kwargs, 5, "ceil_mode", False)))
        want_indices = always_tuple or bool(_arg(args, kwargs, 6, "return_indices", False))
    in_shape = x.shape

    def tangent(u: torch.Tensor):
        if nd == 2 and u.dim() == 4 and _channels_last(u) and _channels_last(idx):
            # gather along the spatial positions of the NHWC views: no layout copies
            B, C = u.shape[:2]
            res = (u.permute(0, 2, 3, 1).reshape(B, -1, C)
                   .gather(1, idx.permute(0, 2, 3, 1).reshape(B, -1, C))
                   .view(B, idx.shape[2], idx.shape[3], C).permute(0, 3, 1, 2))
        else:
            res = u.flatten(-nd).gather(-1, idx.flatten(-nd)).view(idx.shape)
        return (res, idx) if want_indices else res

    records.append(_Entry("max_pool", in_shape, tangent))
    return (out, idx) if want_indices else out


_ACTIVATIONS = (torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu, F.relu6, F.hardtanh,
                F.hardtanh_, F.leaky_relu, F.leaky_relu_)
_RECORDERS: dict = {**{f: _record_activation for f in _ACTIVATIONS}, **{f: _record_max_pool for f in _MAX_POOLS}}
_KIND_OF: dict = {}
for _f in _ACTIVATIONS:
    _KIND_OF[_f] = None  # filled per call from the arguments
for _f in _MAX_POOLS:
    _KIND_OF[_f] = "max_pool"


def _batch_norm_stats(args, kwargs):
    training = bool(_arg(args, kwargs, 5, "training", False))
    rm, rv = _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
    if training or rm is None or rv is None:
        raise NotPiecewiseLinearError("batch_norm normalises with batch statistics (training=True or no running "
                                      "statistics): every sample's output depends on the batch")
    return rm, rv


# ----------------------------------------------------------------------------------------------
# Affine calls in the tangent pass: drop the constant part
# ----------------------------------------------------------------------------------------------

def _drop_bias(func, args, kwargs):
    args, kwargs = _with_arg(args, kwargs, 2, "bias", None)
    return func(*args, **kwargs)


def _batch_norm_tangent(func, args, kwargs):
    rm, rv = _batch_norm_stats(args, kwargs)
    return F.batch_norm(args[0], torch.zeros_like(rm), rv, _arg(args, kwargs, 3, "weight"), None, False, 0.0,
                        float(_arg(args, kwargs, 7, "eps", 1e-5)))


def _pad_tangent(func, args, kwargs):
    if _arg(args, kwargs, 2, "mode", "constant") == "constant":
        args, kwargs = _with_arg(args, kwargs, 3, "value", None)
    return func(*args, **kwargs)


_AFFINE_TANGENT: dict = {f: _drop_bias for f in (torch.conv1d, torch.conv2d, torch.conv3d, torch.conv_transpose1d,
                                                 torch.conv_transpose2d, torch.conv_transpose3d, F.linear)}
_AFFINE_TANGENT[F.batch_norm] = _batch_norm_tangent
_AFFINE_TANGENT[F.pad] = _pad_tangent


class _Recorder(TorchFunctionMode):
    """Primal pass: runs every call unchanged, recording what the nonlinear ones need."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[_Entry] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = _RECORDERS.get(func)
        if rec is not None:
            return rec(self.records, func, args, kwargs)
        if func is F.batch_norm:
            _batch_norm_stats(args, kwargs)
        return func(*args, **kwargs)


# Additive calls: a constant operand of a sum with the tangent is dropped.
def _fn_table(names_by_kind: dict) -> dict:
    table = {}
    for (kind, inplace), names in names_by_kind.items():
        for owner, name in names:
            f = getattr(owner, name, None)
            if f is not None:
                table[f] = (kind, inplace)
    return table


_T = torch.Tensor
_ADDITIVE = _fn_table({
    ("add", False): [(torch, "add"), (_T, "add"), (_T, "__add__"), (_T, "__radd__")],
    ("add", True): [(_T, "add_"), (_T, "__iadd__")],
    ("sub", False): [(torch, "sub"), (torch, "subtract"), (_T, "sub"), (_T, "subtract"), (_T, "__sub__")],
    ("sub", True): [(_T, "sub_"), (_T, "subtract_"), (_T, "__isub__")],
    ("rsub", False): [(torch, "rsub"), (_T, "__rsub__")],
})
_CONCAT = {f for f in (torch.cat, torch.concat, getattr(torch, "concatenate", None), torch.stack) if f is not None}
_FACTORIES = {torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.rand_like, torch.randn_like,
              torch.randint_like, _T.new_zeros, _T.new_ones, _T.new_full, _T.new_empty, _T.new_tensor}


def _zero_like(v):
    return torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0


class _Tangent(TorchFunctionMode):
    """Tangent pass: nonlinear calls replay the recorded linearisation, affine ones drop constants.

    Tensors derived from the tangent input are tracked (a weak identity set), so that a call on
    constants only (a buffer, a constant branch) runs unchanged, and constant terms added to the
    tangent (``x - mean``, ``x + 1``, a constant block in ``cat``, the other branch of ``where``)
    are dropped.
    """

    def __init__(self, records: list[_Entry]) -> None:
        super().__init__()
        self.records, self.pos = records, 0
        self.tangents = torch.utils.weak.WeakIdKeyDictionary()

    def mark(self, out):
        t = out[0] if isinstance(out, tuple) else out
        if isinstance(t, torch.Tensor):
            self.tangents[t] = True
        return out

    def is_tangent(self, v) -> bool:
        return isinstance(v, torch.Tensor) and v in self.tangents

    def _any_tangent(self, args, kwargs) -> bool:
        for v in (*args, *kwargs.values()):
            if isinstance(v, (list, tuple)):
                if any(self.is_tangent(e) for e in v):
                    return True
            elif self.is_tangent(v):
                return True
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _KIND_OF:
            return self._nonlinear(func, args, kwargs)
        if not self._any_tangent(args, kwargs) or func in _FACTORIES:
            return func(*args, **kwargs)
        aff = _AFFINE_TANGENT.get(func)
        if aff is not None:
            return self.mark(aff(func, args, kwargs))
        if func in _ADDITIVE:
            return self.mark(self._additive(func, args, kwargs))
        if func in _CONCAT:
            seq = [e if self.is_tangent(e) else torch.zeros_like(e) for e in _arg(args, kwargs, 0, "tensors")]
            args, kwargs = _with_arg(args, kwargs, 0, "tensors", seq)
        elif func is torch.where:  # where(condition, input, other): the constant side contributes zero
            args = (*args[:1], *(v if self.is_tangent(v) else _zero_like(v) for v in args[1:3]), *args[3:])
        return self.mark(func(*args, **kwargs))

    def _nonlinear(self, func, args, kwargs):
        kind = _KIND_OF[func] or _activation_params(func, args, kwargs)[0]
        u = args[0]
        if self.pos >= len(self.records):
            raise NotPiecewiseLinearError(f"the tangent forward made more nonlinear calls than the primal ({kind})")
        entry = self.records[self.pos]
        self.pos += 1
        if entry.kind != kind or entry.shape != u.shape:
            raise NotPiecewiseLinearError(
                f"the tangent forward diverged from the primal at nonlinear call {self.pos}: {kind} on "
                f"{tuple(u.shape)}, recorded {entry.kind} on {tuple(entry.shape)} (data-dependent control flow?)")
        if not self.is_tangent(u):
            return func(*args, **kwargs)  # a constant branch: its primal value
        return self.mark(entry.tangent(u))

    def _additive(self, func, args, kwargs):
        kind, inplace = _ADDITIVE[func]
        a, b = args[0], _arg(args, kwargs, 1, "other")
        alpha = kwargs.get("alpha", args[2] if len(args) > 2 else 1)
        ta, tb = self.is_tangent(a), self.is_tangent(b)
        if ta and tb:
            return func(*args, **kwargs)
        if inplace:
            if not ta:
                raise NotPiecewiseLinearError("the forward adds its input in place into a constant tensor")
            return a  # a += constant: the tangent is unchanged
        t, scale = (a, -alpha if kind == "rsub" else 1) if ta else (b, {"add": alpha, "sub": -alpha, "rsub": 1}[kind])
        out = t * scale if scale != 1 else t.clone()
        shape = torch.broadcast_shapes(a.shape, b.shape) if isinstance(b, torch.Tensor) else a.shape
        if out.shape != shape:
            out = out.expand(shape).contiguous()
        dtype = torch.result_type(a, b)
        return out if out.dtype == dtype else out.to(dtype)

    def finish(self) -> None:
        if self.pos != len(self.records):
            raise NotPiecewiseLinearError(f"the tangent forward made {self.pos} nonlinear calls, the primal "
                                          f"{len(self.records)}")


# ----------------------------------------------------------------------------------------------
# The linearisation
# ----------------------------------------------------------------------------------------------

def _check_logits(z, batch: int, target: torch.Tensor | None = None) -> None:
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != batch:
        raise ValueError(f"model must return logits of shape (B, K) = ({batch}, K), got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    K = z.shape[1]
    if target is not None and target.numel() and (int(target.min()) < 0 or int(target.max()) >= K):
        raise ValueError(f"target has labels outside [0, {K - 1}] for a model with {K} outputs")


class Linearization:
    """The local linear map ``x' -> J x'`` of a piecewise-linear ``model`` at the points ``x``.

    Construction runs the primal forward once (with a first-order autograd graph) and records what
    every nonlinear call needs. The model should be in eval mode.

    Args:
        model: classifier returning logits (P, K).
        x: the points (P, ...), any floating dtype the model accepts.

    Attributes:
        logits: ``model(x)``, (P, K), detached.
    """

    def __init__(self, model, x: torch.Tensor) -> None:
        self._model = model
        self._x = x.detach().requires_grad_(True)
        rec = _Recorder()
        with torch.enable_grad(), rec:
            z = model(self._x)
        _check_logits(z, x.shape[0])
        self._z, self._records = z, rec.records
        self.logits = z.detach()

    def jvp(self, u: torch.Tensor) -> torch.Tensor:
        """``J u`` (P, K) for a tangent ``u`` shaped like ``x``: the model's forward re-run on ``u``
        through the recorded linearisation (no graph, ``u`` itself is not modified)."""
        if self._records is None:
            raise RuntimeError("this Linearization was released by vjp(..., retain_graph=False)")
        if u.shape != self._x.shape:
            raise ValueError(f"u must have the points' shape {tuple(self._x.shape)}, got {tuple(u.shape)}")
        mode = _Tangent(self._records)
        with torch.no_grad(), mode:
            out = self._model(mode.mark(u.detach().clone()))
        mode.finish()
        return out

    def vjp(self, v: torch.Tensor, retain_graph: bool = True) -> torch.Tensor:
        """``J^T v`` shaped like ``x`` for ``v`` (P, K), one backward pass through the primal graph.
        With ``retain_graph=False`` the graph and the records are released afterwards."""
        if self._z is None:
            raise RuntimeError("this Linearization was released by vjp(..., retain_graph=False)")
        (g,) = torch.autograd.grad(self._z, self._x, v.to(self._z.dtype), retain_graph=retain_graph,
                                   allow_unused=True)
        if not retain_graph:
            self._z, self._records = None, None
        if g is None:
            raise ValueError("the model's output does not depend on its input x (no gradient path)")
        return g


class _ProbTarget:
    """The softmax-probability target ``p_y(z)`` per row of logits ``z`` (P, K): ``s = d p_y / dz``
    and ``v -> C v`` with ``C = d^2 p_y / dz^2`` in O(K) per row. ``1 - p_y`` is computed as
    ``-expm1(log p_y)``, free of cancellation on confident rows."""

    def __init__(self, z: torch.Tensor, target: torch.Tensor) -> None:
        zc = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        logp = F.log_softmax(zc, dim=1)
        idx = target.view(-1, 1).to(torch.int64)
        log_py = logp.gather(1, idx)
        self.p, self.py = logp.exp(), log_py.exp()
        self.q = (-self.p).scatter_(1, idx, -torch.expm1(log_py))  # e_y - p
        self.dtype = z.dtype

    def grad(self) -> torch.Tensor:
        return (self.py * self.q).to(self.dtype)

    def hvp(self, v: torch.Tensor) -> torch.Tensor:
        v = v.to(self.p.dtype)
        qv = (self.q * v).sum(1, keepdim=True)
        pv = (self.p * v).sum(1, keepdim=True)
        return (self.py * (self.q * qv - self.p * (v - pv))).to(self.dtype)


def _points(xp: torch.Tensor, target: torch.Tensor, spec,
            sg_noise) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The gradient's evaluation points (m*B, C, H, W), their labels and per-point tangent scales."""
    B = xp.shape[0]
    if spec.method == "simple":
        return xp, target, None
    if spec.method == "integrated":
        b = _baseline_like(spec.baseline, xp)
        a = path_coefficients(spec.steps, xp.dtype, xp.device)
        pts = (b.unsqueeze(0) + a.view(-1, 1, 1, 1, 1) * (xp - b).unsqueeze(0)).reshape(spec.steps * B, *xp.shape[1:])
        return pts, target.repeat(spec.steps), a
    if sg_noise is None:
        raise ValueError("smoothgrad needs its noise draws")
    n = sg_noise.shape[0]
    pts = (xp.unsqueeze(0) + sg_noise).reshape(n * B, *xp.shape[1:])
    return pts, target.repeat(n), torch.ones(n, dtype=xp.dtype, device=xp.device)


def piecewise_loss_and_direction(model, xp: torch.Tensor, target: torch.Tensor, I_ref: torch.Tensor, spec,
                                 sg_noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``"piecewise_linear"`` mode at the evaluation points ``xp`` (B, C, H, W), already perturbed.

    Returns ``(loss (B,), J_r(xp_i)^T u_i (B, C, H, W))`` per sample (not averaged), like
    :func:`upi_fast.hvp.loss_and_direction`. ``spec`` is a :class:`upi_fast.hvp.SaliencySpec` with
    ``target_kind="prob"``; ``sg_noise`` (n, B, C, H, W) the smoothgrad draws. For integrated
    gradients the M*B path points are one batch: point ``k`` gets the tangent ``a_k w`` (its
    contribution to ``J_A^T w`` is ``a_k H(pt_k) w``); for smoothgrad every draw gets ``w``.
    Exact only for piecewise-linear models (:func:`check_piecewise_linear`); the model must be in
    eval mode.
    """
    if spec.target_kind != "prob":
        raise ValueError(LOGIT_TARGET_MESSAGE)
    B = xp.shape[0]
    pts, tgt, scales = _points(xp, target, spec, sg_noise)
    m = pts.shape[0] // B
    lin = Linearization(model, pts)
    _check_logits(lin.logits, pts.shape[0], tgt)
    prob = _ProbTarget(lin.logits, tgt)
    g = lin.vjp(prob.grad(), retain_graph=True)
    A0 = g if m == 1 else g.view(m, *xp.shape).mean(0)
    loss, u, w = spec.loss_u_w(A0, xp, I_ref)
    if m > 1:
        w = (scales.view(-1, 1, 1, 1, 1) * w.unsqueeze(0)).reshape(m * B, *xp.shape[1:])
    Hw = lin.vjp(prob.hvp(lin.jvp(w)), retain_graph=False)
    if m > 1:
        Hw = Hw.view(m, *xp.shape).mean(0)
    if spec.multiply_by_input:
        Hw = Hw + A0 * u
    return loss, Hw


# ----------------------------------------------------------------------------------------------
# Applicability: structural check, numerical confirmation, cache, mode resolution
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
    """Compare ``J^T diag(c) J u`` through the linearisation with double backward (module docstring)."""
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
    if not ref_norm > 0 or not torch.isfinite(ref).all():
        return False, ("cannot confirm: the double-backward Hessian-vector product at the check samples is zero "
                       "or not finite")
    rel = float((ours - ref).norm()) / ref_norm
    if not rel < rtol:
        return False, (f"the linearised Hessian-vector product differs from double backward (relative error "
                       f"{rel:.2e} >= {rtol:.0e}): the forward applies a smooth function (e.g. torch.tanh) or "
                       f"another nonlinearity outside the recognised modules and functional ops")
    return True, f"linearisation confirmed against double backward (relative error {rel:.1e})"


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_LOGGED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _model_entry(table: "weakref.WeakKeyDictionary", model) -> dict:
    try:
        return table.setdefault(model, {})
    except TypeError:  # not weak-referenceable: no caching
        return {}


def _status(model, x: torch.Tensor, *, recheck: bool = False, n_check: int = 2, rtol: float = 1e-4
            ) -> tuple[bool, str]:
    """(applies, reason), cached per model object, dtype, device type and module structure."""
    entry = _model_entry(_CACHE, model)
    key = (x.dtype, x.device.type, _fingerprint(model))
    if recheck or key not in entry:
        reason = _structural_reason(model)
        entry[key] = (False, reason) if reason is not None else _confirm(model, x, n_check, rtol)
    return entry[key]


def _log_once(model, x: torch.Tensor, message: str) -> None:
    seen = _model_entry(_LOGGED, model)
    key = (x.dtype, x.device.type, _fingerprint(model), message)
    if key not in seen:
        seen[key] = True
        logger.info(message)


def check_piecewise_linear(model, x: torch.Tensor, target: torch.Tensor | None = None, spec=None, *,
                           raise_error: bool = True, recheck: bool = True, n_check: int = 2,
                           rtol: float = 1e-4) -> bool:
    """Whether ``hvp="piecewise_linear"`` is exact for ``model`` (see the module docstring).

    Meant to be called once per fit by solvers; the result is cached for :func:`resolve_hvp`.

    Args:
        model: classifier returning logits (B, K); checked in eval mode (restored afterwards).
        x: sample inputs (B, C, H, W) in model units; the first ``n_check`` are used.
        target: optional labels (B,), checked against the number of logits.
        spec: optional :class:`upi_fast.hvp.SaliencySpec`; a logit target is refused
            (:data:`LOGIT_TARGET_MESSAGE`).
        raise_error: raise ``ValueError`` with the reason instead of returning False.
        recheck: ignore the cache and confirm again (the new verdict is cached).
        n_check: samples used by the numerical confirmation.
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
    in eval mode; ``x`` (B, C, H, W) are evaluation points (the first two confirm the model).
    """
    if hvp not in ("auto", "piecewise_linear"):
        return hvp
    logit = spec.target_kind != "prob"
    if hvp == "piecewise_linear":
        if logit:
            raise ValueError(LOGIT_TARGET_MESSAGE)
        ok, reason = _status(model, x)
        if not ok:
            raise ValueError(f"hvp='piecewise_linear' does not apply to this model: {reason}. "
                             "Use hvp='double_backward' (exact for any model) or hvp='auto'.")
        return hvp
    ok, reason = _status(model, x)
    if ok and logit:
        choice = "finite_difference"
        msg = ("hvp='auto': piecewise-linear model with target_kind='logit', whose exact Hessian is zero almost "
               "everywhere; using hvp='finite_difference' (or attack a softplus_surrogate with an exact mode)")
    elif ok:
        choice, msg = "piecewise_linear", f"hvp='auto': using hvp='piecewise_linear' ({reason})"
    else:
        choice, msg = "double_backward", f"hvp='auto': falling back to hvp='double_backward': {reason}"
    _log_once(model, x, msg)
    return choice
