"""The C++/CUDA extension's host code and kernels without a GPU, under the host emulator.

``csrc/*.cu`` (kernels *and* tensor entry points: argument checks, launch configuration, grid sizing,
layout handling, dtype dispatch, output allocation) and ``csrc/register.cpp`` are compiled by g++
against ``csrc/emulate/`` (``emulate.h``: CUDA threads as fibers and the CUDA runtime calls the host
code makes; ``shim/``: the CUDA and c10/cuda headers mapped onto it) into a small torch extension.
``register.cpp`` registers the entry points, with the C++ signatures of the real build, as the ops
``upi_fast_emu::<op>`` (the real build's are ``upi_fast_cuda::<op>``), whose schemas come from the
same table as ``upi_fast::<op>``'s (``upi_fast/ops/table.py``). Device memory is host memory: the
entry points take CPU tensors.

* The cases of ``tests/test_gpu_cuda_ext.py`` (shared through ``tests/_cuda_ext_cases.py``) run
  against the emulated entry points on two emulated devices (2 and 132 multiprocessors), with every
  new CPU allocation poisoned (NaN bytes) during the call, and each launch checked to run on the
  current stream and device under a device guard.
* Then what only the emulator shows: the launch configuration of large problems (recorded, not
  run), launch errors reported by the CUDA runtime, empty inputs, misaligned (scalar path) inputs,
  the kernels' mutual consistency (gradcheck), a schema mismatch at import.
* Last, the kernels' raw launchers on raw pointers (ctypes on the same library): odd alignments,
  poisoned workspaces, bit identity of the generator with ``rademacher_columns``.

The build (two translation units, about 25 s on 2 cores) is cached under ``$UPI_FAST_CACHE``.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import shutil
import subprocess
import sys
import textwrap
from typing import NamedTuple

import pytest
import torch

import upi_fast.ops as upi_ops
from upi_fast.ops.table import define_schemas
from _cuda_ext_cases import (ALL_DTYPES, KINDS, OPS, SALIENCY_SHAPES, SKETCH_SHAPES, SOFTPLUS_LAYOUTS,
                             SOFTPLUS_SHAPES, Target, assert_rel, check_rademacher_columns,
                             check_saliency_all_kinds, check_saliency_layouts_and_errors, check_sketch,
                             check_sketch_errors_and_merge, check_softplus_all_passes, check_softplus_edges,
                             check_softplus_input_errors, check_softplus_layout, saliency_inputs, saliency_rtol)
from _tolerance import dtype_rtol
from upi_fast.ops.saliency_dissim import saliency_dissim_reference
from upi_fast.ops.sketch_update import rademacher_columns, sketch_update_reference
from upi_fast.ops.softplus import (softplus_backward_reference, softplus_double_backward_reference,
                                   softplus_reference)

# float results compared between code paths (kernels vs references): rerun by .ci/run with other CPU
# kernels forced
pytestmark = pytest.mark.numerics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
NAMESPACE = "upi_fast_emu"
# The emulator's devices (csrc/emulate/emulate.h: kMultiprocessors): what they report, what the host
# code uses (a device reporting 0 counts as 1).
REPORTED_SMS = {0: 2, 1: 132, 2: 0}
SMS = {d: max(n, 1) for d, n in REPORTED_SMS.items()}
OTHER_DEVICE = "meta"  # tensors the emulated kernels cannot read
# CUDA error codes (driver_types.h)
NO_KERNEL_IMAGE, OUT_OF_RESOURCES = 209, 701

_SCHEMA_LIB: list = []  # the upi_fast_emu schema definitions, alive for the session


def _define_schemas() -> torch.library.Library:
    """``upi_fast_emu::<op>`` for each op of the table, defined as ``upi_fast::<op>`` and the real
    build's ``upi_fast_cuda::<op>`` are (``upi_fast/ops/table.py``)."""
    return define_schemas(torch.library.Library(NAMESPACE, "DEF"))


def _build():
    """Compile (or reuse) and import the emulated extension; its schemas are defined first, so a C++
    signature that disagrees with them fails the import, as in the real build."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler to build the emulated extension")
    from torch.utils import cpp_extension
    if not _SCHEMA_LIB:
        _SCHEMA_LIB.append(_define_schemas())
    cache = os.environ.get("UPI_FAST_CACHE") or os.path.join(ROOT, "build")
    build_dir = os.path.join(cache, "cuda_emulator")
    os.makedirs(build_dir, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", "2")
    module = cpp_extension.load(
        name="upi_fast_emulated",
        sources=[os.path.join(CSRC, "emulate", "harness.cpp"), os.path.join(CSRC, "register.cpp")],
        extra_include_paths=[os.path.join(CSRC, "emulate", "shim"), CSRC],
        extra_cflags=["-O1", "-g0", "-U_FORTIFY_SOURCE", "-DUPI_FAST_EMULATE=1",
                      "-DUPI_FAST_BUILD_SYSTEM=emulator", "-DUPI_FAST_CUDA_ARCHS=none",
                      f"-DUPI_FAST_OPS_NAMESPACE={NAMESPACE}",
                      "-DUPI_FAST_DISPATCH_KEY=CompositeExplicitAutograd"],
        build_directory=build_dir, with_cuda=False, verbose=False)
    return module


class Launch(NamedTuple):
    kernel: str
    grid: tuple
    block: tuple
    smem: int
    stream: int
    device: int
    guards: int
    ran: bool


class Emulator:
    """The emulated extension: its module, its ops, and the emulated runtime (through ctypes)."""

    def __init__(self, module):
        self.module = module
        self.ops = getattr(torch.ops, NAMESPACE)
        self.lib = lib = ctypes.CDLL(module.__file__)
        P, I64, INT, U = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_size_t
        lib.upi_emu_softplus.argtypes = [INT, INT, P, P, P, P, P, I64, ctypes.c_double, INT]
        lib.upi_emu_saliency_workspace.restype = I64
        lib.upi_emu_saliency_workspace.argtypes = [INT, I64, I64, INT]
        lib.upi_emu_saliency.argtypes = [INT, P, P, P, P, P, I64, I64, I64, INT, INT]
        lib.upi_emu_sketch.argtypes = [INT, INT, P, P, P, I64, I64, I64, I64, I64, INT, INT]
        lib.upi_emu_rademacher_negative.restype = ctypes.c_uint32
        lib.upi_emu_rademacher_negative.argtypes = [ctypes.c_uint32] * 3
        lib.upi_emu_set_stream.restype = U
        lib.upi_emu_set_stream.argtypes = [U]
        lib.upi_emu_launch_count.restype = I64
        lib.upi_emu_launch_record.argtypes = [I64, ctypes.c_char_p, INT, ctypes.POINTER(I64)]
        self.stream = 0

    # -------------------------------------------------------------------------------- runtime
    @contextlib.contextmanager
    def on_device(self, device: int):
        before = self.lib.upi_emu_set_device(device)
        assert before >= 0, f"no emulated device {device}"
        try:
            yield
        finally:
            self.lib.upi_emu_set_device(before)

    @contextlib.contextmanager
    def on_stream(self, stream: int):
        before, self.stream = self.lib.upi_emu_set_stream(stream), stream
        try:
            yield
        finally:
            self.lib.upi_emu_set_stream(before)
            self.stream = before

    @contextlib.contextmanager
    def recording_only(self):
        before = self.lib.upi_emu_set_execute(0)
        try:
            yield
        finally:
            self.lib.upi_emu_set_execute(before)

    @contextlib.contextmanager
    def poisoned(self):
        before = self.lib.upi_emu_set_poison(1)
        try:
            yield
        finally:
            self.lib.upi_emu_set_poison(before)

    def launches(self) -> list[Launch]:
        out = []
        fields = (ctypes.c_int64 * 11)()
        name = ctypes.create_string_buffer(128)
        for i in range(self.lib.upi_emu_launch_count()):
            assert self.lib.upi_emu_launch_record(i, name, 128, fields) == 0
            f = list(fields)
            out.append(Launch(name.value.decode(), tuple(f[0:3]), tuple(f[3:6]), f[6], f[7], f[8], f[9], bool(f[10])))
        return out

    def clear(self) -> None:
        self.lib.upi_emu_clear_launches()

    # -------------------------------------------------------------------------------- calls
    def call(self, device: int, fn, expect_run: bool = True):
        """``fn()`` on ``device`` with new allocations poisoned; every launch it made must have run
        on that device, on the current stream, under a device guard (all released afterwards)."""
        self.clear()
        with self.on_device(device), self.poisoned():
            out = fn()
        launches = self.launches()
        assert launches, "the call launched no kernel"
        for la in launches:
            assert la.device == device and la.stream == self.stream and la.guards >= 1, la
            assert la.ran == expect_run and la.block[0] % 32 == 0 and la.block[0] <= 1024, la
        assert self.lib.upi_emu_live_guards() == 0
        return out

    def target(self, device: int) -> Target:
        return Target(f"emulator[device {device}: {REPORTED_SMS[device]} SMs]", self.ops,
                      lambda fn: self.call(device, fn))


@pytest.fixture(scope="module")
def emu() -> Emulator:
    return Emulator(_build())


@pytest.fixture(scope="module")
def targets(emu) -> list[Target]:
    """The emulated entry points on a small GPU (2 SMs: few blocks, long grid-stride loops, few
    chunks per sample) and an H100-sized one (132 SMs: many chunks per sample)."""
    return [emu.target(0), emu.target(1)]


# ------------------------------------------------------------------------------------------------
# Registration: the real register.cpp, into the emulated namespace
# ------------------------------------------------------------------------------------------------
def test_build_info_and_registration(emu):
    info = emu.module.build_info()
    assert info["build_system"] == "emulator" and info["cuda_archs"] == ["none"]
    assert sorted(info["ops"]) == sorted(OPS) == sorted(upi_ops._REGISTRY) == sorted(emu.module.registered_ops())
    assert info["torch_version"] == torch.__version__.split("+")[0] and info["host_compiler"]
    for op in OPS:
        dump = torch._C._dispatch_dump(f"{NAMESPACE}::{op}")
        assert str(getattr(torch.ops.upi_fast, op).default._schema).split("::", 1)[1] in dump
        line = [ln for ln in dump.splitlines() if ln.startswith("CompositeExplicitAutograd")]
        assert line and "csrc/register.cpp" in line[0], dump


def test_stale_schema_is_an_import_error_not_an_abort(emu):
    """register.cpp registers inside the module's init: a C++ signature that disagrees with the
    schema (here: the schema gained an argument) fails the import, and the process lives on."""
    code = textwrap.dedent(f"""
        import importlib.util, torch
        import upi_fast
        lib = torch.library.Library({NAMESPACE!r}, "DEF")
        for op in {OPS!r}:
            schema = str(getattr(torch.ops.upi_fast, op).default._schema).split("::", 1)[1]
            lib.define("softplus(Tensor x, float beta, int extra) -> Tensor" if op == "softplus" else schema)
        spec = importlib.util.spec_from_file_location({emu.module.__name__!r}, {emu.module.__file__!r})
        try:
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        except ImportError as exc:
            print("ImportError:", exc)
        print("alive")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0 and "alive" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]
    assert "ImportError: upi_fast._C: registering the CUDA kernels failed" in res.stdout, res.stdout
    assert "softplus" in res.stdout


def test_allocations_are_poisoned_during_calls(emu):
    """The poisoning the checks rely on: new CPU blocks are NaN inside ``poisoned()``, not after."""
    with emu.poisoned():
        inside = [torch.empty(n, dtype=dt) for n, dt in ((7, torch.float32), (1000, torch.float64),
                                                         (33, torch.bfloat16), (5, torch.float16))]
    assert all(torch.isnan(t).all() for t in inside)
    assert emu.lib.upi_emu_set_poison(0) == 0  # switched off again
    outside = torch.empty(1 << 16)
    outside.fill_(1.0)
    del outside
    assert not torch.isnan(torch.empty(1 << 16)).all()  # the default allocator again


# ------------------------------------------------------------------------------------------------
# The GPU tests' cases on the emulated entry points
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SOFTPLUS_SHAPES)
def test_softplus_all_passes(targets, dtype, shape):
    check_softplus_all_passes(targets, dtype, shape, "cpu")


@pytest.mark.parametrize("layout", SOFTPLUS_LAYOUTS)
def test_softplus_non_contiguous_inputs(targets, layout):
    check_softplus_layout(targets[0], layout, "cpu")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_softplus_far_from_the_threshold(targets, dtype):
    check_softplus_edges(targets[0], dtype, "cpu")


def test_softplus_input_checks_name_the_argument(emu, targets):
    check_softplus_input_errors(targets[0], "cpu", OTHER_DEVICE)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor, got device meta"):
        emu.ops.softplus(torch.empty(4, device=OTHER_DEVICE), 1.0)
    with pytest.raises(RuntimeError, match="gg must have the shape of x"):
        emu.ops.softplus_double_backward(torch.ones(3), torch.ones(4), torch.ones(4), 1.0)
    with pytest.raises(RuntimeError, match="beta must be a finite positive"):
        emu.ops.softplus(torch.ones(4), float("inf"))
    assert emu.lib.upi_emu_live_guards() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SALIENCY_SHAPES)
def test_saliency_dissim_all_kinds(targets, dtype, shape):
    check_saliency_all_kinds(targets, dtype, shape, "cpu")


def test_saliency_dissim_layouts_and_input_checks(emu, targets):
    check_saliency_layouts_and_errors(targets[0], "cpu", OTHER_DEVICE)
    with pytest.raises(RuntimeError, match="g must be a CUDA tensor, got device meta"):
        emu.ops.saliency_dissim(torch.empty(1, 1, 2, 2, device=OTHER_DEVICE), torch.empty(1, 4), "l2", True)


# Every dtype pair on every shape but the 150528-column one, which one pair runs (about 1 s a call
# emulated); its launch configuration is checked for every pair in test_sketch_update_launch_configuration.
_SKETCH_CASES = [(w, a, shape) for w in (torch.float32, torch.float64) for a in ALL_DTYPES for shape in SKETCH_SHAPES
                 if shape[2] < 100_000 or (w, a) == (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("w_dtype,a_dtype,shape", _SKETCH_CASES)
def test_sketch_update(targets, w_dtype, a_dtype, shape):
    check_sketch(targets[:1], w_dtype, a_dtype, *shape, "cpu")


def test_sketch_update_generates_exactly_rademacher_columns(targets):
    check_rademacher_columns(targets[:1], "cpu")


def test_sketch_update_input_checks_and_merges(emu, targets):
    check_sketch_errors_and_merge(targets[0], "cpu", OTHER_DEVICE)
    with pytest.raises(RuntimeError, match="W must be a CUDA tensor, got device meta"):
        emu.ops.sketch_update(torch.empty(2, 3, device=OTHER_DEVICE), torch.empty(1, 3), 0, 1, True)
    with pytest.raises(RuntimeError, match=r"W must be a 2-D \(k, d\) tensor"):
        emu.ops.sketch_update(torch.zeros(2, 3, 4), torch.zeros(1, 4), 0, 1, True)
    assert emu.lib.upi_emu_live_guards() == 0


# ------------------------------------------------------------------------------------------------
# Host code the GPU tests cannot see
# ------------------------------------------------------------------------------------------------
def _softplus_grid(n: int, vec_width: int, sm: int) -> int:
    """csrc/README.md: 256 threads, one item (a 16-byte vector, or one element of the scalar tail)
    per thread, at most 8 blocks per multiprocessor, grid-stride beyond."""
    items = n // vec_width + n % vec_width if vec_width > 1 else n
    return min(math.ceil(items / 256), 8 * sm)


def _saliency_plan(B: int, N: int, V: int, sm: int) -> tuple[int, int]:
    """(chunks per sample, chunk length): about 4 blocks per multiprocessor in all, each chunk a
    multiple of the vector width and at least one vector per thread of the 256."""
    nchunk = max(1, min(math.ceil(4 * sm / B), max(1, math.ceil(N / (256 * V)))))
    chunk = max(V, math.ceil(math.ceil(N / nchunk) / V) * V)
    return max(1, math.ceil(N / chunk)), chunk


@pytest.mark.parametrize("device", sorted(SMS))
def test_softplus_launch_configuration(emu, device):
    """Grid sizing for large n on every emulated device, vector path (aligned) and scalar path
    (a storage offset of one element), recorded without running."""
    sm = SMS[device]
    for dtype, n in ((torch.float32, (1 << 22) + 37), (torch.bfloat16, (1 << 22) + 5), (torch.float64, 1037),
                     (torch.float16, 3)):
        V = 16 // torch.empty(0, dtype=dtype).element_size()
        buf = torch.zeros(n + 1, dtype=dtype)
        for x, vec in ((buf[:n], True), (buf[1:], False)):
            assert (x.data_ptr() % 16 == 0) == vec
            with emu.recording_only():
                emu.call(device, lambda: emu.ops.softplus_double_backward(x, x, x, 2.0), expect_run=False)
            (la,) = emu.launches()
            assert la.kernel == "softplus_elementwise" and la.block == (256, 1, 1) and la.smem == 0
            assert la.grid == (_softplus_grid(n, V if vec else 1, sm), 1, 1), (dtype, n, vec, la)


@pytest.mark.parametrize("device", sorted(SMS))
def test_saliency_dissim_launch_configuration(emu, device):
    sm = SMS[device]
    for shape in ((1, 3, 224, 224), (64, 3, 33, 31), (2, 3, 1, 1), (3, 1, 512, 512), (1, 1, 1, 4099)):
        B, C, H, W = shape
        N = H * W
        for dtype in (torch.float32, torch.float64):
            V = 16 // torch.empty(0, dtype=dtype).element_size()
            g, ref = torch.zeros(shape, dtype=dtype), torch.zeros(B, N, dtype=dtype)
            nchunk, _ = _saliency_plan(B, N, V, sm)
            for compute_grad in (True, False):
                with emu.recording_only():
                    emu.call(device, lambda: emu.ops.saliency_dissim(g, ref, "cosine", compute_grad),
                             expect_run=False)
                names = [la.kernel for la in emu.launches()]
                grids = [la.grid[0] for la in emu.launches()]
                assert names == ["saliency_map", "saliency_stats", "saliency_grad"]
                assert grids == [B * nchunk, B * nchunk, B * (nchunk if compute_grad else 1)], (shape, dtype, grids)
                assert all(la.block == (256, 1, 1) for la in emu.launches())


@pytest.mark.parametrize("device", sorted(SMS))
def test_sketch_update_launch_configuration(emu, device):
    sm = SMS[device]
    for k, b, d in SKETCH_SHAPES + [(130, 33, 515), (1, 2000, 7)]:
        for w_dtype in (torch.float32, torch.float64):
            for a_dtype in ALL_DTYPES:
                W, A = torch.zeros(k, d, dtype=w_dtype), torch.zeros(b, d, dtype=a_dtype)
                for normalize in (True, False):
                    with emu.recording_only():
                        emu.call(device, lambda: emu.ops.sketch_update(W, A, 0, 1, normalize), expect_run=False)
                    got = [(la.kernel, la.grid[0], la.block[0]) for la in emu.launches()]
                    tiles = ("sketch_update_tiles", math.ceil(d / 256) * math.ceil(k / 16), 128)
                    norms = [("row_norms", min(b, 16 * sm), 256)] if normalize else []
                    assert got == norms + [tiles], (k, b, d, w_dtype, a_dtype, normalize)


def test_launches_use_the_current_stream(emu):
    x = torch.randn(300)
    g, ref = saliency_inputs((2, 2, 9, 7), torch.float32, "cpu")
    W = torch.zeros(3, 40)
    with emu.on_stream(0x5150):
        emu.call(0, lambda: emu.ops.softplus(x, 2.0))
        emu.call(0, lambda: emu.ops.saliency_dissim(g, ref, "l2", True))
        emu.call(0, lambda: emu.ops.sketch_update(W, torch.randn(5, 40), 0, 1, True))
        assert {la.stream for la in emu.launches()} == {0x5150}
    emu.call(0, lambda: emu.ops.softplus(x, 2.0))
    assert emu.launches()[0].stream == 0


def test_launch_errors_name_the_kernel_and_release_the_guard(emu):
    x = torch.randn(1000)
    emu.lib.upi_emu_inject_launch_error(NO_KERNEL_IMAGE)
    with pytest.raises(RuntimeError,
                       match="no kernel image of softplus_elementwise for this GPU.*TORCH_CUDA_ARCH_LIST"):
        emu.ops.softplus(x, 1.0)
    g, ref = saliency_inputs((2, 2, 9, 7), torch.float64, "cpu")
    emu.lib.upi_emu_inject_launch_error(OUT_OF_RESOURCES)
    with pytest.raises(RuntimeError, match="launching saliency_map failed: too many resources requested for launch"):
        emu.ops.saliency_dissim(g, ref, "l2", True)
    emu.lib.upi_emu_inject_launch_error(OUT_OF_RESOURCES)
    with pytest.raises(RuntimeError, match="launching row_norms failed"):
        emu.ops.sketch_update(torch.zeros(2, 8), torch.randn(3, 8), 0, 1, True)
    assert emu.lib.upi_emu_live_guards() == 0
    # the error was consumed: the next calls run and are right
    y = emu.call(0, lambda: emu.ops.softplus(x, 1.0))
    assert_rel(y, softplus_reference(x.double(), 1.0), torch.float32, "after")
    loss, _ = emu.call(0, lambda: emu.ops.saliency_dissim(g, ref, "l2", True))
    assert_rel(loss, saliency_dissim_reference(g, ref, "l2", False)[0], torch.float64, "after")


def test_empty_inputs_launch_nothing(emu):
    emu.clear()
    for dtype in ALL_DTYPES:
        x = torch.empty(0, 3, dtype=dtype)
        y = emu.ops.softplus(x, 1.0)
        gx = emu.ops.softplus_backward(x, x, 1.0)
        a, b = emu.ops.softplus_double_backward(x, x, x, 1.0)
        assert all(t.shape == x.shape and t.dtype == dtype for t in (y, gx, a, b))
    g = torch.empty(0, 3, 4, 5, dtype=torch.float64)
    loss, grad = emu.ops.saliency_dissim(g, torch.empty(0, 20), "l2", True)
    assert loss.shape == (0,) and grad.shape == g.shape
    loss, grad = emu.ops.saliency_dissim(g.to(memory_format=torch.channels_last), torch.empty(0, 20), "l2", True)
    assert grad.stride() == torch.empty_like(g.to(memory_format=torch.channels_last)).stride()
    for k, b, d in ((0, 3, 4), (2, 0, 4), (2, 3, 0)):
        W = torch.ones(k, d)
        emu.ops.sketch_update(W, torch.ones(b, d), 0, 1, True)
        assert torch.equal(W, torch.ones(k, d))
    assert emu.launches() == []


def test_saliency_dissim_empty_maps(targets):
    """H W = 0: every map is zero (inv = 0), the loss is that of I = 0, the gradient empty."""
    g, ref = torch.empty(2, 3, 0, 5), torch.empty(2, 0)
    for kind in KINDS:
        loss, grad = targets[0].call(lambda: targets[0].ops.saliency_dissim(g, ref, kind, True))
        want_loss, _ = saliency_dissim_reference(g.double(), ref.double(), kind, False)
        assert grad.shape == g.shape
        torch.testing.assert_close(loss.double(), want_loss, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_misaligned_inputs_take_the_scalar_path(targets, dtype):
    """Inputs at a storage offset of one element (not 16-byte aligned): the same values as aligned."""
    n, beta = 1037, 2.5
    gen = torch.Generator().manual_seed(3)
    vals = [(torch.randn(n + 1, generator=gen, dtype=torch.float64) * 4).to(dtype) for _ in range(3)]
    x, gy, gg = (v[1:] for v in vals)
    assert x.data_ptr() % 16 != 0
    xd, gyd, ggd = x.double(), gy.double(), gg.double()
    for t in targets:
        y, gx, (o1, o2) = t.call(lambda: (t.ops.softplus(x, beta), t.ops.softplus_backward(gy, x, beta),
                                          t.ops.softplus_double_backward(gg, gy, x, beta)))
        assert_rel(y, softplus_reference(xd, beta), dtype, f"{t.name} misaligned forward", factor=2)
        assert_rel(gx, softplus_backward_reference(gyd, xd, beta), dtype, f"{t.name} misaligned backward", factor=2)
        r1, r2 = softplus_double_backward_reference(ggd, gyd, xd, beta)
        assert_rel(o1, r1, dtype, f"{t.name} misaligned double backward", factor=2)
        assert_rel(o2, r2, dtype, f"{t.name} misaligned double backward", factor=2)
    if dtype in (torch.float32, torch.float64):  # saliency: g and ref misaligned, N a multiple of 4
        g0, ref0 = saliency_inputs((2, 3, 16, 16), dtype, "cpu", seed=4)
        g = torch.empty(g0.numel() + 1, dtype=dtype)[1:].view(g0.shape).copy_(g0)
        ref = torch.empty(ref0.numel() + 1, dtype=dtype)[1:].view(ref0.shape).copy_(ref0)
        assert g.is_contiguous() and g.data_ptr() % 16 != 0
        for t in targets:
            loss, grad = t.call(lambda: t.ops.saliency_dissim(g, ref, "rel_l2", True))
            want_loss, want_grad = saliency_dissim_reference(g0.double(), ref0.double(), "rel_l2", True)
            assert_rel(loss, want_loss, dtype, f"{t.name} misaligned saliency loss",
                       rtol=saliency_rtol(dtype, 3, 256, "rel_l2", want_loss, depth=1))
            assert_rel(grad, want_grad, dtype, f"{t.name} misaligned saliency grad",
                       rtol=saliency_rtol(dtype, 3, 256, "rel_l2", want_loss, depth=2))


def _kernel_softplus(ops, beta):
    """softplus with its derivatives taken from the other two kernels (not from upi_fast's autograd
    registration): gradcheck / gradgradcheck then test that the kernels are each other's derivatives."""

    class Backward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, gy, x):
            ctx.save_for_backward(gy, x)
            return ops.softplus_backward(gy, x, beta)

        @staticmethod
        def backward(ctx, gg):
            gy, x = ctx.saved_tensors
            return ops.softplus_double_backward(gg.contiguous(), gy, x, beta)

    class Forward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return ops.softplus(x, beta)

        @staticmethod
        def backward(ctx, gy):
            (x,) = ctx.saved_tensors
            return Backward.apply(gy.contiguous(), x)

    return Forward.apply


def _kernel_saliency_loss(ops, ref, kind):
    class Loss(torch.autograd.Function):
        @staticmethod
        def forward(ctx, g):
            loss, grad = ops.saliency_dissim(g, ref, kind, True)
            ctx.save_for_backward(grad)
            return loss

        @staticmethod
        def backward(ctx, grad_loss):
            (grad,) = ctx.saved_tensors
            return grad * grad_loss.view(-1, 1, 1, 1)

    return Loss.apply


def test_kernels_are_each_others_derivatives(emu):
    x = (torch.randn(37, dtype=torch.float64) * 0.5).requires_grad_(True)
    f = _kernel_softplus(emu.ops, 3.0)
    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))
    g = torch.randn(2, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    r = torch.rand(2, 15, dtype=torch.float64)
    for kind in KINDS:
        assert torch.autograd.gradcheck(_kernel_saliency_loss(emu.ops, r, kind), (g,))


def test_upi_fast_ops_reach_the_cpp_entry_points_through_the_one_dispatcher(emu, monkeypatch):
    """What the ``cuda`` backend does for CUDA tensors, on CPU tensors: the dispatcher registered for
    ``upi_fast::<op>`` calls the extension's op (here ``upi_fast_emu::<op>``, registered by the same
    register.cpp as the real build's ``upi_fast_cuda::<op>``), under upi_fast's own autograd formulas
    (first and second order: the backward ops are served by the C++ entry points too)."""
    from upi_fast.ops.saliency_dissim import saliency_dissim
    from upi_fast.ops.sketch_update import sketch_update
    from upi_fast.ops.softplus import softplus
    for op in OPS:  # the extension's op in the role of the table's "upi_fast_cuda::<op>"
        monkeypatch.setitem(upi_ops._REGISTRY[op], "cuda", getattr(emu.ops, op).default)
    monkeypatch.setitem(upi_ops._state, "backend", "cuda")
    monkeypatch.setattr(upi_ops, "resolve_backend", lambda device: "cuda")
    monkeypatch.setattr(upi_ops, "backends", lambda: {"torch": True, "triton": False, "cuda": True})
    emu.clear()
    x = (torch.randn(37, dtype=torch.float64) * 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: softplus(t, 3.0), (x,))
    assert torch.autograd.gradgradcheck(lambda t: softplus(t, 3.0), (x,))
    torch.testing.assert_close(softplus(x, 3.0), softplus_reference(x, 3.0), rtol=1e-13, atol=1e-15)
    g = torch.randn(2, 3, 5, 7, dtype=torch.float64, requires_grad=True)
    ref = torch.rand(2, 35, dtype=torch.float64)
    loss, grad = saliency_dissim(g, ref, "cosine")
    want_loss, want_grad = saliency_dissim_reference(g.detach(), ref, "cosine", True)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-13)
    (dg,) = torch.autograd.grad(loss.sum(), g)
    torch.testing.assert_close(dg, want_grad, rtol=1e-10, atol=1e-13)
    W, A = torch.zeros(5, 40, dtype=torch.float64), torch.randn(9, 40, dtype=torch.float64)
    want = W.clone()
    sketch_update(W, A, 3, 7, True)
    sketch_update_reference(want, A, 3, 7, True)
    torch.testing.assert_close(W, want, rtol=1e-12, atol=1e-13)
    launched = {la.kernel for la in emu.launches()}
    assert {"softplus_elementwise", "saliency_map", "saliency_stats", "saliency_grad",
            "row_norms", "sketch_update_tiles"} <= launched, launched


# ------------------------------------------------------------------------------------------------
# The kernels' raw launchers (ctypes), below the entry points
# ------------------------------------------------------------------------------------------------
_DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def _p(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _nan_like(t):
    return torch.full_like(t, float("nan"))


def _offset(t, off):
    """``t``'s values in a buffer starting ``off`` elements in (off = 1: not 16-byte aligned)."""
    buf = torch.empty(t.numel() + off, dtype=t.dtype)
    out = buf[off:]
    out.copy_(t.reshape(-1))
    return out.view(t.shape)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n,off", [(1037, 0), (1037, 1), (3, 0), (4099, 0)])
def test_raw_softplus_kernels(emu, dtype, n, off):
    lib = emu.lib
    torch.manual_seed(n + off)
    x = _offset((torch.randn(n, dtype=torch.float64) * 4).to(dtype), off)
    x[0] = 30.0  # above the threshold: y = x
    gy, gg = (_offset(torch.randn(n, dtype=torch.float64).to(dtype), off) for _ in range(2))
    beta = 2.5
    tol = {torch.float32: 2e-6, torch.float64: 1e-13, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    xd, gyd, ggd = x.double(), gy.double(), gg.double()

    y = _offset(_nan_like(x), off)
    assert lib.upi_emu_softplus(_DT[dtype], 0, _p(x), None, None, _p(y), None, n, beta, 2) == 0
    torch.testing.assert_close(y.double(), softplus_reference(xd, beta), rtol=tol, atol=tol)

    gx = _offset(_nan_like(x), off)
    assert lib.upi_emu_softplus(_DT[dtype], 1, _p(gy), _p(x), None, _p(gx), None, n, beta, 2) == 0
    torch.testing.assert_close(gx.double(), softplus_backward_reference(gyd, xd, beta), rtol=tol, atol=tol)

    o1, o2 = _offset(_nan_like(x), off), _offset(_nan_like(x), off)
    assert lib.upi_emu_softplus(_DT[dtype], 2, _p(gg), _p(gy), _p(x), _p(o1), _p(o2), n, beta, 2) == 0
    r1, r2 = softplus_double_backward_reference(ggd, gyd, xd, beta)
    torch.testing.assert_close(o1.double(), r1, rtol=tol, atol=tol)
    torch.testing.assert_close(o2.double(), r2, rtol=tol, atol=tol * beta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 3, 9, 7),     # N = 63: scalar path, one chunk
                                   (2, 2, 16, 32),   # N = 512: vector path
                                   (1, 2, 40, 53),   # N = 2120: vector path, 3 chunks per sample
                                   (2, 1, 37, 41),   # N = 1517: scalar path, 2 chunks per sample
                                   (2, 3, 1, 1)])
def test_raw_saliency_dissim_kernels(emu, dtype, shape):
    lib = emu.lib
    B, C, H, W = shape
    N = H * W
    torch.manual_seed(B * 1000 + N)
    g = torch.randn(shape, dtype=torch.float64)
    if H > 1:
        g[0, :, : H // 3] = 0.0  # zero entries: sign(g) = 0
    if B > 1:
        g[1] = 0.0  # an all-zero map: I = 0, zero gradient
    ref = torch.rand(B, N, dtype=torch.float64)
    ref /= ref.sum(1, keepdim=True)
    g, ref = g.to(dtype), ref.to(dtype)
    ws_n = lib.upi_emu_saliency_workspace(_DT[dtype], B, N, 2)
    s1 = g.double().abs().sum((1, 2, 3))
    natural = (1.0 / (s1[s1 > 0] * ref.double()[s1 > 0].norm(dim=1))).max().item() if (s1 > 0).any() else 1.0
    for kind_id, kind in enumerate(KINDS):
        want_loss, want_grad = saliency_dissim_reference(g.double(), ref.double(), kind, True)
        for with_grad in (True, False):
            loss = torch.full((B,), float("nan"), dtype=dtype)
            grad = _nan_like(g) if with_grad else None
            ws = torch.full((ws_n,), float("nan"), dtype=dtype)
            assert lib.upi_emu_saliency(_DT[dtype], _p(g), _p(ref), _p(loss), _p(grad), _p(ws), B, C, N,
                                        kind_id, 2) == 0
            tol = saliency_rtol(dtype, C, N, kind, want_loss, depth=1)
            torch.testing.assert_close(loss.double(), want_loss, rtol=tol, atol=tol)
            if with_grad:
                tol = saliency_rtol(dtype, C, N, kind, want_loss, depth=2)
                torch.testing.assert_close(grad.double(), want_grad, rtol=tol, atol=tol * natural)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("a_dtype", ALL_DTYPES)
def test_raw_sketch_update_kernels(emu, w_dtype, a_dtype):
    lib = emu.lib
    torch.manual_seed(7)
    for k, b, d, row_offset, seed, normalize in ((5, 37, 301, 123_456, 77, True),
                                                 (20, 45, 513, 2**32 - 45, -5, False),  # two sketch-row tiles
                                                 (3, 1, 1, 0, 2**40 + 3, True)):
        W0 = torch.randn(k, d, dtype=torch.float64)
        A = torch.randn(b, d, dtype=torch.float64).to(a_dtype)
        if b > 3:
            A[3] = 0  # a zero row stays zero when normalised
        W = W0.to(w_dtype).clone()
        want = W.double().clone()
        inv = torch.full((b,), float("nan"), dtype=w_dtype)
        assert lib.upi_emu_sketch(_DT[w_dtype], _DT[a_dtype], _p(W), _p(A), _p(inv), k, b, d, row_offset, seed,
                                  int(normalize), 2) == 0
        sketch_update_reference(want, A, row_offset, seed, normalize)
        tol = dtype_rtol(w_dtype, [b, d] if normalize else [b])
        torch.testing.assert_close(W.double(), want, rtol=tol, atol=tol)


def test_raw_generator_is_bit_identical_to_rademacher_columns(emu):
    for seed in (0, 1, 12345, 2**32 - 1):
        for start in (0, 1_000_003, 2**32 - 50):
            rows = torch.arange(start, start + 50)
            want = rademacher_columns(seed, rows, 37)  # (k, b) of +-1
            got = torch.tensor([[-1.0 if emu.lib.upi_emu_rademacher_negative(seed, int(r), j) else 1.0
                                 for r in rows.tolist()] for j in range(37)])
            assert torch.equal(got, want), (seed, start)
