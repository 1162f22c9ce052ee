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

Modules: :mod:`.calls` (the call lists, :func:`register_linear_function`), :mod:`.piecewise_calls`
(ReLU family, clamps, max / min, sort, max pooling), :mod:`.affine_calls` (affine calls with a
constant part), :mod:`.passes` (the primal and tangent ``TorchFunctionMode`` passes) and
:mod:`.core` (the graph guard and :class:`Linearization`).
"""
from __future__ import annotations

from .calls import LINEAR_FUNCTIONS, NotPiecewiseLinearError, register_linear_function
from .core import _GRAPH_NODES, Linearization, check_logits  # noqa: F401

__all__ = ["Linearization", "NotPiecewiseLinearError", "register_linear_function", "LINEAR_FUNCTIONS"]
