"""The C++/CUDA extension ``upi_fast._C`` on a machine without a GPU.

* Registration and dispatch (needs the built extension: ``.ci/build_ext.sh``): build information,
  a C++ kernel registered for the ``CUDA`` key of every op, and the backend switch moving the
  ``CUDA`` key between the C++ kernels and the Python router, checked with ``_dispatch_dump``.
  Skipped when the extension is not built, unless ``UPI_FAST_REQUIRE_EXT=1`` (CI), which fails.
* (The kernels and their host code without a GPU, under the emulator of ``csrc/emulate/``, are
  tested in ``tests/test_cuda_host_emulated.py``.)
* The build configuration of ``setup_cuda.py`` (toolkit discovery through a wrapper ``nvcc``,
  architecture flags, the ``UPI_FAST_BUILD_CUDA`` switch).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import upi_fast
import upi_fast.ops as ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRE_EXT = os.environ.get("UPI_FAST_REQUIRE_EXT", "0") not in ("", "0")
OPS = ("saliency_dissim", "softplus", "softplus_backward", "softplus_double_backward", "sketch_update")
sys.path.insert(0, ROOT)
import setup_cuda  # noqa: E402

# (No numerics marker: the float comparisons of the kernels moved to tests/test_cuda_host_emulated.py,
# which carries it.)


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
