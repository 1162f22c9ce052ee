"""Piecewise-linear calls (ReLU family, clamps, abs, max / min, sort, max pooling): their recorders,
which store the primal's selection so that the tangent pass replays it."""
from __future__ import annotations


import torch
import torch.nn.functional as F
import torch.utils.weak

from .calls import NotPiecewiseLinearError, _arg, _bcast, _channels_last, _fns

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
