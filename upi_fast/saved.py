"""The command line's jobs on a saved perturbation file: evaluate it against a model (transfer), render it.

The file states the settings it was computed with (input size, normalisation, saliency settings:
:func:`upi_fast.io.evaluation_settings`); options left out are taken from it, and an option that
disagrees with it is used with a one-line warning. Units as in :mod:`upi_fast.pipeline`.
"""
from __future__ import annotations

import math
import os
import re
import warnings

import torch

from . import io, viz
from ._checks import check_positive
from .data import make_loader
from .evaluate import evaluate
from .methods import options_used
from .models import model_name
from .pipeline import _GENERAL_RULES, _blame, _device, _model, _open, _saliency_kwargs
from .report import COLUMNS, format_eps, format_table, json_report
from .saliency import saliency as saliency_fn
from .solvers.baselines import universal_random

__all__ = ["evaluate_file", "show"]


#: The evaluation settings a perturbation file states (:data:`upi_fast.io.EVALUATION_DEFAULTS`) and
#: the command-line option of each.
_SETTING_FLAGS = {"size": "--size", "mean": "--mean", "std": "--std", "saliency": "--saliency",
                  "target_kind": "--target-kind", "integration": "--integration", "steps": "--steps",
                  "smoothgrad_std": "--smoothgrad-std", "smoothgrad_samples": "--smoothgrad-samples"}


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(math.isclose(float(x), float(y), rel_tol=1e-6, abs_tol=1e-9)
                                        for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-6)
    return a == b


def _fmt(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, (tuple, list)):
        return ",".join(f"{float(t):g}" for t in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def _applies(key: str, saliency: str) -> bool:
    option = {"integration": "integration", "steps": "steps", "smoothgrad_std": "noise_std",
              "smoothgrad_samples": "n_samples"}.get(key)
    return option is None or option in options_used(saliency)


def _settings_from_file(path: str, meta: dict, delta: torch.Tensor, given: dict, log) -> tuple[dict, list]:
    """Each evaluation setting: the value ``given`` (not None), else the file's, else the default of
    :data:`upi_fast.io.EVALUATION_DEFAULTS`. A given value that disagrees with the file's is used,
    with a one-line warning naming both; a ``size`` that cannot fit the file's perturbation is a
    ValueError on --size. Logs one line listing what was taken from the file; returns the settings
    and the names of those taken from it."""
    stated = io.evaluation_settings(meta, tuple(delta.shape))
    name = os.path.basename(path)
    out, taken = {}, []
    method = given.get("saliency") or stated.get("saliency") or io.EVALUATION_DEFAULTS["saliency"]
    for key, flag in _SETTING_FLAGS.items():
        val, has = given.get(key), key in stated
        if val is None:
            out[key] = stated[key] if has else io.EVALUATION_DEFAULTS[key]
            if has and _applies(key, method):
                taken.append(key)
            continue
        out[key] = val
        if key == "size" and val != delta.shape[-1]:
            err = ValueError(f"{name} holds a {tuple(delta.shape)} perturbation but --size {val} makes the images "
                             f"{val}x{val}; drop --size to use the file's {delta.shape[-1]}")
            err.option = "--size"
            raise err
        if has and not _same(val, stated[key]) and _applies(key, method) and \
                (key not in ("integration", "steps", "smoothgrad_std", "smoothgrad_samples")
                 or stated.get("saliency") == method):
            warnings.warn(f"{flag} {_fmt(val)} differs from {name}'s {key} {_fmt(stated[key])} (the value it was "
                          f"computed with); using {flag} {_fmt(val)}", UserWarning, stacklevel=3)
    if taken:
        log(f"from {name}: " + ", ".join(f"{_SETTING_FLAGS[k]} {_fmt(out[k])}" for k in taken))
    return out, taken


def _load_settings(path: str, given: dict, log) -> tuple[torch.Tensor, dict, dict, list]:
    with _blame("perturbation", ()):
        delta, meta = io.load_perturbation(path)
    settings, taken = _settings_from_file(path, meta, delta, given, log)
    return delta, meta, settings, taken


def _check_shape(path: str, delta: torch.Tensor, shape: tuple) -> None:
    with _blame("perturbation", ()):
        if tuple(delta.shape) != tuple(shape):
            raise ValueError(f"perturbation in {path!r} has shape {tuple(delta.shape)}, expected {tuple(shape)} "
                             f"(the images' shape)")


def evaluate_file(path: str, data: str, model: str, weights=None, num_classes=None, mean=None, std=None, size=None,
                  eval_samples: int = 1000, batch_size: int = 64, saliency: str | None = None,
                  target_kind: str | None = None, k: int | None = None, device=None, seed: int = 0,
                  out: str | None = None, log=print, integration: str | None = None, steps: int | None = None,
                  smoothgrad_std: float | None = None, smoothgrad_samples: int | None = None) -> dict:
    """Evaluate a saved perturbation against a model on a local dataset (e.g. transfer). Errors are
    tagged with the command-line option they concern, as in :func:`compute`.

    ``size``, ``mean``, ``std`` and the saliency settings (``saliency``, ``target_kind``,
    ``integration``: the integrated-gradients path rule, ``steps``, ``smoothgrad_std``,
    ``smoothgrad_samples``) left None are taken from the file's metadata (as ``compute`` wrote
    them), else :data:`upi_fast.io.EVALUATION_DEFAULTS`; a value given that disagrees with the file
    is used, with a warning. The settings used are in the result's ``setup``."""
    given = dict(size=size, mean=mean, std=std, saliency=saliency, target_kind=target_kind, integration=integration,
                 steps=steps, smoothgrad_std=smoothgrad_std, smoothgrad_samples=smoothgrad_samples)
    delta, meta, st, taken = _load_settings(path, given, log)
    why = f"size {st['size']} from {os.path.basename(path)}" if "size" in taken else None
    dataset = _open(data, st["size"], log, why)
    net = _model(model, weights, num_classes, st["mean"], st["std"], dataset, data)
    dev = _device(device)
    net = net.to(dev).eval()
    with _blame("--data", ()):
        shape = tuple(dataset[0][0].shape)
    _check_shape(path, delta, shape)
    saliency, target_kind = st["saliency"], st["target_kind"]
    with _blame("--eval-samples", ()):
        check_positive("eval_samples", eval_samples, integer=True)
    n = min(eval_samples, len(dataset))
    ev_idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    loader = make_loader(dataset, ev_idx, batch_size, seed=seed)
    eps = meta.get("eps")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not math.isfinite(eps) or eps <= 0:
        eps = float(delta.norm())  # a file without (valid) metadata: its own norm
    norm = meta.get("norm", "2")
    if norm not in ("2", "inf", 2, math.inf):
        norm = "2"
    rules = ((re.compile(r"^k must"), "--k"), (re.compile(r"^integration"), "--integration"),
             (re.compile(r"^steps"), "--steps"), (re.compile(r"^noise_std"), "--smoothgrad-std"),
             (re.compile(r"^n_samples"), "--smoothgrad-samples")) + _GENERAL_RULES
    skw = _saliency_kwargs(st)
    with _blame("--model", rules, data=data):
        rows = [{"method": f"{meta.get('method', 'perturbation')} ({os.path.basename(path)})",
                 **evaluate(net, delta, loader, saliency=saliency, target_kind=target_kind, k=k, device=dev,
                            saliency_kwargs=skw)},
                {"method": "universal random", **evaluate(net, universal_random(shape, float(eps), norm, seed),
                                                          loader, saliency=saliency, target_kind=target_kind, k=k,
                                                          device=dev, saliency_kwargs=skw)}]
    log(format_table(rows, columns=[c for c in COLUMNS if c[0] != "seconds"]))
    setup = {"perturbation": os.path.abspath(path), "model": model_name(model), "data": os.path.abspath(data),
             "eval_samples": len(ev_idx), **{key: list(v) if isinstance(v, tuple) else v for key, v in st.items()},
             "from perturbation file": taken, **{f"perturbation {k}": v for k, v in meta.items()}}
    if out:
        with _blame("--out", ()):
            os.makedirs(out, exist_ok=True)
            io.write_text_atomic(os.path.join(out, "evaluation.json"), json_report(setup, rows))
    return {"setup": setup, "results": rows}


def show(path: str, out: str, data: str | None = None, model: str | None = None, weights=None, num_classes=None,
         mean=None, std=None, size=None, n: int = 8, saliency: str | None = None, target_kind: str | None = None,
         integration: str | None = None, steps: int | None = None, smoothgrad_std: float | None = None,
         smoothgrad_samples: int | None = None, log=print) -> list[str]:
    """Render a perturbation file to PNG, and with ``data`` and ``model`` a grid of examples with
    their saliency maps before and after. Returns the written paths. Errors are tagged with the
    command-line option they concern, as in :func:`compute`. ``size``, ``mean``, ``std`` and the
    saliency settings left None come from the file, as in :func:`evaluate_file`."""
    if data and model:
        given = dict(size=size, mean=mean, std=std, saliency=saliency, target_kind=target_kind,
                     integration=integration, steps=steps, smoothgrad_std=smoothgrad_std,
                     smoothgrad_samples=smoothgrad_samples)
        delta, meta, st, taken = _load_settings(path, given, log)
    else:
        with _blame("perturbation", ()):
            delta, meta = io.load_perturbation(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    written = [os.path.join(out, f"{stem}.png")]
    with _blame("--out", ()):
        os.makedirs(out, exist_ok=True)
        viz.plot_perturbation(delta, written[0], title=f"{meta.get('method', stem)}, eps = {format_eps(meta.get('eps', '?'))}")
    if data and model:
        why = f"size {st['size']} from {os.path.basename(path)}" if "size" in taken else None
        dataset = _open(data, st["size"], log, why)
        with _blame("perturbation", ()):
            if tuple(dataset[0][0].shape) != tuple(delta.shape):
                raise ValueError(f"the perturbation has shape {tuple(delta.shape)} but the images in {data} have "
                                 f"shape {tuple(dataset[0][0].shape)}")
        net = _model(model, weights, num_classes, st["mean"], st["std"], dataset, data).eval()
        sal = dict(method=st["saliency"], target_kind=st["target_kind"])
        uses = options_used(st["saliency"])
        if "steps" in uses:
            sal.update(integration=st["integration"], steps=st["steps"])
        if "noise_std" in uses:
            sal.update(noise_std=st["smoothgrad_std"], n_samples=st["smoothgrad_samples"],
                       generator=torch.Generator().manual_seed(0))
        items = [dataset[i] for i in range(min(n, len(dataset)))]
        x = torch.stack([t for t, _ in items])
        y = torch.tensor([int(lbl) for _, lbl in items])
        grid = os.path.join(out, f"{stem}_examples.png")
        with _blame("--model", data=data):
            before = saliency_fn(net, x, y, **sal)
            if "generator" in sal:  # the same noise draws before and after
                sal["generator"] = torch.Generator().manual_seed(0)
            after = saliency_fn(net, x + delta, y, **sal)
        with _blame("--out", ()):
            classes = getattr(dataset, "classes", None)  # ImageFolder: the folder names
            names = [classes[k] if classes and 0 <= k < len(classes) else k for k in y.tolist()]
            viz.plot_saliency_grid(x, before, after, grid, labels=names, images_after=(x + delta).clamp(0, 1),
                                   title=f"saliency before / after {meta.get('method', stem)} "
                                         f"(eps = {format_eps(meta.get('eps', '?'))}); brighter = more salient")
        written.append(grid)
    return written
