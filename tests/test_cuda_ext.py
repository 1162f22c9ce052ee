"""The C++/CUDA extension ``upi_fast._C`` on a machine without a GPU.

* Registration and dispatch (needs the built extension: ``.ci/build_ext.sh``): build information,
  a C++ kernel registered for the ``CUDA`` key of every op, and the backend switch moving the
  ``CUDA`` key between the C++ kernels and the Python router, checked with ``_dispatch_dump``.
  Skipped when the extension is not built, unless ``UPI_FAST_REQUIRE_EXT=1`` (CI), which fails.
* The kernels' logic, without a GPU: ``csrc/*.cu`` compiled by g++ under the host emulator of
  ``csrc/emulate/`` and compared with the float64 PyTorch references (odd sizes, both vector and
  scalar paths, several chunks per sample, outputs poisoned with NaN).
* The build configuration of ``setup_cuda.py`` (toolkit discovery through a wrapper ``nvcc``,
  architecture flags, the ``UPI_FAST_BUILD_CUDA`` switch).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import upi_fast
import upi_fast.ops as ops
from upi_fast.ops.saliency_dissim import saliency_dissim_reference
from upi_fast.ops.sketch_update import rademacher_columns, sketch_update_reference
from upi_fast.ops.softplus import (softplus_backward_reference, softplus_double_backward_reference,
                                   softplus_reference)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRE_EXT = os.environ.get("UPI_FAST_REQUIRE_EXT", "0") not in ("", "0")
OPS = ("saliency_dissim", "softplus", "softplus_backward", "softplus_double_backward", "sketch_update")
sys.path.insert(0, ROOT)
import setup_cuda  # noqa: E402

# float results compared between code paths: rerun by .ci/run with other CPU kernels forced
pytestmark = pytest.mark.numerics


# ------------------------------------------------------------------------------------------------
# Registration and dispatch
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def ext():
    mod = ops._cuda_ext()
    if mod is None:
        msg = (f"the extension upi_fast._C is not built ({ops._state.get('ext_error')}); "
               "build it with .ci/build_ext.sh")
        if REQUIRE_EXT:
            pytest.fail("UPI_FAST_REQUIRE_EXT=1 but " + msg)
        pytest.skip(msg)
    return mod


def _active_cuda_kernel(op: str) -> str:
    """Where the kernel that serves the CUDA key of ``upi_fast::op`` was registered."""
    for line in torch._C._dispatch_dump(f"upi_fast::{op}").splitlines():
        if line.startswith("CUDA:"):
            return line
    return ""


def _cpp_registered(op: str) -> bool:
    return any(line.startswith("CUDA") and "csrc/register.cpp" in line
               for line in torch._C._dispatch_dump(f"upi_fast::{op}").splitlines())


def test_build_info(ext):
    info = ext.build_info()
    assert sorted(info["ops"]) == sorted(OPS) == sorted(ops._REGISTRY)
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert torch.version.cuda is not None
    assert info["cuda_version"].split(".")[0] == torch.version.cuda.split(".")[0]
    assert re.fullmatch(r"\d+\.\d+", info["nvcc_version"])
    assert info["cuda_archs"] and all(re.fullmatch(r"(sm|compute)_\d+[af]?", a) for a in info["cuda_archs"])
    assert info["cuda_arch_list"] and all(a.isdigit() for a in info["cuda_arch_list"])
    assert info["build_system"] in ("setuptools", "cmake") and info["host_compiler"]


def test_every_op_has_a_cpp_cuda_kernel_and_the_router_goes_on_top(ext):
    assert ops._state["ext"] is ext
    for op in OPS:
        assert _cpp_registered(op), torch._C._dispatch_dump(f"upi_fast::{op}")
    if torch.cuda.is_available() and ops.resolve_backend("cuda") == "cuda":
        pytest.skip("the cuda backend is in force: no router to remove")
    assert ops._state["cuda_lib"] is not None
    assert all("upi_fast/ops/__init__.py" in _active_cuda_kernel(op) for op in OPS)
    try:
        ops._state["cuda_lib"]._destroy()
        ops._state["cuda_lib"] = None
        for op in OPS:  # without the Python router, the C++ kernels serve CUDA
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"upi_fast::{op}", "CUDA")
            assert "csrc/register.cpp" in _active_cuda_kernel(op)
    finally:
        ops._sync_cuda_registration()
    assert all("upi_fast/ops/__init__.py" in _active_cuda_kernel(op) for op in OPS)


def test_backend_switch_moves_the_cuda_key(ext, monkeypatch):
    """With a (simulated) GPU: cuda/auto -> C++ kernels; torch/triton -> the Python router."""
    if torch.cuda.is_available():
        pytest.skip("runs with a simulated GPU on machines without one")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        assert upi_fast.backends()["cuda"] is True
        for name, where in (("cuda", "csrc/register.cpp"), ("torch", "upi_fast/ops/__init__.py"),
                            ("auto", "csrc/register.cpp"), ("triton", "upi_fast/ops/__init__.py"),
                            ("cuda", "csrc/register.cpp")):
            upi_fast.set_backend(name)
            assert all(where in _active_cuda_kernel(op) for op in OPS), (name, _active_cuda_kernel("softplus"))
    finally:
        monkeypatch.undo()
        ops._state["backend"] = "auto"
        ops._sync_cuda_registration()
    assert all("upi_fast/ops/__init__.py" in _active_cuda_kernel(op) for op in OPS)


def test_backends_is_honest_about_a_stale_extension(ext, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ext, "registered_ops", lambda: [op for op in OPS if op != "sketch_update"])
    assert upi_fast.backends()["cuda"] is False
    assert "sketch_update" in ops._why_unavailable("cuda")
    with pytest.raises(RuntimeError, match="'cuda' is unavailable.*sketch_update"):
        upi_fast.set_backend("cuda")


def test_forced_but_unusable_cuda_backend_raises_when_called(monkeypatch):
    monkeypatch.setitem(ops._state, "backend", "cuda")  # e.g. UPI_FAST_BACKEND=cuda without the extension
    with pytest.raises(RuntimeError, match="'cuda' is unavailable"):
        ops.implementation("softplus", torch.device("cuda"))


def test_extension_loaded_after_the_router_does_not_shadow_it(ext):
    """End to end in a fresh process: the router is registered first (the extension hidden), then the
    extension is imported (its C++ kernels would become the active CUDA kernels); upi_fast must
    put the router back on top. Also: importing upi_fast loads _C but does not initialise CUDA."""
    code = textwrap.dedent("""
        import sys, torch
        sys.modules["upi_fast._C"] = None           # hide the extension during the first import
        import upi_fast, upi_fast.ops as ops
        assert ops._state["ext"] is None and ops._state["cuda_lib"] is not None
        del sys.modules["upi_fast._C"]
        ops._state.pop("ext")
        assert ops._cuda_ext() is not None          # registers the C++ kernels now
        for op in ops._REGISTRY:
            active = [l for l in torch._C._dispatch_dump("upi_fast::" + op).splitlines() if l.startswith("CUDA:")]
            assert "upi_fast/ops/__init__.py" in active[0], active
        out = __import__("subprocess").run([sys.executable, "-c",
            "import sys, torch, upi_fast; assert 'upi_fast._C' in sys.modules; "
            "assert not torch.cuda.is_initialized(); print('clean')"], capture_output=True, text=True)
        assert "clean" in out.stdout, out.stderr
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "UPI_FAST_BACKEND"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-2000:] + res.stderr[-4000:]


# ------------------------------------------------------------------------------------------------
# The kernels under the host emulator
# ------------------------------------------------------------------------------------------------
_EMU_SOURCES = ["csrc/upi_fast.h", "csrc/saliency_dissim.cu", "csrc/softplus.cu", "csrc/sketch_update.cu",
                "csrc/emulate/emulate.h", "csrc/emulate/harness.cpp"]
_DT = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """The kernels compiled for the host (cached by source hash), loaded with ctypes."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the host emulation of the kernels")
    digest = hashlib.sha256()
    for rel in _EMU_SOURCES:
        with open(os.path.join(ROOT, rel), "rb") as fh:
            digest.update(fh.read())
    digest.update(torch.__version__.encode())
    cache = os.environ.get("UPI_FAST_CACHE") or str(tmp_path_factory.mktemp("emu"))
    os.makedirs(cache, exist_ok=True)
    lib_path = os.path.join(cache, f"upi_emu_{digest.hexdigest()[:16]}.so")
    if not os.path.exists(lib_path):
        tmp = f"{lib_path}.{os.getpid()}.tmp"
        cmd = [cxx, "-std=c++20", "-O1", "-U_FORTIFY_SOURCE", "-shared", "-fPIC",
               "-I" + os.path.join(os.path.dirname(torch.__file__), "include"),
               os.path.join(ROOT, "csrc", "emulate", "harness.cpp"), "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-4000:]
        os.replace(tmp, lib_path)
    lib = ctypes.CDLL(lib_path)
    P, I64, INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.upi_emu_softplus.argtypes = [INT, INT, P, P, P, P, P, I64, ctypes.c_double, INT]
    lib.upi_emu_saliency_workspace.restype = I64
    lib.upi_emu_saliency_workspace.argtypes = [INT, I64, I64, INT]
    lib.upi_emu_saliency.argtypes = [INT, P, P, P, P, P, I64, I64, I64, INT, INT]
    lib.upi_emu_sketch.argtypes = [INT, INT, P, P, P, I64, I64, I64, I64, I64, INT, INT]
    lib.upi_emu_rademacher_negative.restype = ctypes.c_uint32
    lib.upi_emu_rademacher_negative.argtypes = [ctypes.c_uint32] * 3
    return lib


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,off", [(1037, 0), (1037, 1), (3, 0), (4099, 0)])
def test_emulated_softplus_kernels(emu, dtype, n, off):
    torch.manual_seed(n + off)
    x = _offset((torch.randn(n, dtype=torch.float64) * 4).to(dtype), off)
    x[0] = 30.0  # above the threshold: y = x
    gy, gg = (_offset(torch.randn(n, dtype=torch.float64).to(dtype), off) for _ in range(2))
    beta = 2.5
    tol = {torch.float32: 2e-6, torch.float64: 1e-13, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    xd, gyd, ggd = x.double(), gy.double(), gg.double()

    y = _offset(_nan_like(x), off)
    assert emu.upi_emu_softplus(_DT[dtype], 0, _p(x), None, None, _p(y), None, n, beta, 2) == 0
    torch.testing.assert_close(y.double(), softplus_reference(xd, beta), rtol=tol, atol=tol)

    gx = _offset(_nan_like(x), off)
    assert emu.upi_emu_softplus(_DT[dtype], 1, _p(gy), _p(x), None, _p(gx), None, n, beta, 2) == 0
    torch.testing.assert_close(gx.double(), softplus_backward_reference(gyd, xd, beta), rtol=tol, atol=tol)

    o1, o2 = _offset(_nan_like(x), off), _offset(_nan_like(x), off)
    assert emu.upi_emu_softplus(_DT[dtype], 2, _p(gg), _p(gy), _p(x), _p(o1), _p(o2), n, beta, 2) == 0
    r1, r2 = softplus_double_backward_reference(ggd, gyd, xd, beta)
    torch.testing.assert_close(o1.double(), r1, rtol=tol, atol=tol)
    torch.testing.assert_close(o2.double(), r2, rtol=tol, atol=tol * beta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 3, 9, 7),     # N = 63: scalar path, one chunk
                                   (2, 2, 16, 32),   # N = 512: vector path
                                   (1, 2, 40, 53),   # N = 2120: vector path, 3 chunks per sample
                                   (2, 1, 37, 41),   # N = 1517: scalar path, 2 chunks per sample
                                   (2, 3, 1, 1)])
def test_emulated_saliency_dissim_kernels(emu, dtype, shape):
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
    ws_n = emu.upi_emu_saliency_workspace(_DT[dtype], B, N, 2)
    # natural size of the gradient entries, 1 / (||S||_1 ||ref||), for the absolute tolerance
    s1 = g.double().abs().sum((1, 2, 3))
    natural = (1.0 / (s1[s1 > 0] * ref.double()[s1 > 0].norm(dim=1))).max().item() if (s1 > 0).any() else 1.0
    for kind_id, kind in enumerate(("l2", "rel_l2", "cosine")):
        want_loss, want_grad = saliency_dissim_reference(g.double(), ref.double(), kind, True)
        for with_grad in (True, False):
            loss = torch.full((B,), float("nan"), dtype=dtype)
            grad = _nan_like(g) if with_grad else None
            ws = torch.full((ws_n,), float("nan"), dtype=dtype)
            assert emu.upi_emu_saliency(_DT[dtype], _p(g), _p(ref), _p(loss), _p(grad), _p(ws), B, C, N,
                                        kind_id, 2) == 0
            tol = 1e-5 if dtype == torch.float32 else 1e-12
            torch.testing.assert_close(loss.double(), want_loss, rtol=tol, atol=tol)
            if with_grad:
                torch.testing.assert_close(grad.double(), want_grad, rtol=tol * 10, atol=tol * natural)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("a_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_emulated_sketch_update_kernels(emu, w_dtype, a_dtype):
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
        assert emu.upi_emu_sketch(_DT[w_dtype], _DT[a_dtype], _p(W), _p(A), _p(inv), k, b, d, row_offset, seed,
                                  int(normalize), 2) == 0
        sketch_update_reference(want, A, row_offset, seed, normalize)
        tol = 2e-6 * (b ** 0.5) * 4 if w_dtype == torch.float32 else 1e-12
        torch.testing.assert_close(W.double(), want, rtol=tol, atol=tol)


def test_emulated_generator_is_bit_identical_to_rademacher_columns(emu):
    for seed in (0, 1, 12345, 2**32 - 1):
        for start in (0, 1_000_003, 2**32 - 50):
            rows = torch.arange(start, start + 50)
            want = rademacher_columns(seed, rows, 37)  # (k, b) of +-1
            got = torch.tensor([[-1.0 if emu.upi_emu_rademacher_negative(seed, int(r), j) else 1.0
                                 for r in rows.tolist()] for j in range(37)])
            assert torch.equal(got, want), (seed, start)


# ------------------------------------------------------------------------------------------------
# Build configuration (setup_cuda.py)
# ------------------------------------------------------------------------------------------------
def test_arch_flags():
    flags, targets = setup_cuda.arch_flags("8.0;9.0+PTX")
    assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                     "-gencode=arch=compute_90,code=compute_90"]
    assert targets == ["sm_80", "sm_90", "compute_90"]
    assert setup_cuda.arch_flags("9.0a 10.0")[1] == ["sm_90a", "sm_100"]
    with pytest.raises(setup_cuda.BuildConfigError, match="Hopper"):
        setup_cuda.arch_flags("Hopper")
    assert "9.0" in setup_cuda.DEFAULT_ARCH_LIST and "8.0" in setup_cuda.DEFAULT_ARCH_LIST


def _fake_toolkit(root, version="13.0"):
    os.makedirs(os.path.join(root, "bin"))
    os.makedirs(os.path.join(root, "include"))
    os.makedirs(os.path.join(root, "lib64"))
    nvcc = os.path.join(root, "bin", "nvcc")
    with open(nvcc, "w") as fh:
        fh.write(f"#!/bin/sh\necho 'Cuda compilation tools, release {version}, V{version}.1'\n")
    os.chmod(nvcc, 0o755)
    open(os.path.join(root, "include", "cuda_runtime.h"), "w").close()
    open(os.path.join(root, "lib64", "libcudart.so.13"), "w").close()


def test_find_cuda_home_resolves_a_wrapper_nvcc(tmp_path, monkeypatch):
    root = tmp_path / "toolkit-13"
    _fake_toolkit(str(root))
    wrapper_dir = tmp_path / "wrapper"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {root}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    assert setup_cuda.find_cuda_home("13.0") == os.path.realpath(root)
    # an explicit, valid CUDA_HOME wins; an invalid one is ignored
    other = tmp_path / "other"
    _fake_toolkit(str(other), "12.8")
    monkeypatch.setenv("CUDA_HOME", str(other))
    assert setup_cuda.find_cuda_home("13.0") == os.path.realpath(other)
    monkeypatch.setenv("CUDA_HOME", str(wrapper_dir))
    assert setup_cuda.find_cuda_home("13.0") == os.path.realpath(root)


def test_build_switch(monkeypatch):
    monkeypatch.setenv("UPI_FAST_BUILD_CUDA", "0")
    assert setup_cuda.extensions() == ([], {})
    monkeypatch.setenv("UPI_FAST_BUILD_CUDA", "maybe")
    with pytest.raises(setup_cuda.BuildConfigError, match="UPI_FAST_BUILD_CUDA"):
        setup_cuda.extensions()
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only torch
    monkeypatch.setenv("UPI_FAST_BUILD_CUDA", "auto")
    assert setup_cuda.extensions() == ([], {})
    monkeypatch.setenv("UPI_FAST_BUILD_CUDA", "1")
    with pytest.raises(setup_cuda.BuildConfigError, match="CPU-only"):
        setup_cuda.extensions()


def test_default_multi_arch_flags_reach_nvcc_intact(monkeypatch, tmp_path):
    """The default build targets several architectures. nvcc splits a ``-D`` value at commas, so an
    architecture list in a define once defined ``sm_90`` as a macro and broke CUDA's ``<nv/target>``
    (every default build failed; CI, building one architecture, did not see it). Checks the flags
    ``setup_cuda.extensions()`` hands to nvcc, and, where a toolkit is present, preprocesses a file
    with exactly those flags."""
    import torch as _torch
    if not _torch.version.cuda:
        pytest.skip("torch is a CPU-only build: setup_cuda builds nothing")
    home = setup_cuda.find_cuda_home(_torch.version.cuda)
    if home is None:
        pytest.skip("no CUDA toolkit")
    monkeypatch.setenv("UPI_FAST_BUILD_CUDA", "1")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    (ext,), _ = setup_cuda.extensions()
    nvcc_args = ext.extra_compile_args["nvcc"]
    assert sum(a.startswith("-gencode") for a in nvcc_args) >= 3  # 8.0, 9.0 and 9.0 PTX by default
    assert not [a for a in nvcc_args if a.startswith("-D") and "," in a], nvcc_args
    assert any(a.startswith("-DUPI_FAST_CUDA_ARCHS=") and "+" in a for a in ext.extra_compile_args["cxx"])
    src = tmp_path / "probe.cu"
    src.write_text("#include <nv/target>\n#if defined(sm_80) || defined(sm_90) || defined(compute_90)\n"
                   "#error an architecture name is defined as a macro\n#endif\nint probe() { return 1; }\n")
    defines = [a for a in nvcc_args if a.startswith("-D")]
    proc = subprocess.run([os.path.join(home, "bin", "nvcc"), "-E", "-x", "cu", *defines, str(src), "-o", os.devnull],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
