"""Benchmark suite ``upi_grad``: the UPI-Grad step, images per second and peak memory, and the attack
strength each path reaches.

**1. Step throughput**, per model, every contender on the same inputs (seeded; a non-zero perturbation;
cached clean saliency maps ``I_ref``) in this process, after a warm-up call, over interleaved rounds:

* ``per-sample loop``: the authors' pattern, one image per double-backward call (timed on a subset;
  images per second per image processed);
* ``double_backward``: the reference, naive batched eager float32 double backward
  (:func:`upi_fast.saliency_loss_grad`);
* the other modes of :func:`upi_fast.saliency_loss_grad` (eager, unprepared model);
* ``fast ...``: :class:`upi_fast.accel.FastStep` variants (prepared model: BatchNorm folded, frozen,
  CPU kernel choices; channels_last; bf16 / fp16 autocast; ``torch.compile`` of the first-order
  modes; CUDA graphs);
* ``best path``: :func:`upi_fast.accel.autotune_step` (exact float32 on the CPU, bf16 on CUDA), its
  tuning time reported apart.

Headline unit, ``in_gradients``: each step path's seconds per image as a multiple of
``one input gradient (the unit)`` (a plain first-order input gradient of the same model and batch,
timed in the same rounds): it travels between machines, images per second do not.

Columns: median seconds per call and interquartile range, images per second, ``speedup_vs_reference``
(reference = ``double_backward`` in the same run), ``x_loop`` (against the per-sample loop), the
fastest call's rate (``best_items_per_s``, least disturbed on a shared CPU), ``setup_s`` (first call:
mode confirmation, compilation, capture; not in the timings), peak memory (CUDA: peak allocated
during a call; CPU: resident-set growth during a call, measured in a separate worker process with
glibc's mmap threshold lowered, as the ``hvp`` suite does; not with ``--quick``), ``mem_vs_ref``,
and ``cos_vs_ref``: the gradient's cosine with the reference gradient (1 for exact modes; the finite
differences see activation switches the exact Hessian of a ReLU network does not).

Models: the digits CNN (:func:`upi_fast.models.build_digits_cnn`, random weights, 1x16x16, batch
128); on the CPU torchvision ResNet-18 (random weights, 3x64x64, batch 64; 32 with ``--quick``); on
CUDA ResNet-50 (3x224x224, batch 128) and VGG-16 (3x224x224, batch 64). ``--quick`` also drops the
slower contenders on the large models, the bf16 attack-strength fits on the CPU and the CPU memory
worker, and runs 5 attack epochs instead of 20.

**2. Attack strength** on the embedded default (scikit-learn digits, the trained digits CNN, eps = 0.1
x mean image norm, L2): :class:`upi_fast.UPIGrad` with the same seeds and epochs (seeds 0, 1, 2 and 20
epochs; seed 0 and 5 epochs with ``--quick``) for each HVP path, the evaluation split's mean relative
L2 dissimilarity (mean and standard deviation over the seeds: even two exact modes drift apart over
many normalised steps through float rounding, so one seed cannot tell 5% apart) and fooling rate, and
the fit time. The best path runs as ``UPIGrad(prepare_model(model, ...), hvp=...,
precision=...)`` (the solver has no hook for a prepared step; compilation and graphs do not change
the arithmetic).

**3. CUDA only**: the card's bf16 matrix rate (an 8192^3 bf16 matmul, same run), floating-point
operations per image of the best step (``torch.utils.flop_counter``), the achieved rate and its
fraction of the matmul rate, and a UPI-Grad epoch over 50,000 images projected from the step times.

**4. Profile**: ``torch.profiler`` table (top ops by self time) of the best step on the largest model,
returned as an artifact (``bench/__main__`` writes it beside the JSON).

    python -m bench.suites.upi_grad [--quick] [--device cpu|cuda] [--threads N] [--no-save]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from typing import Callable

import torch

from ..harness import (Measurement, apply_threads, compare, cosine, finish_suite, machine_info, measure, memory_worker,
                       print_table, suite_parser)
from ._problems import build_problem, configs, cpu_peak_growth_mb, cuda_peak_mb

__all__ = ["run", "main", "build_problem", "configs"]

REFERENCE = "double_backward (naive batched eager fp32)"
LOOP = "per-sample loop (double backward, 1 image per call)"
BEST = "best path (autotuned)"
UNIT = "one input gradient (the unit)"
_COLUMNS = ["name", "exact", "items", "items_per_s", "median_s", "iqr_s", "in_gradients", "speedup_vs_reference",
            "x_loop",
            "best_items_per_s", "setup_s", "peak_mem_mb", "mem_vs_ref", "cos_vs_ref"]
_STRENGTH_COLUMNS = ["name", "hvp", "precision", "dissimilarity", "dissimilarity_std", "strength_vs_ref",
                     "fooling_rate", "fit_s", "fit_speedup"]


class _Contender:
    """A step to time: ``fn()`` returns ``(loss, grad)`` (or a list of them for the loop)."""

    def __init__(self, fn: Callable, items: int, exact: bool, setup_s: float | None = None, info: str = "") -> None:
        self.fn, self.items, self.exact, self.setup_s, self.info = fn, items, exact, setup_s, info


def _fast(model, x, y, I_ref, delta, **options) -> _Contender:
    from upi_fast.accel import FastStep

    step = FastStep(model, hvp=options.pop("hvp"), **options)
    step(x, y, I_ref, delta)  # setup: mode confirmation, compilation, capture
    exact = step.precision == "fp32" and step.hvp_ in ("double_backward", "forward", "piecewise_linear")
    return _Contender(lambda: step(x, y, I_ref, delta), x.shape[0], exact, step.setup_time_s_,
                      "; ".join(step.notes_))


_QUICK_BIG = ("fast piecewise_linear fp32 [prepared]", "fast finite_difference_onesided fp32 [prepared]",
              "fast piecewise_linear bf16 [prepared, channels_last]")


def _fast_specs(device: str, quick: bool, smoke: bool, big: bool = False, model: str = "") -> dict[str, dict]:
    """name -> FastStep options of the fast contenders (``big``: a large model, fewer rows with --quick;
    on CUDA the compiled rows, a minute or more of compilation each, for ResNet-50 only, not with --quick)."""
    if smoke:
        return {"fast piecewise_linear fp32 [prepared]": dict(hvp="piecewise_linear"),
                "fast finite_difference_onesided fp32 [prepared]": dict(hvp="finite_difference_onesided")}
    if device == "cuda":
        specs = {
            "fast piecewise_linear fp32 [prepared, CL]": dict(hvp="piecewise_linear"),
            "fast piecewise_linear bf16 [prepared, CL]": dict(hvp="piecewise_linear", precision="bf16"),
            "fast piecewise_linear bf16 [prepared, CL, CUDA graph]": dict(hvp="piecewise_linear", precision="bf16",
                                                                          cuda_graph=True),
            "fast finite_difference_onesided bf16 [prepared, CL]": dict(hvp="finite_difference_onesided",
                                                                        precision="bf16"),
            "fast finite_difference_onesided bf16 [prepared, CL, CUDA graph]": dict(
                hvp="finite_difference_onesided", precision="bf16", cuda_graph=True),
            "fast finite_difference_onesided fp16 [prepared, CL, CUDA graph]": dict(
                hvp="finite_difference_onesided", precision="fp16", cuda_graph=True),
            "fast finite_difference fp16 [prepared, CL, CUDA graph]": dict(hvp="finite_difference", precision="fp16",
                                                                           cuda_graph=True),
            "fast double_backward bf16 [prepared, CL]": dict(hvp="double_backward", precision="bf16"),
        }
        if not quick and model == "resnet50":
            specs["fast finite_difference_onesided bf16 [prepared, CL, compile + CUDA graph]"] = dict(
                hvp="finite_difference_onesided", precision="bf16", compile=True, cuda_graph=True)
        return specs
    specs = {
        "fast piecewise_linear fp32 [prepared]": dict(hvp="piecewise_linear"),
        "fast piecewise_linear fp32 [prepared, channels_last]": dict(hvp="piecewise_linear", channels_last=True),
        "fast piecewise_linear fp32 [fold BN only]": dict(hvp="piecewise_linear", stem_space_to_depth=False,
                                                          pool_channels_last=False),
        "fast finite_difference_onesided fp32 [prepared]": dict(hvp="finite_difference_onesided"),
        "fast finite_difference fp32 [prepared]": dict(hvp="finite_difference"),
        "fast piecewise_linear bf16 [prepared, channels_last]": dict(hvp="piecewise_linear", precision="bf16"),
        "fast finite_difference_onesided bf16 [prepared, channels_last]": dict(hvp="finite_difference_onesided",
                                                                              precision="bf16"),
    }
    if not quick:
        specs["fast finite_difference_onesided fp32 [prepared, torch.compile]"] = dict(
            hvp="finite_difference_onesided", compile=True)
    elif big:
        specs = {k: v for k, v in specs.items() if k in _QUICK_BIG}
    return specs


def _contenders(cfg: dict, device: str, quick: bool, smoke: bool, problem) -> tuple[dict[str, _Contender], object]:
    import upi_fast as U
    from upi_fast.accel import autotune_step
    from upi_fast.saliency import averaged_gradient

    model, x, y, I_ref, delta = problem
    B, n = x.shape[0], cfg["loop"]

    def eager(mode):
        return lambda: U.saliency_loss_grad(model, x, y, I_ref, delta, hvp=mode)

    def loop():
        return [U.saliency_loss_grad(model, x[i:i + 1], y[i:i + 1], I_ref[i:i + 1], delta, hvp="double_backward")
                for i in range(n)]

    def unit():
        return averaged_gradient(model, x + delta, y)

    big = cfg["model"] != "digits CNN"
    cont = {UNIT: _Contender(unit, B, True), LOOP: _Contender(loop, n, True),
            REFERENCE: _Contender(eager("double_backward"), B, True)}
    modes = ["piecewise_linear"] if smoke else ["piecewise_linear", "finite_difference", "finite_difference_onesided"]
    if quick and big:
        modes = ["piecewise_linear", "finite_difference_onesided"]
    for mode in modes:
        cont[f"{mode} (eager)"] = _Contender(eager(mode), B, mode == "piecewise_linear")
    for name, opts in _fast_specs(device, quick, smoke, big, cfg["model"]).items():
        try:
            cont[name] = _fast(model, x, y, I_ref, delta, **dict(opts))
        except (RuntimeError, ValueError) as exc:  # report, do not abort the suite
            print(f"  {name}: skipped ({type(exc).__name__}: {str(exc).splitlines()[0]})", flush=True)
    precision = "bf16" if device == "cuda" else "fp32"
    cands = [{}, {"channels_last": True}] if (quick and big and device == "cpu") else None
    best = autotune_step(model, x, y, I_ref, delta, hvp="auto", precision=precision, repeat=1 if quick else 2,
                         candidates=cands)
    cont[BEST] = _Contender(lambda: best(x, y, I_ref, delta), B, precision == "fp32", best.tuning_time_s_,
                            f"hvp={best.hvp_}, precision={best.precision}, channels_last={best.channels_last}, "
                            f"cuda_graph={best.cuda_graph}, chosen among {len(best.tuning_)} candidates")
    return cont, best


# ------------------------------------------------------------------------------------------- memory

def _memory_worker(quick: bool, smoke: bool) -> dict:
    """CPU peak memory of every contender of every model (a fresh process, see the module doc)."""

    libc = ctypes.CDLL("libc.so.6")
    if libc.mallopt(-3, 64 * 1024) != 1:  # M_MMAP_THRESHOLD
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")
    out = {}
    for cfg in configs(quick, "cpu", smoke):
        problem = build_problem(cfg, "cpu")
        cont, _ = _contenders(cfg, "cpu", quick, smoke, problem)
        out[cfg["model"]] = {name: cpu_peak_growth_mb(c.fn) for name, c in cont.items()}
        del problem, cont
    return out


# ------------------------------------------------------------------------------------------- timing

def _time_model(cfg: dict, device: str, quick: bool, smoke: bool, rounds: int, repeat: int):

    problem = build_problem(cfg, device)
    cont, best = _contenders(cfg, device, quick, smoke, problem)
    ref_grad = cont[REFERENCE].fn()[1]
    cos = {}
    for name, c in cont.items():  # warm-up calls (untimed; oneDNN builds its kernels per shape on first use)
        for _ in range(1 if (smoke or quick) else 2):
            out = c.fn()
        if name not in (LOOP, UNIT):
            cos[name] = cosine(out[1], ref_grad)
    times: dict[str, list[float]] = {name: [] for name in cont}
    for _ in range(rounds):
        for name, c in cont.items():
            times[name] += measure(name, c.fn, items=c.items, warmup=0, repeat=repeat, device=device).times_s
    ms = [Measurement(name, times[name], cont[name].items) for name in cont]
    if device == "cuda":
        for m in ms:
            try:
                m.peak_mem_mb = cuda_peak_mb(cont[m.name].fn, torch.device(device))
            except RuntimeError as exc:  # e.g. out of memory for one contender
                m.extra["memory_error"] = str(exc).splitlines()[0]
    return problem, cont, best, ms, cos


def _rows(ms: list[Measurement], cont: dict, cos: dict) -> list[dict]:
    rows = compare(ms, REFERENCE)
    ref = next(r for r in rows if r["name"] == REFERENCE)
    loop = next(r for r in rows if r["name"] == LOOP)
    unit = next(r for r in rows if r["name"] == UNIT)
    for r in rows:
        c = cont[r["name"]]
        # the headline unit: seconds per image as a multiple of one plain input gradient per image (same
        # model and batch, same run; the loop's images go one per call)
        r["in_gradients"] = (r["median_s"] / r["items"]) / (unit["median_s"] / unit["items"])
        r["speedup_vs_reference"] = r.pop("speedup_vs_" + REFERENCE)
        r["x_loop"] = r["items_per_s"] / loop["items_per_s"]
        r["best_items_per_s"] = r["items"] / r["min_s"]
        r["best_speedup"] = r["best_items_per_s"] / (ref["items"] / ref["min_s"])
        r["exact"] = "yes" if c.exact else "no"
        r["setup_s"] = c.setup_s
        r["info"] = c.info
        r["cos_vs_ref"] = cos.get(r["name"])
        r["mem_vs_ref"] = (r["peak_mem_mb"] / ref["peak_mem_mb"]
                           if r.get("peak_mem_mb") is not None and ref.get("peak_mem_mb") else None)
    return rows


# ------------------------------------------------------------------------------------------- GPU extras

def _matmul_rate(device: str, n: int = 8192) -> float:
    """Measured bf16 matrix rate (FLOP/s) of one n x n x n product (random data, CUDA events)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
    m = measure("matmul", lambda: a @ b, warmup=3, repeat=10, device=device)
    return 2 * n ** 3 / m.median_s


def _step_flops(best, x, y, I_ref, delta) -> float:
    """Floating-point operations of one eager call of the best step (CUDA graphs replay the same work),
    counted with ``torch.utils.flop_counter``'s per-op formulas (matrix products and convolutions,
    forward and backward). ``FlopCounterMode`` itself is not used: its module tracker breaks
    ``torch.autograd.grad`` on a leaf input."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class _Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                self.total += formula(*args, **kwargs, out_val=out)
            return out

    saved = best.cuda_graph
    best.cuda_graph = False
    try:
        with _Count() as counter:
            best(x, y, I_ref, delta)
    finally:
        best.cuda_graph = saved
    return float(counter.total)


def _profile(fn: Callable, device: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    fn()
    with profile(activities=acts) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=25)


# ------------------------------------------------------------------------------------------- strength

def _strength(quick: bool, device: str, smoke: bool, best_opts: dict) -> tuple[list[dict], dict]:
    """UPI-Grad on the digits default for each HVP path: evaluation dissimilarity, fooling rate, fit time."""
    from upi_fast import UPIGrad, evaluate
    from upi_fast.accel import prepare_model
    from upi_fast.data import digits
    from upi_fast.models import digits_cnn

    splits = digits(seed=0)
    model = digits_cnn(seed=0, progress=False).to(device).eval()
    (Xa, ya), (Xe, ye) = splits.attack, splits.eval
    if smoke:
        Xa, ya, Xe, ye = Xa[:64], ya[:64], Xe[:64], ye[:64]
    Xa, ya, Xe, ye = Xa.to(device), ya.to(device), Xe.to(device), ye.to(device)
    eps = float(0.1 * Xe.reshape(Xe.shape[0], -1).norm(dim=1).mean())
    epochs = 1 if smoke else (5 if quick else 20)
    prepared = prepare_model(model, channels_last=best_opts.get("channels_last", False),
                             stem_space_to_depth=best_opts.get("stem_space_to_depth"),
                             pool_channels_last=best_opts.get("pool_channels_last"))
    prepared_cl = prepare_model(model, channels_last=True)
    mode = best_opts.get("hvp", "piecewise_linear")
    runs = [("double_backward (reference)", model, "double_backward", "fp32")]
    if not smoke:
        runs += [("piecewise_linear", model, "piecewise_linear", "fp32"),
                 ("finite_difference (central)", model, "finite_difference", "fp32"),
                 ("finite_difference_onesided", model, "finite_difference_onesided", "fp32")]
    runs.append((f"best path: prepared model, {mode}", prepared, mode, "fp32"))
    if not smoke and (device == "cuda" or not quick):  # bf16 on the CPU: oneDNN builds kernels per batch shape
        runs.append((f"prepared model (CL), {mode}, bf16 autocast", prepared_cl, mode, "bf16"))
        runs.append(("prepared model (CL), finite_difference_onesided, bf16 autocast", prepared_cl,
                     "finite_difference_onesided", "bf16"))
        if device == "cuda":
            runs += [("prepared model (CL), finite_difference_onesided, fp16 autocast", prepared_cl,
                      "finite_difference_onesided", "fp16"),
                     ("prepared model (CL), finite_difference (central), fp16 autocast", prepared_cl,
                      "finite_difference", "fp16")]
    UPIGrad(model, eps, epochs=1, batch_size=32, seed=0, progress=False).fit((Xa[:64], ya[:64]))  # warm-up
    seeds = (0,) if (smoke or quick) else (0, 1, 2)
    rows = []
    for name, m, hvp, precision in runs:
        dis, fool, fit = [], [], []
        for seed in seeds:
            t0 = time.perf_counter()
            delta = UPIGrad(m, eps, epochs=epochs, batch_size=32, hvp=hvp, seed=seed, progress=False,
                            precision=precision).fit((Xa, ya)).delta_
            fit.append(time.perf_counter() - t0)
            res = evaluate(model, delta.to(device), (Xe, ye))
            dis.append(res["dissimilarity"])
            fool.append(res["fooling_rate"])
        rows.append({"name": name, "hvp": hvp, "precision": precision, "dissimilarity": statistics.mean(dis),
                     "dissimilarity_std": statistics.stdev(dis) if len(dis) > 1 else 0.0, "per_seed": dis,
                     "fooling_rate": statistics.mean(fool), "fit_s": statistics.mean(fit)})
    ref = rows[0]
    for r in rows:
        r["strength_vs_ref"] = r["dissimilarity"] / ref["dissimilarity"] if ref["dissimilarity"] else None
        r["fit_speedup"] = ref["fit_s"] / r["fit_s"]
    setup = {"data": f"digits, attack {len(ya)} / eval {len(ye)} images", "eps": eps, "epochs": epochs,
             "batch_size": 32, "seeds": list(seeds), "model": "digits_cnn (trained)"}
    return rows, setup


# ------------------------------------------------------------------------------------------- run

def run(quick: bool = False, device: str = "cpu", smoke: bool = False) -> dict:
    """Run the suite; print Markdown tables; return the results (JSON-able; ``artifacts`` holds the
    profile tables as text, ``chart`` the headline bars)."""
    device = torch.device(device).type
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but CUDA is not available")
    rounds, repeat = (1, 1) if smoke else ((1, 2) if quick else (5, 2))
    if device == "cuda":
        rounds, repeat = (1, 2) if (quick or smoke) else (3, 3)
    t0 = time.perf_counter()
    memory, mem_note = ({}, "CPU peak memory not measured with --quick / --smoke") if (quick or smoke) else (
        memory_worker("bench.suites.upi_grad", quick) if device == "cpu" else ({}, None))
    result = {"suite": "upi_grad", "machine": machine_info(device), "quick": quick, "smoke": smoke,
              "reference": REFERENCE, "rounds": rounds, "repeats_per_round": repeat, "models": {},
              "notes": [mem_note] if mem_note else [], "artifacts": {}}
    if device == "cuda":
        torch.backends.cudnn.benchmark = True  # every contender alike: cuDNN picks its fastest algorithms
        result["machine"]["cudnn_benchmark"] = True
        result["machine"]["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
        result["machine"]["matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    chart = {"title": f"UPI-Grad step, images/s relative to {REFERENCE} ({device})", "labels": [], "values": []}
    best_opts = {}
    cfgs = configs(quick, device, smoke)
    profile_model = "resnet50" if device == "cuda" else cfgs[-1]["model"]
    for cfg in cfgs:
        try:
            problem, cont, best, ms, cos = _time_model(cfg, device, quick, smoke, rounds, repeat)
        except (RuntimeError, ValueError) as exc:  # e.g. CUDA out of memory on one model: keep the others
            if device != "cuda":
                raise
            result["models"][cfg["model"]] = {"config": cfg, "rows": [], "error": f"{type(exc).__name__}: {exc}"}
            print(f"{cfg['model']}: FAILED ({type(exc).__name__}: {str(exc).splitlines()[0]})", flush=True)
            torch.cuda.empty_cache()
            continue
        if device == "cpu":
            for m in ms:
                m.peak_mem_mb = memory.get(cfg["model"], {}).get(m.name)
        rows = _rows(ms, cont, cos)
        title = (f"UPI-Grad step: {cfg['model']}, {'x'.join(map(str, cfg['shape']))}, batch {cfg['batch']} "
                 f"(loop on {cfg['loop']} images), {device}, {torch.get_num_threads()} threads, "
                 f"median of {rounds * repeat} calls")
        entry = {"config": cfg, "rows": rows, "table": print_table(title, rows, _COLUMNS),
                 "best": {"hvp": best.hvp_, "precision": best.precision, "channels_last": best.channels_last,
                          "cuda_graph": best.cuda_graph, "choice": best.tuning_choice_, "tuning": best.tuning_,
                          "tuning_time_s": best.tuning_time_s_}}
        print(f"best path for {cfg['model']}: {cont[BEST].info}", flush=True)
        best_row = next(r for r in rows if r["name"] == BEST)
        entry["headline"] = {"best_vs_reference": best_row["speedup_vs_reference"], "best_vs_loop": best_row["x_loop"],
                             "reference_items_per_s": next(r for r in rows if r["name"] == REFERENCE)["items_per_s"],
                             "loop_items_per_s": next(r for r in rows if r["name"] == LOOP)["items_per_s"],
                             "best_items_per_s": best_row["items_per_s"]}
        for r in rows:
            chart["labels"].append(f"{cfg['model']}: {r['name']}")
            chart["values"].append(r["speedup_vs_reference"])
        model, x, y, I_ref, delta = problem
        if device == "cuda" and not smoke:
            rate = _matmul_rate(device)
            flops = _step_flops(best, x, y, I_ref, delta)
            achieved = flops / best_row["median_s"]
            entry["gpu"] = {"bf16_matmul_flops_per_s": rate, "step_flops": flops,
                            "flops_per_image": flops / x.shape[0], "achieved_flops_per_s": achieved,
                            "fraction_of_bf16_matmul": achieved / rate,
                            "epoch_50k_s": {r["name"]: 50_000 / r["items_per_s"] for r in rows}}
            print(f"{cfg['model']}: bf16 matmul {rate / 1e12:.0f} TFLOP/s; best step {flops / x.shape[0] / 1e9:.1f} "
                  f"GFLOP/image, {achieved / 1e12:.1f} TFLOP/s = {achieved / rate:.1%} of the matmul rate; "
                  f"50k-image epoch: best {50_000 / best_row['items_per_s']:.0f} s, reference "
                  f"{50_000 / entry['headline']['reference_items_per_s']:.0f} s", flush=True)
        if cfg["model"] == profile_model:  # profile the best step on the target model
            result["artifacts"][f"upi_grad_profile_{cfg['model'].replace(' ', '_')}.txt"] = (
                f"torch.profiler, best path ({cont[BEST].info}), {cfg['model']} batch {cfg['batch']}, {device}\n\n"
                + _profile(cont[BEST].fn, device))
        if cfg["model"] == profile_model and not quick:
            result["artifacts"][f"upi_grad_profile_{cfg['model'].replace(' ', '_')}_reference.txt"] = (
                f"torch.profiler, {REFERENCE}, {cfg['model']} batch {cfg['batch']}, {device}\n\n"
                + _profile(cont[REFERENCE].fn, device))
        if cfg["model"] == "digits CNN":
            best_opts = {"hvp": best.hvp_, **best.tuning_choice_}
        result["models"][cfg["model"]] = entry
        del problem, cont, best
        if device == "cuda":
            torch.cuda.empty_cache()
    srows, setup = _strength(quick, device, smoke, best_opts)
    result["strength"] = {"setup": setup, "rows": srows,
                          "table": print_table(f"Attack strength, UPI-Grad on digits ({setup['epochs']} epochs, "
                                               f"eps {setup['eps']:.4f}, mean over seeds {setup['seeds']}), "
                                               f"evaluation split, {device}",
                                               srows, _STRENGTH_COLUMNS)}
    result["chart"] = chart
    result["seconds"] = time.perf_counter() - t0
    return result


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("upi_grad", __doc__, "fewer repeats and epochs, no torch.compile rows", smoke=True)
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    apply_threads(parser, args)
    if args.memory_worker:
        print(json.dumps(_memory_worker(args.quick, args.smoke)))
        return 0
    return finish_suite("upi_grad", run(args.quick, args.device, smoke=args.smoke), args.device, args.no_save)


if __name__ == "__main__":
    sys.exit(main())
