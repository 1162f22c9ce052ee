"""upi_fast: Universal Perturbations for Interpretation (UPI), fast.

One norm-bounded perturbation ``delta`` that, added to any image, changes a classifier's
gradient-based saliency maps on a large fraction of a dataset (Ehsani Oskouie & Farnia,
ICASSP 2023, arXiv 2212.03095). Public names are re-exported here; see README.md.
"""
from ._version import __version__
from . import baselines, metrics
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
]
