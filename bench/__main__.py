"""The benchmark entry point: ``python -m bench`` / ``upi-fast bench``.

    python -m bench [SUITE ...] [--quick] [--device cpu|cuda] [--threads N] [--out DIR]
    python -m bench --report [--quick] [SUITE ...]      # regenerate bench/RESULTS.md from one run

Suites (default: all, in this order): ``upi_grad`` (the UPI-Grad step and its fast paths),
``hvp`` (every HVP mode), ``upi_pca`` (direction generation through the sketch, exact vs sketch),
``ops`` (custom ops vs eager), ``svd`` (top singular vector), ``data`` (ImageFolder decode vs the uint8
cache, images per second), ``fits`` (whole UPI-PCA / UPI-Grad fits with the defaults against the
naive batched loop of the same math, :mod:`bench.naive`), ``fixed_costs`` (the one-off costs of a
default fit, before and after their cuts). ``--report`` runs the suites of
:data:`bench.report.REPORT_SUITES` (or those named) and writes ``bench/RESULTS.md`` (``--report-to``)
from that one run (:mod:`bench.report`). Each suite module exposes
``run(quick, device) -> dict`` and prints its Markdown tables (every contender on the same inputs in
one process, after warm-up, median and spread, ratios against the reference of the same run).

Outputs under ``--out`` (default ``bench/results`` under the current folder; ``upi-fast bench``:
``upi_out/bench``), in ``<date>-<device>/`` (``<date>-<device>-<N>t/``
with ``--threads N``; :func:`bench.harness.results_dir`): ``<suite>.json`` per suite (written as soon as the suite ends),
``<suite>.png`` (a bar chart of each contender's ratio to its reference), the suites' artifacts
(e.g. profile tables), and ``summary.md`` / ``summary.json``: the headline table of the whole run with
the command, machine and date. ``--quick`` is sized to finish all suites in under 3 minutes on
2 CPU cores; ``--smoke`` (tests) runs tiny sizes only.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import inspect
import io
import math
import os
import sys
import time
import traceback

SUITES = ("upi_grad", "hvp", "upi_pca", "ops", "svd", "data", "fits", "fixed_costs")

__all__ = ["main", "SUITES", "summary_rows", "plot_chart"]

_SUMMARY_COLUMNS = ["suite", "section", "contender", "median_s", "iqr_s", "items_per_s", "vs_reference", "reference"]


def _f(v):
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _chart_from(suite: str, result: dict) -> dict | None:
    """``{"title", "labels", "values"}``: each contender's ratio to its reference (suite-specific rows)."""
    if result.get("chart"):
        return result["chart"]
    labels, values = [], []
    for row in summary_rows(suite, result):
        if _f(row.get("vs_reference")) is not None:
            labels.append(f"{row['section']}: {row['contender']}"[:90])
            values.append(row["vs_reference"])
    if not labels:
        return None
    return {"title": f"{suite}: speed relative to the reference of each section", "labels": labels, "values": values}


def summary_rows(suite: str, result: dict) -> list[dict]:
    """Uniform rows ``(suite, section, contender, median_s, iqr_s, items_per_s, vs_reference, reference)``
    from a suite's result (every suite reports its own reference, measured in the same run)."""
    out = []

    def add(section, r, ratio_key, reference):
        out.append({"suite": suite, "section": section, "contender": r.get("name") or r.get("op"),
                    "median_s": _f(r.get("median_s")), "iqr_s": _f(r.get("iqr_s")),
                    "items_per_s": _f(r.get("items_per_s")), "vs_reference": _f(r.get(ratio_key)),
                    "reference": reference})

    if suite in ("upi_grad", "upi_pca"):
        for model, entry in result.get("models", {}).items():
            ref = result.get("reference", "")
            for r in entry.get("rows", []):
                add(model, r, "speedup_vs_reference", ref)
    elif suite == "hvp":
        for model, entry in result.get("models", {}).items():
            for r in entry["rows"]:
                add(model, r, "speedup_vs_double_backward", "double_backward")
    elif suite == "svd":
        for r in result.get("in_memory", {}).get("rows", []):
            add("in memory", r, "speedup_vs_sklearn(5,2)", "sklearn randomized_svd(5, 2) (torch.svd_lowrank on CUDA)")
        for r in result.get("stream", {}).get("rows", []):
            ratio = r.get("vs_floor")
            out.append({"suite": suite, "section": "stream", "contender": r.get("name"),
                        "median_s": _f(r.get("median_s")), "iqr_s": None, "items_per_s": _f(r.get("rows_per_s")),
                        "vs_reference": _f(1.0 / ratio) if _f(ratio) else None,
                        "reference": "generate + sum (floor)"})
    elif suite == "data":
        for r in result.get("rows", []):
            add(f"{r.get('section')}, {r.get('workers')} workers", r, "speedup_vs_uncached",
                "uncached reader (decode every epoch), 0 workers")
    elif suite == "fits":
        for case, entry in result.get("cases", {}).items():
            for r in entry.get("rows", []):
                out.append({"suite": suite, "section": case, "contender": r.get("contender"),
                            "median_s": _f(r.get("median_s")), "iqr_s": None, "items_per_s": None,
                            "vs_reference": _f(r.get("speedup_vs_naive")), "reference": result.get("reference")})
    elif suite == "fixed_costs":
        for r in result.get("rows", []):
            out.append({"suite": suite, "section": "fixed cost of a default fit", "contender": r.get("cost"),
                        "median_s": _f(r["after_ms"] / 1e3), "iqr_s": None, "items_per_s": None,
                        "vs_reference": _f(r["before_ms"] / r["after_ms"]) if r.get("after_ms") else None,
                        "reference": "the same cost before issue 17"})
    elif suite == "ops":
        for r in result.get("rows", []):
            out.append({"suite": suite, "section": r.get("op"), "contender": r.get("name"),
                        "median_s": _f(r.get("median_s")), "iqr_s": _f(r.get("iqr_s")),
                        "items_per_s": _f(r.get("GB_per_s")), "vs_reference": _f(r.get("speedup_vs_eager", 1.0
                                                                                        if r.get("name") == "eager"
                                                                                        else None)),
                        "reference": "eager (GB/s in items_per_s)"})
    return out


def plot_chart(chart: dict, path: str) -> None:
    """Horizontal bars of ``chart["values"]`` (ratios), a line at 1 (the reference); PNG written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from upi_fast.io import write_bytes_atomic

    labels, values = list(chart["labels"]), [v if _f(v) is not None else 0.0 for v in chart["values"]]
    fig = Figure(figsize=(11, max(2.5, 0.28 * len(labels) + 1.2)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ypos = list(range(len(labels)))[::-1]
    bars = ax.barh(ypos, values, color=["tab:green" if v >= 1 else "tab:gray" for v in values])
    ax.bar_label(bars, labels=[f"{v:.2f}x" for v in values], fontsize=7, padding=2)
    ax.set_yticks(ypos, labels, fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("ratio to the reference (same run; > 1 is faster)")
    ax.set_title(chart.get("title", ""), fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    write_bytes_atomic(path, buf.getvalue())


def _markdown(rows: list[dict]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(_SUMMARY_COLUMNS) + " |", "|" + "---|" * len(_SUMMARY_COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in _SUMMARY_COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _run_suite(name: str, quick: bool, device: str, smoke: bool) -> dict:
    mod = importlib.import_module(f".suites.{name}", __package__)
    kwargs = {}
    if smoke:
        if "smoke" not in inspect.signature(mod.run).parameters:
            raise ValueError(f"suite {name} has no smoke size")
        kwargs["smoke"] = True
    return mod.run(quick, device, **kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("suites", nargs="*", help=f"suites to run (default: all): {' '.join(SUITES)}")
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (< 3 min on 2 cores)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (tests); implies --quick")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--out", default=None, help="results root (default: bench/results under the current folder)")
    parser.add_argument("--report", action="store_true",
                        help="write bench/RESULTS.md from this run (default suites: bench.report.REPORT_SUITES)")
    parser.add_argument("--report-to", default=os.path.join("bench", "RESULTS.md"), help="the report's path")
    args = parser.parse_args(argv)
    unknown = [s for s in args.suites if s not in SUITES]
    if unknown:  # one line, exit 2, as upi-fast's errors
        print(f"{parser.prog}: error: unknown suite {unknown[0]!r}; choose from {', '.join(SUITES)}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"{parser.prog}: error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    quick = args.quick or args.smoke
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # the ops suite checks kernels under the interpreter
    import torch

    from .harness import machine_info, print_table, results_dir, write_json

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from .report import REPORT_SUITES, render, write_report
    from .report import _load as load_average

    load_before = load_average()
    suites = list(args.suites) or list(REPORT_SUITES if args.report else SUITES)
    results: dict = {}
    out_dir = results_dir(args.device, args.out, tag=f"{args.threads}t" if args.threads is not None else None)
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    started = _dt.datetime.now().isoformat(timespec="seconds")
    t0 = time.perf_counter()
    summary, failures, timings = [], {}, {}
    for name in suites:
        print(f"\n=== suite {name} ({'smoke' if args.smoke else 'quick' if quick else 'full'}, {args.device}, "
              f"{torch.get_num_threads()} threads)", flush=True)
        ts = time.perf_counter()
        try:
            result = _run_suite(name, quick, args.device, args.smoke)
        except Exception as exc:  # noqa: BLE001 - one failing suite must not lose the others' results
            failures[name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
            continue
        timings[name] = time.perf_counter() - ts
        results[name] = result
        result["command"] = command
        result["wall_s"] = timings[name]
        for fname, text in (result.pop("artifacts", None) or {}).items():
            path = os.path.join(out_dir, os.path.basename(fname))
            tmp = path + ".tmp"
            with open(tmp, "w") as fh:
                fh.write(text)
            os.replace(tmp, path)
            print(f"wrote {path}")
        write_json(os.path.join(out_dir, f"{name}.json"), result)
        chart = _chart_from(name, result)
        if chart is not None:
            plot_chart(chart, os.path.join(out_dir, f"{name}.png"))
        summary += summary_rows(name, result)
        print(f"wrote {os.path.join(out_dir, name + '.json')} ({timings[name]:.1f} s)", flush=True)
    total = time.perf_counter() - t0
    machine = machine_info(args.device)
    title = f"Summary: {command} ({machine['date']}, {args.device}, {torch.get_num_threads()} threads, {total:.0f} s)"
    print()
    print_table(title, summary, _SUMMARY_COLUMNS)
    header = (f"# Benchmark summary\n\nCommand: `{command}`  \nStarted: {started}  \nMachine: {machine}  \n"
              f"Suite seconds: {timings}  \nTotal: {total:.1f} s\n\n")
    if failures:
        header += "Failed suites: " + "; ".join(f"{k}: {v}" for k, v in failures.items()) + "\n\n"
    path = os.path.join(out_dir, "summary.md")
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(header + _markdown(summary))
    os.replace(tmp, path)
    write_json(os.path.join(out_dir, "summary.json"), {"command": command, "started": started, "machine": machine,
                                                       "suite_seconds": timings, "total_s": total,
                                                       "load_before": load_before, "load_after": load_average(),
                                                       "failures": failures, "rows": summary})
    print(f"wrote {path}\ntotal {total:.1f} s")
    if args.report:
        write_report(args.report_to, render(results, command=command, total_s=total, out_dir=out_dir,
                                            failures=failures, load_before=load_before, quick=quick, date=started,
                                            summary=summary))
        print(f"wrote {args.report_to}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
