"""Support for the hardening tests: tiny models for ``--model hardening_support:NAME`` and a tiny
ImageFolder writer. Importable by subprocesses (``tests/`` on ``PYTHONPATH``); not a test module."""
from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

__all__ = ["make_model", "grey_model", "oom_model", "nograd_model", "const_model", "not_a_module",
           "train_mode_model", "make_image_folder", "OOM_LIMIT_ENV"]


#: ``oom_model`` raises ``torch.OutOfMemoryError`` for a forward pass over more images than this.
OOM_LIMIT_ENV = "UPI_TEST_OOM_LIMIT"


def make_model(channels: int = 3, classes: int = 3, size: int = 8, seed: int = 1) -> nn.Module:
    """A seeded smooth CNN on ``channels`` x ``size`` x ``size`` images, ``classes`` logits, eval mode."""
    g = torch.Generator().manual_seed(seed)
    m = nn.Sequential(nn.Conv2d(channels, 4, 3, padding=1), nn.Softplus(beta=4), nn.Flatten(),
                      nn.Linear(4 * size * size, classes))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


def grey_model() -> nn.Module:
    """A 1-channel model: RGB images do not fit it."""
    return make_model(channels=1)


class _OOMAbove(nn.Module):
    """``model(x)``, but ``torch.OutOfMemoryError`` when ``x`` holds more than ``limit`` images (a
    stand-in for a device that runs out of memory above some batch size)."""

    def __init__(self, model: nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit = model, limit
        self.calls = 0
        self.refused = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if x.shape[0] > self.limit:
            self.refused += 1
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} GiB (simulated)")
        return self.model(x)


def oom_model(limit: int | None = None, base: nn.Module | None = None) -> nn.Module:
    """:func:`make_model` that runs out of memory above ``limit`` images (default ``$UPI_TEST_OOM_LIMIT``)."""
    if limit is None:
        limit = int(os.environ.get(OOM_LIMIT_ENV, "4"))
    return _OOMAbove(make_model() if base is None else base, limit).eval()


class _NoGrad(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(x)


class _Const(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([0.0, 0.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 3)


def const_model() -> nn.Module:
    """Logits that do not depend on the input (always class 2)."""
    return _Const().eval()


def nograd_model() -> nn.Module:
    """:func:`make_model` run under ``torch.no_grad``: not differentiable in its input."""
    return _NoGrad(make_model()).eval()


def not_a_module():
    """A factory returning something that is not an ``nn.Module``."""
    return 42


def train_mode_model() -> nn.Module:
    """A model with BatchNorm and Dropout, returned in train mode."""
    g = torch.Generator().manual_seed(3)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Softplus(beta=4), nn.Dropout(0.5),
                      nn.Flatten(), nn.Linear(4 * 64, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        m[1].running_mean.copy_(torch.randn(4, generator=g) * 0.1)
        m[1].running_var.copy_(torch.rand(4, generator=g) + 0.5)
    return m.train()


def make_image_folder(root, classes: int = 3, per_class: int = 6, size: int = 8, seed: int = 0) -> str:
    """``root/c<k>/<k>_<i>.png``: ``classes`` folders of ``per_class`` random RGB ``size`` x ``size``
    PNGs, each filed under the class :func:`make_model` predicts for it (so every image is classified
    correctly). With ``classes`` > 3 the extra folders hold images of labels the model does not have."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    model = make_model(size=size)
    want = [per_class] * classes
    got: list[list[np.ndarray]] = [[] for _ in range(classes)]
    for _ in range(200):
        imgs = rng.integers(0, 256, size=(64, size, size, 3), dtype=np.uint8)
        with torch.no_grad():
            pred = model(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255).argmax(1).tolist()
        for img, k in zip(imgs, pred):
            if len(got[k]) < want[k]:
                got[k].append(img)
        for k in range(3, classes):  # labels beyond the model's outputs: any image
            got[k] = list(imgs[:per_class])
        if all(len(g) == w for g, w in zip(got, want)):
            break
    for k in range(classes):
        d = os.path.join(os.fspath(root), f"c{k}")
        os.makedirs(d, exist_ok=True)
        for i, img in enumerate(got[k]):
            Image.fromarray(img).save(os.path.join(d, f"{k}_{i}.png"))
    return os.fspath(root)
