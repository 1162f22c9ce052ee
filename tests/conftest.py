"""Test configuration.

On a machine without CUDA, ``TRITON_INTERPRET=1`` is set here, before anything imports
``upi_fast.kernels``, so that the Triton kernels run on CPU tensors in CI (the interpreter must be
on before the first kernel import). On a GPU machine the kernels run compiled on CUDA tensors
(``pytest -m gpu``) unless ``TRITON_INTERPRET`` is set explicitly.
"""
import os

# OpenMP threads spin while waiting by default; on a shared 2-core machine that makes torch 10-100x
# slower whenever another process runs (see upi_fast/__init__.py). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("UPI_FAST_CACHE", os.path.join(os.path.dirname(__file__), "..", ".pytest_cache", "upi_fast"))

import pytest  # noqa: E402


def pytest_report_header(config):
    """Which CPU kernels ATen / oneDNN use: float results depend on it (see tests/_tolerance.py)."""
    forced = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA") if k in os.environ}
    return f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}" + (
        f" (forced: {forced})" if forced else "")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_backend():
    """Each test starts from seed 0 and the automatic backend."""
    import upi_fast.ops as ops
    torch.manual_seed(0)
    before = ops.get_backend()
    yield
    if ops.get_backend() != before:
        ops.set_backend(before)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("single_thread")``):
    small problems gain nothing from threads, and on a shared, busy CPU spinning OpenMP threads make
    small LAPACK and convolution calls many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
