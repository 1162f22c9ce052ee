"""The C++/CUDA extension ``upi_fast._C`` on a machine without a GPU.

* Registration and dispatch (needs the built extension: ``.ci/build_ext.sh``): build information,
  the extension's kernels registered as ``upi_fast_cuda::<op>`` for ``CUDA`` and nothing for
  ``upi_fast::<op>``, and backend switches that leave every registration as it was (one per key,
  checked with ``_dispatch_dump``) while the one dispatcher picks the selected implementation.
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


def _registrations(qualname: str) -> dict[str, list[str]]:
    """Dispatch key -> the registrations for it (active first, then the inactive ones)."""
    regs: dict[str, list[str]] = {}
    for line in torch._C._dispatch_dump(qualname).splitlines():
        m = re.match(r"(\w+)(\[alias\])?( \(inactive\))?: (registered at .*)", line)
        if m and m.group(1) != "debug":  # "debug:" names where the schema was defined
            regs.setdefault(m.group(1), []).append(m.group(4))
    return regs


def _one_per_key(qualname: str) -> dict[str, str]:
    regs = _registrations(qualname)
    assert all(len(v) == 1 for v in regs.values()), torch._C._dispatch_dump(qualname)
    return {k: v[0] for k, v in regs.items()}


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


def test_the_extension_registers_its_own_ops_only(ext):
    """``upi_fast._C`` registers ``upi_fast_cuda::<op>`` for ``CUDA`` (one kernel, register.cpp) and
    nothing for ``upi_fast::<op>``, whose ``CPU`` and ``CUDA`` keys hold the one Python dispatcher."""
    assert ops._state["ext"] is ext and ext.ops_namespace == "upi_fast_cuda"
    for op in OPS:
        cuda_regs = _one_per_key(f"upi_fast_cuda::{op}")
        assert list(cuda_regs) == ["CUDA"] and "csrc/register.cpp" in cuda_regs["CUDA"], cuda_regs
        regs = _one_per_key(f"upi_fast::{op}")
        assert {"CPU", "CUDA", "Meta", "CompositeExplicitAutograd"} <= set(regs), regs
        assert all("csrc/register.cpp" not in where for where in regs.values()), regs
        assert "upi_fast/ops/__init__.py" in regs["CPU"] and "upi_fast/ops/__init__.py" in regs["CUDA"]


def test_switching_backends_never_adds_removes_or_shadows_a_registration(ext, monkeypatch):
    """With a (simulated) GPU, back and forth over every backend: the dispatcher's tables of the
    ``upi_fast::`` and ``upi_fast_cuda::`` ops stay exactly as they were (one registration per key),
    and only the implementation the one dispatcher picks for each device changes."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert upi_fast.backends()["cuda"] is True
    names = [f"{ns}::{op}" for ns in ("upi_fast", "upi_fast_cuda") for op in OPS]
    before = {n: torch._C._dispatch_dump(n) for n in names}
    for n in names:
        _one_per_key(n)
    triton_fns = {op: ops.table.load(ops.table.by_name(op).triton) for op in OPS}
    reference = {op: ops.table.load(ops.table.by_name(op).torch) for op in OPS}
    try:
        for name in ("cuda", "torch", "auto", "triton", "cuda", "auto", "torch", "triton", "cuda"):
            upi_fast.set_backend(name)
            assert {n: torch._C._dispatch_dump(n) for n in names} == before, name
            for op in OPS:
                on_cuda = ops.implementation(op, torch.device("cuda"))
                on_cpu = ops.implementation(op, "cpu")
                if name in ("cuda", "auto"):
                    assert on_cuda is getattr(torch.ops.upi_fast_cuda, op).default, (name, op, on_cuda)
                elif name == "triton":
                    assert on_cuda is triton_fns[op]
                else:
                    assert on_cuda is reference[op]
                # CPU tensors: the reference, or Triton under the interpreter
                assert on_cpu is (triton_fns[op] if name == "triton" and ops._interpreter_on() else reference[op])
    finally:
        monkeypatch.undo()
        upi_fast.set_backend("auto")
    assert {n: torch._C._dispatch_dump(n) for n in names} == before


def test_backends_is_honest_about_a_stale_extension(ext, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ext, "registered_ops", lambda: [op for op in OPS if op != "sketch_update"])
    assert upi_fast.backends()["cuda"] is False
    assert "sketch_update" in ops._why_unavailable("cuda")
    with pytest.raises(RuntimeError, match="'cuda' is unavailable.*sketch_update"):
        upi_fast.set_backend("cuda")


def test_forced_but_unusable_cuda_backend_raises_when_called(monkeypatch):
    monkeypatch.setitem(ops._state, "backend", "cuda")  # e.g. UPI_FAST_BACKEND=cuda without the extension
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'cuda' is unavailable"):
            ops.implementation("softplus", torch.device("cuda"))
    # CPU tensors are served by the torch reference (the cuda backend serves CUDA tensors only)
    x = torch.randn(6, dtype=torch.float64)
    assert torch.equal(torch.ops.upi_fast.softplus(x, 2.0), torch.nn.functional.softplus(x, 2.0, 20.0))


def test_loading_the_extension_late_changes_no_registration(ext):
    """End to end in a fresh process: upi_fast imported with the extension hidden, then the extension
    loaded: the tables of the ``upi_fast::`` ops do not change (its kernels are ``upi_fast_cuda::``
    ops), and the cuda backend's implementation becomes available. Also: importing upi_fast loads
    _C but does not initialise CUDA."""
    code = textwrap.dedent("""
        import sys, torch
        sys.modules["upi_fast._C"] = None           # hide the extension during the first import
        import upi_fast, upi_fast.ops as ops
        assert ops._state["ext"] is None and "upi_fast._C" in ops._state["ext_error"]
        names = ["upi_fast::" + op for op in ops._REGISTRY]
        before = {n: torch._C._dispatch_dump(n) for n in names}
        assert all("register.cpp" not in d for d in before.values())
        assert not torch._C._dispatch_has_kernel_for_dispatch_key("upi_fast_cuda::softplus", "CUDA")
        del sys.modules["upi_fast._C"]
        ops._state.pop("ext")
        assert ops._cuda_ext() is not None          # registers the C++ kernels now
        assert {n: torch._C._dispatch_dump(n) for n in names} == before
        assert torch._C._dispatch_has_kernel_for_dispatch_key("upi_fast_cuda::softplus", "CUDA")
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
