"""The one table of the custom ops: for each ``upi_fast::<op>``, its schema and its implementations.

Everything else is derived from :data:`OPS`:

* :mod:`upi_fast.ops` defines every schema below, once, in the namespace ``upi_fast``
  (:func:`define_schemas`); the C++/CUDA extension's own namespace ``upi_fast_cuda`` gets the
  same schemas (again :func:`define_schemas`) before ``upi_fast._C`` is imported, and so does the
  emulated build's ``upi_fast_emu`` in tests/test_cuda_host_emulated.py;
* the ``torch`` reference is the op's default kernel (``CompositeExplicitAutograd``), and the one
  Python dispatcher of :mod:`upi_fast.ops` (registered once for ``CPU`` and ``CUDA``) chooses per
  call among ``torch`` / ``triton`` / ``cuda``, each named here: a ``module:function`` for the
  Python ones, ``namespace::op`` for the extension's kernel (registered for the ``CUDA`` key by
  ``csrc/register.cpp``, implemented by ``cuda_function`` in ``cuda_source``);
* ``tests`` are the test files that check the implementations against each other.

``tests/test_op_table.py`` checks that the table is complete (every ``upi_fast::`` op defined is here)
and true (every function, file and test named exists; the extension and its emulated build register
exactly these ops).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["OpSpec", "OPS", "NAMESPACE", "CUDA_NAMESPACE", "IMPLEMENTATIONS", "by_name", "define_schemas",
           "load"]

#: Namespace of the public ops (``torch.ops.upi_fast``).
NAMESPACE = "upi_fast"
#: Namespace of the C++/CUDA extension's kernels (``torch.ops.upi_fast_cuda``, ``CUDA`` key only).
CUDA_NAMESPACE = "upi_fast_cuda"
#: The implementations an op can have, in the order of the table's columns.
IMPLEMENTATIONS = ("torch", "triton", "cuda")


@dataclass(frozen=True)
class OpSpec:
    """One op: ``schema`` without the namespace; ``torch`` and ``triton`` as ``module:function``;
    ``cuda`` as the extension's ``namespace::op``, with ``cuda_function`` (namespace ``upi_fast``
    in C++) defined in ``cuda_source``; ``tests`` as paths relative to the repository root."""

    name: str
    schema: str
    torch: str
    triton: str
    cuda: str
    cuda_function: str
    cuda_source: str
    tests: tuple[str, ...]

    def implementation(self, backend: str) -> str:
        """The table's entry of ``backend`` (one of :data:`IMPLEMENTATIONS`)."""
        if backend not in IMPLEMENTATIONS:
            raise ValueError(f"backend must be one of {IMPLEMENTATIONS}, got {backend!r}")
        return getattr(self, backend)


_CASES = "tests/_cuda_ext_cases.py"
_EMULATED = "tests/test_cuda_host_emulated.py"
_GPU = "tests/test_gpu_cuda_ext.py"

OPS: tuple[OpSpec, ...] = (
    OpSpec(
        name="saliency_dissim",
        schema="saliency_dissim(Tensor g, Tensor ref, str kind, bool compute_grad) -> (Tensor, Tensor)",
        torch="upi_fast.ops.saliency_dissim:saliency_dissim_reference",
        triton="upi_fast.kernels.saliency_dissim:saliency_dissim_triton",
        cuda=f"{CUDA_NAMESPACE}::saliency_dissim",
        cuda_function="saliency_dissim_cuda",
        cuda_source="csrc/saliency_dissim.cu",
        tests=("tests/test_ops_reference.py", "tests/test_kernels_saliency_dissim.py", _CASES, _EMULATED, _GPU),
    ),
    OpSpec(
        name="softplus",
        schema="softplus(Tensor x, float beta) -> Tensor",
        torch="upi_fast.ops.softplus:softplus_reference",
        triton="upi_fast.kernels.softplus:softplus_fwd_triton",
        cuda=f"{CUDA_NAMESPACE}::softplus",
        cuda_function="softplus_cuda",
        cuda_source="csrc/softplus.cu",
        tests=("tests/test_ops_reference.py", "tests/test_kernels_softplus.py", _CASES, _EMULATED, _GPU),
    ),
    OpSpec(
        name="softplus_backward",
        schema="softplus_backward(Tensor grad_y, Tensor x, float beta) -> Tensor",
        torch="upi_fast.ops.softplus:softplus_backward_reference",
        triton="upi_fast.kernels.softplus:softplus_bwd_triton",
        cuda=f"{CUDA_NAMESPACE}::softplus_backward",
        cuda_function="softplus_backward_cuda",
        cuda_source="csrc/softplus.cu",
        tests=("tests/test_kernels_softplus.py", _CASES, _EMULATED, _GPU),
    ),
    OpSpec(
        name="softplus_double_backward",
        schema="softplus_double_backward(Tensor gg, Tensor grad_y, Tensor x, float beta) -> (Tensor, Tensor)",
        torch="upi_fast.ops.softplus:softplus_double_backward_reference",
        triton="upi_fast.kernels.softplus:softplus_bwd2_triton",
        cuda=f"{CUDA_NAMESPACE}::softplus_double_backward",
        cuda_function="softplus_double_backward_cuda",
        cuda_source="csrc/softplus.cu",
        tests=("tests/test_kernels_softplus.py", _CASES, _EMULATED, _GPU),
    ),
    OpSpec(
        name="sketch_update",
        schema="sketch_update(Tensor(a!) W, Tensor A, int row_offset, int seed, bool normalize) -> ()",
        torch="upi_fast.ops.sketch_update:sketch_update_reference",
        triton="upi_fast.kernels.sketch_update:sketch_update_triton",
        cuda=f"{CUDA_NAMESPACE}::sketch_update",
        cuda_function="sketch_update_cuda",
        cuda_source="csrc/sketch_update.cu",
        tests=("tests/test_ops_reference.py", "tests/test_kernels_sketch_update.py", _CASES, _EMULATED, _GPU),
    ),
)


def by_name(name: str) -> OpSpec:
    """The table's row of op ``name``."""
    for spec in OPS:
        if spec.name == name:
            return spec
    raise KeyError(f"no op {name!r} in upi_fast/ops/table.py")


def define_schemas(lib: torch.library.Library) -> torch.library.Library:
    """Define every op of the table in ``lib``'s namespace (a ``torch.library.Library`` of kind ``DEF``
    for ``upi_fast``, the extension's ``upi_fast_cuda``, the emulated build's ``upi_fast_emu``; the
    dispatcher names the file and line that made ``lib``); returns ``lib``, which owns the
    definitions (keep it alive)."""
    for spec in OPS:
        lib.define(spec.schema)
    return lib


def load(target: str) -> Callable:
    """The callable a table entry names: ``module:function``, or ``namespace::op`` (the op's default
    overload in ``torch.ops``; it must be defined, and for the extension's, loaded)."""
    if "::" in target:
        ns, op = target.split("::")
        return getattr(getattr(torch.ops, ns), op).default
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)
