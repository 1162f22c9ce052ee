"""upi_fast: Universal Perturbations for Interpretation (UPI), fast.

One norm-bounded perturbation ``delta`` that, added to any image, changes a classifier's
gradient-based saliency maps on a large fraction of a dataset (Ehsani Oskouie & Farnia,
ICASSP 2023, arXiv 2212.03095).

The public API is every name in ``__all__`` here, the stateless building blocks in
:mod:`upi_fast.functional`, the adapters to other libraries in :mod:`upi_fast.adapters`, and the
modules listed in ``docs/api.md``; everything else is internal. Importing upi_fast compiles no
kernel, imports neither Triton nor matplotlib, and initialises no CUDA context.
"""
from ._version import __version__
from . import adapters, baselines, functional, metrics
from .dissimilarity import dissimilarity
from .evaluate import evaluate
from .hvp import HVP_MODES, saliency_loss_grad
from .ops import backends, get_backend, set_backend
from .projection import project
from .saliency import saliency
from .solvers import UPIPCA, UPIGrad
from .surrogate import softplus_surrogate

__all__ = [
    "__version__",
    "saliency", "dissimilarity", "saliency_loss_grad", "HVP_MODES", "softplus_surrogate", "project",
    "UPIGrad", "UPIPCA", "evaluate", "baselines", "metrics",
    "set_backend", "get_backend", "backends",
    "functional", "adapters",
]
