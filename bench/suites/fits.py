"""Benchmark suite ``fits``: whole ``UPIPCA.fit`` / ``UPIGrad.fit`` calls with the package's defaults
against the naive batched loop of the same math (:mod:`bench.naive`), side by side.

Every fit, of either contender, gets a fresh copy of the model (made outside the timing), so the
default's one-off costs (the prepared copy, the piecewise-linear confirmation, the clean maps) are
counted in every fit, as a user's first fit pays them. Contenders alternate in one process (a warm-up
fit each, then ``rounds`` rounds: naive, default, naive, default, ...); the table gives medians and
``speedup`` = naive median / default median, and the fit's cost in plain input gradients of the same
model and batch (``grad`` contender, timed in the same rounds: the unit that travels between
machines). ``rel_diff``: ``||delta_default - delta_naive|| / ||delta_naive||``: the same math, so float
rounding only, but amplified here: the prepared copy (BatchNorm folded) rounds differently, which
flips ReLU units lying within rounding of zero in a few samples of this random-weight network (in
float64 every preparation option agrees with the model to 1e-14; in float32, against the float64
model, 62 of a batch's 64 maps of the prepared copy agree to 1e-6 and two differ by 1e-3 and 1e-2,
and the model as given shows the same kind of outliers), and the top singular vector of 128
direction rows turns with them (rel_diff about 0.05; ``fast=False`` agrees with the naive loop to 1.4e-6).

Cases (CPU: torchvision ResNet-18, random weights, 10 classes, labels = the model's predictions):
UPI-PCA (exact SVD) on 128 images, batch 64; UPI-Grad (default: UPI-PCA start) on 128 images, one
epoch of batch 64 (2 steps); the same with ``init="random"``; UPI-Grad on 256 images, 2 epochs of
batch 64 (8 steps); UPI-PCA on 512 images (how the one-off costs amortise). ``--quick``: the three short cases, two rounds; ``--smoke``: the digits CNN.

    python -m bench.suites.fits [--quick] [--device cpu|cuda] [--threads N] [--no-save]
"""
from __future__ import annotations

import copy
import statistics
import time

import torch

from ..harness import apply_threads, finish_suite, machine_info, print_table, suite_parser

__all__ = ["run", "main", "CASES"]

NAIVE, DEFAULT, GRAD = "naive batched loop (double backward)", "package default (fast='auto')", "one input gradient"
#: (name, kind, images, epochs)
CASES = (("UPI-PCA, 128 images", "pca", 128, 1), ("UPI-Grad (PCA start), 128 images, 2 steps", "grad", 128, 1),
         ("UPI-Grad init='random', 128 images, 2 steps", "grad_random", 128, 1),
         ("UPI-Grad (PCA start), 256 images, 8 steps", "grad", 256, 2), ("UPI-PCA, 512 images", "pca", 512, 1))
_COLUMNS = ["case", "contender", "median_s", "min_s", "max_s", "in_gradients", "speedup_vs_naive", "rel_diff"]


def _problem(device: str, quick: bool, smoke: bool):
    from ._problems import fit_model
    model, shape, batch = fit_model(device, smoke)
    X = torch.randn(max(n for _, _, n, _ in CASES), *shape, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        Y = model(X).argmax(1)
    return model, X, Y, batch


def _default_fit(kind, model, X, Y, eps, batch, epochs, device):
    import upi_fast as U
    if kind == "pca":
        return U.UPIPCA(model, eps, batch_size=batch, solver="exact", progress=False, device=device).fit((X, Y)).delta_
    return U.UPIGrad(model, eps, epochs=epochs, batch_size=batch, progress=False, device=device,
                     init="random" if kind == "grad_random" else "pca").fit((X, Y)).delta_


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run(quick: bool = False, device: str = "cpu", smoke: bool = False, rounds: int | None = None) -> dict:
    from upi_fast.saliency import raw_gradient

    from ..naive import naive_fit
    t_start = time.perf_counter()
    model, X, Y, batch = _problem(device, quick, smoke)
    rounds = rounds or (1 if smoke else 2 if quick else 3)
    cases = CASES[:2] if smoke else CASES[:3] if quick else CASES
    if smoke:
        cases = tuple((n.replace("128", "32").replace("256", "64"), k, i // 4, e) for n, k, i, e in cases)
    eps = 1.0
    result = {"suite": "fits", "device": device, "machine": machine_info(device), "reference": NAIVE,
              "rounds": rounds, "batch": batch, "input_shape": list(X.shape[1:]), "cases": {}}
    xg, yg = X[:batch], Y[:batch]

    def grad_once():
        raw_gradient(model, xg, yg, "simple", "prob")

    for name, kind, n, epochs in cases:
        Xn, Yn = X[:n], Y[:n]
        times = {NAIVE: [], DEFAULT: [], GRAD: []}
        out = {}
        contenders = {NAIVE: lambda m: naive_fit(kind, m, Xn, Yn, eps, batch, epochs),
                      DEFAULT: lambda m: _default_fit(kind, m, Xn, Yn, eps, batch, epochs, device)}
        for rnd in range(-1, rounds):  # round -1: warm-up (thread pools, oneDNN primitives, lazy imports)
            for cname, fn in contenders.items():
                fresh = copy.deepcopy(model)  # cold: every fit prepares, confirms and maps anew
                _sync(device)
                t0 = time.perf_counter()
                out[cname] = fn(fresh).detach().float().cpu()
                _sync(device)
                if rnd >= 0:
                    times[cname].append(time.perf_counter() - t0)
                del fresh
            t0 = time.perf_counter()
            grad_once()
            _sync(device)
            if rnd >= 0:
                times[GRAD].append(time.perf_counter() - t0)
        g = statistics.median(times[GRAD])
        ref = statistics.median(times[NAIVE])
        rows = []
        for cname, ts in times.items():
            med = statistics.median(ts)
            rows.append({"case": name, "contender": cname, "median_s": med, "min_s": min(ts), "max_s": max(ts),
                         "times_s": ts, "in_gradients": med / g,
                         "speedup_vs_naive": ref / med if cname != GRAD else None,
                         "rel_diff": (float((out[cname] - out[NAIVE]).norm() / out[NAIVE].norm())
                                      if cname in out else None)})
        result["cases"][name] = {"kind": kind, "images": n, "epochs": epochs, "rows": rows,
                                 "speedup": ref / statistics.median(times[DEFAULT])}
        print_table(f"fits: {name} ({device}, {torch.get_num_threads()} threads, {rounds} rounds, medians)", rows,
                    _COLUMNS)
    result["seconds"] = time.perf_counter() - t_start
    return result


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("fits", __doc__, quick_help="the three short cases, two rounds", smoke=True, threads=True)
    args = parser.parse_args(argv)
    apply_threads(parser, args)
    result = run(args.quick, args.device, getattr(args, "smoke", False))
    return finish_suite("fits", result, args.device, args.no_save)


if __name__ == "__main__":
    raise SystemExit(main())
