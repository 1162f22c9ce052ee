"""The naive batched loops: the same math as ``UPIPCA.fit`` / ``UPIGrad.fit`` (default settings:
simple gradient saliency, probability target, ``abs_sum_l1`` maps, L2 dissimilarity, L2 ball,
normalised steps with the cosine schedule, the smoothing noise of the solvers), written as a plain
user would: batched eager float32 double backward through the saliency map on the model as given,
the clean maps computed once and reused, nothing prepared, nothing confirmed, nothing cached across
calls. The random draws (noise, epoch order) come from the same generators as the solvers', so the
result is the solvers' to float rounding (:func:`bench.fits` reports the agreement).

* :func:`naive_clean`: correctly classified samples with a nonzero clean map, and their maps;
* :func:`naive_pca`: per-sample directions (double backward), rows L2-normalised, top right singular
  vector, the sign chosen by the mean dissimilarity on the attack data (the cached maps as reference);
* :func:`naive_grad`: projected ascent from a start (UPI-PCA's, or a random point of the ball), then
  (``UPIGrad``'s ``init="pca"``) the last iterate if its paired per-sample gain over the start on the
  attack objective exceeds 2 standard errors, else the start.
"""
from __future__ import annotations

import math

import torch

from upi_fast.data import epoch_order, global_batches
from upi_fast.dissimilarity import dissimilarity
from upi_fast.projection import project, random_in_ball, steepest_step
from upi_fast.saliency import postprocess_maps, raw_gradient

__all__ = ["naive_clean", "naive_pca", "naive_grad", "naive_step", "naive_fit"]


def _maps(model, x, y, create_graph=False):
    return postprocess_maps(raw_gradient(model, x, y, "simple", "prob", create_graph=create_graph), "abs_sum_l1")


def naive_clean(model, X, Y, batch):
    """``(X, Y, maps)`` of the samples the model classifies correctly and whose map is nonzero."""
    xs, ys, ms = [], [], []
    for i in range(0, X.shape[0], batch):
        x, y = X[i:i + batch], Y[i:i + batch]
        with torch.no_grad():
            keep = model(x).argmax(1) == y
        x, y = x[keep], y[keep]
        m = _maps(model, x, y).detach()
        nz = (m != 0).any(1)
        xs.append(x[nz]), ys.append(y[nz]), ms.append(m[nz])
    return torch.cat(xs), torch.cat(ys), torch.cat(ms)


def naive_step(model, x, y, I_ref, delta):
    """Per-sample losses and the gradient of their sum w.r.t. ``delta`` ((C,H,W) or (B,C,H,W)):
    one batched double backward through the saliency map."""
    d = delta.detach().requires_grad_(True)
    loss = dissimilarity(_maps(model, x + d, y, create_graph=True), I_ref, "l2")
    (g,) = torch.autograd.grad(loss.sum(), d)
    return loss.detach(), g


def _per_sample(model, X, Y, M, delta, batch):
    """(n,) float64 dissimilarities of the maps at ``X + delta`` from the clean maps ``M``."""
    return torch.cat([dissimilarity(_maps(model, X[i:i + batch] + delta, Y[i:i + batch]).detach(), M[i:i + batch],
                                    "l2").double() for i in range(0, X.shape[0], batch)])


def _score(model, X, Y, M, delta, batch):
    return float(_per_sample(model, X, Y, M, delta, batch).mean())


def naive_pca(model, X, Y, M, eps, batch, seed=0):
    """UPI-PCA (one round, exact SVD): ``(delta, {"+1": score, "-1": score})``."""
    shape = X.shape[1:]
    sigma = 0.1 * eps / math.sqrt(math.prod(shape))
    gen = torch.Generator(device=X.device).manual_seed(seed)  # the solvers' generator, so the same draws
    rows = []
    for i in range(0, X.shape[0], batch):
        x, y = X[i:i + batch], Y[i:i + batch]
        z = sigma * torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
        _, g = naive_step(model, x + z, y, M[i:i + batch], torch.zeros_like(x))
        g = g.reshape(x.shape[0], -1)
        rows.append(g / g.norm(dim=1, keepdim=True).clamp_min(1e-30))
    G = torch.cat(rows).double()
    v = torch.linalg.svd(G, full_matrices=False).Vh[0].float().reshape(shape)
    cand = eps * v / v.norm()
    scores = {"+1": _score(model, X, Y, M, cand, batch), "-1": _score(model, X, Y, M, -cand, batch)}
    return (cand if scores["+1"] >= scores["-1"] else -cand), scores


def naive_grad(model, X, Y, M, eps, batch, epochs, seed=0, start=None):
    """UPI-Grad from ``start`` (None: a random point of the ball, ``init="random"``'s learning rate)."""
    shape = X.shape[1:]
    d = math.prod(shape)
    sigma = 0.1 * eps / math.sqrt(d)
    gen = torch.Generator(device=X.device).manual_seed(seed)
    delta = random_in_ball(tuple(shape), eps, 2, generator=gen, device=X.device) if start is None else start.clone()
    lr = (0.5 if start is None else 0.02) * eps
    n, total, step = X.shape[0], epochs * -(-X.shape[0] // batch), 0
    for epoch in range(epochs):
        for idx in global_batches(epoch_order(n, seed, epoch, True).to(X.device), batch):
            x, y, m = X[idx], Y[idx], M[idx]
            z = sigma * torch.randn(x.shape, generator=gen, dtype=x.dtype, device=x.device)
            _, g = naive_step(model, x + z, y, m, delta)
            lr_t = lr / 25 + (lr - lr / 25) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
            delta = project(delta + lr_t * steepest_step(g / x.shape[0], 2), eps, 2).detach()
            step += 1
    if start is None:
        return delta
    # the last iterate when its paired per-sample gain over the start exceeds 2 standard errors
    gain = _per_sample(model, X, Y, M, delta, batch) - _per_sample(model, X, Y, M, start, batch)
    return delta if float(gain.mean()) > 2 * float(gain.std()) / math.sqrt(gain.numel()) else start


def naive_fit(kind, model, X, Y, eps, batch, epochs=1, seed=0):
    """The whole naive fit: ``"pca"`` (UPI-PCA), ``"grad"`` (UPI-Grad from the UPI-PCA start, the
    default) or ``"grad_random"`` (UPI-Grad from a random start). Returns delta (C, H, W)."""
    Xc, Yc, Mc = naive_clean(model, X, Y, batch)
    if kind == "grad_random":
        return naive_grad(model, Xc, Yc, Mc, eps, batch, epochs, seed)
    start, _ = naive_pca(model, Xc, Yc, Mc, eps, batch, seed)
    return start if kind == "pca" else naive_grad(model, Xc, Yc, Mc, eps, batch, epochs, seed, start)
