"""Benchmark suite ``fixed_costs``: the one-off costs of a default fit, before and after issue 17's cuts,
each piece timed side by side in this process (interleaved rounds, medians), in milliseconds and in
plain input gradients of the same model and batch (timed in the same rounds).

The pieces of ``UPIGrad(...).fit`` with the defaults (``fast="auto"``, ``init="pca"``) on ResNet-18
(random weights) at 64x64, for a fit of ``images`` images in batches of 64 (counts per fit in the
table; the UPI-PCA start is part of the default fit):

* model preparation (``prepare_model``: deep copy, fx BatchNorm folding, kernel rewrites): before,
  once per step object (two per fit: the UPI-PCA start and the ascent) with a second deep copy
  inside; after, one copy, reused by the second step (:func:`upi_fast.accel.prepare.prepared_model`);
* the piecewise-linear confirmation (double backward against the linearisation): before, two samples
  per step object (the new prepared copy missed the cache); after, one sample, once per model state;
* clean predictions and maps: before, a prediction pass and a map pass per batch, once by UPIGrad's
  stream and again by the UPI-PCA start's; after, one stream's cache serves both, and the
  predictions come from the maps' own forward pass (UPIGrad's stream runs on the model as given; a
  UPI-PCA fit's on its prepared copy);
* UPI-PCA's sign decision: before, the clean map again plus the maps at ``x + v`` and ``x - v`` per
  batch on the model as given; after, the cached clean maps and the two maps on the prepared copy;
* clean maps: before, on the model as given; after, on the prepared copy (UPIGrad builds its
  prepared step before its stream);
* UPIGrad's final choice (start or last iterate, ``solvers/_final_choice.py``): before, three map
  passes per batch on the model as given (the clean map again, the start's, the last iterate's);
  after, one on the prepared copy (the last iterate's: the clean maps come from the stream's cache,
  the start's per-sample losses from the UPI-PCA sign decision).
"""
from __future__ import annotations

import copy
import statistics
import time

import torch

from ..harness import apply_threads, finish_suite, machine_info, print_table, suite_parser

__all__ = ["run", "main"]

_COLUMNS = ["cost", "per_fit_before", "per_fit_after", "before_ms", "after_ms", "before_in_gradients",
            "after_in_gradients", "saved_ms"]


def _pieces(model, x, y, I_ref):
    from upi_fast import piecewise as P
    from upi_fast.accel import prepare_model
    from upi_fast.accel.prepare import prepared_model
    from upi_fast.saliency import postprocess_maps, raw_gradient
    from upi_fast.solvers._batches import CleanBatches
    from upi_fast.solvers._common import make_spec

    pm = prepare_model(model)
    spec = make_spec("simple", "prob", "l2", None)
    stream = CleanBatches(model, (x[:2], y[:2]), 2, spec, x.device)  # objects to call the pieces on
    stream._n_classes = 10
    prepared_stream = CleanBatches(model, (x[:2], y[:2]), 2, spec, x.device, net=pm)
    v = (0.05 * torch.randn(x.shape[1:], generator=torch.Generator().manual_seed(3))).to(x.device)

    def maps(net, xx):
        return postprocess_maps(raw_gradient(net, xx, y, "simple", "prob"), "abs_sum_l1")

    prepared_model(model)  # the cache entry the "after" reuse hits
    return {
        "unit": lambda: raw_gradient(model, x, y, "simple", "prob"),
        "prepare_before": lambda: (copy.deepcopy(model), prepare_model(model)),
        "prepare_after": lambda: prepare_model(model),
        "prepare_reuse": lambda: prepared_model(model),
        "confirm_before": lambda: P._confirm(pm, x, 2, 1e-4),
        "confirm_after": lambda: P._confirm(pm, x, 1, 1e-4),
        "clean_before": lambda: (stream._keep(x, y), stream.clean_maps(x, y)),
        "clean_after": lambda: prepared_stream._keep_and_maps(x, y, 10),
        "map_user": lambda: maps(model, x + v),
        "map_prepared": lambda: maps(pm, x + v),
    }


def run(quick: bool = False, device: str = "cpu", smoke: bool = False, images: int = 128) -> dict:
    from ._problems import fit_model
    t0 = time.perf_counter()
    model, shape, batch = fit_model(device, smoke)
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        y = model(x).argmax(1)
    from upi_fast.saliency import postprocess_maps, raw_gradient
    I_ref = postprocess_maps(raw_gradient(model, x, y), "abs_sum_l1").detach()
    pieces = _pieces(model, x, y, I_ref)
    rounds = 1 if smoke else (2 if quick else 5)
    times = {k: [] for k in pieces}
    for rnd in range(-1, rounds):
        for k, fn in pieces.items():
            ts = time.perf_counter()
            fn()
            if rnd >= 0:
                times[k].append(time.perf_counter() - ts)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    g = med["unit"]
    nb = -(-images // batch)
    # (cost, count before, piece before, count after, piece after); counts per fit of `images` images
    spec = [("model preparation", "2", 2 * med["prepare_before"], "1 + 1 reuse", med["prepare_after"] + med["prepare_reuse"]),
            ("piecewise-linear confirmation", "2 x 2 samples", 2 * med["confirm_before"], "1 x 1 sample",
             med["confirm_after"]),
            ("clean predictions + clean maps", f"2 streams x {nb} batches", 2 * nb * med["clean_before"],
             f"1 stream x {nb} one-pass batches (prepared copy)", nb * med["clean_after"]),
            ("UPI-PCA sign decision", f"{nb} x 3 maps (model as given)", nb * 3 * med["map_user"],
             f"{nb} x 2 maps (prepared copy)", nb * 2 * med["map_prepared"]),
            ("UPIGrad final choice", f"{nb} x 3 maps (model as given)", nb * 3 * med["map_user"],
             f"{nb} x 1 map (prepared copy)", nb * med["map_prepared"])]
    rows = [{"cost": c, "per_fit_before": nb_, "per_fit_after": na, "before_ms": b, "after_ms": a,
             "before_in_gradients": b / g, "after_in_gradients": a / g, "saved_ms": b - a}
            for c, nb_, b, na, a in spec]
    tot_b, tot_a = sum(r["before_ms"] for r in rows), sum(r["after_ms"] for r in rows)
    rows.append({"cost": "total", "before_ms": tot_b, "after_ms": tot_a, "before_in_gradients": tot_b / g,
                 "after_in_gradients": tot_a / g, "saved_ms": tot_b - tot_a})
    title = (f"Fixed costs of a default UPIGrad fit, {images} images, batch {batch}, {'x'.join(map(str, shape))} "
             f"({device}, {torch.get_num_threads()} threads, {rounds} rounds; one input gradient = {g:.0f} ms)")
    print_table(title, rows, _COLUMNS)
    return {"suite": "fixed_costs", "machine": machine_info(device), "rounds": rounds, "images": images,
            "batch": batch, "unit_ms": g, "pieces_ms": med, "rows": rows, "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("fixed_costs", __doc__, quick_help="two rounds", smoke=True, threads=True)
    args = parser.parse_args(argv)
    apply_threads(parser, args)
    return finish_suite("fixed_costs", run(args.quick, args.device, getattr(args, "smoke", False)), args.device,
                        args.no_save)


if __name__ == "__main__":
    raise SystemExit(main())
