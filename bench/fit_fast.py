"""Whole ``UPIGrad.fit`` / ``UPIPCA.fit`` calls with ``fast=False / True / "autotune"``, side by side.

``python -m bench.fit_fast [--rounds 3]``: ResNet-18 (random weights, 10 classes) on 192 random
3x64x64 images labelled by the model (UPI-Grad: batch 64, 2 epochs; UPI-PCA: batch 64, exact
solver), and the digits CNN on the digits attack split (UPI-Grad: batch 128, 5 epochs; UPI-PCA:
batch 128). Every contender first runs one untimed warm-up fit (thread pools, oneDNN primitive
caches, lazy imports); then rounds are interleaved (every contender once per round, seeds 0, 1,
...), and the median fit time and the ratio to ``fast=False`` in the same run are printed.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import upi_fast as U
from upi_fast.data import digits
from upi_fast.models import digits_cnn

CONTENDERS = (False, True, "autotune")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18(num_classes=10).eval()
    X = torch.randn(192, 3, 64, 64)
    with torch.no_grad():
        y = r18(X).argmax(1)
    splits = digits()
    digits_model = digits_cnn()
    cases = (("UPI-Grad resnet18 64", r18, (X, y), 64, 2), ("UPI-Grad digits", digits_model, splits.attack, 128, 5),
             ("UPI-PCA resnet18 64", r18, (X, y), 64, None), ("UPI-PCA digits", digits_model, splits.attack, 128, None))
    times: dict = {}
    for name, model, data, batch, epochs in cases:
        for rnd in range(-1, args.rounds):  # round -1: warm-up, not recorded
            for fast in CONTENDERS:
                if epochs is None:
                    solver = U.UPIPCA(model, 1.0, batch_size=batch, solver="exact", progress=False, fast=fast,
                                      seed=max(rnd, 0))
                else:
                    solver = U.UPIGrad(model, 1.0, epochs=epochs, batch_size=batch, progress=False, fast=fast,
                                       seed=max(rnd, 0))
                t0 = time.perf_counter()
                solver.fit(data)
                if rnd >= 0:
                    times.setdefault(name, {}).setdefault(str(fast), []).append(time.perf_counter() - t0)
    print(f"{'solver, model':<22} {'fast':<10} {'median s':>9} {'vs fast=False':>14}")
    for name, rows in times.items():
        ref = statistics.median(rows["False"])
        for fast, ts in rows.items():
            med = statistics.median(ts)
            print(f"{name:<22} {fast:<10} {med:>9.2f} {ref / med:>13.2f}x")
    return times


if __name__ == "__main__":
    main()
