"""The prepared step: :class:`FastStep` and :func:`fast_step` (:mod:`upi_fast.accel`)."""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Any, ContextManager

import torch
from torch import nn

from .._checks import check_choice, check_delta, check_images, check_labels, check_maps, check_model, check_positive
from ..hvp import HVP_MODES, SaliencySpec, _loss_grad
from ..hvp_modes import AUTO, DIRECTIONS, DOUBLE_BACKWARD, FIRST_ORDER_MODES, FORWARD, PIECEWISE_LINEAR, RESOLVED_MODES, \
    Hooks, double_backward
from ..piecewise import piecewise_or_fallback, resolve_hvp
from .prepare import _model_device, prepared_model

__all__ = ["FastStep", "fast_step", "PRECISIONS", "COMPILABLE_MODES"]

#: Modes the lean step runs (the forward mode runs the reference code on the prepared model).
LEAN_MODES = tuple(m for m in HVP_MODES if m != FORWARD)

logger = logging.getLogger("upi_fast")

#: Arithmetic of the model passes in :class:`FastStep` (``precision=``): float32, or autocast to bf16 / fp16.
PRECISIONS = ("fp32", "bf16", "fp16")
#: HVP modes whose step is first order only, hence valid under ``torch.compile``.
COMPILABLE_MODES = FIRST_ORDER_MODES


def _lean_supported(spec: SaliencySpec) -> bool:
    """Specs the lean step computes itself (no host synchronisation: CUDA-graph capturable)."""
    return (spec.saliency_method.single_point and not spec.multiplies_input and spec.fused
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
    """``grad_p target(p)`` (first order unless ``create_graph``), shaped like ``p``; no host
    synchronisation (the HVP modes' ``grad_at`` hook in the lean step)."""
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
            self.model_ = prepared_model(model, fold_bn=fold_bn, channels_last=self.channels_last,
                                         stem_space_to_depth=stem_space_to_depth, pool_channels_last=pool_channels_last)
        else:
            self.model_ = model
        self._fn_model = self.model_
        self.hvp_: str | None = None if hvp in RESOLVED_MODES else hvp
        self._lean = _lean_supported(spec) and hvp in LEAN_MODES
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
        """The lean step on one chunk (no argument checks, no host synchronisation): the shared HVP
        mode (:mod:`upi_fast.hvp_modes`) with this step's layout, autocast and batch-wide FD scale."""
        hooks = Hooks(layout=self._layout, autocast=self._autocast, grad_at=_input_grad, check_logits=False,
                      fd_scale=scale)
        if self.hvp_ == DOUBLE_BACKWARD:
            return double_backward(self._fn_model, x, delta, y, I_ref, self.spec, None, hooks)
        return DIRECTIONS[self.hvp_](self._fn_model, x + delta, y, I_ref, self.spec, None, hooks, self.fd_step)

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
            mode = AUTO if self.hvp == AUTO and self.hvp_ == PIECEWISE_LINEAR else self.hvp_
            with self._autocast():
                loss, grad = _loss_grad(self.model_, self._layout(x), y, I_ref, self._layout(delta), self.spec,
                                        mode, 0.0, generator, self.fd_step)
            if mode == AUTO:  # the verdict _loss_grad just cached (keyed by dtype and device: x serves)
                self.hvp_ = resolve_hvp(self.model_, x, self.spec, AUTO)
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
            args = (xs, ys, Is, ds, scale)
            loss, jtu = piecewise_or_fallback(self.model_, lambda: self._layout((xs + ds).detach()), self.hvp,
                                              self.hvp_, lambda mode: self._run_chunk(args), self._refused)
            losses.append(loss[:n])
            parts.append(jtu[:n].to(x.dtype) if per_sample else jtu[:n].to(x.dtype).sum(0))
        loss = torch.cat(losses).detach()
        if per_sample:
            return loss, torch.cat(parts).contiguous() / B
        return loss, (sum(parts) / B).contiguous()

    def _refused(self, reason: str) -> None:
        """A batch the linearisation refused (``hvp="auto"``): double backward from now on."""
        self.hvp_ = DOUBLE_BACKWARD
        self.notes_.append(f"piecewise_linear refused on a batch ({reason}); using double_backward")

    def __repr__(self) -> str:
        return (f"FastStep(hvp={self.hvp_ or self.hvp!r}, precision={self.precision!r}, channels_last={self.channels_last}, "
                f"compile={self.compile}, cuda_graph={self.cuda_graph})")


def fast_step(model: nn.Module, spec: SaliencySpec | None = None, **options: Any) -> FastStep:
    """A :class:`FastStep` for ``model`` (see its arguments): ``step(x, y, I_ref, delta) -> (loss, grad)``."""
    return FastStep(model, spec, **options)
