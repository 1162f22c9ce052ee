"""What the HVP and UPI-Grad suites share: the benchmark problems (models, seeded batches) and
peak-memory probes (CPU resident set growth, CUDA allocator peak). Its own module so that the suites
do not import each other."""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["configs", "build_problem", "cpu_peak_growth_mb", "cuda_peak_mb"]

_GPU_BATCH = {"resnet50": 128, "vgg16": 64}


# ------------------------------------------------------------------------------------------- problems

def configs(quick: bool, device: str, smoke: bool = False) -> list[dict]:
    """Per model: name, input shape, batch, images in the per-sample loop."""
    if smoke:
        return [dict(model="digits CNN", shape=(1, 16, 16), batch=16, loop=2)]
    cfgs = [dict(model="digits CNN", shape=(1, 16, 16), batch=128, loop=32 if quick else 128)]
    if device == "cuda":
        cfgs += [dict(model=m, shape=(3, 224, 224), batch=b, loop=4 if quick else 16) for m, b in _GPU_BATCH.items()]
    else:
        cfgs.append(dict(model="resnet18", shape=(3, 64, 64), batch=32 if quick else 64, loop=2 if quick else 16))
    return cfgs


def build_problem(cfg: dict, device: str):
    """``(model, x, y, I_ref, delta)`` for a config, identical in every process (seeded)."""
    import torchvision

    import upi_fast as U
    from upi_fast.models import build_digits_cnn

    torch.manual_seed(0)
    if cfg["model"] == "digits CNN":
        model, classes = build_digits_cnn(cfg["shape"][-1]), 10
    else:
        model, classes = getattr(torchvision.models, cfg["model"])(weights=None), 1000
    model = model.to(device).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(cfg["batch"], *cfg["shape"], generator=g).to(device)
    y = torch.randint(0, classes, (cfg["batch"],), generator=g).to(device)
    delta = (0.05 * torch.randn(*cfg["shape"], generator=g)).to(device)
    I_ref = U.saliency(model, x, y)
    return model, x, y, I_ref, delta


# ------------------------------------------------------------------------------------------- memory

def _proc_status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def cpu_peak_growth_mb(fn: Callable) -> float:
    fn()  # warm-up: lazily built library state is not the step's memory
    _reset_peak_rss()
    base = _proc_status_mb("VmRSS")
    fn()
    return _proc_status_mb("VmHWM") - base


def cuda_peak_mb(fn: Callable, device) -> float:
    fn()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def fit_model(device: str, smoke: bool):
    """``(model, input shape, batch)`` of the whole-fit benchmarks: torchvision ResNet-18 (random
    weights, 10 classes) at 64x64 in batches of 64, or the digits CNN at 16x16 in batches of 16 for a
    smoke run; seeded, eval mode, on ``device``."""
    import torchvision

    from upi_fast.models import build_digits_cnn
    torch.manual_seed(0)
    if smoke:
        model, shape, batch = build_digits_cnn(16), (1, 16, 16), 16
    else:
        model, shape, batch = torchvision.models.resnet18(num_classes=10), (3, 64, 64), 64
    return model.to(device).eval(), shape, batch
