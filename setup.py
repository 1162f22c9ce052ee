"""Build script for upi_fast.

``pip install -e .`` installs the Python package (``upi_fast``, with ``kernels/`` as
``upi_fast.kernels`` and ``bench/`` as ``upi_fast.bench``). The optional C++/CUDA extension
``upi_fast._C`` is described in ``csrc/`` and built by :func:`cuda_extensions`: by default only on a
machine with a GPU (``UPI_FAST_BUILD_CUDA`` unset or ``auto``; ``1`` builds it without one, as CI does,
``0`` never), so a CPU-only install never spends minutes compiling it.

``python -m build`` makes an sdist (MANIFEST.in: sources, csrc/, kernels/, bench/, docs/, examples/,
tests/) and a wheel from it. Under build isolation torch is absent from the build environment, so
setup_cuda.py skips the extension with a message and the wheel is pure Python (``py3-none-any``):
the torch and Triton backends work, ``upi_fast.backends()`` / ``python -m upi_fast.info`` say which
backends are available. Build the extension with ``pip install --no-build-isolation .``.
"""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _version() -> str:
    with open(os.path.join(HERE, "upi_fast", "_version.py")) as fh:
        return re.search(r'__version__ = "([^"]+)"', fh.read()).group(1)


def _readme() -> str:
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as fh:
        return fh.read()


def cuda_extensions():
    """The C++/CUDA extension, or nothing (see csrc/README and setup_cuda.py)."""
    path = os.path.join(HERE, "setup_cuda.py")
    if not os.path.exists(path):
        return [], {}
    import importlib.util
    spec = importlib.util.spec_from_file_location("setup_cuda", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.extensions()


ext_modules, cmdclass = cuda_extensions()

setup(
    name="upi_fast",
    version=_version(),
    description="Universal Perturbations for Interpretation (UPI) with fused GPU kernels",
    long_description=_readme(),
    long_description_content_type="text/markdown",
    # Tested on 3.11; the public API's PEP 604 annotations resolve with typing.get_type_hints from 3.10.
    python_requires=">=3.10",
    # every package under upi_fast/ (found, so that a new subpackage cannot be left out of the wheel)
    packages=[*find_packages(include=["upi_fast", "upi_fast.*"]),
              "upi_fast.kernels", "upi_fast.bench", "upi_fast.bench.suites"],
    package_dir={"upi_fast": "upi_fast", "upi_fast.kernels": "kernels", "upi_fast.bench": "bench",
                 "upi_fast.bench.suites": "bench/suites"},
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm", "scikit-learn", "matplotlib"],
    extras_require={
        # Everything the test suite, the examples, the packaging test and the extension build need
        # (requirements-test.txt pins the same for CI).
        "dev": ["pytest", "hypothesis", "torchvision", "pillow", "build", "setuptools>=64", "wheel", "ninja",
                "pybind11"],
        "vision": ["torchvision", "pillow"],
        # upi_fast.art: UPI-Grad / UPI-PCA as Adversarial Robustness Toolbox attacks (tested with 1.20.1).
        "art": ["adversarial-robustness-toolbox"],
    },
    entry_points={"console_scripts": ["upi-fast=upi_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
