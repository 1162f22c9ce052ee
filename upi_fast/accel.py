"""Fast paths for the UPI-Grad step: a prepared model and a prepared step function.

The attack step (:func:`upi_fast.saliency_loss_grad`) is dominated by convolutions in four passes
(primal forward, gradient, tangent forward or second gradient, second backward). What this module
changes, each measured side by side in ``bench/suites/upi_grad.py`` (numbers in ``bench/RESULTS.md``):

* :func:`fold_batchnorm`: every eval-mode BatchNorm that directly follows a convolution or linear
  layer is folded into it (``W' = W * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma /
  sqrt(var + eps) + beta``, computed in float64): the same function to float rounding, one
  memory-bound op fewer per layer in *every* pass (forward, tangent forward, both backwards);
* CPU kernel choices: :class:`SpaceToDepthConv2d` (a strided stem over few channels as a stride-1
  convolution: oneDNN's input gradient of ResNet's 3-channel 7x7/2 stem is 2.5x faster that way) and
  :class:`ChannelsLastMaxPool` (the NCHW max-pooling kernel is about 10 times slower than the NHWC one);
* :func:`prepare_model`: an eval-mode copy with the above, parameters frozen (``requires_grad=False``),
  optionally channels_last (NHWC);
* :class:`FastStep` / :func:`fast_step`: ``step(x, y, I_ref, delta) -> (loss, grad)`` with the HVP
  mode resolved once, a lean step without per-call host synchronisation, bf16 / fp16 autocast,
  channels_last inputs, a static batch (padding / chunking), ``torch.compile`` of the model for the
  first-order (finite-difference) modes, and on CUDA the whole fixed-shape step captured as a CUDA
  graph; :func:`autotune_step` times a few equivalent option sets on a real batch and keeps the
  fastest (as cuDNN's benchmark mode does).

Exactness: in float32 without ``compile`` every path computes the reference mode's gradient to
float32 rounding (tests: relative error under 1e-5 against :func:`upi_fast.saliency_loss_grad` on the
unprepared model); specs the lean step does not cover (integrated / smoothgrad saliency,
``multiply_by_input``, ``raw`` maps, ``topk``) run the reference code itself on the prepared model.
``torch.compile`` agrees with the uncompiled step to rounding; bf16 / fp16 change the arithmetic
(judge them by attack strength, ``bench/RESULTS.md``).

What :func:`torch.compile` cannot do here: double backward (PyTorch issue #91469) and the
piecewise-linear tangent pass (a ``TorchFunctionMode`` replaying recorded activation masks); for those
modes ``compile=True`` is refused with the reason. The finite-difference modes are first order
(two or three plain gradients), so their forward and backward compile.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from ._checks import check_choice, check_delta, check_images, check_labels, check_maps, check_model, check_positive
from .hvp import HVP_MODES, SaliencySpec, _loss_grad
from .linearization import register_linear_function
from .piecewise import Linearization, NotPiecewiseLinearError, _ProbTarget, mark_refused, resolve_hvp

__all__ = ["fold_batchnorm", "prepare_model", "FastStep", "fast_step", "autotune_step", "SpaceToDepthConv2d",
           "ChannelsLastMaxPool", "PRECISIONS", "COMPILABLE_MODES"]

logger = logging.getLogger("upi_fast")

#: Arithmetic of the model passes in :class:`FastStep` (``precision=``): float32, or autocast to bf16 / fp16.
PRECISIONS = ("fp32", "bf16", "fp16")
#: HVP modes whose step is first order only, hence valid under ``torch.compile``.
COMPILABLE_MODES = ("finite_difference", "finite_difference_onesided")

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# ------------------------------------------------------------------------------------------------
# BatchNorm folding
# ------------------------------------------------------------------------------------------------

def _fold_into(layer: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold ``bn`` (eval mode, running statistics) into ``layer``'s weight and bias, in place."""
    w = layer.weight.detach()
    dt = w.dtype
    var = bn.running_var.detach().double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.detach().double() * scale
    if layer.bias is not None:
        shift = shift + layer.bias.detach().double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    new_w = (w.double() * scale.view(-1, *([1] * (w.dim() - 1)))).to(dt)
    layer.weight = nn.Parameter(new_w, requires_grad=layer.weight.requires_grad)
    layer.bias = nn.Parameter(shift.to(dt), requires_grad=layer.weight.requires_grad)


def _foldable_pair(gm, node) -> tuple[nn.Module, nn.Module] | None:
    """``(layer, bn)`` when ``node`` calls an eval BatchNorm whose only input is a conv / linear node
    used by nothing else, with matching channels."""
    if node.op != "call_module":
        return None
    bn = gm.get_submodule(node.target)
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.training or bn.running_mean is None:
        return None
    if len(node.args) != 1 or node.kwargs or not hasattr(node.args[0], "op"):
        return None
    src = node.args[0]
    if src.op != "call_module" or len(src.users) != 1:
        return None
    layer = gm.get_submodule(src.target)
    if not isinstance(layer, _FOLDABLE) or type(layer) not in _FOLDABLE:
        return None  # subclasses may override forward: leave them alone
    out_ch = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if bn.num_features != out_ch:
        return None
    return layer, bn


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``model`` with every foldable BatchNorm folded into the layer before it.

    Foldable: an eval-mode BatchNorm (running statistics) whose input is the output of a
    ``Conv1d/2d/3d`` or ``Linear`` module used by nothing else. The model is traced with
    :mod:`torch.fx`; the result is a ``GraphModule`` computing the same function to float rounding
    (folded parameters computed in float64). The caller's model is not modified.

    Args:
        model: an ``nn.Module`` in eval mode (BatchNorm layers in train mode are left alone).

    Returns:
        ``(folded_model, n_folded)``. When the model cannot be traced, or nothing is foldable, a
        deep copy of the model and 0.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return copy.deepcopy(model), 0
    import torch.fx

    try:
        gm = torch.fx.symbolic_trace(copy.deepcopy(model))
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "do not fold"
        logger.info("fold_batchnorm: the model cannot be traced by torch.fx (%s: %s); nothing folded",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return copy.deepcopy(model), 0
    n = 0
    for node in list(gm.graph.nodes):
        pair = _foldable_pair(gm, node)
        if pair is None:
            continue
        layer, bn = pair
        _fold_into(layer, bn)
        node.replace_all_uses_with(node.args[0])
        gm.graph.erase_node(node)
        n += 1
    if n == 0:
        return copy.deepcopy(model), 0
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    gm.training = model.training
    return gm, n


# ------------------------------------------------------------------------------------------------
# CPU kernel choices: space-to-depth stem convolution, channels_last max pooling
# ------------------------------------------------------------------------------------------------

class SpaceToDepthConv2d(nn.Module):
    """A strided ``Conv2d`` with few input channels, rewritten as a stride-1 convolution on the
    space-to-depth input (same function to float rounding).

    A ``k x k`` convolution of stride ``s`` over ``C`` channels equals a ``ceil(k/s) x ceil(k/s)``
    stride-1 convolution over the ``C s^2`` channels of the input cut into ``s x s`` blocks (weights
    zero-padded to a multiple of ``s``). Why: oneDNN's input-gradient kernel for a 3-channel stride-2
    stem (ResNet's 7x7) is slow on the CPU (measured 53 ms for ResNet-18's stem at 64 x 3 x 64 x 64,
    1 thread); on 12 channels it takes 22 ms. Only the input gradient matters to the attack.

    Input (B, C, H, W) -> output (B, O, H_out, W_out) exactly as the original convolution.
    A container (its child is a plain ``Conv2d``): :mod:`upi_fast.piecewise` linearises it.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not self.applies(conv):
            raise ValueError("conv must be a Conv2d with equal strides > 1, dilation 1, groups 1, integer padding "
                             "and padding_mode='zeros'")
        s, k = conv.stride[0], conv.kernel_size
        self.stride, self.padding, self.kernel_size = s, tuple(conv.padding), tuple(k)
        self.in_channels = conv.in_channels
        kp = tuple(-(-kk // s) for kk in k)
        w = conv.weight.detach()
        O, C = w.shape[:2]
        w = nn.functional.pad(w, (0, kp[1] * s - k[1], 0, kp[0] * s - k[0]))
        w = w.view(O, C, kp[0], s, kp[1], s).permute(0, 1, 3, 5, 2, 4).reshape(O, C * s * s, *kp)
        self.conv = nn.Conv2d(C * s * s, O, kp, bias=conv.bias is not None).to(w.device, w.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(w)
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias.detach())
        self.conv.weight.requires_grad_(conv.weight.requires_grad)
        if conv.bias is not None:
            self.conv.bias.requires_grad_(conv.bias.requires_grad)

    @staticmethod
    def applies(conv: nn.Module) -> bool:
        """Whether ``conv`` can be rewritten (and is worth it: at most 4 input channels, stride > 1)."""
        return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.dilation == (1, 1)
                and conv.stride[0] == conv.stride[1] and conv.stride[0] > 1 and conv.in_channels <= 4
                and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped convolution of ``x`` (B, C, H, W): pad, fold s x s blocks into channels, convolve."""
        s, (ph, pw), (kh, kw) = self.stride, self.padding, self.kernel_size
        B, C, H, W = x.shape
        ho, wo = (H + 2 * ph - kh) // s + 1, (W + 2 * pw - kw) // s + 1
        kph, kpw = -(-kh // s), -(-kw // s)
        hp, wp = s * (ho - 1 + kph), s * (wo - 1 + kpw)
        xp = nn.functional.pad(x, (pw, wp - W - pw, ph, hp - H - ph))
        xs = xp.reshape(B, C, hp // s, s, wp // s, s).permute(0, 1, 3, 5, 2, 4).reshape(B, C * s * s, hp // s, wp // s)
        return self.conv(xs)


class ChannelsLastMaxPool(nn.Module):
    """Max pooling run on a channels_last copy of its input, output returned contiguous (NCHW).

    The same function exactly (max and its argmax do not depend on the memory layout). Why: the
    CPU's NCHW max-pooling kernel is slow (measured 41 ms for ResNet-18's 3x3 / 2 pool at
    64 x 64 x 32 x 32, 1 thread) and its channels_last kernel fast (3 ms); the two layout copies
    cost about 3 ms each. A container around the original pooling module.
    """

    def __init__(self, pool: nn.Module) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The wrapped pooling of ``x`` (B, C, H, W), computed in channels_last, returned contiguous."""
        if x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last):
            return self.pool(x)
        return _Relayout.apply(self.pool(_Relayout.apply(x, torch.channels_last)), torch.contiguous_format)


@register_linear_function  # a relayout: the identity map, its backward the same relayout
class _Relayout(torch.autograd.Function):
    """``x.contiguous(memory_format=fmt)`` whose gradient is returned in ``x``'s own layout (a plain
    ``contiguous`` passes the gradient through in the new layout, and the next elementwise backward
    then mixes layouts, which is slow on the CPU). Supports ``torch.func`` transforms (jvp, grad)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
        return x.contiguous(memory_format=fmt)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, fmt = inputs
        ctx.fmt = fmt
        ctx.back = (torch.channels_last if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
                    and not x.is_contiguous() else torch.contiguous_format)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g.contiguous(memory_format=ctx.back), None

    @staticmethod
    def jvp(ctx, gx: torch.Tensor, _):
        return gx.contiguous(memory_format=ctx.fmt)


def _replace_modules(model: nn.Module, pick: Callable[[nn.Module], bool], make: Callable[[nn.Module], nn.Module]
                     ) -> int:
    """Replace (in place) every submodule ``m`` with ``pick(m)`` by ``make(m)``; returns the count."""
    n = 0
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if pick(child):
                setattr(parent, child_name, make(child))
                n += 1
    return n


# ------------------------------------------------------------------------------------------------
# Model preparation
# ------------------------------------------------------------------------------------------------

def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def prepare_model(model: nn.Module, *, fold_bn: bool = True, channels_last: bool = False, freeze: bool = True,
                  stem_space_to_depth: bool | None = None, pool_channels_last: bool | None = None) -> nn.Module:
    """An eval-mode copy of ``model`` prepared for the attack step (the caller's model is untouched).

    Every option keeps the function the same to float rounding.

    Args:
        model: classifier returning logits (B, K), an ``nn.Module``.
        fold_bn: fold BatchNorm into the preceding convolution / linear layer (:func:`fold_batchnorm`).
        channels_last: store 4-d parameters channels_last (NHWC); feed it channels_last inputs.
            Measured: faster with bf16 on the CPU (oneDNN AMX kernels) and the usual choice on CUDA;
            slower in fp32 on the CPU (see ``bench/RESULTS.md``).
        freeze: ``requires_grad_(False)`` on every parameter: the step differentiates with respect to
            the input only, so no weight-gradient bookkeeping is needed.
        stem_space_to_depth: rewrite strided convolutions over at most 4 input channels as
            :class:`SpaceToDepthConv2d`. Default (None): on when the model is on the CPU.
        pool_channels_last: wrap max pooling in :class:`ChannelsLastMaxPool`. Default (None): on when
            the model is on the CPU and ``channels_last`` is off.

    Returns:
        The prepared module (eval mode).
    """
    check_model(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module to be prepared, got {type(model).__name__}")
    cpu = _model_device(model).type == "cpu"
    if stem_space_to_depth is None:
        stem_space_to_depth = cpu
    if pool_channels_last is None:
        pool_channels_last = cpu and not channels_last
    src = copy.deepcopy(model).eval()
    out = fold_batchnorm(src)[0] if fold_bn else src
    out.eval()
    if stem_space_to_depth:
        _replace_modules(out, SpaceToDepthConv2d.applies, SpaceToDepthConv2d)
    if pool_channels_last:
        _replace_modules(out, lambda m: isinstance(m, (nn.MaxPool2d, nn.AdaptiveMaxPool2d)), ChannelsLastMaxPool)
    if freeze:
        for p in out.parameters():
            p.requires_grad_(False)
    if channels_last:
        out = out.to(memory_format=torch.channels_last)
    return out.eval()


# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------

def _lean_supported(spec: SaliencySpec) -> bool:
    """Specs the lean step computes itself (no host synchronisation: CUDA-graph capturable)."""
    return (spec.method == "simple" and not spec.multiply_by_input and spec.fused
            and spec.target_kind in ("prob", "logit"))


def _target_sum(z: torch.Tensor, y: torch.Tensor, target_kind: str) -> torch.Tensor:
    """Sum over the batch of the gradient target (softmax probability or logit of the label)."""
    idx = y.view(-1, 1).to(torch.int64)
    if z.dtype in (torch.float16, torch.bfloat16):  # autocast: the softmax in float32
        z = z.float()
    if target_kind == "prob":
        return torch.log_softmax(z, dim=1).gather(1, idx).exp().sum()
    return z.gather(1, idx).sum()


def _input_grad(model, p: torch.Tensor, y: torch.Tensor, target_kind: str, create_graph: bool = False) -> torch.Tensor:
    """``grad_p target(p)`` (first order unless ``create_graph``), shaped like ``p``."""
    with torch.enable_grad():
        q = p if p.requires_grad else p.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(_target_sum(model(q), y, target_kind), q, create_graph=create_graph)
    return g


class FastStep:
    """A prepared UPI-Grad step: ``step(x, y, I_ref, delta) -> (loss (B,), grad)``.

    Same contract as :func:`upi_fast.saliency_loss_grad` with ``noise_std=0`` (pass ``x`` already
    noised, as the solvers do): ``loss`` are the per-sample dissimilarities, ``grad`` the gradient of
    their mean with respect to ``delta`` ((C, H, W) shared, or (B, C, H, W) per sample), float32.

    Args:
        model: classifier returning logits (B, K), an ``nn.Module`` (prepared by :func:`prepare_model`
            unless ``prepare=False``; the caller's model is never modified).
        spec: the attacked map and loss (:class:`upi_fast.hvp.SaliencySpec`; default: simple gradient,
            probability target, ``abs_sum_l1`` maps, L2 dissimilarity).
        hvp: HVP mode (:data:`upi_fast.HVP_MODES`); ``"auto"`` / ``"piecewise_linear"`` are resolved on
            the first call (the resolved mode is ``hvp_``).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (CUDA only): autocast of the model passes;
            inputs, outputs and the dissimilarity stay float32.
        channels_last: NHWC model and inputs (default: on for CUDA or a 16-bit precision).
        fold_bn, stem_space_to_depth, pool_channels_last: :func:`prepare_model` options.
        compile: ``torch.compile`` the prepared model (first-order modes only, :data:`COMPILABLE_MODES`;
            the first call compiles: see ``setup_time_s_``).
        cuda_graph: capture the whole fixed-shape step as a CUDA graph on the first call and replay
            it (CUDA only; ``method="simple"`` with the fused dissimilarity). Batches are padded to
            ``static_batch`` rows (padded rows get weight 0) or cut into chunks of it.
        static_batch: rows per call: batches are padded to it or cut into chunks of it (bounds the
            memory; default: the first call's batch size with ``compile`` or ``cuda_graph``, else
            none: every batch in one call).
        fd_step: relative finite-difference step (as :func:`upi_fast.saliency_loss_grad`).
        prepare: prepare the model (False: use ``model`` as given).
        validate: check every call's arguments (shapes, dtypes, finiteness, label range).

    Attributes:
        model_: the prepared model. hvp_: the resolved mode (after the first call). setup_time_s_:
        seconds of the first call (mode resolution, compilation, graph capture). notes_: what fell
        back and why (e.g. a failed capture: the step then runs eagerly).
    """

    def __init__(self, model: nn.Module, spec: SaliencySpec | None = None, *, hvp: str = "auto", precision: str = "fp32",
                 channels_last: bool | None = None, fold_bn: bool = True, stem_space_to_depth: bool | None = None,
                 pool_channels_last: bool | None = None, compile: bool = False, cuda_graph: bool = False,
                 static_batch: int | None = None, fd_step: float = 1e-2, prepare: bool = True,
                 validate: bool = True) -> None:
        check_model(model)
        check_choice("hvp", hvp, HVP_MODES)
        check_choice("precision", precision, PRECISIONS)
        check_positive("fd_step", fd_step)
        if static_batch is not None:
            check_positive("static_batch", static_batch, integer=True)
        if spec is None:
            spec = SaliencySpec()
        if not isinstance(spec, SaliencySpec):
            raise TypeError(f"spec must be a upi_fast.hvp.SaliencySpec, got {type(spec).__name__}")
        device = _model_device(model) if isinstance(model, nn.Module) else torch.device("cpu")
        if precision == "fp16" and device.type != "cuda":
            raise ValueError("precision='fp16' needs a CUDA model; use 'bf16' or 'fp32' on the CPU")
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a model on a CUDA device, got {device}")
        if cuda_graph and not _lean_supported(spec):
            raise ValueError("cuda_graph=True supports method='simple', no multiply_by_input, postprocess "
                             "'abs_sum_l1' and dissimilarity 'l2' / 'rel_l2' / 'cosine'")
        if compile and hvp not in COMPILABLE_MODES:
            raise ValueError(f"compile=True needs a first-order mode, hvp in {COMPILABLE_MODES}, got {hvp!r}: "
                             "torch.compile does not support double backward (PyTorch issue #91469), forward-over-"
                             "reverse, or the piecewise-linear tangent pass (a TorchFunctionMode replaying recorded "
                             "activation masks)")
        if channels_last is None:
            channels_last = device.type == "cuda" or precision != "fp32"
        self.spec, self.hvp, self.precision, self.fd_step = spec, hvp, precision, float(fd_step)
        self.channels_last, self.compile, self.cuda_graph = bool(channels_last), bool(compile), bool(cuda_graph)
        self.static_batch, self.validate, self.device = static_batch, validate, device
        if prepare:
            self.model_ = prepare_model(model, fold_bn=fold_bn, channels_last=self.channels_last,
                                        stem_space_to_depth=stem_space_to_depth, pool_channels_last=pool_channels_last)
        else:
            self.model_ = model
        self._fn_model = self.model_
        self.hvp_: str | None = None if hvp in ("auto", "piecewise_linear") else hvp
        self._lean = _lean_supported(spec) and hvp != "forward"
        self.setup_time_s_: float | None = None
        self.notes_: list[str] = []
        self._graphs: dict = {}
        self._compiled = False

    # -- contexts ----------------------------------------------------------------------------------
    def _autocast(self) -> ContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype, cache_enabled=not self.cuda_graph)

    def _layout(self, t: torch.Tensor) -> torch.Tensor:
        return t.contiguous(memory_format=torch.channels_last) if self.channels_last and t.dim() == 4 else t

    # -- one chunk: (loss (S,), J^T u per sample (S, C, H, W)) --------------------------------------
    def _chunk(self, x, y, I_ref, delta, scale) -> tuple[torch.Tensor, torch.Tensor]:
        """The lean step on one chunk (no argument checks, no host synchronisation)."""
        model, spec, mode, kind = self._fn_model, self.spec, self.hvp_, self.spec.dissimilarity
        dt = x.dtype  # float32 (or float64): gradients w.r.t. the float inputs come back in it
        from .ops.saliency_dissim import fused_saliency_loss, saliency_dissim
        with self._autocast():
            if mode == "double_backward":
                with torch.enable_grad():
                    xp = self._layout(x + delta.detach()).requires_grad_(True)
                    r = _input_grad(model, xp, y, spec.target_kind, create_graph=True)
                    loss = fused_saliency_loss(r.to(dt), I_ref, kind)
                    (jtu,) = torch.autograd.grad(loss.sum(), xp)
                return loss.detach(), jtu
            xp = self._layout((x + delta).detach())
            if mode == "piecewise_linear":
                lin = Linearization(model, xp)
                prob = _ProbTarget(lin.logits, y)
                g = lin.vjp(prob.grad(), retain_graph=True)
                loss, u = saliency_dissim(g.to(dt), I_ref, kind, True)
                Hw = lin.vjp(prob.hvp(lin.jvp(self._layout(u.to(xp.dtype)))), retain_graph=False)
                return loss, Hw
            A0 = _input_grad(model, xp, y, spec.target_kind)
            loss, u = saliency_dissim(A0.to(dt), I_ref, kind, True)
            B = xp.shape[0]
            wn = u.reshape(B, -1).norm(dim=1)
            h = torch.where(wn > 0, self.fd_step * scale / wn.clamp_min(1e-30), torch.zeros_like(wn)).view(B, 1, 1, 1)
            safe_h = torch.where(h > 0, h, torch.ones_like(h))
            hu = self._layout((h * u).to(xp.dtype))
            if mode == "finite_difference":
                Hw = (_input_grad(model, xp + hu, y, spec.target_kind).to(dt)
                      - _input_grad(model, xp - hu, y, spec.target_kind).to(dt)) / (2 * safe_h)
            else:
                Hw = (_input_grad(model, xp + hu, y, spec.target_kind).to(dt) - A0.to(dt)) / safe_h
            return loss, torch.where(h > 0, Hw, torch.zeros_like(Hw))

    # -- setup -------------------------------------------------------------------------------------
    def _resolve(self, x, delta) -> None:
        if self.hvp_ is not None:
            return
        xp = (x + delta).detach()
        self.hvp_ = resolve_hvp(self.model_, self._layout(xp), self.spec, self.hvp)  # confirmed in full precision
        if self.compile and self.hvp_ not in COMPILABLE_MODES:  # pragma: no cover - refused in __init__
            raise ValueError(f"compile=True cannot run hvp={self.hvp_!r}")

    def _setup_compile(self) -> None:
        if self.compile and not self._compiled:
            self._fn_model = torch.compile(self.model_, dynamic=False)
            self._compiled = True

    def _capture(self, args: tuple) -> tuple:
        """Capture ``_chunk`` on static copies of ``args``; returns ``(graph, static_args, outputs)``."""
        static = tuple(a.clone() for a in args)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._chunk(*static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._chunk(*static)
        return graph, static, out

    def _run_chunk(self, args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cuda_graph:
            return self._chunk(*args)
        key = tuple((tuple(a.shape), a.dtype) for a in args)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(args)
            except Exception as exc:  # noqa: BLE001 - any capture failure: run eagerly, say why
                self.cuda_graph = False
                self.notes_.append(f"CUDA graph capture failed ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                                   "running eagerly")
                logger.warning("FastStep: %s", self.notes_[-1])
                return self._chunk(*args)
        graph, static, out = self._graphs[key]
        for s, a in zip(static, args):
            s.copy_(a)
        graph.replay()
        return out[0].clone(), out[1].clone()

    # -- the call ----------------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, y: torch.Tensor, I_ref: torch.Tensor, delta: torch.Tensor,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss (B,), grad)`` for clean (already noised) images ``x`` (B, C, H, W), labels ``y`` (B,),
        reference maps ``I_ref`` (B, H*W) and ``delta`` (C, H, W) or (B, C, H, W). ``generator``: the
        smoothgrad draws' random generator (``method="smoothgrad"`` only)."""
        B = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() > 0 else 0
        if self.validate:
            check_images("x", x)
            check_labels("y", y, B)
            width = x.shape[2] * x.shape[3] if self.spec.postprocess == "abs_sum_l1" else x[0].numel()
            check_maps("I_ref", I_ref, B, width)
            check_delta("delta", delta, tuple(x.shape[1:]), B)
        I_ref, delta = I_ref.to(x.dtype), delta.to(x.dtype)
        first = self.setup_time_s_ is None
        t0 = time.perf_counter()
        self._resolve(x, delta)
        if not self._lean:
            # "auto" again, so that a batch the linearisation refuses falls back to double backward
            mode = "auto" if self.hvp == "auto" and self.hvp_ == "piecewise_linear" else self.hvp_
            with self._autocast():
                loss, grad = _loss_grad(self.model_, self._layout(x), y, I_ref, self._layout(delta), self.spec,
                                        mode, 0.0, generator, self.fd_step)
            if mode == "auto":
                self.hvp_ = resolve_hvp(self.model_, self._layout((x + delta).detach()), self.spec, "auto")
            out = loss, grad
        else:
            self._setup_compile()
            out = self._lean_call(x, y, I_ref, delta)
        if first:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.setup_time_s_ = time.perf_counter() - t0
        return out

    def _lean_call(self, x, y, I_ref, delta):
        B = x.shape[0]
        per_sample = delta.dim() == 4
        scale = (x + delta).reshape(B, -1).norm(dim=1).mean().detach()
        static = self.compile or self.cuda_graph or self.static_batch is not None
        S = B if not static else (self.static_batch or B)
        if self.static_batch is None and static:
            self.static_batch = S
        losses, parts = [], []
        for lo in range(0, B, S):
            hi = min(lo + S, B)
            n = hi - lo
            xs, ys, Is = x[lo:hi], y[lo:hi], I_ref[lo:hi]
            ds = delta[lo:hi] if per_sample else delta
            if static and n < S:  # pad with copies of the first row (weight 0 below)
                pad = [0] * (S - n)
                xs, ys, Is = (torch.cat([t, t[pad]]) for t in (xs, ys, Is))
                if per_sample:
                    ds = torch.cat([ds, ds[pad]])
            try:
                loss, jtu = self._run_chunk((xs, ys, Is, ds, scale))
            except NotPiecewiseLinearError as e:  # this batch left the lists: exact or refuse
                if self.hvp != "auto":
                    raise ValueError(f"hvp='piecewise_linear' does not apply to this model on this batch: {e}. "
                                     "Use hvp='double_backward' (exact for any model) or hvp='auto'.") from None
                mark_refused(self.model_, self._layout((xs + ds).detach()), str(e))
                self.hvp_ = "double_backward"
                self.notes_.append(f"piecewise_linear refused on a batch ({e}); using double_backward")
                loss, jtu = self._run_chunk((xs, ys, Is, ds, scale))
            losses.append(loss[:n])
            parts.append(jtu[:n].to(x.dtype) if per_sample else jtu[:n].to(x.dtype).sum(0))
        loss = torch.cat(losses).detach()
        if per_sample:
            return loss, torch.cat(parts).contiguous() / B
        return loss, (sum(parts) / B).contiguous()

    def __repr__(self) -> str:
        return (f"FastStep(hvp={self.hvp_ or self.hvp!r}, precision={self.precision!r}, channels_last={self.channels_last}, "
                f"compile={self.compile}, cuda_graph={self.cuda_graph})")


def fast_step(model: nn.Module, spec: SaliencySpec | None = None, **options: Any) -> FastStep:
    """A :class:`FastStep` for ``model`` (see its arguments): ``step(x, y, I_ref, delta) -> (loss, grad)``."""
    return FastStep(model, spec, **options)


def _default_candidates(device: torch.device, spec: SaliencySpec) -> list[dict]:
    if device.type == "cuda":
        cands = [{"channels_last": True}]
        if _lean_supported(spec):
            cands.append({"channels_last": True, "cuda_graph": True})
        return cands
    return [{}, {"channels_last": True}, {"pool_channels_last": False},
            {"channels_last": True, "stem_space_to_depth": False}]


def autotune_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, I_ref: torch.Tensor, delta: torch.Tensor,
                  spec: SaliencySpec | None = None, *, candidates: list[dict] | None = None, repeat: int = 2,
                  **fixed: Any) -> FastStep:
    """The fastest :class:`FastStep` among option sets, timed on this batch (like cuDNN's benchmark mode).

    Each candidate (a dict of :class:`FastStep` options, merged over ``fixed``) is built, called once
    (warm-up, compilation, capture) and timed over ``repeat`` calls; the one with the smallest median
    is returned. Every default candidate computes the same function (layouts, kernel choices, graph
    capture), so tuning never changes the result beyond float rounding; ``fixed`` holds what must not
    vary (``hvp``, ``precision``, ...).

    Args:
        model, spec: as :class:`FastStep`.
        x, y, I_ref, delta: a representative batch (as :meth:`FastStep.__call__`).
        candidates: option sets to try (default: CPU: NCHW / channels_last, with and without the
            channels_last pooling and the space-to-depth stem; CUDA: channels_last, with and without a
            CUDA graph).
        repeat: timed calls per candidate (>= 1).
        **fixed: options common to every candidate.

    Returns:
        The chosen step, with ``tuning_``: a list of ``{"options", "median_s", "setup_s"}`` (or
        ``"error"``) per candidate, ``tuning_choice_`` (the chosen candidate's options) and
        ``tuning_time_s_``.
    """
    check_positive("repeat", repeat, integer=True)
    t_start = time.perf_counter()
    spec = spec if spec is not None else SaliencySpec()
    device = _model_device(model) if isinstance(model, nn.Module) else torch.device("cpu")
    cands = candidates if candidates is not None else _default_candidates(device, spec)
    if not cands:
        raise ValueError("candidates must hold at least one option set")
    rows, best, best_t = [], None, math.inf
    for opts in cands:
        if not isinstance(opts, dict):
            raise TypeError(f"each candidate must be a dict of FastStep options, got {type(opts).__name__}")
        options = {**fixed, **opts}
        try:
            step = FastStep(model, spec, **options)
            step(x, y, I_ref, delta)
            times = []
            for _ in range(repeat):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                step(x, y, I_ref, delta)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - t0)
        except (RuntimeError, ValueError, TypeError) as exc:
            rows.append({"options": opts, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"})
            continue
        med = sorted(times)[len(times) // 2]
        rows.append({"options": opts, "median_s": med, "setup_s": step.setup_time_s_, "notes": list(step.notes_)})
        if med < best_t:
            best, best_t, choice = step, med, opts
    if best is None:
        raise ValueError(f"every candidate failed: {rows}")
    best.tuning_, best.tuning_choice_ = rows, dict(choice)
    best.tuning_time_s_ = time.perf_counter() - t_start
    return best
