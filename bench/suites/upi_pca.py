"""Benchmark suite ``upi_pca``: UPI-PCA direction generation through the row accumulators, exact vs
sketch, and the whole solver on the digits default.

**1. Directions per second**, per model, on the same inputs (seeded; per-sample directions at
``x + delta``, as UPI-PCA's rounds compute them), every contender after warm-up, interleaved rounds:

* ``directions double_backward (eager)``: the reference, :func:`upi_fast.saliency_loss_grad` with a
  per-sample perturbation (one row per image);
* ``directions <mode> (fast)``: :class:`upi_fast.accel.FastStep` (prepared model, the fastest exact mode);
* ``... + StreamingSketch``: the fast directions fed to the single-pass sketch
  (:class:`upi_fast.linalg.StreamingSketch`, k = 1, l = 11, rows normalised, as the solver does);
* ``... + exact rows``: the fast directions appended to the in-memory exact accumulator;
* ``sketch update only`` / ``exact rows update only``: the accumulators alone on precomputed rows.

Then, once per model, the finalisation of each accumulator on the batch's rows (``exact`` eigh of
``G G^T``, the sketch's small SVD), timed once.

**2. UPI-PCA on digits** (trained digits CNN, eps = 0.1 x mean image norm): ``solver="exact"`` vs
``solver="sketch"``, the reference HVP mode vs the best path (a prepared model), fit seconds,
evaluation dissimilarity and fooling rate, and the |cosine| between the exact and sketched top vectors.

    python -m bench.suites.upi_pca [--quick] [--device cpu|cuda] [--threads N] [--no-save]
"""
from __future__ import annotations

import sys
import time

import torch

from ..harness import (Measurement, apply_threads, compare, finish_suite, machine_info, measure, print_table,
                       suite_parser)
from ._problems import build_problem

__all__ = ["run", "main"]

REFERENCE = "directions double_backward (eager)"
_COLUMNS = ["name", "items", "items_per_s", "median_s", "iqr_s", "speedup_vs_reference", "best_items_per_s"]
_FIT_COLUMNS = ["name", "solver", "hvp", "fit_s", "fit_speedup", "dissimilarity", "fooling_rate", "abs_cos_vs_exact"]


def _configs(quick: bool, device: str, smoke: bool) -> list[dict]:
    if smoke:
        return [dict(model="digits CNN", shape=(1, 16, 16), batch=16, loop=0)]
    cfgs = [dict(model="digits CNN", shape=(1, 16, 16), batch=128, loop=0)]
    if device == "cuda":
        cfgs.append(dict(model="resnet50", shape=(3, 224, 224), batch=64 if quick else 128, loop=0))
    else:
        cfgs.append(dict(model="resnet18", shape=(3, 64, 64), batch=8 if quick else 64, loop=0))
    return cfgs


def _time_model(cfg: dict, device: str, rounds: int, repeat: int, smoke: bool) -> tuple[list[dict], dict]:
    import upi_fast as U
    from upi_fast.accel import FastStep
    from upi_fast.linalg import StreamingSketch
    from upi_fast.solvers._accumulators import ExactRows

    model, x, y, I_ref, delta = build_problem(cfg, device)
    B, d = x.shape[0], x[0].numel()
    per = delta.expand(B, *delta.shape).contiguous()
    step = FastStep(model, hvp="auto", precision="bf16" if device == "cuda" else "fp32")
    step(x, y, I_ref, per)
    rows_cache = (step(x, y, I_ref, per)[1] * B).reshape(B, -1)

    def ref():
        return (U.saliency_loss_grad(model, x, y, I_ref, per, hvp="double_backward")[1] * B).reshape(B, -1)

    def fast():
        return (step(x, y, I_ref, per)[1] * B).reshape(B, -1)

    def new_sketch():
        return StreamingSketch(d, k=1, oversample=10, seed=0, normalize_rows=True, device=device)

    def with_sketch():
        sk = new_sketch()
        sk.update(fast(), 0)
        return sk

    def with_exact():
        acc = ExactRows(d, True, device)
        acc.update(fast(), 0)
        return acc

    def sketch_only():
        sk = new_sketch()
        sk.update(rows_cache, 0)
        return sk

    def exact_only():
        acc = ExactRows(d, True, device)
        acc.update(rows_cache, 0)
        return acc

    mode = step.hvp_
    cont = {REFERENCE: ref, f"directions {mode} (fast)": fast, f"directions {mode} (fast) + StreamingSketch": with_sketch,
            f"directions {mode} (fast) + exact rows": with_exact, "sketch update only": sketch_only,
            "exact rows update only": exact_only}
    for fn in cont.values():  # warm-up (untimed)
        for _ in range(1 if (smoke or rounds == 1) else 2):
            fn()
    times: dict[str, list[float]] = {name: [] for name in cont}
    for _ in range(rounds):
        for name, fn in cont.items():
            times[name] += measure(name, fn, items=B, warmup=0, repeat=repeat, device=device).times_s
    rows = compare([Measurement(name, times[name], B) for name in cont], REFERENCE)
    for r in rows:
        r["speedup_vs_reference"] = r.pop("speedup_vs_" + REFERENCE)
        r["best_items_per_s"] = r["items"] / r["min_s"]
    sk, ex = sketch_only(), exact_only()
    t0 = time.perf_counter()
    S_sk, V_sk = sk.finalize(1)
    t_sk = time.perf_counter() - t0
    t0 = time.perf_counter()
    S_ex, V_ex = ex.finalize(1)
    t_ex = time.perf_counter() - t0
    cos = float((V_sk[0].double() @ V_ex[0].double()).abs() / (V_sk[0].double().norm() * V_ex[0].double().norm()))
    info = {"mode": mode, "finalize_sketch_s": t_sk, "finalize_exact_s": t_ex, "rows": B, "d": d,
            "abs_cos_sketch_vs_exact": cos}
    return rows, info


def _fits(quick: bool, device: str, smoke: bool) -> tuple[list[dict], dict]:
    from upi_fast import UPIPCA, evaluate
    from upi_fast.accel import prepare_model
    from upi_fast.data import digits
    from upi_fast.models import digits_cnn

    splits = digits(seed=0)
    model = digits_cnn(seed=0, progress=False).to(device).eval()
    (Xa, ya), (Xe, ye) = splits.attack, splits.eval
    if smoke or quick:
        n = 64 if smoke else 128
        Xa, ya, Xe, ye = Xa[:n], ya[:n], Xe[:n], ye[:n]
    Xa, ya, Xe, ye = Xa.to(device), ya.to(device), Xe.to(device), ye.to(device)
    eps = float(0.1 * Xe.reshape(Xe.shape[0], -1).norm(dim=1).mean())
    prepared = prepare_model(model)
    UPIPCA(model, eps, seed=0, progress=False).fit((Xa[:32], ya[:32]))  # warm-up
    runs = [("exact, double_backward (reference)", model, "exact", "double_backward"),
            ("sketch, double_backward", model, "sketch", "double_backward"),
            ("exact, best path (prepared model, piecewise_linear)", prepared, "exact", "piecewise_linear"),
            ("sketch, best path (prepared model, piecewise_linear)", prepared, "sketch", "piecewise_linear")]
    rows, comps = [], {}
    for name, m, solver, hvp in runs:
        t0 = time.perf_counter()
        pca = UPIPCA(m, eps, solver=solver, hvp=hvp, seed=0, progress=False).fit((Xa, ya))
        fit_s = time.perf_counter() - t0
        res = evaluate(model, pca.delta_.to(device), (Xe, ye))
        comps[name] = pca.components_[0].double()
        rows.append({"name": name, "solver": solver, "hvp": hvp, "fit_s": fit_s, "dissimilarity": res["dissimilarity"],
                     "fooling_rate": res["fooling_rate"]})
    v_ref = comps[runs[0][0]]
    for r in rows:
        v = comps[r["name"]]
        r["abs_cos_vs_exact"] = float((v @ v_ref).abs() / (v.norm() * v_ref.norm()))
        r["fit_speedup"] = rows[0]["fit_s"] / r["fit_s"]
    return rows, {"attack": len(ya), "eval": len(ye), "eps": eps}


def run(quick: bool = False, device: str = "cpu", smoke: bool = False) -> dict:
    """Run both sections; print Markdown tables; return the results (JSON-able)."""
    device = torch.device(device).type
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but CUDA is not available")
    rounds, repeat = (1, 1) if smoke else ((1, 2) if quick else (3, 2))
    t0 = time.perf_counter()
    result = {"suite": "upi_pca", "machine": machine_info(device), "quick": quick, "smoke": smoke,
              "reference": REFERENCE, "models": {}}
    for cfg in _configs(quick, device, smoke):
        rows, info = _time_model(cfg, device, rounds, repeat, smoke)
        title = (f"UPI-PCA directions: {cfg['model']}, {'x'.join(map(str, cfg['shape']))}, batch {cfg['batch']}, "
                 f"{device}, {torch.get_num_threads()} threads, median of {rounds * repeat} calls "
                 f"(finalize: sketch {info['finalize_sketch_s'] * 1e3:.1f} ms, exact {info['finalize_exact_s'] * 1e3:.1f}"
                 f" ms, |cos| {info['abs_cos_sketch_vs_exact']:.4f})")
        result["models"][cfg["model"]] = {"config": cfg, "rows": rows, "info": info,
                                          "table": print_table(title, rows, _COLUMNS)}
        if device == "cuda":
            torch.cuda.empty_cache()
    frows, setup = _fits(quick, device, smoke)
    result["fits"] = {"setup": setup, "rows": frows,
                      "table": print_table(f"UPI-PCA on digits (attack {setup['attack']}, eval {setup['eval']}, "
                                           f"eps {setup['eps']:.4f}), {device}", frows, _FIT_COLUMNS)}
    result["seconds"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("upi_pca", __doc__, "fewer rows and one round", smoke=True)
    args = parser.parse_args(argv)
    apply_threads(parser, args)
    return finish_suite("upi_pca", run(args.quick, args.device, smoke=args.smoke), args.device, args.no_save)


if __name__ == "__main__":
    sys.exit(main())
