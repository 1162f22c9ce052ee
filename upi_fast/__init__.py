"""upi_fast: Universal Perturbations for Interpretation (UPI), fast.

One norm-bounded perturbation ``delta`` that, added to any image, changes a classifier's
gradient-based saliency maps on a large fraction of a dataset (Ehsani Oskouie & Farnia,
ICASSP 2023, arXiv 2212.03095).

The public API is every name in ``__all__`` here, the stateless building blocks in
:mod:`upi_fast.functional`, the adapters to other libraries in :mod:`upi_fast.adapters`, and the
modules listed in ``docs/api.md``; everything else is internal. Importing upi_fast compiles no
kernel, imports neither Triton nor matplotlib, and initialises no CUDA context.

One process-level setting: when upi_fast is imported before torch, ``OMP_WAIT_POLICY`` defaults
to ``PASSIVE`` (unless already set). With OpenMP's default spinning, torch's CPU kernels slow down
by one to two orders of magnitude as soon as another process competes for the cores (measured on
2 cores, one other busy process: a short UPI-Grad fit on the digits default took 16.4 s instead of
0.28 s); passive waiting only adds a thread wake-up per parallel region. Export
``OMP_WAIT_POLICY=ACTIVE`` to opt out.
"""
import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ._version import __version__  # noqa: E402
from . import adapters, baselines, functional, metrics
from .dissimilarity import dissimilarity
from .evaluate import evaluate
from .hvp import HVP_MODES, saliency_loss_grad
from .ops import backends, get_backend, set_backend
from .projection import project
from .saliency import saliency
from .solvers import UPIPCA, BatchOutOfMemoryError, UPIGrad
from .surrogate import softplus_surrogate

__all__ = [
    "__version__",
    "saliency", "dissimilarity", "saliency_loss_grad", "HVP_MODES", "softplus_surrogate", "project",
    "UPIGrad", "UPIPCA", "BatchOutOfMemoryError", "evaluate", "baselines", "metrics",
    "set_backend", "get_backend", "backends",
    "functional", "adapters",
]
