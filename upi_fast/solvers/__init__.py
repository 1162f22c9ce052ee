"""The solvers: UPI-Grad, UPI-PCA (and PCA+), and the baselines they are compared with."""
from . import baselines
from ._microbatch import BatchOutOfMemoryError
from .upi_grad import UPIGrad
from .upi_pca import UPIPCA

__all__ = ["UPIGrad", "UPIPCA", "baselines", "BatchOutOfMemoryError"]
