"""The C++/CUDA extension ``upi_fast._C`` on CUDA tensors, against the Triton kernels and the PyTorch
references: every op, every backend (``cuda``, ``triton``, ``torch``) selected through the same
dispatch layer (``set_backend``), compared with float64 references computed on the GPU, on sizes
that are not multiples of the block sizes, with the CUDA caching allocator poisoned (freed memory
filled with NaN bytes, so an output element a kernel forgets to write shows up as NaN).

The cases are shared with tests/test_cuda_host_emulated.py (tests/_cuda_ext_cases.py), which runs
them on CPU tensors against the same host code compiled under the emulator of csrc/emulate/.

Needs a CUDA device and the extension built for it (bench/gpu_check.sh does both), and the Triton
kernels compiled rather than interpreted:

    TRITON_INTERPRET=0 UPI_FAST_REQUIRE_EXT=1 python -m pytest -m gpu tests/test_gpu_cuda_ext.py
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import upi_fast
import upi_fast.ops as ops
from _cuda_ext_cases import (ALL_DTYPES, SALIENCY_SHAPES, SKETCH_SHAPES, SOFTPLUS_LAYOUTS, SOFTPLUS_SHAPES,
                             Target, check_rademacher_columns, check_saliency_all_kinds,
                             check_saliency_layouts_and_errors, check_sketch, check_sketch_errors_and_merge,
                             check_softplus_all_passes, check_softplus_edges, check_softplus_input_errors,
                             check_softplus_layout)
from upi_fast.ops.saliency_dissim import saliency_dissim
from upi_fast.ops.sketch_update import rademacher_columns, sketch_update
from upi_fast.ops.softplus import softplus

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DEV = "cuda"
REQUIRE_EXT = os.environ.get("UPI_FAST_REQUIRE_EXT", "0") not in ("", "0")
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(autouse=True)
def _require_ext():
    if ops._cuda_ext() is None or not upi_fast.backends()["cuda"]:
        msg = f"the cuda backend is unavailable: {ops._why_unavailable('cuda')}"
        if REQUIRE_EXT:
            pytest.fail("UPI_FAST_REQUIRE_EXT=1 but " + msg)
        pytest.skip(msg)


def _backends() -> list[str]:
    names = ["cuda", "torch"]
    if not INTERPRETED and upi_fast.backends()["triton"]:
        names.insert(1, "triton")
    return names


def _poison() -> None:
    """Fill freed blocks of both allocator pools with 0xFF bytes (NaN in every float dtype)."""
    torch.cuda.synchronize()
    blocks = [torch.full((n,), -1, dtype=torch.int32, device=DEV) for n in (1 << 8, 1 << 12, 1 << 16, 1 << 18,
                                                                             1 << 22, 1 << 25)]
    del blocks
    torch.cuda.synchronize()


def _with_backend(name: str, fn):
    upi_fast.set_backend(name)
    try:
        _poison()
        out = fn()
        torch.cuda.synchronize()
        return out
    finally:
        upi_fast.set_backend("auto")


def _target(name: str) -> Target:
    """The upi_fast:: ops on CUDA tensors, served by backend ``name``."""
    return Target(name, torch.ops.upi_fast, lambda fn: _with_backend(name, fn))


def _targets() -> list[Target]:
    return [_target(name) for name in _backends()]


# ------------------------------------------------------------------------------------------------ dispatch
def test_cuda_backend_serves_cuda_tensors_through_the_cpp_kernels():
    info = ops._cuda_ext().build_info()
    major, minor = torch.cuda.get_device_capability()
    cap = major * 10 + minor
    archs = info["cuda_archs"]
    assert f"sm_{cap}" in archs or any(a.startswith("compute_") and int(a[8:].rstrip("af")) <= cap for a in archs), \
        f"the extension has no code for sm_{cap}: {archs}"
    upi_fast.set_backend("auto")
    assert ops.resolve_backend(DEV) == "cuda"
    for op in ops._REGISTRY:
        # upi_fast::<op>: the one Python dispatcher for CUDA; upi_fast_cuda::<op>: the C++ kernel
        active = [l for l in torch._C._dispatch_dump(f"upi_fast::{op}").splitlines() if l.startswith("CUDA")]
        assert len(active) == 1 and "upi_fast/ops/__init__.py" in active[0], active
        cpp = [l for l in torch._C._dispatch_dump(f"upi_fast_cuda::{op}").splitlines() if l.startswith("CUDA")]
        assert len(cpp) == 1 and "csrc/register.cpp" in cpp[0], cpp
        assert ops.implementation(op, DEV) is getattr(torch.ops.upi_fast_cuda, op).default
    x = torch.randn(1037, device=DEV)
    y = torch.ops.upi_fast.softplus(x, 3.0)  # through the dispatcher: the C++ kernel's result, bit for bit
    assert torch.equal(y, torch.ops.upi_fast_cuda.softplus(x, 3.0))
    upi_fast.set_backend("torch")
    assert ops.implementation("softplus", DEV) is ops.table.load(ops.table.by_name("softplus").torch)
    assert torch.equal(torch.ops.upi_fast.softplus(x, 3.0), torch.nn.functional.softplus(x, 3.0, 20.0))
    upi_fast.set_backend("auto")


def test_importing_upi_fast_does_not_initialise_cuda():
    code = ("import sys, torch, upi_fast; assert 'upi_fast._C' in sys.modules; "
            "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ softplus
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SOFTPLUS_SHAPES)
def test_softplus_all_passes_all_backends(dtype, shape):
    check_softplus_all_passes(_targets(), dtype, shape, DEV)


@pytest.mark.parametrize("layout", SOFTPLUS_LAYOUTS)
def test_softplus_cuda_kernels_on_non_contiguous_inputs(layout):
    check_softplus_layout(_target("cuda"), layout, DEV)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_softplus_cuda_kernels_far_from_the_threshold(dtype):
    check_softplus_edges(_target("cuda"), dtype, DEV)


def test_softplus_autograd_through_the_cuda_kernels():
    upi_fast.set_backend("cuda")
    x = (torch.randn(37, device=DEV, dtype=torch.float64) * 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: softplus(t, 3.0), (x,))
    assert torch.autograd.gradgradcheck(lambda t: softplus(t, 3.0), (x,))


def test_softplus_cuda_input_checks_name_the_argument():
    upi_fast.set_backend("cuda")
    check_softplus_input_errors(_target("cuda"), DEV, "cpu")


# ------------------------------------------------------------------------------------------------ saliency
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SALIENCY_SHAPES)
def test_saliency_dissim_all_kinds_all_backends(dtype, shape):
    check_saliency_all_kinds(_targets(), dtype, shape, DEV)


def test_saliency_dissim_cuda_channels_last_and_autograd():
    upi_fast.set_backend("cuda")
    check_saliency_layouts_and_errors(_target("cuda"), DEV, "cpu")
    upi_fast.set_backend("cuda")
    gg = torch.randn(2, 2, 5, 7, device=DEV, dtype=torch.float64, requires_grad=True)
    r = torch.rand(2, 35, device=DEV, dtype=torch.float64)
    for kind in ("l2", "rel_l2", "cosine"):
        assert torch.autograd.gradcheck(lambda t: saliency_dissim(t, r, kind)[0], (gg,))


# ------------------------------------------------------------------------------------------------ sketch
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("a_dtype", ALL_DTYPES)
@pytest.mark.parametrize("k,b,d", SKETCH_SHAPES)
def test_sketch_update_all_backends(w_dtype, a_dtype, k, b, d):
    check_sketch(_targets(), w_dtype, a_dtype, k, b, d, DEV)


def test_sketch_update_generates_exactly_rademacher_columns():
    """W = 0, A = identity rows, no normalisation: W becomes Psi[:, rows] itself, bit for bit, through
    the ops (every backend) and through the Python wrapper (the cuda backend)."""
    check_rademacher_columns(_targets(), DEV)
    W = torch.zeros(40, 300, device=DEV)
    _with_backend("cuda", lambda: sketch_update(W, torch.eye(300, device=DEV), 7, -1, False))
    assert torch.equal(W, rademacher_columns(2**32 - 1, torch.arange(7, 307), 40).to(DEV))


def test_sketch_update_cuda_checks_and_merges():
    upi_fast.set_backend("cuda")
    check_sketch_errors_and_merge(_target("cuda"), DEV, "cpu")
