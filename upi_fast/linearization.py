"""The local linear map of a piecewise-linear forward, recorded op by op, or a refusal saying why.

:class:`Linearization` runs a model's forward on ``x`` once (the primal pass, with a first-order
autograd graph) under a ``TorchFunctionMode`` that sees every torch call made by modules and by
hand-written ``forward`` code alike. Tensors that depend on ``x`` are *tracked*; a call that touches a
tracked tensor must be on one of the explicit lists below, and anything else raises
:class:`NotPiecewiseLinearError` naming the call. :meth:`Linearization.jvp` re-runs the same forward on
a tangent ``u`` (the tangent pass) under a second mode that replays, call by call, what the primal
recorded; :meth:`Linearization.vjp` is a backward pass through the primal graph.

The lists (the proof that the tangent pass computes ``J u`` for the ``J`` that autograd uses):

* **metadata** (:data:`_META`): shape, dtype, device queries; no values read.
* **linear** (:data:`_LINEAR`): views, reshapes, indexing with constant indices, reductions by sum and
  mean, average and adaptive average pooling, interpolation, pixel shuffles, ``unfold`` / ``fold``,
  dtype casts, dropout in eval mode: linear in the tracked input, every other tensor argument constant.
* **multilinear** (:data:`_MULTILINEAR`): ``mul``, ``matmul``, ``einsum``, ... with at most one tracked
  operand; ``div`` with a tracked numerator only.
* **affine** (:data:`_AFFINE`): convolutions and ``linear`` (bias dropped), ``batch_norm`` with running
  statistics (shift dropped), ``pad`` (pad value dropped), ``add`` / ``sub`` (constant terms dropped),
  ``cat`` / ``stack`` (constant blocks zeroed), ``where`` and ``masked_fill`` (the constant side
  zeroed), ``addmm`` and friends (the constant addend dropped), item assignment.
* **piecewise linear** (:data:`_PIECEWISE`), whose linearisation the primal records: ReLU, ReLU6,
  Hardtanh, LeakyReLU, PReLU, threshold, ``clamp`` and its variants, ``abs``, ``maximum`` / ``minimum``
  / ``fmax`` / ``fmin``, ``max`` / ``min`` / ``amax`` / ``amin`` reductions, max pooling, ``sort`` and
  ``topk`` values. Each replays autograd's own derivative convention (ties split as autograd splits
  them), so the tangent pass and the backward pass use the same ``J``.
* **piecewise constant** (:data:`_CONSTANT`): comparisons, ``sign``, ``floor`` / ``round``,
  ``argmax``, integer casts, ...: zero derivative, so the tangent pass replays the primal's output as a
  constant (``x > 0`` computed on a tangent would be meaningless).

Refused whatever the arguments: random draws (the two passes would see different numbers), reading a
tracked value into Python (``item``, ``bool``), ``detach`` of a tracked tensor, writing a tracked
tensor into a constant in place. Calls on constants only (parameters, buffers, constant branches)
run unchanged and are not checked.

Second guard, on what autograd recorded: every node of the primal graph on a path from ``x`` to the
logits must be the backward of an op above (:data:`_GRAPH_NODES`), so that a call the function mode
cannot see (a custom ``autograd.Function``, whose backward autograd will use) is refused too; custom
Functions known to be linear can be declared with :func:`register_linear_function`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
import torch.utils.weak
from torch.overrides import TorchFunctionMode

__all__ = ["Linearization", "NotPiecewiseLinearError", "register_linear_function", "LINEAR_FUNCTIONS"]


class NotPiecewiseLinearError(ValueError):
    """The model (or one call in its forward) cannot be linearised by :class:`Linearization`."""


_T = torch.Tensor


def _fns(*specs: str) -> list:
    """Callables named ``"owner.attr"`` (``T`` = torch.Tensor, ``F`` = torch.nn.functional), skipping any
    this torch version lacks. Property getters are named ``"T.shape.__get__"``."""
    owners = {"T": _T, "torch": torch, "F": F}
    out = []
    for spec in specs:
        head, *rest = spec.split(".")
        obj: Any = owners[head]
        for part in rest:
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            out.append(obj)
    return out


def _name(func) -> str:
    """A readable name for a torch callable (``torch.tanh``, ``Tensor.clamp``, ``torch.nn.functional.gelu``)."""
    mod = getattr(func, "__module__", None) or ""
    name = getattr(func, "__name__", None) or repr(func)
    qual = getattr(func, "__qualname__", None) or name
    if mod in ("torch._C._nn", "torch.nn.functional"):
        return f"torch.nn.functional.{name}"
    owner = qual.rsplit(".", 1)[0] if "." in qual else ""
    if owner in ("TensorBase", "Tensor", "_TensorBase"):
        return f"Tensor.{name}"
    if owner == "_VariableFunctionsClass" or mod in ("torch", "torch.functional") or (not mod and not owner):
        return f"torch.{name}"
    if "getset_descriptor" in repr(func) or name == "__get__":
        return f"Tensor attribute ({func!r})"
    return f"{mod}.{qual}" if mod else qual


# ----------------------------------------------------------------------------------------------
# The lists
# ----------------------------------------------------------------------------------------------

_META = set(_fns(
    "T.shape.__get__", "T.dtype.__get__", "T.device.__get__", "T.ndim.__get__", "T.layout.__get__",
    "T.requires_grad.__get__", "T.is_cuda.__get__", "T.is_sparse.__get__", "T.is_quantized.__get__",
    "T.is_meta.__get__", "T.is_mkldnn.__get__", "T.is_leaf.__get__", "T.grad_fn.__get__", "T.names.__get__",
    "T.size", "T.dim", "T.ndimension", "T.numel", "T.nelement", "T.__len__", "T.is_contiguous", "T.stride",
    "T.element_size", "T.is_floating_point", "T.is_complex", "T.get_device", "T.storage_offset",
    "T.requires_grad_", "T.dim_order", "T.__hash__", "torch.is_tensor", "torch.numel", "torch.is_floating_point",
    "torch.is_complex", "T.__format__", "T.__repr__"))
"""Calls that read only metadata (shape, dtype, device, layout)."""

_FACTORIES = set(_fns(
    "torch.zeros_like", "torch.ones_like", "torch.full_like", "torch.empty_like", "T.new_zeros", "T.new_ones",
    "T.new_full", "T.new_empty", "T.new_tensor"))
"""Constant tensors shaped like a tracked one: constants, whatever the argument."""

_RANDOM = set(_fns(
    "torch.rand", "torch.randn", "torch.randint", "torch.randperm", "torch.rand_like", "torch.randn_like",
    "torch.randint_like", "torch.bernoulli", "torch.multinomial", "torch.normal", "torch.poisson",
    "T.uniform_", "T.normal_", "T.bernoulli_", "T.bernoulli", "T.random_", "T.exponential_", "T.cauchy_",
    "T.log_normal_", "T.geometric_", "T.multinomial", "F.rrelu", "F.rrelu_", "torch.rrelu", "torch.rrelu_"))
"""Random draws: refused (the primal and the tangent pass would draw different numbers)."""

_READS = set(_fns(
    "T.item", "T.tolist", "T.__bool__", "T.__float__", "T.__int__", "T.__index__", "T.__complex__", "T.numpy",
    "T.__array__", "T.detach", "T.detach_", "T.data.__get__", "torch.detach"))
"""Calls that take a tracked value out of autograd's sight: refused on tracked tensors."""

# Linear in the tracked first argument; every other tensor argument must be constant
_LINEAR = set(_fns(
    "T.view", "T.view_as", "T.reshape", "T.reshape_as", "T.flatten", "T.unflatten", "T.permute", "T.transpose",
    "T.swapaxes", "T.swapdims", "T.t", "T.T.__get__", "T.mT.__get__", "T.contiguous", "T.clone", "T.squeeze",
    "T.unsqueeze", "T.expand", "T.expand_as", "T.repeat", "T.repeat_interleave", "T.tile", "T.flip", "T.fliplr",
    "T.flipud", "T.roll", "T.rot90", "T.narrow", "T.select", "T.__getitem__", "T.index_select", "T.gather",
    "T.take_along_dim", "T.masked_select", "T.chunk", "T.split", "T.tensor_split", "T.unbind", "T.movedim",
    "T.moveaxis", "T.diagonal", "T.tril", "T.triu", "T.neg", "T.negative", "T.__neg__", "T.__pos__",
    "T.positive", "T.sum", "T.mean", "T.cumsum", "T.trace", "T.to", "T.type", "T.type_as", "T.float",
    "T.double", "T.half", "T.bfloat16", "T.cpu", "T.cuda", "T.bool", "T.long", "T.int", "T.short", "T.byte",
    "T.char", "T.unfold",
    "torch.flatten", "torch.unflatten", "torch.reshape", "torch.permute", "torch.transpose", "torch.swapaxes",
    "torch.t", "torch.squeeze", "torch.unsqueeze", "torch.split", "torch.chunk", "torch.tensor_split",
    "torch.unbind", "torch.movedim", "torch.moveaxis", "torch.narrow", "torch.select", "torch.index_select",
    "torch.gather", "torch.take_along_dim", "torch.masked_select", "torch.sum", "torch.mean", "torch.cumsum",
    "torch.flip", "torch.fliplr", "torch.flipud", "torch.roll", "torch.rot90", "torch.tile", "torch.diagonal",
    "torch.tril", "torch.triu", "torch.neg", "torch.negative", "torch.positive", "torch.trace", "torch.clone",
    "torch.repeat_interleave", "torch.broadcast_to", "T.broadcast_to", "torch.atleast_2d",
    "F.avg_pool1d", "F.avg_pool2d", "F.avg_pool3d", "torch.avg_pool1d", "F.adaptive_avg_pool1d",
    "F.adaptive_avg_pool2d", "F.adaptive_avg_pool3d", "torch.adaptive_avg_pool1d", "F.lp_pool1d",
    "F.interpolate", "F.upsample", "F.upsample_nearest", "F.upsample_bilinear", "F.pixel_shuffle",
    "F.pixel_unshuffle", "torch.pixel_shuffle", "torch.pixel_unshuffle", "F.channel_shuffle",
    "torch.channel_shuffle", "torch.native_channel_shuffle", "F.unfold", "F.fold", "F.grid_sample",
    "F.affine_grid"))
_LINEAR.discard(None)
_LINEAR.discard(_fns("F.lp_pool1d")[0] if _fns("F.lp_pool1d") else None)  # p-norm pooling is not linear
_META_ARGS = set(_fns("T.view_as", "T.reshape_as", "T.expand_as", "T.type_as", "T.to"))
"""Linear calls whose other tensor argument is read only for its shape / dtype."""

_DROPOUT = set(_fns("F.dropout", "F.dropout1d", "F.dropout2d", "F.dropout3d", "F.alpha_dropout",
                    "F.feature_alpha_dropout", "torch.dropout", "torch.dropout_", "torch.alpha_dropout",
                    "torch.feature_dropout", "torch.feature_alpha_dropout"))

# Linear in each tensor operand (at most one tracked)
_MULTILINEAR = set(_fns(
    "torch.mul", "torch.multiply", "T.mul", "T.multiply", "T.__mul__", "T.__rmul__", "T.mul_", "T.__imul__",
    "torch.matmul", "T.matmul", "T.__matmul__", "T.__rmatmul__", "torch.mm", "T.mm", "torch.bmm", "T.bmm",
    "torch.mv", "T.mv", "torch.dot", "T.dot", "torch.einsum", "torch.tensordot", "torch.outer", "T.outer",
    "torch.inner", "torch.kron"))
_NUMERATOR = set(_fns("torch.div", "torch.divide", "torch.true_divide", "T.div", "T.divide", "T.true_divide",
                      "T.__truediv__", "T.div_", "T.__itruediv__"))
"""Division: linear in a tracked numerator over a constant denominator (no rounding mode)."""

_CONSTANT = set(_fns(
    "torch.gt", "torch.lt", "torch.ge", "torch.le", "torch.eq", "torch.ne", "torch.greater", "torch.less",
    "torch.greater_equal", "torch.less_equal", "torch.not_equal", "T.gt", "T.lt", "T.ge", "T.le", "T.eq",
    "T.ne", "T.greater", "T.less", "T.greater_equal", "T.less_equal", "T.not_equal", "T.__gt__", "T.__lt__",
    "T.__ge__", "T.__le__", "T.__eq__", "T.__ne__", "torch.isnan", "torch.isinf", "torch.isfinite",
    "torch.isposinf", "torch.isneginf", "torch.signbit", "T.isnan", "T.isinf", "T.isfinite", "T.signbit",
    "torch.sign", "torch.sgn", "T.sign", "T.sgn", "torch.floor", "torch.ceil", "torch.round", "torch.trunc",
    "torch.fix", "T.floor", "T.ceil", "T.round", "T.trunc", "T.fix", "torch.argmax", "torch.argmin",
    "torch.argsort", "T.argmax", "T.argmin", "T.argsort", "torch.nonzero", "T.nonzero", "torch.count_nonzero",
    "T.count_nonzero", "torch.heaviside", "torch.floor_divide", "T.floor_divide", "T.__floordiv__",
    "torch.bucketize", "torch.searchsorted", "torch.isclose", "T.isclose", "torch.equal", "T.equal",
    "torch.logical_not", "T.logical_not", "T.any", "T.all", "torch.any", "torch.all"))
"""Piecewise-constant outputs: zero derivative, replayed from the primal in the tangent pass."""

LINEAR_FUNCTIONS: set = set()
"""Custom ``torch.autograd.Function`` classes declared linear in their tensor inputs (their forward's
calls are still checked one by one): see :func:`register_linear_function`."""


def register_linear_function(cls: type) -> type:
    """Declare a custom ``torch.autograd.Function`` whose backward is the exact transpose of a forward
    that is linear in its tensor inputs (a relayout, a scaling), so that the primal graph's check
    accepts its node. Usable as a class decorator. Its forward's own calls are still checked."""
    if not (isinstance(cls, type) and issubclass(cls, torch.autograd.Function)):
        raise TypeError(f"cls must be a torch.autograd.Function subclass, got {cls!r}")
    LINEAR_FUNCTIONS.add(cls)
    return cls


# ----------------------------------------------------------------------------------------------
# Argument helpers
# ----------------------------------------------------------------------------------------------

def _arg(args: tuple, kwargs: dict, i: int, name: str, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _with_arg(args: tuple, kwargs: dict, i: int, name: str, value) -> tuple[tuple, dict]:
    if len(args) > i:
        return args[:i] + (value,) + args[i + 1:], kwargs
    return args, {**kwargs, name: value}


def _tensors(v):
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, (list, tuple)):
        for e in v:
            yield from _tensors(e)


def _bcast(t: torch.Tensor, shape) -> torch.Tensor:
    return t if t.shape == shape else t.expand(shape).contiguous()


def _channels_last(t: torch.Tensor) -> bool:
    """Stored NHWC (and not also plain contiguous, as size-1 dimensions can make a tensor both)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


# ----------------------------------------------------------------------------------------------
# Piecewise-linear calls: (kind, record(primal) -> (out, data), tangent(data, ...) -> out)
# ----------------------------------------------------------------------------------------------

class _Entry:
    """One recorded call: its kind, the shapes of its tensor arguments, and what the tangent needs."""
    __slots__ = ("kind", "shapes", "data")

    def __init__(self, kind: str, shapes: tuple, data) -> None:
        self.kind, self.shapes, self.data = kind, shapes, data


def _inplace_name(func) -> bool:
    n = getattr(func, "__name__", "")
    return (n.endswith("_") and not n.endswith("__")) or n in ("__iadd__", "__isub__", "__imul__", "__itruediv__")


def _act_params(func, args, kwargs) -> tuple[str, tuple]:
    """(kind, parameters) of a ReLU-like call."""
    if func in _RELU:
        return "relu", ()
    if func is F.relu6:
        return "hardtanh", (0.0, 6.0)
    if func in _HARDTANH:
        return "hardtanh", (float(_arg(args, kwargs, 1, "min_val", -1.0)), float(_arg(args, kwargs, 2, "max_val", 1.0)))
    return "leaky_relu", (float(_arg(args, kwargs, 1, "negative_slope", 0.01)),)


def _act_inplace(func, args, kwargs) -> bool:
    if _inplace_name(func):
        return True
    if func is F.relu or func is F.relu6:
        return bool(_arg(args, kwargs, 1, "inplace", False))
    if func is F.hardtanh:
        return bool(_arg(args, kwargs, 3, "inplace", False))
    if func is F.leaky_relu:
        return bool(_arg(args, kwargs, 2, "inplace", False))
    return False


_RELU = set(_fns("torch.relu", "torch.relu_", "T.relu", "T.relu_", "F.relu", "F.relu_"))
_HARDTANH = set(_fns("F.hardtanh", "F.hardtanh_"))
_LEAKY = set(_fns("F.leaky_relu", "F.leaky_relu_"))


def _mask_tangent(u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask, u, torch.zeros((), dtype=u.dtype, device=u.device))


def _rec_activation(func, args, kwargs):
    kind, params = _act_params(func, args, kwargs)
    x = args[0]
    if kind == "leaky_relu" and params[0] <= 0:
        mask = x.detach() > 0  # the output's sign no longer tells the branch: keep the input's
        return func(*args, **kwargs), ("leaky", mask, params[0])
    out = func(*args, **kwargs)
    # autograd's own backward kernels, fed with the retained output (no extra mask in memory)
    return out, ("act", kind, params, out.detach(), out._version)


def _rec_threshold(func, args, kwargs):
    th = float(_arg(args, kwargs, 1, "threshold"))
    mask = args[0].detach() > th  # threshold_backward: grad where x > threshold
    return func(*args, **kwargs), ("mask", mask)


def _rec_clamp(func, args, kwargs):
    n = getattr(func, "__name__", "")
    x = args[0].detach()
    if n.startswith("clamp_min"):
        lo, hi = _arg(args, kwargs, 1, "min"), None
    elif n.startswith("clamp_max"):
        lo, hi = None, _arg(args, kwargs, 1, "max")
    else:
        lo, hi = _arg(args, kwargs, 1, "min"), _arg(args, kwargs, 2, "max")
    mask = torch.ones_like(x, dtype=torch.bool)
    if lo is not None:  # clamp_backward: grad where min <= x <= max
        mask = mask & (x >= (lo.detach() if isinstance(lo, torch.Tensor) else lo))
    if hi is not None:
        mask = mask & (x <= (hi.detach() if isinstance(hi, torch.Tensor) else hi))
    return func(*args, **kwargs), ("mask", mask)


def _rec_prelu(func, args, kwargs):
    x, w = args[0], _arg(args, kwargs, 1, "weight")
    mask = x.detach() > 0  # prelu backward: grad where x > 0, weight * grad elsewhere
    wb = w.detach()
    if wb.numel() > 1 and x.dim() > 1:
        wb = wb.view(1, -1, *([1] * (x.dim() - 2)))
    return func(*args, **kwargs), ("leaky", mask, wb)


def _rec_abs(func, args, kwargs):
    return func(*args, **kwargs), ("scale", torch.sgn(args[0].detach()))  # abs backward: grad * sgn(x)


def _binary_select(a, b, want_max: bool):
    ad = a.detach() if isinstance(a, torch.Tensor) else a
    bd = b.detach() if isinstance(b, torch.Tensor) else b
    win = (ad > bd) if want_max else (ad < bd)
    return win, (ad == bd)


def _rec_binary(func, args, kwargs):
    n = getattr(func, "__name__", "")
    a, b = args[0], _arg(args, kwargs, 1, "other")
    win, tie = _binary_select(a, b, n in ("maximum", "fmax", "max"))
    return func(*args, **kwargs), ("binary", win, tie)


def _rec_maxmin(func, args, kwargs):
    """max / min: binary (tensor other), with dim (values, indices), or a full reduction."""
    second = _arg(args, kwargs, 1, "other") if len(args) > 1 or "other" in kwargs else _arg(args, kwargs, 1, "dim")
    if isinstance(second, torch.Tensor):
        out, data = _rec_binary(func, args, kwargs)
        return out, data
    out = func(*args, **kwargs)
    if second is None:  # full reduction: autograd distributes evenly among ties
        mask = args[0].detach() == out.detach()
        return out, ("even", mask, None, False)
    keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
    return out, ("index", out.indices, int(second), keepdim, type(out))


def _rec_amax(func, args, kwargs):
    x = args[0].detach()
    dim = _arg(args, kwargs, 1, "dim", ())
    keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
    out = func(*args, **kwargs)
    dims = tuple(range(x.dim())) if dim in ((), None, []) else ((dim,) if isinstance(dim, int) else tuple(dim))
    dims = tuple(d % x.dim() for d in dims) if x.dim() else ()
    o = out.detach()
    if not keepdim:
        for d in sorted(dims):
            o = o.unsqueeze(d)
    return out, ("even", x == o, dims, keepdim)


def _rec_sort(func, args, kwargs):
    out = func(*args, **kwargs)
    n = getattr(func, "__name__", "")
    dim = _arg(args, kwargs, 2 if n == "topk" else 1, "dim", -1)
    if isinstance(dim, bool):  # torch.sort(x, stable=...) positional forms
        dim = -1
    return out, ("index", out.indices, int(dim), True, type(out))


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


def _rec_max_pool(func, args, kwargs):
    with_indices, nd, adaptive, always_tuple = _MAX_POOLS[func]
    x = args[0]
    if adaptive:
        out, idx = with_indices(x, _arg(args, kwargs, 1, "output_size"))
        want = always_tuple or bool(_arg(args, kwargs, 2, "return_indices", False))
    else:
        stride = _arg(args, kwargs, 2, "stride", None)
        if stride is not None and not isinstance(stride, int) and len(stride) == 0:
            stride = None  # torch.max_pool2d's "same as kernel_size"
        out, idx = with_indices(x, _arg(args, kwargs, 1, "kernel_size"), stride, _arg(args, kwargs, 3, "padding", 0),
                                _arg(args, kwargs, 4, "dilation", 1), bool(_arg(args, kwargs, 5, "ceil_mode", False)))
        want = always_tuple or bool(_arg(args, kwargs, 6, "return_indices", False))
    return ((out, idx) if want else out), ("pool", idx, nd, want)


def _apply(data, tangents: list, out_shape=None):
    """The recorded linearisation applied to the tangents of the call's tracked arguments (None for a
    constant argument)."""
    kind = data[0]
    u = tangents[0]
    if kind == "act":
        _, act, params, ref, version = data
        if ref._version != version:
            raise NotPiecewiseLinearError("an activation's output was modified in place later in the forward; its "
                                          "mask can no longer be read back")
        if act == "relu":
            return torch.ops.aten.threshold_backward(u, ref, 0)
        if act == "hardtanh":
            return torch.ops.aten.hardtanh_backward(u, ref, params[0], params[1])
        return torch.ops.aten.leaky_relu_backward(u, ref, params[0], True)
    if kind == "mask":
        return _mask_tangent(u, data[1])
    if kind == "leaky":
        return torch.where(data[1], u, u * data[2])
    if kind == "scale":
        return u * data[1]
    if kind == "binary":
        _, win, tie = data
        ua, ub = tangents
        shape = torch.broadcast_shapes(win.shape, *(t.shape for t in tangents if t is not None))
        ua = torch.zeros(shape, dtype=(ub if ua is None else ua).dtype, device=win.device) if ua is None else ua
        ub = torch.zeros_like(ua) if ub is None else ub
        ua, ub = _bcast(ua, shape), _bcast(ub, shape)
        # autograd (maximum / minimum): the winner's gradient; ties split in half
        return torch.where(tie, (ua + ub) / 2, torch.where(win, ua, ub))
    if kind == "even":
        _, mask, dims, keepdim = data
        m = mask.to(u.dtype)
        if dims is None:
            return (u * m).sum() / m.sum()
        return (u * m).sum(dims, keepdim=keepdim) / m.sum(dims, keepdim=keepdim)
    if kind == "index":
        _, idx, dim, keepdim, cls = data
        gi = idx if keepdim else idx.unsqueeze(dim)
        vals = u.gather(dim, gi)
        if not keepdim:
            vals = vals.squeeze(dim)
        return cls((vals, idx))
    if kind == "pool":
        _, idx, nd, want = data
        if nd == 2 and u.dim() == 4 and _channels_last(u) and _channels_last(idx):
            B, C = u.shape[:2]  # gather along the spatial positions of the NHWC views: no layout copies
            res = (u.permute(0, 2, 3, 1).reshape(B, -1, C).gather(1, idx.permute(0, 2, 3, 1).reshape(B, -1, C))
                   .view(B, idx.shape[2], idx.shape[3], C).permute(0, 3, 1, 2))
        else:
            res = u.flatten(-nd).gather(-1, idx.flatten(-nd)).view(idx.shape)
        return (res, idx) if want else res
    raise AssertionError(kind)  # pragma: no cover


_PIECEWISE: dict = {}
for _f in (*_RELU, *_HARDTANH, *_LEAKY, F.relu6):
    _PIECEWISE[_f] = ("activation", _rec_activation)
for _f in _fns("F.threshold", "F.threshold_", "torch.threshold", "torch.threshold_"):
    _PIECEWISE[_f] = ("threshold", _rec_threshold)
for _f in _fns("torch.clamp", "torch.clip", "torch.clamp_min", "torch.clamp_max", "torch.clamp_", "torch.clip_",
               "torch.clamp_min_", "torch.clamp_max_", "T.clamp", "T.clip", "T.clamp_", "T.clip_", "T.clamp_min",
               "T.clamp_max", "T.clamp_min_", "T.clamp_max_"):
    _PIECEWISE[_f] = ("clamp", _rec_clamp)
for _f in _fns("F.prelu", "torch.prelu"):
    _PIECEWISE[_f] = ("prelu", _rec_prelu)
for _f in _fns("torch.abs", "torch.absolute", "T.abs", "T.absolute", "T.__abs__", "T.abs_", "torch.abs_"):
    _PIECEWISE[_f] = ("abs", _rec_abs)
for _f in _fns("torch.maximum", "torch.minimum", "torch.fmax", "torch.fmin", "T.maximum", "T.minimum", "T.fmax",
               "T.fmin"):
    _PIECEWISE[_f] = ("binary", _rec_binary)
for _f in _fns("torch.max", "torch.min", "T.max", "T.min"):
    _PIECEWISE[_f] = ("maxmin", _rec_maxmin)
for _f in _fns("torch.amax", "torch.amin", "T.amax", "T.amin"):
    _PIECEWISE[_f] = ("amax", _rec_amax)
for _f in _fns("torch.sort", "T.sort", "torch.topk", "T.topk"):
    _PIECEWISE[_f] = ("sort", _rec_sort)
for _f in _MAX_POOLS:
    _PIECEWISE[_f] = ("max_pool", _rec_max_pool)
_PIECEWISE_INPLACE = {f for f in _PIECEWISE if _inplace_name(f)}


# ----------------------------------------------------------------------------------------------
# Affine calls: the tangent drops the constant part
# ----------------------------------------------------------------------------------------------

def _aff_bias(mode, func, args, kwargs):  # conv*, linear: weight constant, bias dropped
    args, kwargs = _with_arg(args, kwargs, 2, "bias", None)
    return func(*args, **kwargs)


def _batch_norm_stats(args, kwargs):
    training = bool(_arg(args, kwargs, 5, "training", False))
    rm, rv = _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
    if training or rm is None or rv is None:
        raise NotPiecewiseLinearError("batch_norm normalises with batch statistics (training=True or no running "
                                      "statistics): every sample's output depends on the batch")
    return rm, rv


def _aff_batch_norm(mode, func, args, kwargs):
    rm, rv = _batch_norm_stats(args, kwargs)
    return F.batch_norm(args[0], torch.zeros_like(rm), rv, _arg(args, kwargs, 3, "weight"), None, False, 0.0,
                        float(_arg(args, kwargs, 7, "eps", 1e-5)))


def _aff_pad(mode, func, args, kwargs):
    if _arg(args, kwargs, 2, "mode", "constant") == "constant":
        args, kwargs = _with_arg(args, kwargs, 3, "value", None)
    return func(*args, **kwargs)


def _aff_cat(mode, func, args, kwargs):
    seq = [e if mode.is_tracked(e) else torch.zeros_like(e) for e in _arg(args, kwargs, 0, "tensors")]
    args, kwargs = _with_arg(args, kwargs, 0, "tensors", seq)
    return func(*args, **kwargs)


def _aff_where(mode, func, args, kwargs):  # where(condition, input, other): the constant side contributes zero
    cond, a, b = args[0], _arg(args, kwargs, 1, "input"), _arg(args, kwargs, 2, "other")
    ref = a if mode.is_tracked(a) else b
    a = a if mode.is_tracked(a) else torch.zeros((), dtype=ref.dtype, device=ref.device)
    b = b if mode.is_tracked(b) else torch.zeros((), dtype=ref.dtype, device=ref.device)
    return torch.where(cond, a, b)


def _aff_masked_fill(mode, func, args, kwargs):
    args, kwargs = _with_arg(args, kwargs, 2, "value", 0.0)
    return func(*args, **kwargs)


def _aff_addmm(mode, func, args, kwargs):  # beta * input + alpha * (m1 @ m2): input constant, dropped
    args, kwargs = _with_arg(args, kwargs, 0, "input", torch.zeros_like(args[0]))
    return func(*args, **kwargs)


def _aff_setitem(mode, func, args, kwargs):
    target, index, value = args
    if mode.is_tracked(value):
        return func(target, index, value)
    return func(target, index, 0)  # a constant written into the tangent: its derivative is zero


def _aff_copy(mode, func, args, kwargs):
    if mode.is_tracked(args[1]):
        return func(*args, **kwargs)
    return args[0].zero_()


def _additive(mode, func, args, kwargs):
    kind = _ADD_KIND[func]
    a, b = args[0], _arg(args, kwargs, 1, "other")
    alpha = _arg(args, kwargs, 2, "alpha", 1)
    ta, tb = mode.is_tracked(a), mode.is_tracked(b)
    if ta and tb:
        return func(*args, **kwargs)
    if _inplace_name(func):
        return a  # tracked += constant: the tangent is unchanged
    if ta:
        t, scale = a, (-alpha if kind == "rsub" else 1)
    else:
        t, scale = b, {"add": alpha, "sub": -alpha, "rsub": 1}[kind]
    out = t * scale if scale != 1 else t.clone()
    shape = torch.broadcast_shapes(a.shape, b.shape) if isinstance(b, torch.Tensor) else a.shape
    out = _bcast(out, shape)
    dtype = torch.result_type(a, b)
    return out if out.dtype == dtype else out.to(dtype)


_ADD_KIND: dict = {}
for _kind, _names in {"add": ("torch.add", "T.add", "T.__add__", "T.__radd__", "T.add_", "T.__iadd__"),
                      "sub": ("torch.sub", "torch.subtract", "T.sub", "T.subtract", "T.__sub__", "T.sub_",
                              "T.subtract_", "T.__isub__"),
                      "rsub": ("torch.rsub", "T.__rsub__")}.items():
    for _f in _fns(*_names):
        _ADD_KIND[_f] = _kind

_AFFINE: dict = {f: _aff_bias for f in _fns("torch.conv1d", "torch.conv2d", "torch.conv3d", "torch.conv_transpose1d",
                                            "torch.conv_transpose2d", "torch.conv_transpose3d", "F.linear")}
_AFFINE[F.batch_norm] = _aff_batch_norm
_AFFINE[F.pad] = _aff_pad
for _f in _fns("torch.cat", "torch.concat", "torch.concatenate", "torch.stack", "torch.hstack", "torch.vstack"):
    _AFFINE[_f] = _aff_cat
for _f in _fns("torch.where", "T.where"):
    _AFFINE[_f] = _aff_where
for _f in _fns("T.masked_fill", "T.masked_fill_", "torch.masked_fill"):
    _AFFINE[_f] = _aff_masked_fill
for _f in _fns("torch.addmm", "T.addmm", "torch.addmv", "T.addmv", "torch.baddbmm", "T.baddbmm", "torch.addbmm"):
    _AFFINE[_f] = _aff_addmm
_AFFINE[_T.__setitem__] = _aff_setitem
_AFFINE[_T.copy_] = _aff_copy
for _f in _ADD_KIND:
    _AFFINE[_f] = _additive

# which arguments of an affine call may be tracked (None: any)
_AFFINE_TRACKABLE: dict = {f: (0,) for f in _AFFINE}
for _f in _ADD_KIND:
    _AFFINE_TRACKABLE[_f] = None
for _f in _fns("torch.cat", "torch.concat", "torch.concatenate", "torch.stack", "torch.hstack", "torch.vstack"):
    _AFFINE_TRACKABLE[_f] = None
for _f in _fns("torch.where", "T.where"):
    _AFFINE_TRACKABLE[_f] = (1, 2)
for _f in _fns("torch.addmm", "T.addmm", "torch.addmv", "T.addmv", "torch.baddbmm", "T.baddbmm", "torch.addbmm"):
    _AFFINE_TRACKABLE[_f] = (1, 2)
_AFFINE_TRACKABLE[_T.__setitem__] = (0, 2)
_AFFINE_TRACKABLE[_T.copy_] = (0, 1)
_AFFINE_NAMES = {torch.where: ("condition", "input", "other"), _T.where: ("condition", "input", "other"),
                 torch.addmm: ("input", "mat1", "mat2"), _T.addmm: ("input", "mat1", "mat2")}


# ----------------------------------------------------------------------------------------------
# The two passes
# ----------------------------------------------------------------------------------------------

def _is_float(t) -> bool:
    return isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())


class _Pass(TorchFunctionMode):
    """Shared by both passes: tracking of the tensors that depend on the input, and the lists."""

    primal = True

    def __init__(self, records: list | None = None) -> None:
        super().__init__()
        self.records: list[_Entry] = [] if records is None else records
        self.pos = 0
        self.tracked = torch.utils.weak.WeakIdKeyDictionary()

    # -- tracking ------------------------------------------------------------------------------
    def mark(self, out):
        if isinstance(out, torch.Tensor):
            if _is_float(out):
                self.tracked[out] = True
        elif isinstance(out, (list, tuple)):
            for e in out:
                self.mark(e)
        return out

    def is_tracked(self, v) -> bool:
        return isinstance(v, torch.Tensor) and v in self.tracked

    def _tracked_positions(self, args, kwargs) -> list:
        pos = []
        for i, v in enumerate(args):
            if any(self.is_tracked(t) for t in _tensors(v)):
                pos.append(i)
        for k, v in kwargs.items():
            if any(self.is_tracked(t) for t in _tensors(v)):
                pos.append(k)
        return pos

    @staticmethod
    def _refuse(func, why: str):
        raise NotPiecewiseLinearError(f"{_name(func)} {why}")

    # -- dispatch ------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _META:
            return func(*args, **kwargs)
        if func in _RANDOM:
            self._refuse(func, "draws random numbers in the forward: the tangent pass would see other draws")
        tracked = self._tracked_positions(args, kwargs)
        if not tracked or func in _FACTORIES:
            return func(*args, **kwargs)
        if func in _READS:
            self._refuse(func, "reads a value that depends on the input out of autograd's sight (item / bool / "
                               "detach / numpy): its derivative cannot be linearised")
        if _inplace_name(func) and 0 not in tracked and func not in (_T.__setitem__,):
            self._refuse(func, "writes a tensor that depends on the input into a constant tensor in place")
        if func in _CONSTANT:
            return self._constant(func, args, kwargs)
        if func in _PIECEWISE:
            return self._piecewise(func, args, kwargs, tracked)
        if func in _AFFINE:
            allowed = _AFFINE_TRACKABLE[func]
            if func is _T.__setitem__ and 0 not in tracked:
                self._refuse(func, "writes a tensor that depends on the input into a constant tensor in place")
            if allowed is not None:
                names = _AFFINE_NAMES.get(func, ())
                for p in tracked:
                    i = names.index(p) if isinstance(p, str) and p in names else p
                    if i not in allowed:
                        self._refuse(func, f"with a tensor that depends on the input as argument {p!r} (only "
                                           f"arguments {allowed} may; e.g. a convolution's weight must be constant)")
            if func in _fns("torch.addmm", "T.addmm", "torch.addmv", "T.addmv", "torch.baddbmm", "T.baddbmm",
                            "torch.addbmm") and len(tracked) > 1:
                self._refuse(func, "multiplies two tensors that both depend on the input (not linear)")
            return self._affine(func, args, kwargs)
        if func in _DROPOUT:
            if bool(_arg(args, kwargs, 2, "training", kwargs.get("train", True))):
                self._refuse(func, "is in training mode (random masks): call model.eval()")
            return self._linear(func, args, kwargs)
        if func in _LINEAR:
            if func not in _META_ARGS and any(p != 0 for p in tracked):
                self._refuse(func, f"with a tensor that depends on the input as argument {tracked[-1]!r} (only the "
                                   "first argument may; e.g. a sampling grid must be constant)")
            if func is _T.view and len(args) > 1 and isinstance(args[1], torch.dtype):
                self._refuse(func, "reinterprets the bits of a tensor that depends on the input")
            return self._linear(func, args, kwargs)
        if func in _MULTILINEAR:
            n = sum(1 for v in (*args, *kwargs.values()) for t in _tensors(v) if self.is_tracked(t))
            if n > 1:
                self._refuse(func, "multiplies two tensors that both depend on the input (not linear)")
            return self._linear(func, args, kwargs)
        if func in _NUMERATOR:
            if tracked != [0]:
                self._refuse(func, "divides by a tensor that depends on the input (not linear)")
            if _arg(args, kwargs, 2, "rounding_mode") is not None:
                self._refuse(func, "with a rounding mode is not on the list of linearisable calls")
            return self._linear(func, args, kwargs)
        self._refuse(func, "is not on the list of calls the piecewise-linear mode can linearise (upi_fast.linearization)"
                           ": a smooth or unknown function of the input")

    def _linear(self, func, args, kwargs):
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and not _is_float(out):
            return self._constant_out(func, out, args)  # an integer / bool cast: piecewise constant
        return self.mark(out)

    def _next(self, kind: str, shapes: tuple) -> _Entry:
        if self.pos >= len(self.records):
            raise NotPiecewiseLinearError(f"the tangent forward made more recorded calls than the primal ({kind})")
        entry = self.records[self.pos]
        self.pos += 1
        if entry.kind != kind or entry.shapes != shapes:
            raise NotPiecewiseLinearError(
                f"the tangent forward diverged from the primal at recorded call {self.pos}: {kind} on {shapes}, "
                f"recorded {entry.kind} on {entry.shapes} (data-dependent control flow?)")
        return entry

    @staticmethod
    def _shapes(args) -> tuple:
        return tuple(tuple(t.shape) for v in args for t in _tensors(v))

    def finish(self) -> None:
        if self.pos != len(self.records):
            raise NotPiecewiseLinearError(f"the tangent forward made {self.pos} recorded calls, the primal "
                                          f"{len(self.records)}")


class _Primal(_Pass):
    """Primal pass: runs every call unchanged, refusing those off the lists, recording what the
    piecewise-linear and piecewise-constant ones need."""

    def _constant(self, func, args, kwargs):
        return self._constant_out(func, func(*args, **kwargs), args)

    def _constant_out(self, func, out, args):
        self.records.append(_Entry("constant", self._shapes(args), out))
        return out

    def _piecewise(self, func, args, kwargs, tracked):
        kind, record = _PIECEWISE[func]
        shapes = self._shapes(args)
        for v in (*args[1:], *kwargs.values()):
            if kind in ("activation", "threshold", "clamp", "prelu", "abs", "amax", "sort", "max_pool") and \
                    any(self.is_tracked(t) for t in _tensors(v)):
                self._refuse(func, "with a bound, weight or parameter that depends on the input")
        out, data = record(func, args, kwargs)
        self.records.append(_Entry(kind, shapes, data))
        if isinstance(out, tuple) and not isinstance(out, torch.Tensor):
            self.mark(out[0])  # (values, indices)
            return out
        return self.mark(out)

    def _affine(self, func, args, kwargs):
        if func is F.batch_norm:
            _batch_norm_stats(args, kwargs)
        return self.mark(func(*args, **kwargs))


class _Tangent(_Pass):
    """Tangent pass: the forward re-run on ``u``; recorded calls replay the primal's linearisation,
    affine calls drop their constant part."""

    primal = False

    def _constant(self, func, args, kwargs):
        return self._next("constant", self._shapes(args)).data

    def _constant_out(self, func, out, args):
        return self._next("constant", self._shapes(args)).data

    def _piecewise(self, func, args, kwargs, tracked):
        kind = _PIECEWISE[func][0]
        entry = self._next(kind, self._shapes(args))
        data = entry.data
        if data[0] == "binary":
            a, b = args[0], _arg(args, kwargs, 1, "other")
            tangents = [a if self.is_tracked(a) else None, b if self.is_tracked(b) else None]
        else:
            tangents = [args[0]]
        res = _apply(data, tangents)
        if func in _PIECEWISE_INPLACE or (kind == "activation" and _act_inplace(func, args, kwargs)):
            out = args[0].copy_(res)
            return self.mark(out)
        if isinstance(res, tuple):
            self.mark(res[0])
            return res
        return self.mark(res)

    def _affine(self, func, args, kwargs):
        return self.mark(_AFFINE[func](self, func, args, kwargs))


# ----------------------------------------------------------------------------------------------
# Second guard: the autograd graph of the primal
# ----------------------------------------------------------------------------------------------

_GRAPH_NODES = frozenset({
    # linear / structural
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AsStridedBackward0", "PermuteBackward0",
    "TransposeBackward0", "TransposeBackward1", "TBackward0", "CloneBackward0", "SqueezeBackward0",
    "SqueezeBackward1", "SqueezeBackward2", "SqueezeBackward3", "SqueezeBackward4", "UnsqueezeBackward0",
    "ExpandBackward0", "RepeatBackward0", "FlipBackward0", "RollBackward0", "RotBackward0", "NarrowBackward0",
    "SelectBackward0", "SliceBackward0", "IndexBackward0", "IndexSelectBackward0", "GatherBackward0",
    "TakeAlongDimBackward0", "MaskedSelectBackward0", "SplitBackward0", "SplitWithSizesBackward0",
    "UnbindBackward0", "UnfoldBackward0", "DiagonalBackward0", "TrilBackward0", "TriuBackward0", "NegBackward0",
    "SumBackward0", "SumBackward1", "MeanBackward0", "MeanBackward1", "CumsumBackward0", "TraceBackward0",
    "ToCopyBackward0", "AliasBackward0", "CopyBackwards", "CopySlices", "MovedimBackward0",
    "RepeatInterleaveBackward0", "AvgPool2DBackward0", "AvgPool3DBackward0", "AdaptiveAvgPool2DBackward0",
    "AdaptiveAvgPool3DBackward0", "MeanBackward2",
    "UpsampleNearest1DBackward0", "UpsampleNearest2DBackward0", "UpsampleNearest3DBackward0",
    "UpsampleNearestExact1DBackward0", "UpsampleNearestExact2DBackward0", "UpsampleNearestExact3DBackward0",
    "UpsampleLinear1DBackward0", "UpsampleBilinear2DBackward0", "UpsampleTrilinear3DBackward0",
    "UpsampleBicubic2DBackward0", "UpsampleBilinear2DAaBackward0", "UpsampleBicubic2DAaBackward0",
    "PixelShuffleBackward0", "PixelUnshuffleBackward0", "ChannelShuffleBackward0", "Im2ColBackward0",
    "Col2ImBackward0", "GridSampler2DBackward0", "GridSampler3DBackward0", "NativeChannelShuffleBackward0",
    "StackBackward0", "CatBackward0", "WhereBackward0", "MaskedFillBackward0", "MaskedFillBackward1",
    "IndexPutBackward0", "FillBackward0", "FillBackward1", "ZeroBackward0", "ConstantPadNdBackward0",
    "ReflectionPad1DBackward0", "ReflectionPad2DBackward0", "ReflectionPad3DBackward0",
    "ReplicationPad1DBackward0", "ReplicationPad2DBackward0", "ReplicationPad3DBackward0", "PadBackward0",
    # multilinear / affine
    "MulBackward0", "MulBackward1", "DivBackward0", "DivBackward1", "AddBackward0", "AddBackward1",
    "SubBackward0", "SubBackward1", "RsubBackward0", "RsubBackward1", "MmBackward0", "BmmBackward0",
    "MvBackward0", "DotBackward0", "AddmmBackward0", "AddmvBackward0", "BaddbmmBackward0", "AddbmmBackward0",
    "ConvolutionBackward0", "MkldnnConvolutionBackward0", "CudnnConvolutionBackward0", "LinearBackward0",
    "NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0",
    "NativeBatchNormLegitNoTrainingBackward0", "NativeBatchNormLegitBackward0", "BatchNormBackward0",
    "OuterBackward0", "KronBackward0",
    # piecewise linear
    "ReluBackward0", "ReluBackward1", "ThresholdBackward0", "ThresholdBackward1", "HardtanhBackward0",
    "HardtanhBackward1", "LeakyReluBackward0", "LeakyReluBackward1", "PreluKernelBackward0", "PreluBackward0",
    "ClampBackward0", "ClampBackward1", "ClampMinBackward0", "ClampMinBackward1", "ClampMaxBackward0",
    "ClampMaxBackward1", "AbsBackward0", "MaximumBackward0", "MinimumBackward0", "FmaxBackward0", "FminBackward0",
    "MaxBackward0", "MaxBackward1", "MinBackward0", "MinBackward1", "AmaxBackward0", "AminBackward0",
    "SortBackward0", "SortBackward1", "TopkBackward0", "MaxPool2DWithIndicesBackward0",
    "MaxPool3DWithIndicesBackward0", "AdaptiveMaxPool2DBackward0", "AdaptiveMaxPool3DBackward0",
    "MaxPool1DWithIndicesBackward0",
    # piecewise constant (zero derivative)
    "SignBackward0", "SgnBackward0", "FloorBackward0", "CeilBackward0", "RoundBackward0", "RoundBackward1",
    "TruncBackward0",
})
"""Names of the autograd nodes that the lists above produce (the backward of each listed call)."""


def _graph_reason(z: torch.Tensor, x: torch.Tensor) -> str | None:
    """Why the primal graph from ``x`` to ``z`` holds a node outside :data:`_GRAPH_NODES`, or None."""
    start = getattr(torch.autograd.graph, "get_gradient_edge", None)
    root = z.grad_fn
    if root is None or start is None:
        return None
    target = start(x).node
    # post-order over the nodes reachable from z (children first), then: does the node reach x?
    order, seen, stack = [], {root}, [(root, iter(root.next_functions))]
    while stack:
        node, it = stack[-1]
        for nxt, _ in it:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, iter(nxt.next_functions)))
                break
        else:
            stack.pop()
            order.append(node)
    reaches: dict = {}
    for n in order:
        reaches[n] = n is target or any(nxt is not None and reaches.get(nxt, False) for nxt, _ in n.next_functions)
    for n in order:
        if n is target or not reaches.get(n):
            continue
        name = type(n).__name__
        if name in _GRAPH_NODES:
            continue
        cls = getattr(n, "_forward_cls", None)
        if cls is not None and cls in LINEAR_FUNCTIONS:
            continue
        what = f"custom autograd Function {cls.__name__}" if cls is not None else f"autograd node {name}"
        return (f"the forward's autograd graph holds {what}, whose derivative the piecewise-linear mode does not "
                f"know (a call invisible to its checks: declare a linear custom Function with "
                f"upi_fast.linearization.register_linear_function)")
    return None


# ----------------------------------------------------------------------------------------------
# The linearisation
# ----------------------------------------------------------------------------------------------

def check_logits(z, batch: int, target: torch.Tensor | None = None) -> None:
    """``z`` must be (batch, K) logits, ``target`` labels in [0, K)."""
    if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[0] != batch:
        raise ValueError(f"model must return logits of shape (B, K) = ({batch}, K), got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    K = z.shape[1]
    if target is not None and target.numel() and (int(target.min()) < 0 or int(target.max()) >= K):
        raise ValueError(f"target has labels outside [0, {K - 1}] for a model with {K} outputs")


@contextlib.contextmanager
def _module_context(model) -> Iterator[Callable[[], str]]:
    """Track the innermost module running (global forward hooks) so that a refusal can name it."""
    names = {id(m): n for n, m in model.named_modules()} if isinstance(model, torch.nn.Module) else {}
    stack: list = []

    def pre(module, args):
        stack.append(module)

    def post(module, args, out):
        if stack and stack[-1] is module:
            stack.pop()

    from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
    handles = (register_module_forward_pre_hook(pre), register_module_forward_hook(post))

    def where() -> str:
        if not stack:
            return ""
        m = stack[-1]
        return f"in module {names.get(id(m), '?') or '<model>'!r} ({type(m).__name__}): "

    try:
        yield where
    finally:
        for h in handles:
            h.remove()


class Linearization:
    """The local linear map ``x' -> J x'`` of a piecewise-linear ``model`` at the points ``x``.

    Construction runs the primal forward once (with a first-order autograd graph), checks every call
    that touches the input against the module's lists and every node of the autograd graph, and
    records what each piecewise-linear call needs; it raises :class:`NotPiecewiseLinearError` with the
    reason when the forward leaves the lists. The model should be in eval mode.

    Args:
        model: classifier returning logits (P, K).
        x: the points (P, ...), any floating dtype the model accepts.

    Attributes:
        logits: ``model(x)``, (P, K), detached.
    """

    def __init__(self, model: Callable, x: torch.Tensor) -> None:
        self._model = model
        self._x = x.detach().requires_grad_(True)
        rec = _Primal()
        with torch.enable_grad(), _module_context(model) as where, rec:
            rec.mark(self._x)
            try:
                z = model(self._x)
            except NotPiecewiseLinearError as e:
                raise NotPiecewiseLinearError(f"{where()}{e}") from None
        check_logits(z, x.shape[0])
        if isinstance(z, torch.Tensor) and z.grad_fn is not None:
            reason = _graph_reason(z, self._x)
            if reason is not None:
                raise NotPiecewiseLinearError(reason)
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
