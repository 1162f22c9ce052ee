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

import contextlib
import math
import os
import time
import weakref

import torch
from tqdm.auto import tqdm

from .._checks import DeviceLike, ModelLike, NormLike, check_choice, check_model, check_positive, eval_mode
from ..checkpoint import generator_state, set_generator_state
from ..dissimilarity import dissimilarity as dissimilarity_fn
from ..distributed import current
from ..hvp import _loss_grad
from ..linalg import spill_dtype as spill_dtype_check
from ..saliency import postprocess_maps, raw_gradient
from ._accumulators import SOLVERS, make_accumulator, pca_plus_direction, resolve_solver
from ._batches import CleanBatches, batch_noise
from ._common import (DataLike, FastLike, SurrogateLike, autocast_factory, autograd_errors, check_common,
                      check_fast, check_flag, check_hvp, check_precision, default_noise_std, make_spec, resolve_device,
                      spec_fields, surrogate_context)
from ._fast import FastSteps, fast_config
from ._microbatch import MicroBatcher
from ._state import RunCheckpoints, check_checkpoint_args

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
            ``memory_budget`` bytes at its peak, else block Krylov over rows spilled to ``spill_dir``, or the
            single-pass sketch where spilling is impossible), ``"exact"``,
            ``"sketch"`` (single pass, mergeable), ``"frequent_directions"``, ``"subspace"`` /
            ``"block_krylov"`` (multi-pass: rows spill to a memory-mapped file in ``spill_dir``).
        spill_dtype: storage of the spill file of the multi-pass solvers: ``"float32"`` (default,
            4 d bytes a row), ``"float16"`` (rows stored divided by a per-row power of two, so no
            overflow or underflow whatever the row norms; rounding <= 2^-11 relative) or
            ``"bfloat16"`` (<= 2^-8 relative): 2 d bytes a row, half the disk and half the bytes
            read per pass. Rows are normalised (``normalize_rows``) before they are spilled.
        plus_lambda: PCA+ weight lambda (None: plain UPI-PCA).
        rounds: rounds of direction collection (>= 1).
        batch_size: samples per direction batch.
        seed: seeds the offsets, sketches and random starts.
        device, progress: as :class:`UPIGrad`.
        hvp: how the per-sample directions are computed (:data:`upi_fast.HVP_MODES`).
        surrogate: None, ``"softplus"`` or a beta (see :class:`UPIGrad`).
        saliency_kwargs, fd_step: as :class:`UPIGrad`.
        n_components: singular values / vectors to report (the perturbation uses the first).
        memory_budget: bytes the exact solver may use at its peak (16 per entry of the n x d matrix: the
            float32 rows, their concatenation and its float64 copy; ``"auto"``).
        sketch_kwargs: extra arguments of the streaming solver (oversample, n_iter, ...).
        checkpoint_dir, checkpoint_every: as :class:`UPIGrad` (steps = direction batches, counted over
            all rounds); a checkpoint holds the round, the batch position, the noise generator state,
            delta of the previous rounds and every process's partial accumulators (sketch state,
            exact rows so far, or FD buffer); the multi-pass solvers cannot be checkpointed. Resuming
            a distributed run needs the same number of processes.
        precision: as :class:`UPIGrad` (rows and sketches stay float32).
        oom_retry: as :class:`UPIGrad`: on running out of device memory, compute the rows of a batch
            in micro-batches of half the size (the rows are per sample, so nothing changes).
        fast: the per-sample directions through the prepared step of :mod:`upi_fast.accel` (as
            :class:`UPIGrad`'s ``fast``: ``"auto"`` (default: on for an ``nn.Module``), ``False`` (the
            reference code), ``True``, ``"autotune"`` or a dict of FastStep options; the same rows to
            float32 rounding).

    Distributed: ``"sketch"`` and ``"exact"`` give the single-process result to rounding;
    ``"frequent_directions"`` merges the processes' sketches (valid, not bit-equal);
    ``"subspace"`` / ``"block_krylov"`` are single-process only.

    Attributes (after :meth:`fit`):
        delta_: (C, H, W) float32 CPU. sign_: +1 or -1. singular_values_: (n_components,) of G.
        components_: (n_components, d) right singular vectors. residual_: ``||A v - theta v||``
        of the PCA+ eigenvector (None otherwise); eigenvalue_: theta (PCA+). n_samples_: rows used
        per round. sign_scores_: mean attack-split dissimilarity for s = +1 and -1. fit_time_.
        micro_batch_: the micro-batch size ``oom_retry`` settled on (None: batches were never split).
        step_: the :class:`~upi_fast.accel.FastStep` used for the directions (None unless ``fast``).
    """

    def __init__(self, model: ModelLike, eps: float, norm: NormLike = 2, saliency: str = "simple",
                 target_kind: str = "prob", dissimilarity: str = "l2", noise_std: float | None = None,
                 normalize_rows: bool = True, solver: str = "auto", plus_lambda: float | None = None, rounds: int = 1,
                 batch_size: int = 128, seed: int = 0, device: DeviceLike | None = None, progress: bool = True,
                 hvp: str = "double_backward", surrogate: SurrogateLike = None, saliency_kwargs: dict | None = None,
                 fd_step: float = 1e-2, n_components: int = 1, memory_budget: int = 2 * 2**30,
                 spill_dir: str | None = None, spill_dtype: str = "float32", sketch_kwargs: dict | None = None,
                 checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int | None = None,
                 precision: str = "fp32", oom_retry: bool = False, fast: FastLike = "auto") -> None:
        check_model(model)
        self.fast = check_fast(fast, model)
        self._fast = None
        self.oom_retry = check_flag("oom_retry", oom_retry)
        self._micro = MicroBatcher(oom_retry, batch_size)
        self.norm = check_common(eps, norm, batch_size, seed)
        check_choice("solver", solver, SOLVERS)
        check_hvp(hvp)
        check_positive("rounds", rounds, integer=True)
        check_positive("n_components", n_components, integer=True)
        if noise_std is not None:
            check_positive("noise_std", noise_std, allow_zero=True)
        if plus_lambda is not None:
            check_positive("plus_lambda", plus_lambda, allow_zero=True)
        check_checkpoint_args(checkpoint_dir, checkpoint_every)
        check_precision(precision)
        spill_dtype_check(spill_dtype, "spill_dtype")
        self.checkpoint_dir, self.checkpoint_every, self.precision = checkpoint_dir, checkpoint_every, precision
        self._autocast = contextlib.nullcontext
        self.spec = make_spec(saliency, target_kind, dissimilarity, saliency_kwargs)
        self.model, self.eps, self.noise_std, self.normalize_rows = model, float(eps), noise_std, bool(normalize_rows)
        self.solver, self.plus_lambda, self.rounds, self.batch_size = solver, plus_lambda, rounds, batch_size
        self.seed, self.device, self.progress, self.hvp = seed, device, progress, hvp
        self.surrogate, self.fd_step, self.n_components = surrogate, fd_step, n_components
        self.memory_budget, self.spill_dir, self.sketch_kwargs = memory_budget, spill_dir, dict(sketch_kwargs or {})
        self.spill_dtype = spill_dtype
        self.saliency, self.target_kind, self.dissimilarity = saliency, target_kind, dissimilarity

    # -- the pieces -------------------------------------------------------------------------------
    def directions(self, x: torch.Tensor, y: torch.Tensor, I_ref: torch.Tensor, delta_prev: torch.Tensor,
                   sigma: float, gen: torch.Generator | None) -> torch.Tensor:
        """Per-sample attack directions (B, d): ``grad_{x'} D(I(x_i), I(x'))`` at ``x' = x + z + delta_prev``
        (``z`` drawn from ``gen`` with std ``sigma``)."""
        z = None if sigma == 0 else sigma * torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
        return self._directions(x if z is None else x + z, y, I_ref, delta_prev, gen)

    def _directions(self, x_eval, y, I_ref, delta_prev, sg_gen) -> torch.Tensor:
        def part(lo: int, hi: int) -> torch.Tensor:
            b = hi - lo
            per = delta_prev.to(x_eval.dtype).expand(b, *delta_prev.shape).contiguous()
            if self._fast is not None:
                _, g = self._fast(x_eval[lo:hi], y[lo:hi], I_ref[lo:hi], per, sg_gen)
            else:
                with autograd_errors(self.hvp), surrogate_context(self.model, self.surrogate), self._autocast():
                    _, g = _loss_grad(self.model, x_eval[lo:hi], y[lo:hi], I_ref[lo:hi], per, self.spec, self.hvp,
                                      0.0, sg_gen, self.fd_step)
            return (g * b).reshape(b, -1)

        return _joined(self._micro.run(part, x_eval.shape[0], "the attack directions", generators=(sg_gen,)))

    def label_directions(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Rows of V for PCA+: ``grad_x p_y(x_i)`` (B, d) of the real network."""
        def part(lo: int, hi: int) -> torch.Tensor:
            with self._autocast():
                return raw_gradient(self.model, x[lo:hi], y[lo:hi], "simple", "prob").reshape(hi - lo, -1)

        return _joined(self._micro.run(part, x.shape[0], "the label directions (PCA+)"))

    def _perturbation(self, v: torch.Tensor, shape) -> torch.Tensor:
        v = v.reshape(shape)
        if self.norm == math.inf:
            return self.eps * v.sign()
        return self.eps * v / v.norm().clamp_min(1e-30)

    def _sign_scores(self, stream: CleanBatches, cand: torch.Tensor) -> tuple[float, float]:
        """Mean attack loss of ``+cand`` and ``-cand`` over the attack data (real network, no noise),
        summed over all processes' shares. Fixed costs cut: the clean maps the stream holds are the
        real network's (no surrogate, no smoothgrad draws) on cached tensors, so they are reused rather
        than computed again; the maps run through the fit's prepared copy when there is one (the same
        function to float rounding, BatchNorm folded). When reused, the per-sample losses of both
        signs are kept by cache row (``_sign_values``: NaN for rows another process scored) for a
        caller that needs them again (UPIGrad's final choice compares its last iterate with them)."""
        tot_p = tot_m = 0.0
        n = 0
        s = self.spec
        real = self.surrogate is None or self.surrogate is False
        reuse = real and stream.kind == "cached" and not s.stochastic
        step = getattr(self._fast, "step", None)
        net = step.model_ if real and step is not None else self.model
        per = (torch.full((2, stream.n_correct), math.nan, dtype=torch.float64, device=cand.device)
               if reuse else None)

        def maps(x, y):
            with self._autocast():
                g = raw_gradient(net, x, y, s.method, s.target_kind, False, s.steps, s.baseline,
                                 s.multiply_by_input, integration=s.integration)
                return postprocess_maps(g, s.postprocess)

        def part(x, y, ref=None, rows=None) -> tuple[float, float, int]:
            ref = maps(x, y) if ref is None else ref
            nz = (ref != 0).any(1)  # samples without an interpretation are left out, as in the attack
            if not bool(nz.any()):
                return 0.0, 0.0, 0
            if not bool(nz.all()):
                x, y, ref = x[nz], y[nz], ref[nz]
                rows = None if rows is None else rows[nz]
            vals = []
            for j, sign in enumerate((1, -1)):
                adv = maps(x + sign * cand.to(x.dtype), y)
                v = dissimilarity_fn(adv.to(x.dtype), ref.to(x.dtype), s.dissimilarity, k=s.k)
                if rows is not None:
                    per[j, rows.to(per.device)] = v.detach().double()
                vals.append(float(v.sum()))
            return vals[0], vals[1], int(x.shape[0])

        for batch in stream.epoch(0, maps=reuse):
            if not batch.n:
                continue
            x, y, I_ref, rows = batch.x, batch.y, batch.I_ref, batch.rows if reuse else None
            for _, _, (p, m, c) in self._micro.run(
                    lambda lo, hi: part(x[lo:hi], y[lo:hi], None if I_ref is None else I_ref[lo:hi],
                                        None if rows is None else rows[lo:hi]), batch.n, "the sign scores"):
                tot_p += p
                tot_m += m
                n += c
        tot_p, tot_m, n = stream.comm.sum_floats(tot_p, tot_m, n)
        self._sign_values = None if per is None else (weakref.ref(stream._cache[0]), per)  # no hold on the data
        return tot_p / max(n, 1), tot_m / max(n, 1)

    def _accumulators(self, solver: str, d: int, n: int, r: int, device):
        rows = make_accumulator(solver, d, n, self.n_components, self.seed + r, self.normalize_rows, device,
                                self.memory_budget, self.spill_dir, self.sketch_kwargs, self.spill_dtype)
        lab = (make_accumulator(solver, d, n, 1, self.seed + 7919 + r, self.normalize_rows, device,
                                self.memory_budget, self.spill_dir, self.sketch_kwargs, self.spill_dtype)
               if self.plus_lambda is not None else None)
        return rows, lab

    def _config(self, stream, solver: str) -> dict:
        """What must match to resume a checkpoint."""
        return {"eps": self.eps, "norm": self.norm, "spec": spec_fields(self.spec), "noise_std": self.noise_std,
                "normalize_rows": self.normalize_rows, "solver": solver, "plus_lambda": self.plus_lambda,
                "rounds": self.rounds, "batch_size": self.batch_size, "seed": self.seed, "hvp": self.hvp,
                "surrogate": self.surrogate, "fd_step": self.fd_step, "n_components": self.n_components,
                "sketch_kwargs": self.sketch_kwargs, "precision": self.precision,
                "fast": fast_config(self.fast),
                "data": {"kind": stream.kind, "input_shape": stream.input_shape,
                         "batches_per_epoch": stream.batches_per_epoch}}

    def _collect(self, stream: CleanBatches, st: "_PCAState", r: int, rows, lab, sigma: float, ckpt) -> None:
        """Round ``r``'s direction rows of this process's shares, from ``st.batch`` on, into the
        accumulators (global row indices), checkpointing when due."""
        show = self.progress and stream.comm.is_main
        with tqdm(total=stream.batches_per_epoch or None, initial=st.batch, desc=f"UPI-PCA round {r + 1}/{self.rounds}",
                  disable=None if show else True, leave=False) as bar:
            for batch in stream.epoch(r, start=st.batch):
                z = batch_noise(batch, stream.input_shape, sigma, st.gen, stream.dtype, st.delta.device)
                if batch.n:
                    x_eval = batch.x if z is None else batch.x + z.to(batch.x.dtype)
                    g = self._directions(x_eval, batch.y, batch.I_ref, st.delta,
                                         stream.smoothgrad_generator(r, batch.index, 1))
                    rows.update(g, row_offset=st.row_base + batch.offset)
                    if lab is not None:
                        lab.update(self.label_directions(batch.x, batch.y), row_offset=st.row_base + batch.offset)
                st.advance(batch.n_global)
                ckpt.maybe_save(st.position, lambda: st.checkpoint(stream.comm, rows, lab))
                bar.update(1)

    def _solve(self, rows, lab, r: int, comm):
        """Merge the processes' accumulators; ``(S, Vh, v)`` with ``v`` the UPI-PCA (or PCA+) direction."""
        for acc in (rows, lab):
            if acc is not None:
                acc.merge(comm)
        S, Vh = rows.finalize(self.n_components)
        if self.plus_lambda is None:
            self.eigenvalue_, self.residual_ = None, None
            return S, Vh, Vh[0]
        v, theta, resid = pca_plus_direction(rows, lab, self.plus_lambda, seed=self.seed + r)
        self.eigenvalue_, self.residual_ = float(theta), float(resid)
        return S, Vh, v

    # -- fit ---------------------------------------------------------------------------------------
    def fit(self, data: DataLike, resume: bool = False) -> "UPIPCA":
        """Compute the perturbation from ``data`` (a DataLoader of ``(x, y)`` or a tuple ``(X, y)``).

        ``data`` is read only here; the sign is chosen on it too (never on evaluation data). With
        ``resume=True`` the run continues from the newest good checkpoint in ``checkpoint_dir``.
        Under ``torch.distributed`` each process computes the rows of its share of every global
        batch (with global row indices, so the test matrices agree), the accumulators are merged
        (sketches summed, exact rows gathered) and the sign is decided on the whole attack split.
        """
        t0 = time.perf_counter()
        comm = current()
        device = resolve_device(self.device, self.model)
        self._autocast = autocast_factory(self.precision, device)
        self._micro = MicroBatcher(self.oom_retry, self.batch_size, device)
        try:
            with eval_mode(self.model):
                self._fast = FastSteps.for_solver(self)
                self._fit(data, resume, comm, device)
            self.step_ = None if self._fast is None else self._fast.step
        finally:
            self._autocast = contextlib.nullcontext
            self._fast = None
        self.micro_batch_ = self._micro.limit
        self.fit_time_ = time.perf_counter() - t0
        return self

    def _fit(self, data, resume: bool, comm, device) -> None:
        self._sign_values = None
        stream = CleanBatches(self.model, data, self.batch_size, self.spec, device, shuffle=False,
                              surrogate=self.surrogate, seed=self.seed, comm=comm, autocast=self._autocast,
                              micro=self._micro, net=getattr(getattr(self._fast, "step", None), "model_", None))
        shape = stream.input_shape
        d = math.prod(shape)
        sigma = self.noise_std if self.noise_std is not None else default_noise_std(self.eps, self.norm, d)
        ds = getattr(data, "dataset", None)  # an IterableDataset may have no length: 0, unknown
        n_est = stream.n_correct or (len(ds) if hasattr(ds, "__len__") else 0)
        solver = resolve_solver(self.solver, d, n_est, self.memory_budget,
                                multi_pass_ok=not comm.active and self.checkpoint_dir is None)
        if solver in ("subspace", "block_krylov") and (comm.active or self.checkpoint_dir is not None):
            raise ValueError(f"solver={solver!r} spills rows to a local file: it supports neither several processes "
                             "nor checkpoints; use solver='sketch', 'exact' or 'frequent_directions'")
        ckpt = RunCheckpoints(self.checkpoint_dir, self.checkpoint_every, "UPIPCA", self._config(stream, solver),
                              comm, resume)
        st = _PCAState(torch.zeros(shape, device=device), torch.Generator(device=device).manual_seed(self.seed))
        found = st.restore(ckpt.restore(), device, comm) if resume else None
        for r in range(st.round, self.rounds):
            rows, lab = self._accumulators(solver, d, stream.n_correct, r, device)
            try:
                if found is not None:
                    st.load_accumulators(found, comm.rank, rows, lab)
                    found = None
                self._collect(stream, st, r, rows, lab, sigma, ckpt)
                S, Vh, v = self._solve(rows, lab, r, comm)
            finally:
                for acc in (rows, lab):
                    if hasattr(acc, "close"):
                        acc.close()
            cand = self._perturbation(v.to(device), shape).float()  # scored as returned: float32
            scores = self._sign_scores(stream, cand)
            sign = 1 if scores[0] >= scores[1] else -1
            st.delta = comm.broadcast_((sign * cand).contiguous())
            st.end_round()
        self.delta_ = st.delta.detach().float().cpu()
        self.sign_ = sign
        self.sign_scores_ = {"+1": scores[0], "-1": scores[1]}
        self.singular_values_ = S.detach().float().cpu()
        self.components_ = Vh.detach().float().cpu()
        self.n_samples_ = stream.n_correct if stream.n_correct else st.last_rows
        if self._sign_values is not None:  # the chosen sign's per-sample losses, by cache row
            self._sign_values = (self._sign_values[0], self._sign_values[1][0 if sign == 1 else 1])

    def __repr__(self) -> str:
        return (f"UPIPCA(eps={self.eps}, norm={self.norm}, saliency={self.saliency!r}, solver={self.solver!r}, "
                f"plus_lambda={self.plus_lambda}, rounds={self.rounds})")


def _joined(parts: list) -> torch.Tensor:
    """The per-sample rows of :meth:`MicroBatcher.run`'s parts, in order (the part itself when whole)."""
    return parts[0][2] if len(parts) == 1 else torch.cat([p for _, _, p in parts])


class _PCAState:
    """Everything a UPI-PCA run carries between direction batches (and what a checkpoint holds)."""

    def __init__(self, delta: torch.Tensor, gen: torch.Generator) -> None:
        self.delta, self.gen = delta, gen
        self.round = self.batch = self.position = 0  # next batch of the round; batches done in all rounds
        self.row_base = 0  # global rows (kept samples) before the next batch of this round
        self.last_rows = 0

    def advance(self, n_global: int) -> None:
        self.batch, self.position, self.row_base = self.batch + 1, self.position + 1, self.row_base + n_global

    def end_round(self) -> None:
        self.round, self.batch, self.last_rows, self.row_base = self.round + 1, 0, self.row_base, 0

    def checkpoint(self, comm, rows, lab) -> tuple[dict, dict]:
        """The state, with every process's accumulators gathered (rank 0 writes them all)."""
        mine = {name: acc.state() for name, acc in (("rows", rows), ("lab", lab)) if acc is not None}
        every = comm.all_gather_objects(mine)
        tensors = {"delta": self.delta, "gen_state": generator_state(self.gen)}
        meta = {"round": self.round, "batch": self.batch, "position": self.position, "row_base": self.row_base,
                "acc": {}}
        for rank, accs in enumerate(every):
            for name, (t, m) in accs.items():
                tensors.update({f"acc.{rank}.{name}.{k}": v for k, v in t.items()})
                meta["acc"][f"{rank}.{name}"] = m
        return tensors, meta

    def restore(self, found, device, comm):
        if found is None:
            return None
        tensors, meta = found
        if meta.get("world_size") != comm.world:
            raise ValueError(f"resume: this UPI-PCA checkpoint was written by {meta.get('world_size')} process(es); "
                             f"resume it with the same number (now {comm.world})")
        if tuple(tensors["delta"].shape) != tuple(self.delta.shape):
            raise ValueError(f"resume: the checkpoint's delta has shape {tuple(tensors['delta'].shape)}, the data "
                             f"{tuple(self.delta.shape)}")
        self.delta = tensors["delta"].to(device, self.delta.dtype)
        set_generator_state(self.gen, tensors["gen_state"])
        self.round, self.batch, self.position = int(meta["round"]), int(meta["batch"]), int(meta["position"])
        self.row_base = int(meta["row_base"])
        return found

    @staticmethod
    def load_accumulators(found, rank: int, rows, lab) -> None:
        tensors, meta = found
        for name, acc in (("rows", rows), ("lab", lab)):
            key = f"{rank}.{name}"
            if acc is None or key not in meta["acc"]:
                continue
            prefix = f"acc.{key}."
            acc.load({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, meta["acc"][key])
