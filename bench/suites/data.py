"""Benchmark suite ``data``: the ImageFolder data path, decoded every epoch vs through the uint8
cache of :class:`upi_fast.data.CachedImageDataset` (issue 17).

A generated ImageFolder of 224 x 224 JPEGs (smooth noise: low-resolution noise upsampled bicubically
plus fine grain, quality 90, so that a file is tens of KB as photographs are; 10 classes) is made once
under ``$UPI_FAST_BENCH_DATA`` (default: the system temp folder) and reused. Reported, in images per
second through a DataLoader (batches of 64, read in index order, the float32 batches consumed):

* ``uncached``: the reader alone, every epoch decodes (the reference);
* ``epoch 1``: decode + resize + cache write (a fresh cache folder each run, so never warmed);
* ``epoch 2``: cache read (after the entry is opened and verified; the verification time is a row);

with 0 and 2 DataLoader workers, and on CUDA with pinned memory on / off (each batch copied to the
device); on the CPU pinned memory does not apply. Also the cache's size on disk, and the rate the
step to be fed needs: about 2,000 img/s fp32 and 8,000 img/s bf16 for ResNet-50 at 224 on one
H100/H200-class card (an estimate from the step's FLOPs, not a measurement). Note: the JPEGs are
already 224 x 224, smaller than ImageNet's (~400 x 350 on average), so epoch 1 and ``uncached`` are
faster here than on ImageNet; the cache read does not depend on the source size.

    python -m bench.suites.data [--quick] [--device cpu|cuda] [--no-save]
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..harness import finish_suite, machine_info, print_table, suite_parser

__all__ = ["run", "main", "make_jpeg_folder"]

STEP_RATES = {"ResNet-50 224 fp32, one H100/H200 (estimate)": 2000.0,
              "ResNet-50 224 bf16, one H100/H200 (estimate)": 8000.0}
_COLUMNS = ["section", "name", "workers", "pin_memory", "median_s", "items", "items_per_s", "speedup_vs_uncached"]


def make_jpeg_folder(n: int, size: int = 224, root: str | None = None, classes: int = 10) -> str:
    """An ImageFolder of ``n`` JPEGs ``size`` x ``size`` (made once: reused when its marker exists)."""
    from PIL import Image
    base = root or os.environ.get("UPI_FAST_BENCH_DATA") or os.path.join(tempfile.gettempdir(), "upi_fast_bench_data")
    folder = os.path.join(base, f"jpeg{size}-n{n}-v1")
    if os.path.isfile(os.path.join(folder, ".complete")):
        return folder
    tmp = f"{folder}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        d = os.path.join(tmp, f"class{i % classes:02d}")
        os.makedirs(d, exist_ok=True)
        low = rng.integers(0, 256, (max(2, size // 16), max(2, size // 16), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((size, size), Image.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(d, f"{i:06d}.jpg"), quality=90)
    open(os.path.join(tmp, ".complete"), "w").close()
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def _epoch(dataset, workers: int, pin: bool, device: str) -> tuple[float, int]:
    loader = DataLoader(dataset, batch_size=64, num_workers=workers, pin_memory=pin)
    dev = torch.device(device)
    t0 = time.perf_counter()
    n, total = 0, 0.0
    for x, _ in loader:
        if dev.type == "cuda":
            x = x.to(dev, non_blocking=pin)
        total += float(x[:, 0, 0, 0].sum())  # touch the batch (and, on CUDA, wait for it)
        n += x.shape[0]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter() - t0, n


def _du(path: str) -> int:
    """Bytes on disk (allocated blocks) under ``path``."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            total += getattr(st, "st_blocks", 0) * 512 or st.st_size
    return total


def run(quick: bool = False, device: str = "cpu", smoke: bool = False) -> dict:
    from upi_fast.data import CachedImageDataset, image_folder

    n, size = (64, 32) if smoke else (5000, 224)
    repeat = 1 if smoke else 2 if quick else 3
    t0 = time.perf_counter()
    folder = make_jpeg_folder(n, size)
    gen_s = time.perf_counter() - t0
    jpeg_bytes = _du(folder)
    pins = (False, True) if device == "cuda" else (False,)
    rows, cache_root = [], tempfile.mkdtemp(prefix="upi_fast_bench_cache_")
    try:
        for workers in (0, 2):
            for pin in pins:
                def row(section, name, times, items, **extra):
                    med = float(np.median(times))
                    rows.append({"section": section, "name": name, "workers": workers,
                                 "pin_memory": pin if device == "cuda" else "n/a (CPU)", "median_s": med,
                                 "times_s": times, "items": items, "items_per_s": items / med, **extra})

                plain = image_folder(folder, size=size)
                un = [_epoch(plain, workers, pin, device) for _ in range(repeat)]
                row("uncached reader", "uncached: decode every epoch", [t for t, _ in un], un[0][1])
                cdir = os.path.join(cache_root, f"w{workers}-p{int(pin)}")
                t = time.perf_counter()
                cached = CachedImageDataset(image_folder(folder, size=size), cdir)
                open_s = time.perf_counter() - t
                t1, k = _epoch(cached, workers, pin, device)
                row("epoch 1", "epoch 1: decode + resize + cache write", [t1 + open_s], k,
                    complete=os.path.isfile(os.path.join(cached.entry, "manifest.json")))
                t = time.perf_counter()
                reopened = CachedImageDataset(image_folder(folder, size=size), cdir)
                verify_s = time.perf_counter() - t
                assert reopened.complete, "the cache was not complete after epoch 1"
                row("open", "open + verify a complete entry (key, checksums)", [verify_s], n)
                e2 = [_epoch(reopened, workers, pin, device) for _ in range(repeat)]
                row("epoch 2", "epoch 2: cache read", [t for t, _ in e2], e2[0][1])
                cache_bytes = _du(str(reopened.entry))
        ref = {(r["workers"], r["pin_memory"]): r["items_per_s"] for r in rows if r["section"] == "uncached reader"}
        ref0 = next(r["items_per_s"] for r in rows if r["section"] == "uncached reader" and r["workers"] == 0)
        for r in rows:
            if r["section"] == "open":  # a one-off cost per run, not a rate to compare
                continue
            r["speedup_vs_uncached"] = r["items_per_s"] / ref0
            r["speedup_vs_uncached_same_workers"] = r["items_per_s"] / ref[(r["workers"], r["pin_memory"])]
    finally:
        shutil.rmtree(cache_root, ignore_errors=True)
    table = print_table(f"data: ImageFolder of {n} JPEGs {size}x{size} ({device}, {os.cpu_count()} CPUs, "
                        f"speedup vs the uncached reader with 0 workers)", rows, _COLUMNS)
    best = max(r["items_per_s"] for r in rows if r["section"] == "epoch 2")
    feed = [{"step": k, "needs_img_per_s": v, "best_epoch2_img_per_s": best, "fraction_fed": best / v,
             "cpus_needed_at_the_measured_rate_per_cpu": v / (best / (os.cpu_count() or 1))} for k, v in STEP_RATES.items()]
    table += print_table("data: what the step to be fed needs (estimates from the step's FLOPs)", feed,
                         list(feed[0].keys()))
    notes = {"pin_memory": "measured on CUDA only; on the CPU it does not apply" if device != "cuda" else "measured",
             "jpeg_folder": folder, "jpeg_bytes_on_disk": jpeg_bytes, "cache_bytes_on_disk": cache_bytes,
             "cache_bytes_expected": n * 3 * size * size, "generate_s": gen_s,
             "page_cache": "the JPEGs are in the OS page cache (generated or read before): decode-bound, not disk-bound"}
    print(f"cache on disk: {cache_bytes / 2**20:.1f} MiB for {n} images ({cache_bytes / n / 1024:.0f} KiB each; "
          f"JPEGs {jpeg_bytes / 2**20:.1f} MiB)")
    return {"suite": "data", "device": device, "machine": machine_info(device), "n_images": n, "size": size,
            "rows": rows, "feed": feed, "notes": notes, "seconds": time.perf_counter() - t0,
            "artifacts": {"data_tables.md": table}}


def main(argv: list[str] | None = None) -> int:
    parser = suite_parser("data", __doc__, "2 repeats instead of 3", threads=False, smoke=True)
    args = parser.parse_args(argv)
    return finish_suite("data", run(args.quick, args.device, smoke=args.smoke), args.device, args.no_save)


if __name__ == "__main__":
    sys.exit(main())
