"""Models: the embedded digits CNN, torchvision / user models, weights loaded safely.

* :func:`digits_cnn`: a small piecewise-linear CNN (conv, ReLU, max pool, linear only) trained
  deterministically on the digits train split in a few seconds and cached as safetensors.
* :func:`load_model`: ``"digits"``, ``"torchvision:NAME"`` or ``"module.path:callable"``, with an
  optional local weights file (safetensors, or ``torch.load(weights_only=True)``; nothing is ever
  downloaded) and an optional input normalisation (:class:`Normalized`).
* :func:`model_name`: a short description for metadata.
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import math
import os
import warnings
from pathlib import Path
from typing import Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .data import _check_mean_std, digits
from .io import write_bytes_atomic

__all__ = ["DIGITS_ARCH", "build_digits_cnn", "digits_cnn", "digits_cnn_cache_path", "default_cache_dir",
           "Normalized", "load_model", "load_state_dict_file", "model_name", "model_num_classes", "model_record",
           "file_sha256"]

#: Per-channel normalisation constants: one number per input channel (or one for all), or a tensor.
ChannelValues = Union[Sequence[float], float, torch.Tensor]

#: Output classes of every torchvision classification model built without ``num_classes`` (ImageNet).
_TORCHVISION_CLASSES = 1000

#: Architecture (and training recipe) version of :func:`digits_cnn`; part of the cache file name.
DIGITS_ARCH = "digits_cnn-v1"
_EPOCHS, _BATCH, _MAX_LR = 12, 64, 1e-2


# --------------------------------------------------------------------------------------------- digits CNN
def build_digits_cnn(size: int = 16, num_classes: int = 10) -> nn.Sequential:
    """The untrained digits architecture for ``size`` x ``size`` grey inputs (``size`` divisible by 4):
    conv(1->16, 3x3, pad 1)-ReLU-maxpool(2)-conv(16->32, 3x3, pad 1)-ReLU-maxpool(2)-flatten-
    linear(32 (size/4)^2 -> 64)-ReLU-linear(64 -> num_classes). Piecewise linear in its input."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 4 or size % 4:
        raise ValueError(f"size must be a positive multiple of 4, got {size!r}")
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (size // 4) ** 2, 64), nn.ReLU(), nn.Linear(64, num_classes),
    )


def default_cache_dir() -> Path:
    """``$UPI_FAST_CACHE`` when set, else ``~/.cache/upi_fast``."""
    env = os.environ.get("UPI_FAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "upi_fast"


def digits_cnn_cache_path(cache_dir: str | os.PathLike | None = None, size: int = 16, seed: int = 0) -> Path:
    """Where :func:`digits_cnn` caches the weights for ``size`` / ``seed``."""
    root = Path(os.fspath(cache_dir)).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"{DIGITS_ARCH}-size{size}-seed{seed}.safetensors"


def _state_hash(sd: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _train_digits(size: int, seed: int, progress: bool) -> tuple[nn.Sequential, float]:
    """Adam with a one-cycle learning rate, 12 epochs of minibatches of 64 in an order drawn from
    ``seed``; initialisation from ``seed`` too (the global RNG state is restored afterwards)."""
    data = digits(size=size, seed=0)
    X, y = data.train
    steps = _EPOCHS * math.ceil(X.shape[0] / _BATCH)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_digits_cnn(size)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=_MAX_LR)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=_MAX_LR, total_steps=steps)
    epochs = range(_EPOCHS)
    if progress:
        from tqdm.auto import tqdm
        epochs = tqdm(epochs, desc=f"training {DIGITS_ARCH} (size {size})", unit="epoch")
    model.train()
    with torch.enable_grad():
        for _ in epochs:
            order = torch.randperm(X.shape[0], generator=g)
            for i in range(0, X.shape[0], _BATCH):
                idx = order[i:i + _BATCH]
                loss = F.cross_entropy(model(X[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(data.eval.X).argmax(1) == data.eval.y).float().mean())
    return model, acc


def _load_digits_cache(path: Path, size: int, seed: int) -> nn.Sequential:
    """The cached model, or an exception saying why the cache file is unusable."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        sd = {k: f.get_tensor(k) for k in f.keys()}
    expect = {"arch": DIGITS_ARCH, "size": str(size), "seed": str(seed)}
    for k, v in expect.items():
        if meta.get(k) != v:
            raise ValueError(f"metadata {k!r} is {meta.get(k)!r}, expected {v!r}")
    if meta.get("sha256") != _state_hash(sd):
        raise ValueError("checksum mismatch")
    with torch.random.fork_rng(devices=[]):  # the random initialisation is overwritten anyway
        model = build_digits_cnn(size)
    model.load_state_dict(sd, strict=True)
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise ValueError("non-finite weights")
    return model.eval()


def digits_cnn(cache_dir: str | os.PathLike | None = None, retrain: bool = False, seed: int = 0, size: int = 16,
               progress: bool = False) -> nn.Module:
    """The embedded default classifier: :func:`build_digits_cnn` trained on ``digits(size).train``.

    Training is deterministic for a given ``seed`` (same machine, same thread count) and takes a
    few seconds on 2 CPU cores; eval-split accuracy is about 98% at ``size=16``. The weights are
    cached at :func:`digits_cnn_cache_path` (``cache_dir``, else ``$UPI_FAST_CACHE``, else
    ``~/.cache/upi_fast``) as safetensors with a SHA-256 checksum in the metadata, written
    atomically; a cache file that fails to load or verify is reported with a warning and replaced.
    ``retrain=True`` ignores the cache. An unwritable cache only warns.

    Returns:
        ``nn.Sequential`` in eval mode, float32, on the CPU; input (B, 1, size, size) in [0, 1].
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an integer, got {seed!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 4 or size % 4:
        raise ValueError(f"size must be a positive multiple of 4, got {size!r}")
    path = digits_cnn_cache_path(cache_dir, size, seed)
    model = None
    if not retrain and path.exists():
        try:
            model = _load_digits_cache(path, size, seed)
        except Exception as e:  # any failure to read or verify means: retrain
            warnings.warn(f"digits CNN cache {str(path)!r} is corrupt or stale ({type(e).__name__}: {e}); retraining",
                          UserWarning, stacklevel=2)
            model = None
    if model is None:
        from safetensors.torch import save as st_save
        model, acc = _train_digits(size, seed, progress)
        sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        meta = {"arch": DIGITS_ARCH, "size": str(size), "seed": str(seed), "eval_accuracy": f"{acc:.4f}",
                "sha256": _state_hash(sd)}
        try:
            write_bytes_atomic(path, st_save(sd, metadata=meta))
        except OSError as e:
            warnings.warn(f"could not write the digits CNN cache {str(path)!r}: {e}", UserWarning, stacklevel=2)
    model._upi_fast_name = f"digits(size={size}, seed={seed})"
    return model.float().eval()


# --------------------------------------------------------------------------------------------- normalisation
class Normalized(nn.Module):
    """``model((x - mean) / std)``: a per-channel affine map in front of ``model``.

    ``mean`` / ``std`` have one value per input channel (or one for all); they are non-persistent
    buffers (not in the state dict) that follow ``.to(device / dtype)``. Being affine, the wrapper
    keeps a piecewise-linear network piecewise linear.
    """

    def __init__(self, model: nn.Module, mean: ChannelValues, std: ChannelValues) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        mean, std = _check_mean_std(mean, std)
        if mean is None:
            raise ValueError("Normalized needs mean and std")
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``model((x - mean) / std)`` for images ``x`` (B, C, H, W) in the un-normalised units
        (e.g. pixels in [0, 1]); returns the wrapped model's output (logits (B, K))."""
        c = self.mean.shape[1]
        if x.dim() != 4 or (c != 1 and x.shape[1] != c):
            raise ValueError(f"Normalized expects input (B, {c}, H, W), got {tuple(x.shape)}")
        return self.model((x - self.mean) / self.std)

    def extra_repr(self) -> str:
        """The normalisation constants, for ``repr(module)``."""
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


# --------------------------------------------------------------------------------------------- weights files
def _unwrap_checkpoint(obj) -> dict:
    if isinstance(obj, Mapping) and obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
    return obj


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` without running code: safetensors (``.safetensors``, or any
    file that is not a torch archive) or ``torch.load(map_location="cpu", weights_only=True)``.

    A checkpoint dict holding the weights under ``"state_dict"`` / ``"model_state_dict"`` /
    ``"model"`` is unwrapped; a ``"module."`` prefix on every key (DataParallel) is removed.

    Raises:
        FileNotFoundError: no such file. ValueError: unreadable, unsafe or not a dict of tensors.
    """
    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {str(p)!r}")
    with open(p, "rb") as f:
        head = f.read(8)
    torch_archive = head[:2] == b"PK" or head[:1] == b"\x80"
    if p.suffix == ".safetensors" or not torch_archive:
        from safetensors.torch import load_file
        try:
            obj = load_file(str(p), device="cpu")
        except Exception as e:
            raise ValueError(f"could not read weights from {str(p)!r} as safetensors: {e}") from None
    else:
        try:
            with warnings.catch_warnings():  # torch's advisories about the pickle protocol: not ours to show
                warnings.simplefilter("ignore")
                obj = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"refusing to load weights from {str(p)!r}: torch.load(weights_only=True) failed "
                             f"({first}); only plain state dicts of tensors are accepted") from None
    obj = _unwrap_checkpoint(obj)
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"weights file {str(p)!r} does not hold a state dict (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"weights file {str(p)!r} has non-tensor entries: {bad[:5]}")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(os.fspath(path), "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _head_key(model: nn.Module, classes: int) -> str | None:
    """The state-dict key of ``model``'s classification layer: the last weight of two or more
    dimensions whose first dimension is ``classes`` (``fc.weight`` of a ResNet, ``classifier.6.weight``
    of a VGG, ``heads.head.weight`` of a ViT, ``classifier.1.weight`` (a 1x1 conv) of a SqueezeNet)."""
    key = None
    for k, v in model.state_dict().items():
        if k.endswith("weight") and v.dim() >= 2 and v.shape[0] == classes:
            key = k
    return key


def _load_weights_strict(model: nn.Module, path, what: str, sd: dict | None = None) -> None:
    sd = load_state_dict_file(path) if sd is None else sd
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(own) & set(sd)) if sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        def fmt(name, items):
            return f"{name} ({len(items)}): {items[:8]}{' ...' if len(items) > 8 else ''}" if items else ""
        parts = [s for s in (fmt("missing keys", missing), fmt("unexpected keys", unexpected),
                             fmt("shape mismatches", mismatched)) if s]
        raise ValueError(f"weights file {os.fspath(path)!r} does not match {what}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)


# --------------------------------------------------------------------------------------------- specs
def _torchvision_classifier(name: str, num_classes: int | None) -> nn.Module:
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; e.g. {', '.join(names[:5])}"
        raise ValueError(f"unknown torchvision classification model {name!r}{hint}")
    kwargs = {"weights": None}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    return tvm.get_model(name, **kwargs)


def _import_callable(spec: str):
    mod_name, _, attr = spec.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"model spec {spec!r} must be 'digits', 'torchvision:NAME' or 'module.path:callable'")
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"model spec {spec!r}: cannot import module {mod_name!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model spec {spec!r}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model spec {spec!r}: {attr!r} is not callable")
    return obj


def load_model(spec: str, weights: str | os.PathLike | None = None, num_classes: int | None = None,
               mean: ChannelValues | None = None, std: ChannelValues | None = None) -> nn.Module:
    """Build a model from a spec string, in eval mode.

    Args:
        spec: ``"digits"`` (:func:`digits_cnn`, trained or cached; with ``weights`` the bare
            architecture loads them instead), ``"torchvision:NAME"`` (a torchvision classification
            model, random initialisation: nothing is downloaded) or ``"module.path:callable"``
            (imported and called with no arguments; must return an ``nn.Module``).
        weights: optional local weights file (see :func:`load_state_dict_file`), loaded strictly:
            a mismatch lists the missing / unexpected keys and shape mismatches.
        num_classes: passed to the torchvision constructor (for ``"digits"``: must be 10 or None). For a
            torchvision model with ``weights`` and no ``num_classes`` it is read from the weights' final
            layer (``fc.weight`` of shape (3, 512): 3 classes); a ``num_classes`` that disagrees with
            them is a ValueError naming both. :func:`model_num_classes` tells the result.
        mean, std: when given, the model is wrapped in :class:`Normalized` (inputs then in pixel units).

    Raises:
        ValueError: malformed spec, unknown torchvision name (close matches listed), module not
            importable, callable not returning an nn.Module, weights not matching.
        FileNotFoundError: ``weights`` does not exist.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise TypeError(f"spec must be a non-empty string, got {spec!r}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    spec = spec.strip()
    if weights is not None and not Path(os.fspath(weights)).expanduser().is_file():
        raise FileNotFoundError(f"weights file not found: {os.fspath(weights)!r}")
    classes, head = None, None
    if spec == "digits":
        if num_classes not in (None, 10):
            raise ValueError(f"the digits model has 10 classes, got num_classes={num_classes}")
        if weights is None:
            model = digits_cnn()
        else:
            model = build_digits_cnn(16)
            _load_weights_strict(model, weights, "the digits CNN (size 16)")
            model._upi_fast_name = "digits"
        classes = 10
    elif spec.startswith("torchvision:"):
        name = spec.split(":", 1)[1].strip().lower()
        model = _torchvision_classifier(name, num_classes)
        classes = num_classes if num_classes is not None else _TORCHVISION_CLASSES
        if weights is not None:
            sd = load_state_dict_file(weights)
            key = _head_key(model, classes)
            if key is not None and key in sd and sd[key].dim() >= 2 and sd[key].shape[0] != classes:
                found = int(sd[key].shape[0])
                shape = tuple(sd[key].shape)
                if num_classes is not None:
                    raise ValueError(f"num_classes={num_classes} does not match the weights file "
                                     f"{os.path.basename(os.fspath(weights))!r}: its {key} has shape {shape}, "
                                     f"i.e. {found} classes (drop --num-classes to take it from the weights)")
                classes = found  # inferred from the final layer of the weights
                model = _torchvision_classifier(name, classes)
            if key is not None and key in sd:
                head = (key, tuple(sd[key].shape))
            _load_weights_strict(model, weights, f"torchvision {name}", sd)
        model._upi_fast_name = f"torchvision:{name}"
    else:
        factory = _import_callable(spec)
        model = factory()
        if not isinstance(model, nn.Module):
            raise ValueError(f"model spec {spec!r}: the callable returned a {type(model).__name__}, not an nn.Module")
        if weights is not None:
            _load_weights_strict(model, weights, spec)
        if num_classes is not None:
            warnings.warn(f"num_classes is ignored for a callable spec ({spec!r})", UserWarning, stacklevel=2)
        model._upi_fast_name = spec
    if weights is not None:
        model._upi_fast_weights = os.fspath(weights)
    model._upi_fast_num_classes = classes
    model._upi_fast_head = head
    model.eval()
    if mean is not None or std is not None:
        model = Normalized(model, mean, std).eval()
    return model


def _unwrap(model: nn.Module) -> nn.Module:
    return model.model if isinstance(model, Normalized) else model


def model_num_classes(model: nn.Module) -> tuple[int | None, str]:
    """``(classes, where that number comes from)`` for a model from :func:`load_model`: the
    torchvision / digits head (``num_classes``, or inferred from the weights' final layer, e.g.
    ``"fc.weight (3, 512) in r18.safetensors"``); ``(None, "")`` for a callable spec (unknown
    until it runs)."""
    m = _unwrap(model)
    classes = getattr(m, "_upi_fast_num_classes", None)
    if classes is None:
        return None, ""
    head, w = getattr(m, "_upi_fast_head", None), getattr(m, "_upi_fast_weights", None)
    if head is not None and w:
        return classes, f"{head[0]} {head[1]} in {os.path.basename(w)}"
    return classes, f"{getattr(m, '_upi_fast_name', 'the model')} head"


def model_record(spec: str, model: nn.Module) -> dict:
    """What a perturbation file records about the model it was computed on: ``model`` (the spec),
    ``weights`` (the file's name, None without one), ``weights_sha256`` and ``num_classes`` (None
    for a callable spec)."""
    m = _unwrap(model)
    w = getattr(m, "_upi_fast_weights", None)
    return {"model": model_name(spec), "weights": os.path.basename(w) if w else None,
            "weights_sha256": file_sha256(w) if w else None, "num_classes": model_num_classes(model)[0]}


def model_name(model_or_spec: nn.Module | str) -> str:
    """A short description for metadata: the spec a model was loaded from (plus its weights file
    and normalisation), else the class's qualified name."""
    if isinstance(model_or_spec, str):
        s = model_or_spec.strip()
        return f"torchvision:{s.split(':', 1)[1].strip().lower()}" if s.startswith("torchvision:") else s
    if isinstance(model_or_spec, Normalized):
        mean = [round(v, 6) for v in model_or_spec.mean.flatten().tolist()]
        std = [round(v, 6) for v in model_or_spec.std.flatten().tolist()]
        return f"{model_name(model_or_spec.model)} normalized(mean={json.dumps(mean)}, std={json.dumps(std)})"
    name = getattr(model_or_spec, "_upi_fast_name", None)
    if isinstance(name, str):
        w = getattr(model_or_spec, "_upi_fast_weights", None)
        return f"{name} [weights {os.path.basename(w)}]" if w else name
    cls = type(model_or_spec)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
