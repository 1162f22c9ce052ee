"""Stateless building blocks for other libraries: one import for everything UPI is made of.

Everything here is a re-export; this module defines nothing of its own and has no side effects
(importing it compiles no kernel and initialises no CUDA context). The names below are public and
stable within a major version (see ``docs/api.md``); the modules that define them are not.

Conventions shared by every function:

* **Images** ``x``: ``(B, C, H, W)`` floating tensors in the model's own input units (for the
  bundled loaders: pixels in ``[0, 1]``, normalisation inside the model). **Labels** / targets:
  ``(B,)`` int64 class indices.
* **Models**: any callable ``model(x) -> logits (B, K)``; computed in eval mode (restored after).
* **Maps**: ``(B, H*W)`` after the default ``"abs_sum_l1"`` post-processing (non-negative, each
  row sums to 1 unless the gradient is exactly zero), ``(B, C*H*W)`` for ``"raw"``.
* **Perturbations** ``delta``: ``(C, H, W)`` (universal) in the images' units; norm balls are L2
  or Linf, radius ``eps`` in the same units.
* Dissimilarities and metrics are dimensionless, one value per sample ``(B,)`` unless reduced.

Groups:

* saliency maps -- :func:`saliency`, :func:`raw_gradient`, :func:`postprocess_maps`,
  :func:`target_scores`, :func:`integration_rule` (the integrated-gradients path rules
  :data:`INTEGRATION_RULES`: the authors' default and captum's five);
* dissimilarities -- :func:`dissimilarity`; fused post-processing + dissimilarity forward and
  gradient in one kernel call -- :func:`saliency_dissim`, :func:`fused_saliency_loss`;
* smooth surrogate -- :func:`softplus`, :func:`softplus_surrogate`, :class:`SoftplusSurrogate`;
* gradient of the attack loss through batched Hessian-vector products -- :func:`saliency_loss_grad`;
* norm balls -- :func:`project`, :func:`random_in_ball`, :func:`steepest_step`, :func:`norm_of`,
  :func:`parse_norm`;
* streaming sketch and eigen-solvers -- :func:`sketch_update`, :class:`StreamingSketch`,
  :class:`FrequentDirections`, :func:`randomized_svd`, :func:`top_singular_vectors`,
  :func:`exact_svd`, :func:`lanczos_top`, :func:`pca_plus_eigenvector`;
* evaluation metrics -- :func:`relative_l2`, :func:`topk_intersection`, :func:`spearman`,
  :func:`center_of_mass_shift`, :func:`fooling_rate`, :func:`rankdata`, and the whole protocol
  :func:`evaluate`;
* backends -- :func:`backends`, :func:`set_backend`, :func:`get_backend`.
"""
from __future__ import annotations

from .dissimilarity import KINDS as DISSIMILARITIES
from .dissimilarity import default_k, dissimilarity
from .evaluate import METRICS, evaluate
from .hvp import HVP_MODES, saliency_loss_grad
from .linalg import (FrequentDirections, LanczosResult, PCAPlusResult, SketchError, StreamingSketch, SVDResult,
                     exact_svd, lanczos_top, pca_plus_eigenvector, randomized_svd, top_singular_vectors)
from .metrics import center_of_mass_shift, fooling_rate, rankdata, relative_l2, spearman, topk_intersection
from .ops import backends, get_backend, set_backend
from .ops.saliency_dissim import KINDS as FUSED_DISSIMILARITIES
from .ops.saliency_dissim import fused_saliency_loss, saliency_dissim
from .ops.sketch_update import sketch_update
from .ops.softplus import softplus
from .projection import NORMS, norm_of, parse_norm, project, random_in_ball, steepest_step
from .saliency import METHODS as SALIENCY_METHODS
from .saliency import INTEGRATION_RULES, POSTPROCESS, TARGET_KINDS, integration_rule, postprocess_maps, raw_gradient, \
    saliency, target_scores
from .surrogate import SoftplusSurrogate, softplus_surrogate

__all__ = [
    # saliency maps
    "saliency", "raw_gradient", "postprocess_maps", "target_scores", "SALIENCY_METHODS", "TARGET_KINDS",
    "POSTPROCESS", "integration_rule", "INTEGRATION_RULES",
    # dissimilarities, fused forward / gradient
    "dissimilarity", "default_k", "DISSIMILARITIES", "saliency_dissim", "fused_saliency_loss",
    "FUSED_DISSIMILARITIES",
    # smooth surrogate
    "softplus", "softplus_surrogate", "SoftplusSurrogate",
    # attack-loss gradient (batched HVPs)
    "saliency_loss_grad", "HVP_MODES",
    # norm balls
    "project", "random_in_ball", "steepest_step", "norm_of", "parse_norm", "NORMS",
    # streaming sketch and eigen-solvers
    "sketch_update", "StreamingSketch", "SketchError", "FrequentDirections", "randomized_svd", "SVDResult",
    "top_singular_vectors", "exact_svd", "lanczos_top", "LanczosResult", "pca_plus_eigenvector", "PCAPlusResult",
    # evaluation
    "relative_l2", "topk_intersection", "spearman", "center_of_mass_shift", "fooling_rate", "rankdata",
    "evaluate", "METRICS",
    # backends
    "backends", "set_backend", "get_backend",
]
