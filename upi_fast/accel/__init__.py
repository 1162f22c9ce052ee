"""Fast paths for the UPI-Grad step: a prepared model and a prepared step function.

Three modules: :mod:`.prepare` (the model: BatchNorm folding, layout rewrites, :func:`prepare_model`),
:mod:`.step` (:class:`FastStep`, :func:`fast_step`; its HVP modes are the reference's own,
:mod:`upi_fast.hvp_modes`, with the step's layout, autocast and precomputed scale as hooks) and
:mod:`.autotune` (:func:`autotune_step`).

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

from .autotune import autotune_step
from .prepare import ChannelsLastMaxPool, SpaceToDepthConv2d, fold_batchnorm, prepare_model
from .step import COMPILABLE_MODES, PRECISIONS, FastStep, fast_step

__all__ = ["fold_batchnorm", "prepare_model", "FastStep", "fast_step", "autotune_step", "SpaceToDepthConv2d",
           "ChannelsLastMaxPool", "PRECISIONS", "COMPILABLE_MODES"]
