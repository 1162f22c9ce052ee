"""The command line's job on real data: compute a UPI (evaluating and rendering a saved perturbation
file: :mod:`upi_fast.saved`).

Units: images are loaded as pixels in [0, 1]; a model's normalisation (``mean``/``std``) is part
of the model (:class:`upi_fast.models.Normalized`), so ``eps`` is in pixel units [0, 1] and the
integrated-gradients black baseline is 0.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import time
from typing import Iterator

import torch

from . import io, viz
from .methods import options_used
from .data import DEFAULT_IMAGE_FOLDER_SIZE, dataset_num_classes, make_loader, open_dataset, resize_note, split_indices
from .distributed import Comm, launched, local_device, main_only, shard_bounds
from .evaluate import evaluate
from .models import load_model, model_num_classes, model_record
from .report import format_eps, format_table, json_report, markdown_report
from ._checks import check_choice, check_positive
from .solvers import UPIGrad, UPIPCA
from .solvers._common import resolve_device
from .solvers._microbatch import is_out_of_memory
from .solvers.baselines import universal_random

__all__ = ["ComputeConfig", "compute", "eps_from_pixels", "option_of"]

_log = logging.getLogger("upi_fast")


# --------------------------------------------------------------------------------------------- blame
# Which command-line option a bad-input error raised during a stage concerns: the exception gets an
# ``option`` attribute (e.g. ``"--data"``) that the CLI puts in front of its one-line message. The
# message itself is the API's. Rules are tried in order; the stage's default comes last.
_GENERAL_RULES = (
    (re.compile(r"precision"), "--precision"),
    (re.compile(r"^resume\b"), "--resume"),
    (re.compile(r"checkpoint"), "--checkpoint-dir"),
    (re.compile(r"\bhvp\b"), "--hvp"),
    (re.compile(r"\bsolver\b"), "--solver"),
    (re.compile(r"backend", re.IGNORECASE), "--backend"),
    (re.compile(r"cannot process images of shape"), "--model/--size"),
    (re.compile(r"^the model"), "--model"),
    (re.compile(r"\bdata\b"), "--data"),
)
_MODEL_RULES = (
    (re.compile(r"^num_classes="), "--num-classes"),
    (re.compile(r"weights"), "--weights"),
    (re.compile(r"^(mean|std)\b|\bmean and std\b|\b(mean|std) must\b|^Normalized"), "--mean/--std"),
    (re.compile(r"num_classes"), "--num-classes"),
)


def option_of(exc: BaseException) -> str | None:
    """The command-line option a pipeline error was blamed on (None when unknown)."""
    return getattr(exc, "option", None)


@contextlib.contextmanager
def _blame(default: str | None, rules: tuple = _GENERAL_RULES, data: str | None = None) -> Iterator[None]:
    """Tag bad-input errors raised inside with the option they concern (see :func:`option_of`);
    the exception itself (type, message) is re-raised unchanged."""
    try:
        yield
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        if option_of(exc) is None:
            msg = str(exc)
            if is_out_of_memory(exc):
                opt = "--batch-size"
            else:
                opt = next((o for rx, o in rules if rx.search(msg)), None)
                if opt is None and data and (os.path.abspath(data) in msg or data in msg):
                    opt = "--data"
                opt = opt or default
            try:
                exc.option = opt
            except AttributeError:  # an exception type without a __dict__: leave it untagged
                pass
        raise


def _open(data: str, size, log=None, why: str | None = None, cache=None) -> "torch.utils.data.Dataset":
    """The dataset at ``data`` (images ``size`` x ``size``); with ``log``, one line when the images
    are resized (from what to what, and ``why``: where ``size`` came from); with ``cache`` (a folder),
    read through a :class:`~upi_fast.data.CachedImageDataset` there."""
    with _blame("--data", ()):
        dataset = open_dataset(data, size=size)
        if len(dataset) == 0:
            raise ValueError(f"data: {data!r} holds no images")
        if log is not None:
            note = resize_note(dataset, size, why or (f"--size {size}" if size is not None else
                                                      f"--size not given: {DEFAULT_IMAGE_FOLDER_SIZE} for an "
                                                      f"ImageFolder, torchvision's ImageNet input size; --size N "
                                                      f"changes it"))
            if note:
                log(note)
        if cache is not None:
            with _blame("--cache", ()):
                from .data.cache import CachedImageDataset
                dataset = CachedImageDataset(dataset, cache)
        return dataset


def _model(spec: str, weights, num_classes, mean, std, dataset=None, data: str | None = None) -> torch.nn.Module:
    """The model of ``spec``; with ``dataset``, its class count checked against the data's (a
    torchvision model with neither weights nor ``num_classes`` gets a random head of the data's
    class count; a head read from the weights or given that differs is a ValueError on --data)."""
    data_classes = dataset_num_classes(dataset) if dataset is not None else None
    if (num_classes is None and weights is None and data_classes is not None and isinstance(spec, str)
            and spec.strip().startswith("torchvision:")):
        num_classes = data_classes
    with _blame("--model", _MODEL_RULES):
        model = load_model(spec, weights, num_classes=num_classes, mean=mean, std=std)
    classes, source = model_num_classes(model)
    if data_classes is not None and classes is not None and classes != data_classes:
        err = ValueError(f"{data} has {data_classes} classes but the model has {classes} ({source}); give data "
                         f"with the model's classes, or weights with a {data_classes}-class head")
        err.option = "--data"
        raise err
    return model


def _device(device) -> torch.device:
    with _blame("--device", ()):
        return resolve_device(local_device(device), None)


def _check_config(cfg: "ComputeConfig") -> "ComputeConfig":
    """The settings the command line validates, checked again for API callers (tagged with their
    options); returns a copy with ``norm`` parsed (2.0 or inf)."""
    with _blame("--eps", ()):
        if (cfg.eps is None) == (cfg.eps_pixels is None):
            raise ValueError("give exactly one of eps and eps_pixels")
    with _blame("--eps" if cfg.eps is not None else "--eps-pixels", ()):
        check_positive("eps" if cfg.eps is not None else "eps_pixels",
                       cfg.eps if cfg.eps is not None else cfg.eps_pixels)
    with _blame("--norm", ()):
        from .projection import parse_norm
        norm = parse_norm(cfg.norm)
    with _blame("--method", ()):
        check_choice("method", cfg.method, ("grad", "pca", "pca+"))
    for name in ("attack_samples", "eval_samples", "epochs", "batch_size"):
        with _blame("--" + name.replace("_", "-"), ()):
            check_positive(name, getattr(cfg, name), integer=True)
    with _blame("--workers", ()):
        if isinstance(cfg.workers, bool) or not isinstance(cfg.workers, int) or cfg.workers < 0:
            raise ValueError(f"workers must be an integer >= 0, got {cfg.workers!r}")
    with _blame("--fast", ()):
        check_choice("fast", cfg.fast, ("off", "on", "autotune"))
    with _blame("--integration", ()):
        from .saliency import INTEGRATION_RULES
        check_choice("integration", cfg.integration, INTEGRATION_RULES)
    for name in ("steps", "smoothgrad_samples"):
        with _blame("--" + name.replace("_", "-"), ()):
            check_positive(name, getattr(cfg, name), integer=True)
    with _blame("--smoothgrad-std", ()):
        check_positive("smoothgrad_std", cfg.smoothgrad_std)
    with _blame("--oom-retry", ()):
        if not isinstance(cfg.oom_retry, bool):
            raise TypeError(f"oom_retry must be True or False, got {cfg.oom_retry!r}")
    return dataclasses.replace(cfg, norm=norm)


def eps_from_pixels(eps_pixels: float, norm: float, input_shape: tuple) -> float:
    """Convert a per-pixel budget on the 0-255 scale to model units (pixels in [0, 1]):
    Linf: ``eps_pixels / 255``; L2: ``eps_pixels / 255 * sqrt(d)`` (an RMS change of
    ``eps_pixels`` grey levels per pixel)."""
    per = eps_pixels / 255.0
    return per if norm == math.inf else per * math.sqrt(math.prod(input_shape))


@dataclasses.dataclass
class ComputeConfig:
    """Everything ``upi-fast compute`` needs (validated by the CLI, and again by :func:`compute`).

    ``oom_retry``: split batches that do not fit the device's memory into micro-batches instead of
    stopping (``--oom-retry``; see :class:`upi_fast.solvers.UPIGrad`). ``fast``: ``"off"``, ``"on"``
    or ``"autotune"``, the solvers' ``fast`` option (``--fast``). ``integration``: the
    integrated-gradients path rule (``--integration``, :data:`upi_fast.saliency.INTEGRATION_RULES`;
    used with ``saliency="integrated"``)."""
    data: str
    model: str
    out: str
    weights: str | None = None
    num_classes: int | None = None
    mean: tuple | None = None
    std: tuple | None = None
    size: int | None = None
    eps: float | None = None
    eps_pixels: float | None = None
    norm: float = 2.0
    method: str = "grad"
    attack_samples: int = 1000
    eval_samples: int = 1000
    epochs: int = 10
    batch_size: int = 64
    hvp: str = "double_backward"
    saliency: str = "simple"
    target_kind: str = "prob"
    plus_lambda: float = 1.0
    solver: str = "auto"
    device: str | None = None
    seed: int = 0
    workers: int = 0
    cache: str | None = None
    progress: bool = True
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    resume: bool = False
    precision: str = "fp32"
    oom_retry: bool = False
    fast: str = "on"
    integration: str = "uniform_endpoints"
    steps: int = 10
    smoothgrad_std: float = 0.15
    smoothgrad_samples: int = 10


def _saliency_kwargs(s) -> dict:
    """The solvers' / :func:`evaluate`'s ``saliency_kwargs`` for settings ``s`` (a ComputeConfig, or
    a dict with its saliency fields): the integration rule, and the steps / noise of the method."""
    s = s if isinstance(s, dict) else vars(s)
    kw = {"integration": s["integration"]}
    uses = options_used(s["saliency"])
    if "steps" in uses:
        kw["steps"] = s["steps"]
    if "noise_std" in uses:
        kw.update(smoothgrad_std=s["smoothgrad_std"], n_samples=s["smoothgrad_samples"])
    return kw


def _load(cfg, log=None) -> tuple:
    dataset = _open(cfg.data, cfg.size, log, cache=cfg.cache)
    model = _model(cfg.model, cfg.weights, cfg.num_classes, cfg.mean, cfg.std, dataset, cfg.data)
    dev = _device(cfg.device)
    return dataset, model.to(dev).eval(), dev


def compute(cfg: ComputeConfig, log=print) -> dict:
    """Compute a UPI on the attack split, save it, and evaluate it (and universal random noise of
    the same norm) on the disjoint evaluation split. Writes ``upi.safetensors``, ``upi.png``,
    ``report.md`` and ``report.json`` into ``cfg.out``.

    Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is started here
    (NCCL for CUDA, gloo on the CPU; each process on ``cuda:LOCAL_RANK``), the solver and the
    evaluation split their data across the processes, rank 0 alone logs and writes, and the group
    is torn down at the end. ``cfg.checkpoint_every`` writes checkpoints (to ``cfg.checkpoint_dir``,
    default ``<out>/checkpoints``); ``cfg.resume`` continues from the newest good one.

    Errors are the API's (ValueError, TypeError, FileNotFoundError, or
    :class:`~upi_fast.solvers.BatchOutOfMemoryError`), each tagged with the command-line option it
    concerns (:func:`option_of`). ``cfg.oom_retry`` splits batches that do not fit the device."""
    cfg = _check_config(cfg)
    with launched(cfg.device) as comm:
        return _compute(cfg, comm, main_only(log, comm))


def _checkpoint_dir(cfg) -> str | None:
    if cfg.checkpoint_dir is not None:
        return cfg.checkpoint_dir
    if cfg.checkpoint_every is not None or cfg.resume:
        return os.path.join(cfg.out, "checkpoints")
    return None


def _evaluate_fitting(model, delta, dataset, idx, cfg, dev, batch_size: int) -> dict:
    """:func:`evaluate` over ``dataset[idx]`` in batches of ``batch_size``; with ``cfg.oom_retry`` a
    batch that does not fit the device is retried at half the size (every metric is a mean over
    samples, so the batch size does not change the result)."""
    while True:
        loader = make_loader(dataset, idx, batch_size, workers=cfg.workers, seed=cfg.seed)
        failed = None
        try:
            with _blame("--model", data=cfg.data):
                return evaluate(model, delta, loader, saliency=cfg.saliency, target_kind=cfg.target_kind, device=dev,
                                saliency_kwargs=_saliency_kwargs(cfg))
        except RuntimeError as exc:
            if not (cfg.oom_retry and batch_size > 1 and is_out_of_memory(exc)):
                raise
            failed = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
        batch_size //= 2
        _log.warning("upi_fast: out of device memory evaluating (%s); retrying with batches of %d", failed, batch_size)


def _evaluate_split(model, delta, dataset, idx, cfg, dev, comm: Comm, batch_size: int | None = None) -> dict:
    """:func:`evaluate` on this process's share of ``idx``, the means combined over all processes
    (weighted by their correctly classified counts)."""
    lo, hi = shard_bounds(len(idx), comm.world, comm.rank)
    res, n, n_total = {}, 0, hi - lo
    if hi > lo:
        try:
            res = _evaluate_fitting(model, delta, dataset, idx[lo:hi], cfg, dev, batch_size or cfg.batch_size)
            n = res["n"]
        except ValueError as exc:  # this share holds no correctly classified sample
            if "none of the samples" not in str(exc) or not comm.active:
                raise
    if not comm.active:
        return res
    names = ("dissimilarity", "topk_intersection", "spearman", "fooling_rate")
    sums = comm.sum_floats(*(res.get(m, 0.0) * n for m in names), n, n_total)
    n_all, total = int(sums[-2]), int(sums[-1])
    if n_all == 0:
        raise ValueError("the model classifies none of the samples in the evaluation split correctly")
    return {**{m: v / n_all for m, v in zip(names, sums)}, "n": n_all, "n_total": total}


def split_and_budget(cfg: ComputeConfig, dataset) -> tuple:
    """``(attack indices, eval indices, attack loader, input shape (C, H, W), eps in model units)``
    of a run: the seeded attack / evaluation split and the budget (``--eps``, or ``--eps-pixels``
    converted for the input shape)."""
    with _blame("--attack-samples/--eval-samples", ()):
        att_idx, ev_idx = split_indices(len(dataset), cfg.attack_samples, cfg.eval_samples, cfg.seed)
    attack = make_loader(dataset, att_idx, cfg.batch_size, workers=cfg.workers, seed=cfg.seed)
    with _blame("--data", ()):
        shape = tuple(dataset[int(att_idx[0])][0].shape)
    eps = cfg.eps if cfg.eps is not None else eps_from_pixels(cfg.eps_pixels, cfg.norm, shape)
    return att_idx, ev_idx, attack, shape, eps


def _compute(cfg: ComputeConfig, comm: Comm, log) -> dict:
    t0 = time.perf_counter()
    dataset, model, dev = _load(cfg, log)
    att_idx, ev_idx, attack, shape, eps = split_and_budget(cfg, dataset)
    log(f"{len(dataset)} images {shape}; attack {len(att_idx)}, eval {len(ev_idx)}; eps = {eps:.4g} "
        f"({'L2' if cfg.norm == 2 else 'Linf'}, pixel units)")
    if comm.active:
        log(f"data parallel: {comm.world} processes ({comm.backend})")
    common = dict(norm=cfg.norm, saliency=cfg.saliency, target_kind=cfg.target_kind, batch_size=cfg.batch_size,
                  seed=cfg.seed, device=dev, progress=cfg.progress and comm.is_main, hvp=cfg.hvp,
                  precision=cfg.precision, checkpoint_dir=_checkpoint_dir(cfg), checkpoint_every=cfg.checkpoint_every,
                  oom_retry=cfg.oom_retry, fast={"off": False, "on": True, "autotune": "autotune"}[cfg.fast],
                  saliency_kwargs=_saliency_kwargs(cfg))
    with _blame("--model", data=cfg.data):
        if cfg.method == "grad":
            solver = UPIGrad(model, eps, epochs=cfg.epochs, **common)
        else:
            solver = UPIPCA(model, eps, solver=cfg.solver,
                            plus_lambda=cfg.plus_lambda if cfg.method == "pca+" else None, **common)
        solver.fit(attack, resume=cfg.resume)
    with _blame("--weights", ()):
        record = model_record(cfg.model, model)
    meta = {"method": {"grad": "UPI-Grad", "pca": "UPI-PCA", "pca+": "PCA+"}[cfg.method], "eps": eps,
            "eps_units": "pixels [0, 1]", "eps_pixels": cfg.eps_pixels,
            "norm": "2" if cfg.norm == 2 else "inf", **record, "input_shape": list(shape),
            "size": shape[-1] if shape[-1] == shape[-2] else None,
            "units": "pixels [0, 1]", "mean": list(cfg.mean) if cfg.mean else None,
            "std": list(cfg.std) if cfg.std else None, "saliency": cfg.saliency, "target_kind": cfg.target_kind,
            "integration": cfg.integration, "steps": cfg.steps, "smoothgrad_std": cfg.smoothgrad_std,
            "smoothgrad_samples": cfg.smoothgrad_samples,
            "hvp": cfg.hvp, "seed": cfg.seed, "attack_samples": len(att_idx), "data": os.path.abspath(cfg.data),
            "precision": cfg.precision, "processes": comm.world,
            "fast": cfg.fast}
    path = os.path.join(cfg.out, "upi.safetensors")
    if comm.is_main:
        with _blame("--out", ()):
            os.makedirs(cfg.out, exist_ok=True)
            io.save_perturbation(path, solver.delta_, meta)
            viz.plot_perturbation(solver.delta_, os.path.join(cfg.out, "upi.png"),
                                  title=f"{meta['method']}, eps = {format_eps(eps)} ({'L2' if cfg.norm == 2 else 'Linf'}), "
                                        f"{meta['model']}", units="pixel units [0, 1]")
    eval_bs = min(cfg.batch_size, solver.micro_batch_ or cfg.batch_size)  # what fitted the device while solving
    rows = [{"method": meta["method"],
             **_evaluate_split(model, solver.delta_, dataset, ev_idx, cfg, dev, comm, eval_bs),
             "seconds": solver.fit_time_},
            {"method": "universal random",
             **_evaluate_split(model, universal_random(shape, eps, cfg.norm, cfg.seed), dataset, ev_idx, cfg, dev,
                               comm, eval_bs),
             "seconds": 0.0}]
    setup = {k: v for k, v in meta.items()} | {"eval_samples": len(ev_idx), "total seconds": round(time.perf_counter() - t0, 1)}
    if comm.is_main:
        with _blame("--out", ()):
            io.write_text_atomic(os.path.join(cfg.out, "report.md"),
                                 markdown_report("upi-fast compute", setup, rows, ["upi.png"]))
            io.write_text_atomic(os.path.join(cfg.out, "report.json"), json_report(setup, rows))
    log(format_table(rows))
    log(f"wrote {path}")
    return {"setup": setup, "results": rows, "path": path}
