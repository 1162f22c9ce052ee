"""Public home of the baselines (implemented in :mod:`upi_fast.solvers.baselines`)."""
from .solvers.baselines import classification_uap, per_image_attack, per_sample_random, universal_random

__all__ = ["universal_random", "per_sample_random", "classification_uap", "per_image_attack"]
