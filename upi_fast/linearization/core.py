"""The graph guard on the primal autograd graph, the logits check and :class:`Linearization`."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.utils.weak

from .calls import LINEAR_FUNCTIONS, NotPiecewiseLinearError
from .passes import _Primal, _Tangent

# ----------------------------------------------------------------------------------------------
# Second guard: the autograd graph of the primal
# ----------------------------------------------------------------------------------------------

_GRAPH_NODES = frozenset({
    # linear / structural
    "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AsStridedBackward0", "AsStridedBackward1", "PermuteBackward0",
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
