"""Timing harness shared by every benchmark suite.

Honest by construction: every contender of a comparison gets the same inputs (the caller builds
them once), runs ``warmup`` times untimed, then ``repeat`` timed runs; we report the median and
the spread (min, max, interquartile range) and, where asked, peak memory. On CUDA the runs are
timed with events after a synchronisation; on the CPU with ``time.perf_counter``. Ratios are
always computed against a reference contender measured in the same process, the same run.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

__all__ = ["Measurement", "measure", "compare", "print_table", "machine_info", "results_dir", "write_json"]


@dataclasses.dataclass
class Measurement:
    """One contender's timings. ``items`` is how many images/rows one call processes."""
    name: str
    times_s: list[float]
    items: int = 1
    peak_mem_mb: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def iqr_s(self) -> float:
        if len(self.times_s) < 4:
            return max(self.times_s) - min(self.times_s)
        q = statistics.quantiles(self.times_s, n=4)
        return q[2] - q[0]

    @property
    def throughput(self) -> float:
        return self.items / self.median_s

    def as_dict(self) -> dict:
        return {"name": self.name, "median_s": self.median_s, "min_s": min(self.times_s),
                "max_s": max(self.times_s), "iqr_s": self.iqr_s, "repeats": len(self.times_s),
                "items": self.items, "items_per_s": self.throughput, "peak_mem_mb": self.peak_mem_mb,
                **self.extra}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name: str, fn: Callable[[], object], *, items: int = 1, warmup: int = 1, repeat: int = 5,
            device: torch.device | str = "cpu", track_memory: bool = False, **extra) -> Measurement:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times timed; return a :class:`Measurement`.

    ``track_memory``: peak CUDA memory allocated during the timed runs (``torch.cuda`` counters),
    or on the CPU the growth of the process's peak resident set over the timed runs (a lower
    bound: the CPU peak is process-wide and never goes down).
    """
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    base_rss = _rss_peak_mb()
    if device.type == "cuda" and track_memory:
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    peak = None
    if track_memory:
        if device.type == "cuda":
            peak = (torch.cuda.max_memory_allocated(device) - base_alloc) / 2**20
        else:
            peak = _rss_peak_mb() - base_rss
    return Measurement(name, times, items, peak, dict(extra))


def _rss_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def compare(measurements: list[Measurement], reference: str) -> list[dict]:
    """Rows with ``speedup`` = reference median time / contender median time (per item)."""
    ref = next(m for m in measurements if m.name == reference)
    ref_per_item = ref.median_s / ref.items
    rows = []
    for m in measurements:
        row = m.as_dict()
        row["speedup_vs_" + reference] = ref_per_item / (m.median_s / m.items)
        rows.append(row)
    return rows


def print_table(title: str, rows: list[dict], columns: list[str]) -> str:
    """Render rows as a Markdown table (returned and printed)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return "" if v is None else str(v)
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    return text


def _cpu_model() -> str:
    """The processor's name and its vector / matrix extensions that matter here (Linux)."""
    try:
        with open("/proc/cpuinfo") as fh:
            text = fh.read()
    except OSError:
        return platform.processor() or "unknown"
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "unknown")
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    ext = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{name} ({', '.join(ext)})" if ext else name


def machine_info(device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    info = {"date": _dt.date.today().isoformat(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "platform": platform.platform(), "cpu": _cpu_model(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


#: Where results go without ``--out``: relative to the current folder (never to this file's folder,
#: which is the installed package or the source tree). From the repository root that is the
#: checked-in ``bench/results``.
DEFAULT_RESULTS_ROOT = os.path.join("bench", "results")


def results_dir(device: torch.device | str = "cpu", root: str | None = None, tag: str | None = None) -> str:
    """``<root>/<date>-<device>[-<tag>]/`` (created), ``root`` default :data:`DEFAULT_RESULTS_ROOT`
    under the current folder; ``tag`` tells runs of one day apart (e.g. ``"1t"`` for a one-thread run)."""
    device = torch.device(device)
    name = device.type if device.type != "cuda" else torch.cuda.get_device_name(device).replace(" ", "_")
    root = os.path.abspath(root or DEFAULT_RESULTS_ROOT)
    path = os.path.join(root, f"{_dt.date.today().isoformat()}-{name}" + (f"-{tag}" if tag else ""))
    os.makedirs(path, exist_ok=True)
    return path


def write_json(path: str, payload: dict) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=2, default=str)
    os.replace(tmp, path)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def memory_worker(module: str, quick: bool, timeout: float = 3600) -> tuple[dict, str | None]:
    """Run ``python -m <module> --memory-worker [--quick]`` in a fresh process (so its peak resident
    memory is its own) with this process's thread count; returns ``(the JSON on its last stdout
    line, None)`` or ``({}, why it failed)``."""
    cmd = [sys.executable, "-m", module, "--memory-worker"] + (["--quick"] if quick else [])
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    except (OSError, subprocess.TimeoutExpired) as e:
        return {}, f"memory worker failed: {e}"
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}"
        return {}, f"memory worker failed: {last}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of two tensors' flattened values, in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def suite_parser(suite: str, doc: str, quick_help: str, *, threads: bool = True, smoke: bool = False,
                 default_device: str = "cpu") -> argparse.ArgumentParser:
    """The command line every suite shares: ``--quick``, ``--device``, ``--no-save`` and, when asked
    for, ``--threads`` and the hidden ``--smoke``."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.suites.{suite}", description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if smoke:
        parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    parser.add_argument("--no-save", action="store_true", help=f"do not write bench/results/.../{suite}.json (under the current folder)")
    if threads:
        parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return parser


def apply_threads(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``torch.set_num_threads(args.threads)`` when given (a clear error below 1)."""
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)


def finish_suite(suite: str, result: dict, device: str, no_save: bool) -> int:
    """Print the suite's total time and write its JSON (unless ``no_save``); returns exit code 0."""
    if "seconds" in result:
        print(f"total {result['seconds']:.1f} s")
    if not no_save:
        path = os.path.join(results_dir(device), f"{suite}.json")
        write_json(path, result)
        print(f"wrote {path}")
    return 0
