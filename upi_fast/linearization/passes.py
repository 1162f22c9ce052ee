"""The two ``TorchFunctionMode`` passes: the primal (checks every call, records) and the tangent
(replays the recorded linearisation on a tangent)."""
from __future__ import annotations


import torch
import torch.nn.functional as F
import torch.utils.weak
from torch.overrides import TorchFunctionMode

from .affine_calls import _ADDMM_LIKE, _AFFINE, _AFFINE_NAMES, _AFFINE_TRACKABLE, _batch_norm_stats
from .calls import NotPiecewiseLinearError, _CONSTANT, _DROPOUT, _FACTORIES, _LINEAR, _META, _META_ARGS, _MULTILINEAR, _NUMERATOR, _RANDOM, _READS, _T, _arg, _name, _tensors
from .piecewise_calls import _Entry, _PIECEWISE, _PIECEWISE_INPLACE, _act_inplace, _apply, _inplace_name

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
            if func in _ADDMM_LIKE and len(tracked) > 1:
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
