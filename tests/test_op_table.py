"""The table of the custom ops (``upi_fast/ops/table.py``) is complete and true.

* Complete: every ``upi_fast::`` op the dispatcher knows is a row of the table, and every row is an op.
* True: the schemas defined are the table's; the torch reference and the Triton launcher it names
  import, and take the schema's arguments; the CUDA kernel's C++ function is defined in the ``.cu``
  file named and registered under the op's name in ``csrc/register.cpp``; the test files named exist
  and exercise the op; the extension (when built) and its emulated build register exactly the
  table's ops, in their own namespaces, and nothing for ``upi_fast::``.
"""
from __future__ import annotations

import inspect
import os
import re

import pytest
import torch

import upi_fast.ops as ops
from upi_fast.ops.table import CUDA_NAMESPACE, IMPLEMENTATIONS, NAMESPACE, OPS, by_name, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(spec.name for spec in OPS)
REQUIRE_EXT = os.environ.get("UPI_FAST_REQUIRE_EXT", "0") not in ("", "0")


def _ops_in(namespace: str) -> list[str]:
    prefix = namespace + "::"
    return sorted({n[len(prefix):].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith(prefix)})


def _read(path: str) -> str:
    with open(os.path.join(ROOT, path)) as fh:
        return fh.read()


def _arg_names(spec) -> list[str]:
    return [a.name for a in getattr(torch.ops.upi_fast, spec.name).default._schema.arguments]


def test_every_upi_fast_op_is_in_the_table_once():
    assert len(NAMES) == len(set(NAMES))
    assert _ops_in(NAMESPACE) == NAMES
    assert sorted(ops._REGISTRY) == NAMES
    assert all(sorted(ops._REGISTRY[name]) == sorted(IMPLEMENTATIONS) for name in NAMES)
    assert by_name("softplus").name == "softplus"
    with pytest.raises(KeyError, match="no op"):
        by_name("relu")


@pytest.mark.parametrize("spec", OPS, ids=lambda s: s.name)
def test_schema_is_the_tables(spec):
    schema = getattr(torch.ops.upi_fast, spec.name).default._schema
    assert str(schema) == f"{NAMESPACE}::{spec.schema}"
    assert spec.name == spec.schema.split("(")[0]


@pytest.mark.parametrize("spec", OPS, ids=lambda s: s.name)
def test_python_implementations_exist_and_take_the_schemas_arguments(spec):
    want = _arg_names(spec)
    for backend in ("torch", "triton"):
        fn = load(spec.implementation(backend))
        params = [p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        assert params == want, (backend, spec.implementation(backend), params, want)
    assert spec.torch.startswith("upi_fast.ops.") and spec.triton.startswith("upi_fast.kernels.")
    # the op's default kernel (CompositeExplicitAutograd) is the table's torch reference
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{spec.name}", "CompositeExplicitAutograd")


@pytest.mark.parametrize("spec", OPS, ids=lambda s: s.name)
def test_cuda_kernel_is_defined_in_its_source_and_registered_under_its_name(spec):
    ns, name = spec.cuda.split("::")
    assert ns == CUDA_NAMESPACE and name == spec.name
    source = _read(spec.cuda_source)
    assert re.search(rf"\b{spec.cuda_function}\s*\(", source), f"{spec.cuda_function} not in {spec.cuda_source}"
    assert re.search(rf"\b{spec.cuda_function}\s*\(", _read("csrc/upi_fast.h")), "not declared in upi_fast.h"
    register = _read("csrc/register.cpp")
    assert re.search(rf'm\.impl\("{spec.name}",\s*TORCH_FN\(upi_fast::{spec.cuda_function}\)\)', register)


def test_register_cpp_lists_exactly_the_tables_ops():
    register = _read("csrc/register.cpp")
    body = re.search(r"static const std::vector<std::string> ops = \{(.*?)\};", register, re.S).group(1)
    assert sorted(re.findall(r'"(\w+)"', body)) == NAMES
    assert sorted(re.findall(r'm\.impl\("(\w+)"', register)) == NAMES
    assert re.search(rf"#define UPI_FAST_OPS_NAMESPACE {CUDA_NAMESPACE}\b", register)


@pytest.mark.parametrize("spec", OPS, ids=lambda s: s.name)
def test_tests_named_exist_and_exercise_the_op(spec):
    assert spec.tests
    for path in spec.tests:
        assert os.path.isfile(os.path.join(ROOT, path)), path
        text = _read(path)
        # the op by name, or its family (the .cu file's: softplus for the backward passes, which
        # e.g. check_softplus_all_passes covers)
        family = os.path.splitext(os.path.basename(spec.cuda_source))[0]
        assert spec.name in text or family in text, (path, spec.name)


def test_the_extension_registers_the_tables_ops_in_its_own_namespace():
    ext = ops._cuda_ext()
    if ext is None:
        msg = f"the extension upi_fast._C is not built ({ops._state.get('ext_error')})"
        if REQUIRE_EXT:
            pytest.fail("UPI_FAST_REQUIRE_EXT=1 but " + msg)
        pytest.skip(msg)
    assert ext.ops_namespace == CUDA_NAMESPACE == ext.build_info()["ops_namespace"]
    assert sorted(ext.registered_ops()) == NAMES == sorted(ext.build_info()["ops"])
    assert _ops_in(CUDA_NAMESPACE) == NAMES
    for spec in OPS:
        assert str(load(spec.cuda)._schema) == f"{CUDA_NAMESPACE}::{spec.schema}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(spec.cuda, "CUDA")
        assert "csrc/register.cpp" in torch._C._dispatch_dump(spec.cuda)
        # nothing of the extension's for the public op
        assert "csrc/register.cpp" not in torch._C._dispatch_dump(f"{NAMESPACE}::{spec.name}")


def test_the_emulated_build_registers_the_same_set():
    import test_cuda_host_emulated as emulated  # builds (or reuses) the emulated extension
    module = emulated._build()
    ns = emulated.NAMESPACE
    assert module.ops_namespace == ns == module.build_info()["ops_namespace"]
    assert sorted(module.registered_ops()) == NAMES
    assert _ops_in(ns) == NAMES
    for spec in OPS:
        assert str(getattr(getattr(torch.ops, ns), spec.name).default._schema) == f"{ns}::{spec.schema}"
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"{ns}::{spec.name}", "CompositeExplicitAutograd")
