"""Attack strength against the budget (``upi-fast sweep``): every method at every eps.

For each budget and each method a perturbation is computed on the attack split and evaluated on
the disjoint evaluation split (the splits, the model and every other setting come from a
:class:`upi_fast.pipeline.ComputeConfig`, as for ``upi-fast compute``). Methods:

* ``grad`` (UPI-Grad), ``pca`` (UPI-PCA), ``pca+`` (PCA+ with ``plus_lambda``): the UPIs;
* ``uap``: the classification UAP of Shafahi et al. (attacks the label, for comparison);
* ``random``: universal random noise of the same norm, the mean over ``random_draws`` draws;
* ``per-image``: the per-image interpretation attack (one delta per image): the ceiling a universal
  perturbation is compared with.

Every metric is a mean over the evaluation images the clean model classifies correctly (``n`` of
``n_total``; see :mod:`upi_fast.report`); ``n`` is the same for every method, since it depends on
the clean model only. Single process (a sweep is many small runs; use ``compute`` under
``torchrun`` for one large one).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from . import io, viz
from .data import make_loader, split_indices
from .report import format_eps, format_table, samples_line, samples_summary

if TYPE_CHECKING:  # imported lazily: the CLI's parser imports this module
    from torch.utils.data import DataLoader

    from .pipeline import ComputeConfig

__all__ = ["METHODS", "DEFAULT_METHODS", "METHOD_LABELS", "parse_methods", "check_budgets", "universal_delta",
           "sweep", "sweep_table", "write_sweep"]

#: Method keys :func:`sweep` accepts, in the order results are reported.
METHODS = ("grad", "pca", "pca+", "uap", "random", "per-image")
#: The methods of ``upi-fast sweep`` without ``--methods``.
DEFAULT_METHODS = ("grad", "pca", "random", "per-image")
#: Method key -> the label used in tables, JSON and figures.
METHOD_LABELS = {"grad": "UPI-Grad", "pca": "UPI-PCA", "pca+": "PCA+", "uap": "classification UAP",
                 "random": "universal random", "per-image": "per-image attack"}
_METRICS = ("dissimilarity", "topk_intersection", "spearman", "fooling_rate")
_BUDGET_UNITS = {"eps_pixels": "grey levels per pixel on the 0-255 scale", "eps": "model units, pixels in [0, 1]"}


def _tag(exc: BaseException, option: str) -> BaseException:
    try:
        exc.option = option
    except AttributeError:  # pragma: no cover - exception types without a __dict__
        pass
    return exc


def parse_methods(methods: str | Sequence[str]) -> tuple[str, ...]:
    """``"grad,pca,random"`` (or a sequence of keys) -> the keys, in :data:`METHODS` order.

    Raises:
        ValueError: an unknown or repeated method, or none at all (tagged ``--methods``).
    """
    items = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else [str(m).strip() for m in methods]
    items = [m for m in items if m]
    if not items:
        raise _tag(ValueError("methods must name at least one of " + ", ".join(METHODS)), "--methods")
    unknown = [m for m in items if m not in METHODS]
    if unknown:
        raise _tag(ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}"), "--methods")
    twice = sorted({m for m in items if items.count(m) > 1})
    if twice:
        raise _tag(ValueError(f"method {twice[0]!r} is given twice"), "--methods")
    return tuple(m for m in METHODS if m in items)


def check_budgets(budgets: Sequence[float], option: str = "--eps-pixels") -> tuple[float, ...]:
    """The budgets as floats, sorted increasing; each must be a finite number > 0, none repeated.
    Errors are ValueErrors tagged with ``option``."""
    try:
        vals = [float(b) for b in budgets]
    except (TypeError, ValueError):
        raise _tag(ValueError(f"budgets must be numbers, got {budgets!r}"), option) from None
    if not vals:
        raise _tag(ValueError("give at least one budget"), option)
    bad = [v for v in vals if not math.isfinite(v) or v <= 0]
    if bad:
        raise _tag(ValueError(f"every budget must be a finite number > 0, got {bad[0]:g}"), option)
    twice = sorted({v for v in vals if vals.count(v) > 1})
    if twice:
        raise _tag(ValueError(f"budget {twice[0]:g} is given twice"), option)
    return tuple(sorted(vals))


def _common(cfg, dev) -> dict:
    return dict(norm=cfg.norm, saliency=cfg.saliency, target_kind=cfg.target_kind, batch_size=cfg.batch_size,
                seed=cfg.seed, device=dev, progress=cfg.progress, hvp=cfg.hvp, precision=cfg.precision,
                oom_retry=cfg.oom_retry, fast={"off": False, "on": True, "autotune": "autotune"}[cfg.fast],
                saliency_kwargs={"integration": cfg.integration})


def universal_delta(method: str, model: torch.nn.Module, attack: "DataLoader", eps: float, cfg: "ComputeConfig",
                    dev: torch.device) -> torch.Tensor:
    """The universal perturbation of ``method`` (``grad``, ``pca``, ``pca+`` or ``uap``) at radius
    ``eps`` (model units), computed on ``attack`` (a DataLoader of the attack split) with the
    settings of ``cfg`` (a :class:`~upi_fast.pipeline.ComputeConfig`: norm, epochs, batch size,
    saliency, HVP, solver, ``plus_lambda``, seed, precision, ``fast``): a (C, H, W) tensor on the CPU."""
    from .solvers import UPIGrad, UPIPCA
    from .solvers.baselines import classification_uap

    if method == "grad":
        return UPIGrad(model, eps, epochs=cfg.epochs, **_common(cfg, dev)).fit(attack).delta_.detach().cpu()
    if method in ("pca", "pca+"):
        plus = cfg.plus_lambda if method == "pca+" else None
        return UPIPCA(model, eps, solver=cfg.solver, plus_lambda=plus, **_common(cfg, dev)).fit(attack).delta_.detach().cpu()
    if method == "uap":
        return classification_uap(model, attack, eps, norm=cfg.norm, epochs=cfg.epochs, batch_size=cfg.batch_size,
                                  seed=cfg.seed, device=dev, progress=cfg.progress)
    raise ValueError(f"method must be one of grad, pca, pca+, uap, got {method!r}")


def _norm_of(delta: torch.Tensor, norm: float) -> float:
    return float(delta.abs().max()) if norm == math.inf else float(delta.norm())


def _mean_rows(runs: list[dict]) -> dict:
    out = {m: sum(r[m] for r in runs) / len(runs) for m in _METRICS}
    out["dissimilarity_std"] = float(torch.tensor([r["dissimilarity"] for r in runs], dtype=torch.float64)
                                      .std(unbiased=False)) if len(runs) > 1 else 0.0
    out["n"], out["n_total"] = runs[0]["n"], runs[0]["n_total"]
    return out


def sweep(cfg: "ComputeConfig", budgets: Sequence[float], methods: str | Sequence[str] = DEFAULT_METHODS,
          budget: str = "eps_pixels", random_draws: int = 3, per_image_steps: int = 20, log: Callable[[str], None] = print) -> dict:
    """Every method at every budget: computed on the attack split, evaluated on the evaluation split.

    Args:
        cfg: a :class:`upi_fast.pipeline.ComputeConfig` (data, model, splits, solver settings; its
            ``eps`` / ``eps_pixels`` / ``method`` / checkpoint settings are not used).
        budgets: the radii, in the unit of ``budget``; sorted increasing in the result.
        methods: keys of :data:`METHODS` (or a comma-separated string).
        budget: ``"eps_pixels"`` (grey levels on the 0-255 scale, converted per
            :func:`upi_fast.pipeline.eps_from_pixels`) or ``"eps"`` (model units).
        random_draws: the ``random`` method is the mean over this many draws (seeds ``cfg.seed + i``).
        per_image_steps: PGD steps of the per-image attack.
        log: receives one progress line per (budget, method) and a summary line.

    Returns:
        ``{"setup", "budget": {"name", "unit", "values", "eps"}, "methods": [labels], "ceiling",
        "series": {label: {metric: [value per budget]}}, "results": [row per budget and method],
        "samples": {"n", "n_total", "left_out", "reason"}}``. Each row: ``budget``, ``eps`` (model
        units), ``method``, ``key``, the metrics, ``n`` / ``n_total``, ``seconds`` and, for a
        universal perturbation, ``delta_norm`` (its norm, at most ``eps``).

    Errors are the pipeline's (ValueError, TypeError, FileNotFoundError...), tagged with the
    command-line option they concern (``exc.option``).
    """
    from .pipeline import _blame, _check_config, _evaluate_fitting, _load, eps_from_pixels
    from .solvers.baselines import per_image_attack, universal_random

    if budget not in _BUDGET_UNITS:
        raise _tag(ValueError(f"budget must be 'eps_pixels' or 'eps', got {budget!r}"), "--eps-pixels")
    option = "--eps-pixels" if budget == "eps_pixels" else "--eps"
    values = check_budgets(budgets, option)
    keys = parse_methods(methods)
    for name, v in (("random_draws", random_draws), ("per_image_steps", per_image_steps)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise _tag(ValueError(f"{name} must be a positive integer, got {v!r}"), "--" + name.replace("_", "-"))
    base = dataclasses.replace(cfg, **{"eps": None, "eps_pixels": None, budget: values[0]}, checkpoint_dir=None,
                               checkpoint_every=None, resume=False)
    base = _check_config(base)
    t0 = time.perf_counter()
    dataset, model, dev = _load(base)
    with _blame("--attack-samples/--eval-samples", ()):
        att_idx, ev_idx = split_indices(len(dataset), base.attack_samples, base.eval_samples, base.seed)
    attack = make_loader(dataset, att_idx, base.batch_size, workers=base.workers, seed=base.seed)
    with _blame("--data", ()):
        shape = tuple(dataset[int(att_idx[0])][0].shape)
    eps_list = [b if budget == "eps" else eps_from_pixels(b, base.norm, shape) for b in values]
    norm_name = "L2" if base.norm == 2 else "Linf"
    log(f"sweep: {len(dataset)} images {shape}; attack {len(att_idx)}, eval {len(ev_idx)}; {norm_name} budgets "
        f"{budget} = {', '.join(f'{b:g}' for b in values)}; methods {', '.join(METHOD_LABELS[k] for k in keys)}")
    rows: list[dict] = []
    total, done = len(values) * len(keys), 0
    skw = {"integration": base.integration}
    for b, eps in zip(values, eps_list):
        cfg_b = dataclasses.replace(base, **{budget: b})
        for key in keys:
            t = time.perf_counter()
            label = METHOD_LABELS[key]
            row: dict = {"budget": b, "eps": eps, "method": label, "key": key}
            with _blame("--model", data=base.data):
                if key == "random":
                    draws = [universal_random(shape, eps, base.norm, seed=base.seed + i) for i in range(random_draws)]
                    res = _mean_rows([_evaluate_fitting(model, d, dataset, ev_idx, cfg_b, dev, base.batch_size)
                                      for d in draws])
                    row["draws"] = random_draws
                    row["delta_norm"] = max(_norm_of(d, base.norm) for d in draws)
                elif key == "per-image":
                    def attack_fn(x, y, eps=eps):
                        return per_image_attack(model, x, y, eps, steps=per_image_steps, norm=base.norm,
                                                saliency=base.saliency, target_kind=base.target_kind, hvp=base.hvp,
                                                seed=base.seed, saliency_kwargs=skw, batch_size=base.batch_size)
                    res = _evaluate_fitting(model, attack_fn, dataset, ev_idx, cfg_b, dev, base.batch_size)
                    row["steps"] = per_image_steps
                else:
                    delta = universal_delta(key, model, attack, eps, cfg_b, dev)
                    res = _evaluate_fitting(model, delta, dataset, ev_idx, cfg_b, dev, base.batch_size)
                    row["delta_norm"] = _norm_of(delta, base.norm)
            row.update({k: v for k, v in res.items() if k != "per_sample"})
            row["seconds"] = time.perf_counter() - t
            rows.append(row)
            done += 1
            log(f"  [{done}/{total}] {budget} {b:g} (eps {format_eps(eps)}) {label:<18} dissimilarity "
                f"{row['dissimilarity']:.3f}  top-k {row['topk_intersection']:.3f}  fooling {row['fooling_rate']:.3f}"
                f"  n {row['n']}/{row['n_total']}  ({row['seconds']:.1f} s)")
    labels = [METHOD_LABELS[k] for k in keys]
    series = {lab: {m: [r[m] for r in rows if r["method"] == lab] for m in _METRICS} for lab in labels}
    from .models import model_name
    setup = {"command": "sweep", "model": model_name(model), "data": os.path.abspath(base.data),
             "input_shape": list(shape), "norm": "2" if base.norm == 2 else "inf", "units": "pixels [0, 1]",
             "attack_samples": len(att_idx), "eval_samples": len(ev_idx), "epochs": base.epochs,
             "saliency": base.saliency, "target_kind": base.target_kind, "integration": base.integration,
             "hvp": base.hvp, "solver": base.solver, "plus_lambda": base.plus_lambda, "seed": base.seed,
             "random_draws": random_draws, "per_image_steps": per_image_steps,
             "total seconds": round(time.perf_counter() - t0, 1)}
    result = {"setup": setup,
              "budget": {"name": budget, "unit": _BUDGET_UNITS[budget], "values": list(values), "eps": eps_list},
              "methods": labels, "ceiling": METHOD_LABELS["per-image"] if "per-image" in keys else None,
              "series": series, "results": rows, "samples": samples_summary(rows)}
    log(sweep_table(result))
    return result


def sweep_table(result: dict) -> str:
    """The rows of a :func:`sweep` result as a text table (budget, eps, method, metrics, n, seconds)
    followed by the line stating the samples used."""
    name = result["budget"]["name"]
    cols = ((("budget", name),) + (() if name == "eps" else (("eps", "eps (model)"),)) +
            (("method", "method"), ("dissimilarity", "rel. L2 dissim. (higher: stronger)"),
             ("topk_intersection", "top-k inter. (lower: stronger)"), ("spearman", "Spearman"),
             ("fooling_rate", "fooling rate"), ("n", "n used/eval"), ("seconds", "seconds")))
    rows = [{**r, "budget": f"{r['budget']:g}"} for r in result["results"]]
    return format_table(rows, columns=cols)


def _caption(result: dict) -> str:
    s = result["setup"]
    return (f"{samples_line(result['results'])} Model {s['model']}; universal perturbations computed on "
            f"{s['attack_samples']} attack images, {'L2' if s['norm'] == '2' else 'Linf'} ball.")


def write_sweep(result: dict, out: str | os.PathLike) -> list[str]:
    """Write ``sweep.json`` (the result) and ``sweep.png`` (:func:`upi_fast.viz.plot_sweep`: three
    panels against the budget, the per-image attack as the ceiling) into ``out``, atomically.
    Returns the two paths."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, "sweep.json"), os.path.join(out, "sweep.png")]
    io.write_json_atomic(paths[0], result)
    b = result["budget"]
    unit = ("grey levels per pixel, 0-255 scale" + (", RMS" if result["setup"]["norm"] == "2" else "")
            if b["name"] == "eps_pixels" else "model units, pixels in [0, 1]")
    label = f"budget {'eps_pixels' if b['name'] == 'eps_pixels' else 'eps'} ({unit})"
    title = (f"interpretation attack against the budget ({'L2' if result['setup']['norm'] == '2' else 'Linf'}): "
             f"{result['setup']['model']} on {os.path.basename(result['setup']['data'])}")
    viz.plot_sweep(b["values"], result["series"], paths[1], budget_label=label, ceiling=result["ceiling"],
                   title=title, caption=_caption(result))
    return paths

