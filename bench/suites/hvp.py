"""Benchmark suite ``hvp``: one UPI-Grad step (:func:`upi_fast.saliency_loss_grad`) in every HVP mode.

Contenders, all on the same inputs (seeded) in one run, at a non-zero perturbation:

* ``gradient (floor)``: the plain first-order saliency gradient (one forward, one backward);
* ``double_backward``, ``forward``, ``finite_difference``, ``finite_difference_onesided``,
  ``piecewise_linear``: :func:`upi_fast.saliency_loss_grad` with that ``hvp`` (probability target,
  abs/sum/L1 maps, L2 dissimilarity);
* ``per-sample loop``: the authors' pattern, a Python loop calling the double-backward step on one
  image at a time (timed on a subset of the batch; images per second are per image processed).

Models: a digits-like ReLU CNN (1x16x16, batch 128) and torchvision ResNet-18 (3x64x64, batch 64)
with random weights on the CPU; with ``--device cuda`` also ResNet-50 (3x224x224, batch 64).
``--quick`` uses fewer repeats, batch 16 for ResNet-18 (32 for ResNet-50) and skips the CPU peak
memory (its worker process would double the time).

``in_gradients``, the headline unit: each contender's seconds per image as a multiple of the
``gradient (floor)`` contender's (one plain input gradient of the same model and batch, same run).

Timing: :func:`bench.harness.measure`, contenders interleaved over rounds (the CPU is shared),
median and interquartile range over all timed calls; ``speedup`` is images per second relative to
``double_backward`` in the same run; the ``best`` columns use each contender's fastest call, the
least disturbed by other processes on a shared CPU. ``cos_vs_db``: cosine of the mode's gradient with the
double-backward gradient (1 for the exact modes; the finite differences see activation switches
that the exact Hessian of a ReLU network does not, see docs/calibration.md).

Peak memory, per contender, one call after a warm-up call:

* CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call (tensor
  memory, exact);
* CPU: a separate worker process (``--memory-worker``) builds the same inputs, sets glibc's
  ``M_MMAP_THRESHOLD`` to 64 KiB with ``mallopt`` so that every tensor buffer is its own mapping and
  freed memory leaves the resident set at once, then for each contender resets the peak resident
  set (``/proc/self/clear_refs``, ``5``) and reports ``VmHWM`` minus ``VmRSS`` before the call:
  the growth of resident memory during the call, which is the tensor memory plus small allocator
  overhead. The timing process keeps the default allocator so that its timings are untouched.

    python -m bench.suites.hvp [--quick] [--device cuda|cpu] [--threads N] [--no-save]

Results go to ``bench/results/<date>-<device>/hvp.json`` (written atomically).
"""
from __future__ import annotations

import argparse
import ctypes
import json
import sys
import time
from typing import Callable

import torch

from ..harness import (Measurement, apply_threads, compare, cosine, finish_suite, machine_info, measure, memory_worker,
                       print_table, suite_parser)
from ._problems import build_problem, cpu_peak_growth_mb, cuda_peak_mb

__all__ = ["run", "main", "MODES"]

MODES = ("double_backward", "forward", "finite_difference", "finite_difference_onesided", "piecewise_linear")
_FLOOR, _LOOP = "gradient (floor)", "per-sample loop (double backward)"
_COLUMNS = ["name", "items", "items_per_s", "median_s", "iqr_s", "in_gradients", "speedup_vs_double_backward",
            "best_items_per_s",
            "best_speedup", "peak_mem_mb", "mem_vs_db", "cos_vs_db"]


def _configs(quick: bool, device: str, smoke: bool = False) -> list[dict]:
    """Per model: name, input shape, batch, images in the per-sample loop."""
    if smoke:
        return [dict(model="digits CNN", shape=(1, 16, 16), batch=16, loop=2)]
    rb = 16 if quick else 64
    cfgs = [dict(model="digits CNN", shape=(1, 16, 16), batch=128, loop=32 if quick else 128),
            dict(model="resnet18", shape=(3, 64, 64), batch=rb, loop=2 if quick else 16)]
    if device == "cuda":
        cfgs.append(dict(model="resnet50", shape=(3, 224, 224), batch=32 if quick else 64, loop=4 if quick else 16))
    return cfgs


def _contenders(cfg: dict, model, x, y, I_ref, delta) -> dict[str, tuple[Callable, int]]:
    """name -> (call returning ``(loss, grad)`` or a gradient, images per call)."""
    import upi_fast as U
    from upi_fast.saliency import averaged_gradient

    B, n = x.shape[0], cfg["loop"]

    def floor():
        return averaged_gradient(model, x + delta, y)

    def step(mode):
        return lambda: U.saliency_loss_grad(model, x, y, I_ref, delta, hvp=mode)

    def loop():
        return [U.saliency_loss_grad(model, x[i:i + 1], y[i:i + 1], I_ref[i:i + 1], delta, hvp="double_backward")
                for i in range(n)]

    return {_FLOOR: (floor, B), **{m: (step(m), B) for m in MODES}, _LOOP: (loop, n)}


# ------------------------------------------------------------------------------------------- memory

def _memory_worker(quick: bool, threads: int) -> dict:
    """CPU peak memory of every contender of every model (run in a fresh process, see module doc)."""
    torch.set_num_threads(threads)
    libc = ctypes.CDLL("libc.so.6")
    if libc.mallopt(-3, 64 * 1024) != 1:  # M_MMAP_THRESHOLD
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")
    out = {}
    for cfg in _configs(quick, "cpu"):
        problem = build_problem(cfg, "cpu")
        out[cfg["model"]] = {name: cpu_peak_growth_mb(fn) for name, (fn, _) in _contenders(cfg, *problem).items()}
        del problem
    return out


# ------------------------------------------------------------------------------------------- timing

def _time_model(cfg: dict, device: str, rounds: int, repeat: int) -> tuple[list[Measurement], dict]:
    problem = build_problem(cfg, device)
    cont = _contenders(cfg, *problem)
    grads = {}
    for name, (fn, _) in cont.items():  # warm-up call, kept for the agreement column
        out = fn()
        if name in MODES:
            grads[name] = out[1]
    cos = {m: cosine(g, grads["double_backward"]) for m, g in grads.items()}
    times: dict[str, list[float]] = {name: [] for name in cont}
    for _ in range(rounds):
        for name, (fn, items) in cont.items():
            times[name] += measure(name, fn, items=items, warmup=0, repeat=repeat, device=device).times_s
    ms = [Measurement(name, times[name], cont[name][1]) for name in cont]
    if device == "cuda":
        for m in ms:
            m.peak_mem_mb = cuda_peak_mb(cont[m.name][0], torch.device(device))
    return ms, cos


def run(quick: bool = False, device: str = "cpu", smoke: bool = False) -> dict:
    """Time and measure every contender on every model; print Markdown tables; return the results.

    ``quick``: batch 16 for ResNet-18, one round, and no CPU peak memory (the memory worker process
    would double the time); ``smoke`` (tests): the digits CNN at batch 16 only."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but CUDA is not available")
    rounds, repeat = (1, 1) if smoke else ((1, 2) if quick else (3, 2))
    t0 = time.perf_counter()
    if device != "cpu":
        memory, mem_note = {}, None
    elif quick or smoke:
        memory, mem_note = {}, "CPU peak memory not measured with --quick (run without it)"
    else:
        memory, mem_note = memory_worker("bench.suites.hvp", quick, timeout=1800)
    result = {"suite": "hvp", "machine": machine_info(device), "quick": quick, "rounds": rounds,
              "repeats_per_round": repeat, "models": {}, "notes": [mem_note] if mem_note else []}
    for cfg in _configs(quick, device, smoke):
        ms, cos = _time_model(cfg, device, rounds, repeat)
        for m in ms:
            if device == "cpu":
                m.peak_mem_mb = memory.get(cfg["model"], {}).get(m.name)
        rows = compare(ms, "double_backward")
        db_mem = next(m.peak_mem_mb for m in ms if m.name == "double_backward")
        db_best = next(r for r in rows if r["name"] == "double_backward")
        unit = next(r for r in rows if r["name"] == _FLOOR)
        for r in rows:
            # the headline unit: seconds per image as a multiple of one plain input gradient per image
            # (same model and batch, same run); it travels between machines, images per second do not
            r["in_gradients"] = (r["median_s"] / r["items"]) / (unit["median_s"] / unit["items"])
            r["best_items_per_s"] = r["items"] / r["min_s"]
            r["best_speedup"] = r["best_items_per_s"] / (db_best["items"] / db_best["min_s"])
            r["mem_vs_db"] = r["peak_mem_mb"] / db_mem if r["peak_mem_mb"] is not None and db_mem else None
            r["cos_vs_db"] = cos.get(r["name"])
        title = (f"{cfg['model']}, {'x'.join(map(str, cfg['shape']))}, batch {cfg['batch']} "
                 f"(per-sample loop on {cfg['loop']} images), {device}, {torch.get_num_threads()} threads")
        print_table(title, rows, _COLUMNS)
        result["models"][cfg["model"]] = {"config": cfg, "rows": rows}
    result["seconds"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("hvp", __doc__, "fewer repeats, smaller ResNet batches, no CPU memory")
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    apply_threads(parser, args)
    if args.memory_worker:
        print(json.dumps(_memory_worker(args.quick, torch.get_num_threads())))
        return 0
    return finish_suite("hvp", run(args.quick, args.device), args.device, args.no_save)


if __name__ == "__main__":
    sys.exit(main())
