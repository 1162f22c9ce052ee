"""Affine calls with a constant part (convolution / linear bias, BatchNorm statistics, padding,
where, addmm, ...): the tangent drops the constant; additive combinations."""
from __future__ import annotations


import torch
import torch.nn.functional as F
import torch.utils.weak

from .calls import NotPiecewiseLinearError, _T, _arg, _bcast, _fns, _with_arg
from .piecewise_calls import _inplace_name

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
#: ``beta * input + alpha * (m1 @ m2)`` calls: the constant addend dropped, one tracked factor at most.
_ADDMM_LIKE = frozenset(_fns("torch.addmm", "T.addmm", "torch.addmv", "T.addmv", "torch.baddbmm", "T.baddbmm",
                             "torch.addbmm"))
for _f in _ADDMM_LIKE:
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
for _f in _ADDMM_LIKE:
    _AFFINE_TRACKABLE[_f] = (1, 2)
_AFFINE_TRACKABLE[_T.__setitem__] = (0, 2)
_AFFINE_TRACKABLE[_T.copy_] = (0, 1)
_AFFINE_NAMES = {torch.where: ("condition", "input", "other"), _T.where: ("condition", "input", "other"),
                 torch.addmm: ("input", "mat1", "mat2"), _T.addmm: ("input", "mat1", "mat2")}
