"""The call lists of the linearisation: which torch functions are linear, metadata, constant,
piecewise constant or dropout, and :func:`register_linear_function`; argument helpers."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.weak


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
    "F.adaptive_avg_pool2d", "F.adaptive_avg_pool3d", "torch.adaptive_avg_pool1d",
    "F.interpolate", "F.upsample", "F.upsample_nearest", "F.upsample_bilinear", "F.pixel_shuffle",
    "F.pixel_unshuffle", "torch.pixel_shuffle", "torch.pixel_unshuffle", "F.channel_shuffle",
    "torch.channel_shuffle", "torch.native_channel_shuffle", "F.unfold", "F.fold", "F.grid_sample",
    "F.affine_grid"))
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
