"""UPI-Grad: projected stochastic gradient ascent on one universal perturbation.

``delta <- Proj_{||.||_p <= eps}(delta + lr * step(grad_delta (1/B) sum_i D(I(x_i), I(x_i + Z_i + delta))))``
over mini-batches of the attack data, epochs times, from a random start inside the ball. The
gradient is a batch of Hessian-vector products (:func:`upi_fast.saliency_loss_grad`).
"""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from .._checks import check_choice, check_model, check_positive, eval_mode
from ..hvp import _loss_grad
from ..projection import project, random_in_ball, steepest_step
from ._common import CleanBatches, check_common, check_hvp, default_noise_std, make_spec, resolve_device, \
    surrogate_context

__all__ = ["UPIGrad"]

OPTIMIZERS = ("normalized", "sign", "adam")


class UPIGrad:
    """Universal perturbation for interpretation by projected stochastic gradient ascent.

    Args:
        model: classifier returning logits (B, K); used in eval mode (restored afterwards).
        eps: radius of the norm ball, in model input units.
        norm: 2 (the paper's) or ``inf``.
        saliency: ``"simple"``, ``"integrated"`` or ``"smoothgrad"``.
        target_kind: ``"prob"`` (default) or ``"logit"``.
        dissimilarity: attack loss ``"l2"`` (default), ``"rel_l2"``, ``"cosine"`` or ``"topk"``.
        epochs: passes over the attack data.
        batch_size: samples per step.
        lr: initial step size in model units; default ``0.5 * eps`` (``0.5 * eps / sqrt(d)`` for sign
            or Adam steps under the L2 norm, whose steps have norm ~ sqrt(d) per unit lr).
        lr_schedule: ``"cosine"`` (default: from ``lr`` down to ``lr / 25`` over all steps; large
            early steps explore the ball, small late ones settle) or ``"constant"``.
        optimizer: ``"normalized"`` (steepest ascent for the norm: ``g / ||g||_2`` for L2,
            ``sign(g)`` for Linf), ``"sign"`` (always ``sign(g)``) or ``"adam"``.
        noise_std: smoothing noise ``Z`` standard deviation; default ``||Z||_2 ~ 0.1 eps``
            (:func:`upi_fast.solvers._common.default_noise_std`); 0 disables it.
        hvp: Hessian-vector product mode (:data:`upi_fast.HVP_MODES`).
        surrogate: None, ``"softplus"`` or a beta: attack the network with every ReLU replaced by
            ``softplus(beta x) / beta`` (needed with ``target_kind="logit"``).
        preserve_labels: ``mu >= 0``; maximise ``D - mu * CE(f(x + delta), y)`` to keep labels.
        seed: seeds the random start, the data order and the noise.
        device: where to compute (default: the model's device).
        progress: show a progress bar.
        saliency_kwargs: extra saliency options (``steps``, ``baseline``, ``multiply_by_input``,
            ``smoothgrad_std``, ``n_samples``, ``k``).
        fd_step: relative step of the finite-difference modes.

    Attributes (after :meth:`fit`):
        delta_: the perturbation (C, H, W), float32, on the CPU.
        history_: mean attack loss of every step (list of floats).
        n_samples_: correctly classified attack samples used per epoch.
        n_steps_: steps taken. fit_time_: seconds.
    """

    def __init__(self, model, eps: float, norm=2, saliency: str = "simple", target_kind: str = "prob",
                 dissimilarity: str = "l2", epochs: int = 10, batch_size: int = 128, lr: float | None = None,
                 optimizer: str = "normalized", noise_std: float | None = None, hvp: str = "double_backward",
                 surrogate=None, preserve_labels: float = 0.0, seed: int = 0, device=None, progress: bool = True,
                 saliency_kwargs: dict | None = None, fd_step: float = 1e-2, lr_schedule: str = "cosine") -> None:
        check_model(model)
        self.norm = check_common(eps, norm, batch_size, seed)
        check_positive("epochs", epochs, integer=True)
        check_choice("optimizer", optimizer, OPTIMIZERS)
        check_choice("lr_schedule", lr_schedule, ("cosine", "constant"))
        check_hvp(hvp)
        if lr is not None:
            check_positive("lr", lr)
        if noise_std is not None:
            check_positive("noise_std", noise_std, allow_zero=True)
        check_positive("preserve_labels", preserve_labels, allow_zero=True)
        self.spec = make_spec(saliency, target_kind, dissimilarity, saliency_kwargs)
        self.model, self.eps, self.epochs, self.batch_size = model, float(eps), epochs, batch_size
        self.lr, self.optimizer, self.noise_std, self.hvp = lr, optimizer, noise_std, hvp
        self.surrogate, self.preserve_labels, self.seed = surrogate, float(preserve_labels), seed
        self.device, self.progress, self.fd_step, self.lr_schedule = device, progress, fd_step, lr_schedule
        self.saliency, self.target_kind, self.dissimilarity = saliency, target_kind, dissimilarity

    def _default_lr(self, d: int) -> float:
        if self.optimizer == "normalized" or self.norm == math.inf:
            return 0.5 * self.eps
        return 0.5 * self.eps / math.sqrt(d)

    def _lr_at(self, lr: float, step: int, total: int | None) -> float:
        if self.lr_schedule == "constant" or not total:
            return lr
        lo = lr / 25.0
        return lo + (lr - lo) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    def fit(self, data) -> "UPIGrad":
        """Compute the perturbation on ``data``: a DataLoader of ``(x, y)`` or a tuple ``(X, y)``.

        Only samples the clean model classifies correctly are used. Returns ``self``.
        """
        t0 = time.perf_counter()
        device = resolve_device(self.device, self.model)
        gen = torch.Generator(device=device).manual_seed(self.seed)
        with eval_mode(self.model):
            batches = CleanBatches(self.model, data, self.batch_size, self.spec, device, gen, shuffle=True,
                                   surrogate=self.surrogate)
            shape = batches.input_shape
            if shape is None:  # streamed loader: peek at the first batch
                x0, _, _ = next(iter(batches))
                shape = tuple(x0.shape[1:])
            d = math.prod(shape)
            lr = self.lr if self.lr is not None else self._default_lr(d)
            sigma = self.noise_std if self.noise_std is not None else default_noise_std(self.eps, self.norm, d)
            delta = random_in_ball(shape, self.eps, self.norm, generator=gen, device=device)
            adam = _Adam(delta) if self.optimizer == "adam" else None
            history: list[float] = []
            per_epoch = (math.ceil(batches.n_correct / self.batch_size) if batches.n_correct
                         else len(data) if hasattr(data, "__len__") and not isinstance(data, tuple) else 0)
            total = self.epochs * per_epoch
            with tqdm(total=total or None, desc="UPI-Grad", disable=None if self.progress else True, leave=False) as bar:
                for _ in range(self.epochs):
                    for x, y, I_ref in batches:
                        loss, grad = self._objective_grad(x, y, I_ref, delta, sigma, gen)
                        delta = self._step(delta, grad, self._lr_at(lr, len(history), total), adam)
                        history.append(float(loss.mean()))
                        bar.update(1)
                        bar.set_postfix(loss=f"{history[-1]:.4f}")
        self.delta_ = delta.detach().float().cpu()
        self.history_ = history
        self.n_samples_ = batches.n_correct
        self.n_steps_ = len(history)
        self.fit_time_ = time.perf_counter() - t0
        return self

    def _objective_grad(self, x, y, I_ref, delta, sigma, gen):
        with surrogate_context(self.model, self.surrogate):
            loss, grad = _loss_grad(self.model, x, y, I_ref, delta.to(x.dtype), self.spec, self.hvp, sigma, gen,
                                    self.fd_step)
        if self.preserve_labels > 0:
            with torch.enable_grad():
                d = delta.detach().requires_grad_(True)
                ce = torch.nn.functional.cross_entropy(self.model(x + d), y)
                (g_ce,) = torch.autograd.grad(ce, d)
            grad = grad - self.preserve_labels * g_ce
        return loss, grad

    def _step(self, delta, grad, lr, adam):
        if self.optimizer == "normalized":
            step = steepest_step(grad, self.norm)
        elif self.optimizer == "sign":
            step = grad.sign()
        else:
            step = adam.direction(grad)
        return project(delta + lr * step, self.eps, self.norm).detach()

    def __repr__(self) -> str:
        return (f"UPIGrad(eps={self.eps}, norm={self.norm}, saliency={self.saliency!r}, hvp={self.hvp!r}, "
                f"optimizer={self.optimizer!r}, epochs={self.epochs}, batch_size={self.batch_size})")


class _Adam:
    """Adam on the ascent direction: returns ``m_hat / (sqrt(v_hat) + eps)`` for each new gradient."""

    def __init__(self, like: torch.Tensor, b1: float = 0.9, b2: float = 0.999, tiny: float = 1e-12) -> None:
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like)
        self.t = 0
        self.b1, self.b2, self.tiny = b1, b2, tiny

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        self.t += 1
        self.m.mul_(self.b1).add_(g, alpha=1 - self.b1)
        self.v.mul_(self.b2).addcmul_(g, g, value=1 - self.b2)
        m_hat = self.m / (1 - self.b1 ** self.t)
        v_hat = self.v / (1 - self.b2 ** self.t)
        return m_hat / (v_hat.sqrt() + self.tiny * v_hat.sqrt().max().clamp_min(1e-30) + 1e-30)
