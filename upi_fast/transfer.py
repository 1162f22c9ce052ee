"""Transfer across models (``upi-fast transfer``): every model's UPI evaluated on every model.

One dataset, one attack / evaluation split, several models (``SPEC`` or ``SPEC=WEIGHTS`` each, see
:func:`parse_models`). For every source model a UPI is computed on the attack split with the
settings of a :class:`upi_fast.pipeline.ComputeConfig`; it is then evaluated on the evaluation
split against every target model. The diagonal is the white-box case, the rest is transfer. Each
target is also measured against universal random noise of the same norm (the floor).

A target's metrics use the evaluation images *that target* classifies correctly (``n`` of
``n_total``, the same for every source; see :mod:`upi_fast.report`). Single process.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from . import io, viz
from .report import format_eps, samples_line

if TYPE_CHECKING:
    from .pipeline import ComputeConfig

__all__ = ["parse_models", "model_labels", "transfer", "transfer_table", "write_transfer"]

_METRICS = ("dissimilarity", "topk_intersection", "spearman", "fooling_rate")


def parse_models(text: str) -> list[tuple[str, str | None]]:
    """``"torchvision:resnet18=r18.safetensors,digits"`` -> ``[("torchvision:resnet18",
    "r18.safetensors"), ("digits", None)]``: a comma-separated list of ``SPEC`` or ``SPEC=WEIGHTS``
    (the first ``=`` separates; a spec never holds one). Raises ValueError (tagged ``--models``)
    for an empty list or item."""
    out = []
    for item in (t.strip() for t in str(text).split(",")):
        if not item:
            continue
        spec, sep, weights = (s.strip() for s in item.partition("="))
        if not spec or (sep and not weights):
            exc = ValueError(f"each model must be SPEC or SPEC=WEIGHTS, got {item!r}")
            exc.option = "--models"
            raise exc
        out.append((spec, weights or None))
    if not out:
        exc = ValueError(f"models must name at least one model, got {text!r}")
        exc.option = "--models"
        raise exc
    return out


def model_labels(models: Sequence[tuple[str, str | None]]) -> list[str]:
    """Short unique labels: the spec, ``[weights file name]`` when given, ``#k`` for repeats."""
    from .models import model_name
    base = [model_name(s) + (f" [{os.path.basename(w)}]" if w else "") for s, w in models]
    return [b if base.count(b) == 1 else f"{b} #{base[:i + 1].count(b)}" for i, b in enumerate(base)]


@contextlib.contextmanager
def _as_models_error(label: str) -> Iterator[None]:
    """Errors about one model (its spec, weights, or its predictions) -> blamed on ``--models``,
    the message prefixed with the model's label."""
    try:
        yield
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        if getattr(exc, "option", None) not in (None, "--model", "--weights", "--model/--size"):
            raise
        if type(exc) in (ValueError, TypeError, RuntimeError) and label not in str(exc):
            new = type(exc)(f"{label}: {exc}")
            new.option = "--models"
            raise new from exc
        with contextlib.suppress(AttributeError):
            exc.option = "--models"
        raise


def transfer(cfg: "ComputeConfig", models: Sequence[tuple[str, str | None]],
             log: Callable[[str], None] = print) -> dict:
    """Compute each model's UPI and evaluate it on every model.

    Args:
        cfg: a :class:`upi_fast.pipeline.ComputeConfig`: data, budget (``eps`` or ``eps_pixels``),
            ``method`` (``grad``, ``pca``, ``pca+``), splits, solver and saliency settings;
            ``num_classes`` / ``mean`` / ``std`` / ``size`` apply to every model. Its ``model`` and
            ``weights`` are not used (``models`` replaces them).
        models: ``[(spec, weights or None), ...]`` (see :func:`parse_models`), at least one.
        log: receives progress lines and the tables.

    Returns:
        ``{"setup", "models": [labels], "matrix": {metric: [[value per target] per source]},
        "random": {metric: [value per target]}, "n": [per target], "n_total": [per target],
        "results": [row per (source, target)], "samples": {...}}``.

    Errors are tagged with the command-line option they concern (``--models`` for one model's).
    """
    from .pipeline import _blame, _check_config, _device, _evaluate_fitting, _model, _open, split_and_budget
    from .models import model_name
    from .solvers.baselines import universal_random
    from .sweep import universal_delta

    models = [(str(s), None if w is None else os.fspath(w)) for s, w in models]
    if not models:
        exc = ValueError("models must name at least one model")
        exc.option = "--models"
        raise exc
    cfg = _check_config(dataclasses.replace(cfg, model=models[0][0], weights=models[0][1], checkpoint_dir=None,
                                            checkpoint_every=None, resume=False))
    labels = model_labels(models)
    t0 = time.perf_counter()
    dataset = _open(cfg.data, cfg.size)
    dev = _device(cfg.device)
    nets = []
    for (spec, weights), label in zip(models, labels):
        with _as_models_error(label):
            nets.append(_model(spec, weights, cfg.num_classes, cfg.mean, cfg.std).to(dev).eval())
    att_idx, ev_idx, attack, shape, eps = split_and_budget(cfg, dataset)
    method = {"grad": "UPI-Grad", "pca": "UPI-PCA", "pca+": "PCA+"}[cfg.method]
    log(f"transfer: {len(models)} models, {len(dataset)} images {shape}; attack {len(att_idx)}, eval {len(ev_idx)}; "
        f"{method}, eps = {format_eps(eps)} ({'L2' if cfg.norm == 2 else 'Linf'}, pixel units)")
    deltas, seconds = [], []
    for i, (net, label) in enumerate(zip(nets, labels)):
        t = time.perf_counter()
        with _as_models_error(label), _blame("--model", data=cfg.data):
            deltas.append(universal_delta(cfg.method, net, attack, eps, cfg, dev))
        seconds.append(time.perf_counter() - t)
        log(f"  [{i + 1}/{len(nets)}] {method} on {label} ({seconds[-1]:.1f} s)")
    rows, rand, ns, totals = [], {m: [] for m in _METRICS}, [], []
    for j, (net, tlabel) in enumerate(zip(nets, labels)):
        with _as_models_error(tlabel), _blame("--model", data=cfg.data):
            base = _evaluate_fitting(net, universal_random(shape, eps, cfg.norm, cfg.seed), dataset, ev_idx, cfg, dev,
                                     cfg.batch_size)
            for m in _METRICS:
                rand[m].append(base[m])
            ns.append(base["n"])
            totals.append(base["n_total"])
            for i, slabel in enumerate(labels):
                res = _evaluate_fitting(net, deltas[i], dataset, ev_idx, cfg, dev, cfg.batch_size)
                rows.append({"source": slabel, "target": tlabel, "white_box": i == j,
                             **{m: res[m] for m in _METRICS}, "n": res["n"], "n_total": res["n_total"],
                             "seconds": seconds[i]})
        log(f"  evaluated on {tlabel}: n {ns[-1]}/{totals[-1]}")
    k = len(labels)
    matrix = {m: [[rows[j * k + i][m] for j in range(k)] for i in range(k)] for m in _METRICS}
    setup = {"command": "transfer", "models": [f"{s}={w}" if w else s for s, w in models],
             "model names": [model_name(n) for n in nets], "data": os.path.abspath(cfg.data),
             "input_shape": list(shape), "method": method, "eps": eps, "eps_pixels": cfg.eps_pixels,
             "norm": "2" if cfg.norm == 2 else "inf", "units": "pixels [0, 1]", "attack_samples": len(att_idx),
             "eval_samples": len(ev_idx), "epochs": cfg.epochs, "saliency": cfg.saliency,
             "target_kind": cfg.target_kind, "seed": cfg.seed, "total seconds": round(time.perf_counter() - t0, 1)}
    from .report import samples_summary
    result = {"setup": setup, "models": labels, "matrix": matrix, "random": rand, "n": ns, "n_total": totals,
              "results": rows, "samples": samples_summary(rows)}
    log(transfer_table(result))
    return result


def _matrix_text(labels: list[str], mat: list[list[float]], notes: list[str], corner: str) -> list[str]:
    heads = [corner] + [f"{t} ({n})" for t, n in zip(labels, notes)]
    cells = [[s] + [f"{v:.3f}" for v in row] for s, row in zip(labels, mat)]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    fmt = lambda cs: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cs, widths)))
    return [fmt(heads), fmt(["-" * w for w in widths])] + [fmt(c) for c in cells]


def transfer_table(result: dict) -> str:
    """The source x target dissimilarity and fooling-rate matrices of a :func:`transfer` result as
    text (each column headed by its target and ``n used/evaluated``), the random-noise floor per
    target, and the line stating the samples used."""
    labels = result["models"]
    notes = [f"n {n}/{t}" for n, t in zip(result["n"], result["n_total"])]
    out = ["relative L2 dissimilarity (rows: source = UPI computed on; columns: target; higher = stronger attack)"]
    out += _matrix_text(labels, result["matrix"]["dissimilarity"], notes, "source \\ target")
    out += ["  random noise, same norm: " + ", ".join(f"{v:.3f}" for v in result["random"]["dissimilarity"]), ""]
    out += ["fooling rate (fraction of labels changed; lower = stealthier)"]
    out += _matrix_text(labels, result["matrix"]["fooling_rate"], notes, "source \\ target")
    out += [samples_line(result["results"])]
    return "\n".join(out)


def write_transfer(result: dict, out: str | os.PathLike) -> list[str]:
    """Write ``transfer.json`` (the result) and ``transfer.png`` (:func:`upi_fast.viz.plot_transfer`:
    heat maps of dissimilarity and fooling rate, source x target) into ``out``, atomically.
    Returns the two paths."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, "transfer.json"), os.path.join(out, "transfer.png")]
    io.write_json_atomic(paths[0], result)
    s = result["setup"]
    notes = [f"n = {n}/{t}" for n, t in zip(result["n"], result["n_total"])]
    caption = (f"{samples_line(result['results'])} n per target: correctly classified / evaluated images. "
               f"Diagonal: white-box; off-diagonal: transfer.")
    title = (f"transfer of {s['method']} across models ({'L2' if s['norm'] == '2' else 'Linf'}, "
             f"eps = {format_eps(s['eps'])} pixel units) on {os.path.basename(s['data'])}")
    viz.plot_transfer(result["models"], result["models"],
                      {"dissimilarity": result["matrix"]["dissimilarity"],
                       "fooling_rate": result["matrix"]["fooling_rate"]},
                      paths[1], target_notes=notes, title=title, caption=caption)
    return paths

