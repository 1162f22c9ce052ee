"""UPI-Grad: projected stochastic gradient ascent on one universal perturbation.

``delta <- Proj_{||.||_p <= eps}(delta + lr * step(grad_delta (1/B) sum_i D(I(x_i), I(x_i + Z_i + delta))))``
over mini-batches of the attack data, epochs times. The gradient is a batch of Hessian-vector
products (:func:`upi_fast.saliency_loss_grad`), the exact gradient of that objective.

The start (``init``): by default the UPI-PCA perturbation of the same attack data
(:class:`upi_fast.solvers.UPIPCA`, one pass of per-sample directions), refined by small steps, and
the better of start and result on the attack data is returned; ``init="random"`` is the plain
method (a random point of the ball, large early steps). Why: on the embedded default the random
start lands, for some seeds, in a clearly worse optimum (evaluation dissimilarity 0.567 instead of
0.600), and large steps leave the UPI-PCA start's basin for one that scores no better on the attack
data and worse on held-out data; the numbers are in ``docs/demo_table.md`` and the test
``tests/test_solvers.py::test_upi_grad_default_is_seed_robust_on_the_embedded_default``.
"""
from __future__ import annotations

import math
import os
import time

import torch
from tqdm.auto import tqdm

from .._checks import DeviceLike, ModelLike, NormLike, check_choice, check_model, check_positive, eval_mode
from ..checkpoint import generator_state, set_generator_state
from ..distributed import current
from ..hvp import _loss_grad
from ..projection import project, random_in_ball, steepest_step
from ._batches import CleanBatches, batch_noise
from ._common import (DataLike, FastLike, SurrogateLike, autocast_factory, autograd_errors, check_common,
                      check_fast, check_flag, check_hvp, check_precision, default_noise_std, make_spec, resolve_device,
                      spec_fields, surrogate_context)
from ._early_stop import check_early_stop, epoch_objectives, should_stop
from ._fast import FastSteps, fast_config
from ._final_choice import choose
from ._microbatch import MicroBatcher
from ._state import RunCheckpoints, check_checkpoint_args
from .upi_pca import UPIPCA

__all__ = ["UPIGrad"]

OPTIMIZERS = ("normalized", "sign", "adam")
#: ``UPIGrad(init=...)``: where the ascent starts.
INITS = ("pca", "random")
#: Default initial step size, as a fraction of the default-lr rule's scale, per start: large steps that
#: explore the ball from a random point, small ones that refine the UPI-PCA start (chosen by 2-fold
#: cross-validation inside the digits attack split, never on the evaluation split).
_LR_FRACTION = {"random": 0.5, "pca": 0.02}


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
        lr: initial step size in model units; default ``f * eps`` (``f * eps / sqrt(d)`` for sign or
            Adam steps under the L2 norm, whose steps have norm ~ sqrt(d) per unit lr) with
            ``f = 0.02`` for ``init="pca"`` (a refinement that stays near the start) and ``f = 0.5``
            for ``init="random"``.
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
            ``smoothgrad_std``, ``n_samples``, ``k``, ``integration``: the integrated-gradients path
            rule, :data:`upi_fast.saliency.INTEGRATION_RULES`).
        fd_step: relative step of the finite-difference modes.
        checkpoint_dir: folder for checkpoints (None: none); ``fit(..., resume=True)`` continues from it.
        checkpoint_every: write a checkpoint every this many steps (global batches); the newest two
            are kept. A checkpoint holds delta, the Adam moments and step, the noise generator state,
            the data position (epoch, batch) and the loss history.
        precision: ``"fp32"`` (default), ``"bf16"`` or ``"fp16"``: autocast for the saliency and HVP
            passes (delta and the optimiser stay float32; ``"fp16"`` needs CUDA).
        oom_retry: when the device runs out of memory on a batch, split it into micro-batches of half
            the size (again and again, down to one sample), sum their gradients and go on, with a
            warning on the ``upi_fast`` logger; the smaller size is kept for the rest of the run.
            Without it (default) running out of memory raises
            :class:`~upi_fast.solvers.BatchOutOfMemoryError`, whose message names the batch size to
            lower. See :mod:`upi_fast.solvers._microbatch` for what splitting preserves.
        fast: the prepared step of :mod:`upi_fast.accel` instead of the reference code.
            ``"auto"`` (default): ``True`` for an ``nn.Module``, ``False`` for a plain callable.
            ``False``: the reference :func:`upi_fast.saliency_loss_grad` on ``model`` as given.
            ``True``: a :class:`~upi_fast.accel.FastStep` (BatchNorm folded, frozen copy of the
            model, lean step; with ``target_kind="prob"``, ``hvp="double_backward"`` becomes
            ``"auto"``, which uses the exact piecewise-linear HVP where it proves it applies and
            double backward otherwise, so the gradient is the same to float32 rounding).
            ``"autotune"``: the fastest of a few equivalent layouts, timed on the first batch
            (:func:`~upi_fast.accel.autotune_step`; a few seconds).
            A dict: :class:`~upi_fast.accel.FastStep` options (e.g. ``{"channels_last": True}``,
            ``{"compile": True}`` with a finite-difference ``hvp``, ``{"cuda_graph": True}``).
            The caller's model is never modified. Measured gains: ``bench/RESULTS.md``.
        init: the start of the ascent. ``"pca"`` (default): the :class:`~upi_fast.solvers.UPIPCA`
            perturbation of the same data (same ``norm``, saliency, dissimilarity, noise, ``hvp``,
            ``surrogate``, ``batch_size``, ``seed``, ``precision``, ``oom_retry`` and ``fast``; exact
            or streaming SVD as ``UPIPCA(solver="auto")`` picks), refined with the small default
            ``lr``; at the end the attack objective (mean ``D``, minus ``preserve_labels`` x the mean
            cross-entropy) of the start and of the last iterate are measured on the attack data (the
            real network, no smoothing noise) and the better one becomes ``delta_``, so on the attack
            data the result never scores below UPI-PCA. ``"random"``:
            the plain method, a uniform random point of the ball (drawn from ``seed``), the large
            default ``lr``, the last iterate returned (the behaviour before ``init`` existed). The
            gradient is the same exact gradient of the objective either way; only the start, the
            default step size and the final choice differ.
        patience: early stop (None: off, the default): end the run after this many epochs in a row
            whose attack objective (the mean of the epoch's step losses, ``epoch_history_``, computed
            from all-reduced values so the same on every process) is not above the best so far by
            more than ``min_delta``; the final choice of ``init`` applies to the iterate at the stop.
        min_delta: the least improvement of the epoch objective that counts (>= 0; needs ``patience``).

    Distributed (``torch.distributed`` initialised, e.g. under ``torchrun``): each global batch is
    split across the processes; each computes the gradient sum of its correctly classified samples,
    and the sums and counts are all-reduced into the global mean, so every process holds the same
    delta, equal (to rounding) to a single process's with the same ``batch_size``. The smoothing
    noise is drawn per global batch from a generator shared by all processes; smoothgrad's own
    draws are per process (equal to a single process's only for the other saliency methods).

    Attributes (after :meth:`fit`):
        delta_: the perturbation (C, H, W), float32, on the CPU.
        history_: mean attack loss of every step (list of floats).
        n_samples_: correctly classified attack samples used per epoch.
        n_steps_: steps taken. fit_time_: seconds.
        micro_batch_: the micro-batch size ``oom_retry`` settled on (None: batches were never split).
        step_: the :class:`~upi_fast.accel.FastStep` used (None unless ``fast``); its ``hvp_`` is the
            resolved HVP mode and, with ``fast="autotune"``, ``tuning_`` the timings of the candidates.
        start_: the starting perturbation (C, H, W), float32, CPU.
        start_score_, score_: the attack objective on the attack data (mean ``D`` minus
            ``preserve_labels`` x mean cross-entropy; real network, no noise) of ``start_`` and of
            ``delta_`` (None with ``init="random"``, which measures nothing).
        refined_: whether ``delta_`` is the ascent's last iterate (False: the start scored higher and
            was kept; always True with ``init="random"``).
        epoch_history_: the attack objective of every epoch (mean of its step losses; what
            ``patience`` watches). stopped_epoch_: epochs run when early stop ended the run (None:
            it ran all ``epochs``).
    """

    def __init__(self, model: ModelLike, eps: float, norm: NormLike = 2, saliency: str = "simple",
                 target_kind: str = "prob", dissimilarity: str = "l2", epochs: int = 10, batch_size: int = 128,
                 lr: float | None = None, optimizer: str = "normalized", noise_std: float | None = None,
                 hvp: str = "double_backward", surrogate: SurrogateLike = None, preserve_labels: float = 0.0,
                 seed: int = 0, device: DeviceLike | None = None, progress: bool = True,
                 saliency_kwargs: dict | None = None, fd_step: float = 1e-2, lr_schedule: str = "cosine",
                 checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int | None = None,
                 precision: str = "fp32", oom_retry: bool = False, fast: FastLike = "auto",
                 init: str = "pca", patience: int | None = None, min_delta: float = 0.0) -> None:
        check_model(model)
        self.patience, self.min_delta = check_early_stop(patience, min_delta)
        check_choice("init", init, INITS)
        self.init = init
        self.fast = check_fast(fast, model)
        self.oom_retry = check_flag("oom_retry", oom_retry)
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
        check_checkpoint_args(checkpoint_dir, checkpoint_every)
        check_precision(precision)
        self.checkpoint_dir, self.checkpoint_every, self.precision = checkpoint_dir, checkpoint_every, precision
        self.spec = make_spec(saliency, target_kind, dissimilarity, saliency_kwargs)
        self.model, self.eps, self.epochs, self.batch_size = model, float(eps), epochs, batch_size
        self.lr, self.optimizer, self.noise_std, self.hvp = lr, optimizer, noise_std, hvp
        self.surrogate, self.preserve_labels, self.seed = surrogate, float(preserve_labels), seed
        self.device, self.progress, self.fd_step, self.lr_schedule = device, progress, fd_step, lr_schedule
        self.saliency, self.target_kind, self.dissimilarity = saliency, target_kind, dissimilarity
        self.saliency_kwargs = dict(saliency_kwargs or {})

    def _default_lr(self, d: int) -> float:
        f = _LR_FRACTION[self.init]
        if self.optimizer == "normalized" or self.norm == math.inf:
            return f * self.eps
        return f * self.eps / math.sqrt(d)

    def _lr_at(self, lr: float, step: int, total: int | None) -> float:
        if self.lr_schedule == "constant" or not total:
            return lr
        lo = lr / 25.0
        return lo + (lr - lo) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    def fit(self, data: DataLike, resume: bool = False) -> "UPIGrad":
        """Compute the perturbation on ``data``: a DataLoader of ``(x, y)`` or a tuple ``(X, y)``.

        Only samples the clean model classifies correctly are used. With ``init="pca"`` the start is
        computed from ``data`` first (UPI-PCA: one more pass over it). With ``resume=True`` the run
        continues from the newest good checkpoint in ``checkpoint_dir`` (from scratch when there is
        none) and ends as an uninterrupted run would. Under ``torch.distributed`` every process
        calls ``fit`` with the same data; each handles its share of every global batch and all end
        with the same ``delta_``. Returns ``self``.
        """
        t0 = time.perf_counter()
        comm = current()
        device = resolve_device(self.device, self.model)
        autocast = autocast_factory(self.precision, device)
        self._micro = micro = MicroBatcher(self.oom_retry, self.batch_size, device)
        with eval_mode(self.model):
            self._fast = FastSteps.for_solver(self)  # first: the clean maps run on its prepared copy too
            stream = CleanBatches(self.model, data, self.batch_size, self.spec, device, shuffle=True,
                                  surrogate=self.surrogate, seed=self.seed, comm=comm, autocast=autocast, micro=micro,
                                  net=getattr(getattr(self._fast, "step", None), "model_", None))
            shape = stream.input_shape
            d = math.prod(shape)
            lr = self.lr if self.lr is not None else self._default_lr(d)
            sigma = self.noise_std if self.noise_std is not None else default_noise_std(self.eps, self.norm, d)
            ckpt = RunCheckpoints(self.checkpoint_dir, self.checkpoint_every, "UPIGrad",
                                  self._config(stream), comm, resume)
            gen = torch.Generator(device=device).manual_seed(self.seed)
            found = ckpt.restore() if resume else None
            start = self._start(data, stream, gen, device, found)
            st = _GradState(start.clone(), _Adam(start) if self.optimizer == "adam" else None, gen,
                            None if self.init == "random" else start)
            st.restore(found, device)
            total = self.epochs * stream.batches_per_epoch
            show = self.progress and comm.is_main
            with tqdm(total=total or None, initial=st.batch_count, desc="UPI-Grad", disable=None if show else True,
                      leave=False) as bar:
                for epoch in range(st.epoch, self.epochs):
                    for batch in stream.epoch(epoch, start=st.batch):
                        self._train_step(st, batch, stream, sigma, lr, total, autocast)
                        st.advance(batch)
                        ckpt.maybe_save(st.batch_count, st.checkpoint)
                        bar.update(1)
                        if st.history:
                            bar.set_postfix(loss=f"{st.history[-1]:.4f}")
                    st.end_epoch()
                    if self.patience is not None and should_stop(st.epoch_history(), self.patience,
                                                                 self.min_delta, comm):
                        break
            delta, self.start_score_, self.score_, self.refined_ = choose(self, st.delta, st.start, stream, autocast,
                                                                          self._start_values)
            self._start_values = None
            delta = comm.broadcast_(delta.clone())
        self.delta_ = delta.detach().float().cpu()
        self.start_ = start.detach().float().cpu().clone()
        self.history_ = list(st.history)
        self.n_samples_ = stream.n_correct if stream.kind == "cached" else st.epoch_correct
        self.n_steps_ = len(st.history)
        self.epoch_history_ = st.epoch_history()
        self.stopped_epoch_ = st.epoch if st.epoch < self.epochs else None
        self.micro_batch_ = micro.limit
        self.step_ = None if self._fast is None else self._fast.step
        self.fit_time_ = time.perf_counter() - t0
        return self

    def _start(self, data, stream, gen, device, found) -> torch.Tensor:
        """The first iterate: a random point of the ball, the start a resumed run began from, or the
        UPI-PCA perturbation of ``data`` (same settings; every process gets the same one)."""
        self._start_values = None
        if self.init == "random":
            return random_in_ball(stream.input_shape, self.eps, self.norm, generator=gen, device=device)
        if found is not None:
            return found[0]["start"].to(device, torch.float32)
        # tensors are held anyway: UPI-PCA's own choice (the exact SVD when the n x d rows fit its budget);
        # a loader is streamed: the single-pass sketch keeps memory independent of the number of samples and
        # merges linearly across processes (so several processes start where one would); 20 extra columns
        # (memory 3 x 21 x d floats) come within |cos| >= 0.99 of the exact top vector on the digits default
        # (seeds 0-3; the default 10: 0.91-0.998)
        solver, sketch = ("auto", None) if stream.kind == "cached" else ("sketch", {"oversample": 20})
        pca = UPIPCA(self.model, self.eps, norm=self.norm, saliency=self.saliency, target_kind=self.target_kind,
                     dissimilarity=self.dissimilarity, noise_std=self.noise_std, batch_size=self.batch_size,
                     seed=self.seed, device=device, progress=self.progress, hvp=self.hvp, surrogate=self.surrogate,
                     saliency_kwargs=self.saliency_kwargs, fd_step=self.fd_step, precision=self.precision,
                     oom_retry=self.oom_retry, fast=self.fast, solver=solver, sketch_kwargs=sketch).fit(data)
        self._start_values = pca._sign_values  # the start's per-sample losses, for the final choice
        return pca.delta_.to(device, torch.float32)

    def _config(self, stream) -> dict:
        """What must match to resume a checkpoint."""
        cfg = {"eps": self.eps, "norm": self.norm, "saliency": self.saliency, "target_kind": self.target_kind,
               "dissimilarity": self.dissimilarity, "spec": spec_fields(self.spec), "epochs": self.epochs,
               "batch_size": self.batch_size, "lr": self.lr, "optimizer": self.optimizer,
               "noise_std": self.noise_std, "hvp": self.hvp, "surrogate": self.surrogate,
               "preserve_labels": self.preserve_labels, "seed": self.seed, "fd_step": self.fd_step,
               "lr_schedule": self.lr_schedule, "precision": self.precision,
               "fast": fast_config(self.fast),
               "data": {"kind": stream.kind, "input_shape": stream.input_shape,
                        "batches_per_epoch": stream.batches_per_epoch}}
        if self.init != "random":  # absent for the random start, so that earlier checkpoints still resume
            cfg["init"] = self.init
        if self.patience is not None:  # likewise absent without early stop
            cfg["early_stop"] = {"patience": self.patience, "min_delta": self.min_delta}
        return cfg

    def _train_step(self, st: "_GradState", batch, stream, sigma: float, lr: float, total: int, autocast) -> None:
        """One global step: noise for the global batch, this rank's gradient sum, all-reduced into the
        global mean (over the global batch's correctly classified samples), then the update."""
        z = batch_noise(batch, stream.input_shape, sigma, st.gen, stream.dtype, st.delta.device)
        if batch.n_global == 0:
            return
        sg_gen = stream.smoothgrad_generator(st.epoch, batch.index, 1)
        loss_mean, grad = self._global_grad(batch, st.delta, z, sg_gen, stream, autocast)
        st.delta = self._step(st.delta, grad, self._lr_at(lr, len(st.history), total), st.adam)
        st.history.append(loss_mean)

    def _global_grad(self, batch, delta, z, sg_gen, stream, autocast) -> tuple[float, torch.Tensor]:
        """``(mean loss, mean gradient)`` over the global batch, the same on every rank."""
        d = delta.numel()
        buf = torch.zeros(d + 1, dtype=torch.float64, device=delta.device)
        if batch.n:
            x, y, I_ref = batch.x, batch.y, batch.I_ref
            x_eval = x if z is None else x + z.to(x.dtype)
            parts = self._micro.run(
                lambda lo, hi: self._objective_grad(x_eval[lo:hi], y[lo:hi], I_ref[lo:hi], delta, sg_gen, autocast,
                                                    x_clean=x[lo:hi]),
                batch.n, "the attack gradient", generators=(sg_gen,))
            if len(parts) == 1:
                loss, grad = parts[0][2]
                buf[:d] = grad.reshape(-1).double() * (batch.n / batch.n_global)
            else:  # each part is the mean over its micro-batch: weight by its size
                buf[:d] = sum(g.reshape(-1).double() * (hi - lo) for lo, hi, (_, g) in parts) / batch.n_global
                loss = torch.cat([p[0] for _, _, p in parts])
            buf[d] = loss.double().sum()
        stream.comm.all_reduce_(buf)
        if not bool(torch.isfinite(buf).all()):
            raise ValueError(f"the attack gradient is NaN or Inf (precision={self.precision!r}); "
                             "use precision='fp32' or a smaller eps / noise_std")
        return float(buf[d]) / batch.n_global, buf[:d].reshape(delta.shape).to(delta.dtype)

    def _objective_grad(self, x_eval, y, I_ref, delta, generator, autocast, x_clean):
        if self._fast is not None:
            loss, grad = self._fast(x_eval, y, I_ref, delta.to(x_eval.dtype), generator)
        else:
            with autograd_errors(self.hvp), surrogate_context(self.model, self.surrogate), autocast():
                loss, grad = _loss_grad(self.model, x_eval, y, I_ref, delta.to(x_eval.dtype), self.spec, self.hvp,
                                        0.0, generator, self.fd_step)
        if self.preserve_labels > 0:
            with autograd_errors(self.hvp), torch.enable_grad():
                dd = delta.detach().to(x_clean.dtype).requires_grad_(True)
                ce = torch.nn.functional.cross_entropy(self.model(x_clean + dd), y)
                (g_ce,) = torch.autograd.grad(ce, dd)
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
                f"optimizer={self.optimizer!r}, epochs={self.epochs}, batch_size={self.batch_size}, init={self.init!r})")


class _GradState:
    """Everything a UPI-Grad run carries from step to step (and what a checkpoint holds)."""

    def __init__(self, delta: torch.Tensor, adam: "_Adam | None", gen: torch.Generator,
                 start: torch.Tensor | None = None) -> None:
        self.delta, self.adam, self.gen = delta, adam, gen
        self.start = start  # the UPI-PCA start (None for a random one: nothing to compare with)
        self.epoch = self.batch = self.batch_count = 0  # position: next batch of epoch; batches done
        self.history: list[float] = []
        self.seen = self.correct = 0  # this epoch so far
        self.epoch_correct = 0  # correctly classified samples of the last full epoch
        self.epoch_ends: list[int] = []  # len(history) at the end of every epoch

    def epoch_history(self) -> list[float]:
        return epoch_objectives(self.history, self.epoch_ends)

    def advance(self, batch) -> None:
        self.batch, self.batch_count = self.batch + 1, self.batch_count + 1
        self.seen, self.correct = self.seen + batch.size, self.correct + batch.n_global

    def end_epoch(self) -> None:
        self.epoch, self.batch = self.epoch + 1, 0
        self.epoch_correct, self.seen, self.correct = self.correct, 0, 0
        self.epoch_ends.append(len(self.history))

    def checkpoint(self) -> tuple[dict, dict]:
        tensors = {"delta": self.delta, "gen_state": generator_state(self.gen),
                   "history": torch.tensor(self.history, dtype=torch.float64)}
        meta = {"epoch": self.epoch, "batch": self.batch, "batch_count": self.batch_count, "seen": self.seen,
                "correct": self.correct, "epoch_correct": self.epoch_correct, "epoch_ends": list(self.epoch_ends)}
        if self.adam is not None:
            tensors.update({"adam.m": self.adam.m, "adam.v": self.adam.v})
            meta["adam.t"] = self.adam.t
        if self.start is not None:
            tensors["start"] = self.start
        return tensors, meta

    def restore(self, found, device) -> None:
        if found is None:
            return
        tensors, meta = found
        if tuple(tensors["delta"].shape) != tuple(self.delta.shape):
            raise ValueError(f"resume: the checkpoint's delta has shape {tuple(tensors['delta'].shape)}, the data "
                             f"{tuple(self.delta.shape)}")
        self.delta = tensors["delta"].to(device, self.delta.dtype)
        set_generator_state(self.gen, tensors["gen_state"])
        self.history = tensors["history"].tolist()
        for k in ("epoch", "batch", "batch_count", "seen", "correct", "epoch_correct"):
            setattr(self, k, int(meta[k]))
        self.epoch_ends = [int(v) for v in meta.get("epoch_ends", [])]  # absent in older checkpoints
        if self.adam is not None:
            self.adam.m = tensors["adam.m"].to(device, self.delta.dtype)
            self.adam.v = tensors["adam.v"].to(device, self.delta.dtype)
            self.adam.t = int(meta["adam.t"])


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
