"""UPI-PCA: the top singular direction of the per-sample interpretation-attack directions.

1. For each attack sample, ``x' = x_i + z_i (+ delta_{r-1})`` and the direction
   ``g_i = grad_{x'} D(I(x_i), I(x'))`` (one per-sample Hessian-vector product); rows optionally
   L2-normalised.
2. ``G`` (n x d) stacks the rows; it is fed block by block to a row accumulator (exact in memory,
   or a streaming sketch that never holds G).
3. ``v`` = top right singular vector of G (uncentred); ``delta = s * eps * v`` (``s * eps * sign(v)``
   for Linf), the sign ``s`` chosen by mean dissimilarity on the **attack** data.
4. PCA+ (``plus_lambda``): ``v`` = top eigenvector of ``G^T G / ||G||_F^2 - lambda V^T V / ||V||_F^2``
   where V stacks ``grad_x p_y(x_i)``: directions that move the interpretation but not the label.
5. ``rounds > 1``: the directions of round r are taken at ``x_i + delta_{r-1}``.
"""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from .._checks import check_choice, check_model, check_positive, eval_mode
from ..hvp import _loss_grad
from ..saliency import raw_gradient
from ..dissimilarity import dissimilarity as dissimilarity_fn
from ..saliency import postprocess_maps
from ._accumulators import SOLVERS, make_accumulator, pca_plus_direction
from ._common import CleanBatches, check_common, check_hvp, default_noise_std, make_spec, resolve_device, \
    surrogate_context

__all__ = ["UPIPCA"]


class UPIPCA:
    """Universal perturbation for interpretation from the top singular vector of attack directions.

    Args:
        model: classifier returning logits (B, K); used in eval mode.
        eps: radius of the norm ball in model input units.
        norm: 2 (the paper's) or ``inf`` (``delta = s eps sign(v)``).
        saliency, target_kind, dissimilarity: the attacked map and loss (as :class:`UPIGrad`).
        noise_std: std of the random offset ``z_i`` (default: ``||z||_2 ~ 0.1 eps``).
        normalize_rows: scale every direction ``g_i`` to unit L2 norm before the SVD.
        solver: how the top singular vector is found: ``"auto"`` (exact when the n x d matrix fits
            ``memory_budget`` bytes, else the single-pass streaming sketch), ``"exact"``,
            ``"sketch"`` (single pass, mergeable), ``"frequent_directions"``, ``"subspace"`` /
            ``"block_krylov"`` (multi-pass: rows spill to a memory-mapped file in ``spill_dir``).
        plus_lambda: PCA+ weight lambda (None: plain UPI-PCA).
        rounds: rounds of direction collection (>= 1).
        batch_size: samples per direction batch.
        seed: seeds the offsets, sketches and random starts.
        device, progress: as :class:`UPIGrad`.
        hvp: how the per-sample directions are computed (:data:`upi_fast.HVP_MODES`).
        surrogate: None, ``"softplus"`` or a beta (see :class:`UPIGrad`).
        saliency_kwargs, fd_step: as :class:`UPIGrad`.
        n_components: singular values / vectors to report (the perturbation uses the first).
        memory_budget: bytes the exact solver may use for G (``"auto"``).
        sketch_kwargs: extra arguments of the streaming solver (oversample, n_iter, ...).

    Attributes (after :meth:`fit`):
        delta_: (C, H, W) float32 CPU. sign_: +1 or -1. singular_values_: (n_components,) of G.
        components_: (n_components, d) right singular vectors. residual_: ``||A v - theta v||``
        of the PCA+ eigenvector (None otherwise); eigenvalue_: theta (PCA+). n_samples_: rows used
        per round. sign_scores_: mean attack-split dissimilarity for s = +1 and -1. fit_time_.
    """

    def __init__(self, model, eps: float, norm=2, saliency: str = "simple", target_kind: str = "prob",
                 dissimilarity: str = "l2", noise_std: float | None = None, normalize_rows: bool = True,
                 solver: str = "auto", plus_lambda: float | None = None, rounds: int = 1, batch_size: int = 128,
                 seed: int = 0, device=None, progress: bool = True, hvp: str = "double_backward", surrogate=None,
                 saliency_kwargs: dict | None = None, fd_step: float = 1e-2, n_components: int = 1,
                 memory_budget: int = 2 * 2**30, spill_dir: str | None = None,
                 sketch_kwargs: dict | None = None) -> None:
        check_model(model)
        self.norm = check_common(eps, norm, batch_size, seed)
        check_choice("solver", solver, SOLVERS)
        check_hvp(hvp)
        check_positive("rounds", rounds, integer=True)
        check_positive("n_components", n_components, integer=True)
        if noise_std is not None:
            check_positive("noise_std", noise_std, allow_zero=True)
        if plus_lambda is not None:
            check_positive("plus_lambda", plus_lambda, allow_zero=True)
        self.spec = make_spec(saliency, target_kind, dissimilarity, saliency_kwargs)
        self.model, self.eps, self.noise_std, self.normalize_rows = model, float(eps), noise_std, bool(normalize_rows)
        self.solver, self.plus_lambda, self.rounds, self.batch_size = solver, plus_lambda, rounds, batch_size
        self.seed, self.device, self.progress, self.hvp = seed, device, progress, hvp
        self.surrogate, self.fd_step, self.n_components = surrogate, fd_step, n_components
        self.memory_budget, self.spill_dir, self.sketch_kwargs = memory_budget, spill_dir, dict(sketch_kwargs or {})
        self.saliency, self.target_kind, self.dissimilarity = saliency, target_kind, dissimilarity

    # -- the pieces -------------------------------------------------------------------------------
    def directions(self, x, y, I_ref, delta_prev, sigma, gen) -> torch.Tensor:
        """Per-sample attack directions (B, d): ``grad_{x'} D(I(x_i), I(x'))`` at ``x' = x + z + delta_prev``."""
        B = x.shape[0]
        per = delta_prev.to(x.dtype).expand(B, *delta_prev.shape).contiguous()
        with surrogate_context(self.model, self.surrogate):
            _, g = _loss_grad(self.model, x, y, I_ref, per, self.spec, self.hvp, sigma, gen, self.fd_step)
        return (g * B).reshape(B, -1)

    def label_directions(self, x, y) -> torch.Tensor:
        """Rows of V for PCA+: ``grad_x p_y(x_i)`` (B, d) of the real network."""
        g = raw_gradient(self.model, x, y, "simple", "prob")
        return g.reshape(x.shape[0], -1)

    def _perturbation(self, v: torch.Tensor, shape) -> torch.Tensor:
        v = v.reshape(shape)
        if self.norm == math.inf:
            return self.eps * v.sign()
        return self.eps * v / v.norm().clamp_min(1e-30)

    def _mean_dissimilarity(self, batches: CleanBatches, delta: torch.Tensor) -> float:
        """Mean attack loss of ``delta`` over the attack data (real network, no noise)."""
        tot, n = 0.0, 0
        s = self.spec
        for x, y, _ in batches:
            ref = postprocess_maps(raw_gradient(self.model, x, y, s.method, s.target_kind, False, s.steps, s.baseline,
                                                s.multiply_by_input), s.postprocess)
            adv = postprocess_maps(raw_gradient(self.model, x + delta.to(x.dtype), y, s.method, s.target_kind, False,
                                                s.steps, s.baseline, s.multiply_by_input), s.postprocess)
            tot += float(dissimilarity_fn(adv, ref, s.dissimilarity, k=s.k).sum())
            n += x.shape[0]
        return tot / max(n, 1)

    # -- fit ---------------------------------------------------------------------------------------
    def fit(self, data) -> "UPIPCA":
        """Compute the perturbation from ``data`` (a DataLoader of ``(x, y)`` or a tuple ``(X, y)``).

        ``data`` is read only here; the sign is chosen on it too (never on evaluation data).
        """
        t0 = time.perf_counter()
        device = resolve_device(self.device, self.model)
        gen = torch.Generator(device=device).manual_seed(self.seed)
        with eval_mode(self.model):
            batches = CleanBatches(self.model, data, self.batch_size, self.spec, device, gen, shuffle=False,
                                   surrogate=self.surrogate)
            shape = batches.input_shape
            if shape is None:
                shape = tuple(next(iter(batches))[0].shape[1:])
            d = math.prod(shape)
            sigma = self.noise_std if self.noise_std is not None else default_noise_std(self.eps, self.norm, d)
            delta = torch.zeros(shape, device=device)
            for r in range(self.rounds):
                rows = make_accumulator(self.solver, d, batches.n_correct, self.n_components, self.seed + r,
                                        self.normalize_rows, device, self.memory_budget, self.spill_dir,
                                        self.sketch_kwargs)
                lab = (make_accumulator(self.solver, d, batches.n_correct,
                                        1, self.seed + 7919 + r, self.normalize_rows, device, self.memory_budget,
                                        self.spill_dir, self.sketch_kwargs)
                       if self.plus_lambda is not None else None)
                try:
                    with tqdm(total=batches.n_correct or None, desc=f"UPI-PCA round {r + 1}/{self.rounds}",
                              disable=None if self.progress else True, leave=False) as bar:
                        for x, y, I_ref in batches:
                            rows.update(self.directions(x, y, I_ref, delta, sigma, gen))
                            if lab is not None:
                                lab.update(self.label_directions(x, y))
                            bar.update(x.shape[0])
                    S, Vh = rows.finalize(self.n_components)
                    if self.plus_lambda is not None:
                        v, theta, resid = pca_plus_direction(rows, lab, self.plus_lambda, seed=self.seed + r)
                        self.eigenvalue_, self.residual_ = float(theta), float(resid)
                    else:
                        v = Vh[0]
                        self.eigenvalue_, self.residual_ = None, None
                finally:
                    for acc in (rows, lab):
                        if hasattr(acc, "close"):
                            acc.close()
                cand = self._perturbation(v.to(device), shape)
                scores = (self._mean_dissimilarity(batches, cand), self._mean_dissimilarity(batches, -cand))
                sign = 1 if scores[0] >= scores[1] else -1
                delta = sign * cand
        self.delta_ = delta.detach().float().cpu()
        self.sign_ = sign
        self.sign_scores_ = {"+1": scores[0], "-1": scores[1]}
        self.singular_values_ = S.detach().float().cpu()
        self.components_ = Vh.detach().float().cpu()
        self.n_samples_ = batches.n_correct
        self.fit_time_ = time.perf_counter() - t0
        return self

    def __repr__(self) -> str:
        return (f"UPIPCA(eps={self.eps}, norm={self.norm}, saliency={self.saliency!r}, solver={self.solver!r}, "
                f"plus_lambda={self.plus_lambda}, rounds={self.rounds})")
