"""The optional C++/CUDA extension ``upi_fast._C`` for setup.py: :func:`extensions`.

``UPI_FAST_BUILD_CUDA`` decides:

* ``0`` (or ``false``/``no``/``off``): never build it;
* ``1`` (or ``true``/``yes``/``on``): build it, and fail with a clear message when that is impossible
  (torch not importable in the build environment, a CPU-only torch, no CUDA toolkit);
* unset or ``auto``: build it when torch is importable, is a CUDA build, a GPU is present
  (``torch.cuda.is_available()``, or ``nvidia-smi -L`` lists a device) and a CUDA toolkit is found;
  otherwise skip it with one line saying why and how to force it (the Triton and PyTorch backends
  still work). A machine with nvcc but no GPU therefore does not spend minutes compiling a module
  it can never use; CI (``.ci/build_ext.sh``) sets ``UPI_FAST_BUILD_CUDA=1`` to compile without one.

torch must be importable while building, so install with ``pip install --no-build-isolation -e .``
(under build isolation torch is absent from the build environment and the extension is skipped).

The toolkit root (``CUDA_HOME``) is discovered, never assumed: a valid ``CUDA_HOME``/``CUDA_PATH``
first, then the ``nvcc`` on ``PATH`` (resolved through symlinks and, for a wrapper script, by asking
it where it lives with ``nvcc --dryrun``), then the usual install folders; a root is valid when it
has ``bin/nvcc``, ``include/cuda_runtime.h`` and ``lib64/`` (or ``lib/``) with ``libcudart.so*``.
Among several, the one matching torch's CUDA major version is preferred.

Architectures: ``TORCH_CUDA_ARCH_LIST`` (e.g. ``"9.0"``, ``"8.0;9.0+PTX"``), default
``"8.0;9.0+PTX"`` (sm_80 and sm_90 machine code, compute_90 PTX for newer GPUs).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

__all__ = ["extensions", "find_cuda_home", "gpu_present", "arch_flags", "DEFAULT_ARCH_LIST", "SOURCES"]

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0+PTX"
# Relative to the repository root (setuptools wants relative source paths).
SOURCES = ["csrc/register.cpp", "csrc/saliency_dissim.cu", "csrc/softplus.cu", "csrc/sketch_update.cu"]
HEADERS = ["csrc/upi_fast.h"]
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _say(msg: str) -> None:
    print(f"[upi_fast setup] {msg}", file=sys.stderr, flush=True)


class BuildConfigError(RuntimeError):
    """UPI_FAST_BUILD_CUDA=1 was asked for but the extension cannot be built here."""


# ------------------------------------------------------------------------------------------------
# CUDA toolkit discovery
# ------------------------------------------------------------------------------------------------
def _is_toolkit_root(root: str | None) -> bool:
    if not root or not os.path.isdir(root):
        return False
    nvcc = os.path.join(root, "bin", "nvcc")
    if not (os.path.isfile(nvcc) and os.access(nvcc, os.X_OK)):
        return False
    if not os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
        return False
    return any(glob.glob(os.path.join(root, lib, "libcudart.so*")) for lib in ("lib64", "lib"))


def _toolkit_version(root: str) -> tuple[int, int] | None:
    """(major, minor) of the toolkit at ``root``, from ``nvcc --version``."""
    try:
        out = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _roots_from_nvcc(nvcc: str) -> list[str]:
    """Toolkit roots the ``nvcc`` at this path belongs to: its own folder (through symlinks) and, for
    a wrapper script, where the real nvcc is (asked with ``--dryrun``, or read from the script)."""
    roots = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        res = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (res.stdout + res.stderr).splitlines():
            m = re.match(r"#\$ (?:TOP|_HERE_)=(.+)$", line.strip())
            if m:
                here = os.path.realpath(m.group(1).strip().strip('"'))
                roots.append(os.path.dirname(here) if os.path.basename(here) == "bin" else here)
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open(nvcc, "rb") as fh:
            head = fh.read(65536)
        if not head.startswith(b"\x7fELF"):
            for path in re.findall(rb"(/[^\s'\"]+)/bin/nvcc\b", head):
                roots.append(os.path.realpath(path.decode(errors="replace")))
    except OSError:
        pass
    return roots


def find_cuda_home(torch_cuda: str | None = None) -> str | None:
    """The CUDA toolkit root to build with, or ``None``. See the module docstring for the order."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        val = os.environ.get(var)
        if val:
            if _is_toolkit_root(val):
                return os.path.realpath(val)
            _say(f"ignoring {var}={val}: not a CUDA toolkit root (needs bin/nvcc, include/, lib64/libcudart.so)")
    candidates: list[str] = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += _roots_from_nvcc(nvcc)
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    candidates += sorted(glob.glob("/opt/cuda*"), reverse=True) + ["/usr/lib/cuda"]
    seen, valid = set(), []
    for c in candidates:
        real = os.path.realpath(c)
        if real not in seen and _is_toolkit_root(real):
            seen.add(real)
            valid.append(real)
    if not valid:
        return None
    if torch_cuda:
        want = int(torch_cuda.split(".")[0])
        for root in valid:
            ver = _toolkit_version(root)
            if ver is not None and ver[0] == want:
                return root
        _say(f"no CUDA toolkit of major version {want} (torch's) found; trying {valid[0]}")
    return valid[0]


# ------------------------------------------------------------------------------------------------
# Architectures
# ------------------------------------------------------------------------------------------------
def arch_flags(arch_list: str | None = None) -> tuple[list[str], list[str]]:
    """(nvcc -gencode flags, target names such as ``sm_90``/``compute_90``) for an arch list like
    ``"8.0;9.0+PTX"`` (``;``, ``,`` or spaces between entries; ``9.0a``-style suffixes allowed)."""
    arch_list = arch_list if arch_list is not None else os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
    flags, targets = [], []
    for entry in re.split(r"[;,\s]+", arch_list.strip()):
        if not entry:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry)
        if not m:
            raise BuildConfigError(f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not of the form 9.0, 9.0a or 9.0+PTX "
                                   f"(named architectures are not supported here)")
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        targets.append(f"sm_{num}")
        if m.group(4):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
            targets.append(f"compute_{num}")
    if not flags:
        raise BuildConfigError(f"TORCH_CUDA_ARCH_LIST={arch_list!r} names no architecture")
    return flags, targets


# ------------------------------------------------------------------------------------------------
# The extension
# ------------------------------------------------------------------------------------------------
def _mode() -> str:
    val = os.environ.get("UPI_FAST_BUILD_CUDA", "auto").strip().lower()
    if val in _TRUE:
        return "force"
    if val in _FALSE:
        return "skip"
    if val in ("", "auto"):
        return "auto"
    raise BuildConfigError(f"UPI_FAST_BUILD_CUDA must be 0, 1 or auto, got {val!r}")


def _unavailable(mode: str, reason: str):
    if mode == "force":
        raise BuildConfigError(f"UPI_FAST_BUILD_CUDA=1 but the CUDA extension cannot be built: {reason}")
    _say(f"skipping the C++/CUDA extension upi_fast._C: {reason}")
    return [], {}


def gpu_present() -> tuple[bool, str]:
    """``(True, how it was seen)`` when this machine has a CUDA GPU: ``torch.cuda.is_available()``,
    else ``nvidia-smi -L`` listing at least one device; ``(False, what was tried)`` otherwise."""
    try:
        import torch
        if torch.cuda.is_available():
            return True, f"torch sees {torch.cuda.device_count()} CUDA device(s)"
    except Exception:  # noqa: BLE001 - a broken driver here only means: ask nvidia-smi
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False, "torch.cuda.is_available() is False and there is no nvidia-smi"
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return False, "torch.cuda.is_available() is False and nvidia-smi -L failed"
    gpus = [ln for ln in out.splitlines() if ln.strip().startswith("GPU ")]
    if gpus:
        return True, f"nvidia-smi lists {len(gpus)} GPU(s)"
    return False, "torch.cuda.is_available() is False and nvidia-smi -L lists no GPU"


def extensions():
    """``(ext_modules, cmdclass)`` for ``setup()``: the extension ``upi_fast._C`` and torch's
    ``BuildExtension``, or ``([], {})`` when it is not to be built (see the module docstring)."""
    mode = _mode()
    if mode == "skip":
        _say("UPI_FAST_BUILD_CUDA=0: not building the C++/CUDA extension upi_fast._C")
        return [], {}
    try:
        import torch
    except ImportError:
        return _unavailable(mode, "torch is not importable in the build environment "
                                  "(install with `pip install --no-build-isolation -e .`)")
    if not torch.version.cuda:
        return _unavailable(mode, f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)")
    if mode == "auto":
        has_gpu, why = gpu_present()
        if not has_gpu:
            _say(f"skipping the C++/CUDA extension upi_fast._C: no GPU on this machine ({why}); "
                 f"set UPI_FAST_BUILD_CUDA=1 to build it anyway (about 2 minutes)")
            return [], {}
    cuda_home = find_cuda_home(torch.version.cuda)
    if cuda_home is None:
        return _unavailable(mode, "no CUDA toolkit found (set CUDA_HOME to the folder whose bin/ holds nvcc "
                                  "and lib64/ holds libcudart.so)")
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first, and patch the
    # module too in case something imported it already.
    os.environ["CUDA_HOME"] = cuda_home
    from torch.utils import cpp_extension
    cpp_extension.CUDA_HOME = cuda_home

    gencode, targets = arch_flags()
    # nvcc splits -D values at commas (-DA=x,y defines A=x and y=1: "sm_90 = 90" in CUDA's nv/target
    # then fails to parse): the list is joined with "+", and only the host compiler, which compiles
    # the build information (register.cpp), gets it.
    defines = ["-DUPI_FAST_BUILD_SYSTEM=setuptools"]
    host_defines = defines + ["-DUPI_FAST_CUDA_ARCHS=" + "+".join(targets)]
    ext = cpp_extension.CUDAExtension(
        name="upi_fast._C",
        sources=SOURCES,
        depends=HEADERS,
        include_dirs=[os.path.join(HERE, "csrc")],
        # -g0: Python's default CFLAGS carry -g (slower builds, an 8 MB module); -lineinfo keeps the
        # source lines of the kernels for profilers.
        extra_compile_args={"cxx": ["-O3", "-g0"] + host_defines, "nvcc": ["-O3", "-lineinfo"] + gencode + defines},
    )
    ninja = cpp_extension.is_ninja_available()
    _say(f"building upi_fast._C with CUDA_HOME={cuda_home}, targets {','.join(targets)}, "
         f"{'ninja' if ninja else 'setuptools (no ninja)'}, MAX_JOBS={os.environ.get('MAX_JOBS', 'default')}")
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=ninja)}
