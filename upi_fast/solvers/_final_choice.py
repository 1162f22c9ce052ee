"""UPI-Grad's final choice with a UPI-PCA start: the last iterate, or the start when the last iterate
does not beat it on the attack data by more than the noise of that comparison.

The comparison is paired over the attack samples: per sample the attack objective
``D(I(x), I(x + delta)) - mu * CE(f(x + delta), y)`` (real network, no smoothing noise, smoothgrad's
draws shared by the clean and every perturbed map) of the start and of the last iterate; the last
iterate is taken when the mean per-sample gain exceeds 2 standard errors.

Fixed costs cut (issue 17): the comparison used to run three map passes per batch on the model as
given (the clean map again, the start's, the last iterate's). Now, for cached tensors and a
deterministic map of the real network,

* the clean maps are the stream's cache (the same maps the attack used);
* the start's per-sample losses are the ones the UPI-PCA sign decision measured for the chosen
  sign (``UPIPCA._sign_values``, by cache row; a row without one is measured here);
* the maps run through the fit's prepared copy (BatchNorm folded: the same function to float
  rounding), so one map pass per batch remains: the last iterate's.

Anything else (loaders, smoothgrad, a surrogate, a resumed start) measures all three, still on the
prepared copy when the real network is the attacked one.
"""
from __future__ import annotations

import math

import torch

from ..data import derive_seed
from ..dissimilarity import dissimilarity as dissimilarity_fn
from ..saliency import postprocess_maps, raw_gradient

__all__ = ["choose", "attack_scores"]

_SALT_SCORES = 0x5343  # smoothgrad draws of the final attack scores: derive_seed(seed, salt, batch, rank)


def choose(solver, delta: torch.Tensor, start: torch.Tensor | None, stream, autocast, start_values=None
           ) -> tuple[torch.Tensor, float | None, float | None, bool]:
    """``(delta, start score, score of the returned delta, refined)`` for ``solver`` (a UPIGrad in its
    fit) with last iterate ``delta`` and UPI-PCA ``start`` (None: a random start, nothing compared).
    ``start_values``: the UPI-PCA fit's ``_sign_values`` (or None)."""
    if start is None:
        return delta, None, None, True
    (s_start, s_last), gain, se = attack_scores(solver, stream, (start, delta), autocast, start_values)
    if gain > 2 * se:
        return delta, s_start, s_last, True
    return start, s_start, s_start, False


def _map_net(solver):
    """The network the score maps run through: the fit's prepared copy for the real network."""
    step = getattr(solver._fast, "step", None)
    real = solver.surrogate is None or solver.surrogate is False
    return step.model_ if real and step is not None else solver.model


def attack_scores(solver, stream, deltas, autocast, start_values=None) -> tuple[list[float], float, float]:
    """The mean attack objective of each of ``deltas`` over the attack data (the samples the stream
    keeps), summed over all processes' shares; and the mean per-sample gain of the last delta over
    the first with its standard error. ``start_values`` (cache-row losses of ``deltas[0]``) are used
    when the stream's cache is the one they were measured on."""
    s, mu = solver.spec, solver.preserve_labels
    net = _map_net(solver)
    real = solver.surrogate is None or solver.surrogate is False
    cached = real and stream.kind == "cached" and not s.stochastic
    known = None
    if cached and start_values is not None and start_values[0]() is stream._cache[0]:
        known = start_values[1]

    def maps(x, y, noise):
        with autocast():
            g = raw_gradient(net, x, y, s.method, s.target_kind, False, s.steps, s.baseline,
                             s.multiply_by_input, s.smoothgrad_std, s.n_samples, None, noise,
                             integration=s.integration)
        return postprocess_maps(g, s.postprocess).to(x.dtype)

    def objective(x, y, ref, noise, d):
        xd = x + d.to(x.dtype)
        v = dissimilarity_fn(maps(xd, y, noise), ref, s.dissimilarity, k=s.k).double()
        if mu > 0:
            v = v - mu * _cross_entropy(net, xd, y, autocast)
        return v

    def part(x, y, ref, rows, gen):
        noise = s.draw_noise(x, gen)
        if ref is None:
            ref = maps(x, y, noise)
        keep = (ref != 0).any(1)  # samples without an interpretation are left out, as in the attack
        if not bool(keep.all()):
            x, y, ref = x[keep], y[keep], ref[keep]
            noise = None if noise is None else noise[:, keep]
            rows = None if rows is None else rows[keep]
        if x.shape[0] == 0:
            return [0.0] * len(deltas), 0, 0.0, 0.0
        per = []
        for j, d in enumerate(deltas):
            v = None
            if j == 0 and known is not None and rows is not None:
                v = known[rows.to(known.device)].to(x.device)
                if bool(torch.isnan(v).any()):
                    v = None  # a row the sign decision did not score (another process's): measure it
                elif mu > 0:
                    v = v - mu * _cross_entropy(net, x + d.to(x.dtype), y, autocast)
            per.append(objective(x, y, ref, noise, d) if v is None else v)
        diff = per[-1] - per[0]
        return [float(v.sum()) for v in per], int(x.shape[0]), float(diff.sum()), float((diff * diff).sum())

    sums, n, dsum, dsq = [0.0] * len(deltas), 0, 0.0, 0.0
    for batch in (stream.in_order() if cached else stream.epoch(0, maps=False)):
        if not batch.n:
            continue
        gen = torch.Generator(device=batch.x.device).manual_seed(
            derive_seed(solver.seed, _SALT_SCORES, batch.index, stream.comm.rank))
        ref, rows = batch.I_ref, batch.rows
        for _, _, (vals, c, ds, dq) in solver._micro.run(
                lambda lo, hi: part(batch.x[lo:hi], batch.y[lo:hi], None if ref is None else ref[lo:hi],
                                    None if rows is None else rows[lo:hi], gen),
                batch.n, "the attack scores", generators=(gen,)):
            sums, n, dsum, dsq = [a + b for a, b in zip(sums, vals)], n + c, dsum + ds, dsq + dq
    *sums, n, dsum, dsq = stream.comm.sum_floats(*sums, n, dsum, dsq)
    n = max(n, 1)
    gain = dsum / n
    var = max(dsq / n - gain * gain, 0.0) * n / max(n - 1, 1)  # sample variance of the per-sample gains
    return [v / n for v in sums], gain, math.sqrt(var / n)


def _cross_entropy(net, x, y, autocast) -> torch.Tensor:
    """Per-sample cross-entropy (b,) float64 of ``net`` at ``x`` (half-precision logits in float32)."""
    with torch.no_grad(), autocast():
        z = net(x)
        z = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z
        return torch.nn.functional.cross_entropy(z, y, reduction="none").double()
