"""Comparison tables of perturbations: rendering to text, Markdown and JSON (no computation here).

Every table, report and figure states how many samples its metrics use: the metrics of
:func:`upi_fast.evaluate` count only the evaluation images the *clean* model classifies correctly
(and whose clean saliency map is not zero), so ``n`` (used) can be smaller than ``n_total``
(evaluated). :func:`samples_summary` / :func:`samples_line` say so in one place.
"""
from __future__ import annotations

import json
import math
from typing import Any, Sequence

__all__ = ["COLUMNS", "METRIC_INFO", "SAMPLES_REASON", "format_table", "markdown_report", "json_report",
           "samples_summary", "samples_line", "format_eps", "metric_label"]

#: (row key, column heading) of the default comparison table. ``n`` is rendered ``used/evaluated``.
COLUMNS = (("method", "method"), ("dissimilarity", "rel. L2 dissim."), ("topk_intersection", "top-k inter."),
           ("spearman", "Spearman"), ("fooling_rate", "fooling rate"), ("n", "n used/eval"), ("seconds", "seconds"))

#: metric key -> (readable name, unit, which direction is a stronger attack / what it means).
METRIC_INFO = {
    "dissimilarity": ("saliency dissimilarity", "relative L2, ||I'-I|| / ||I||", "higher = stronger attack"),
    "topk_intersection": ("top-k intersection", "fraction of the top-k pixels kept", "lower = stronger attack"),
    "spearman": ("Spearman rank correlation", "correlation in [-1, 1]", "lower = stronger attack"),
    "fooling_rate": ("fooling rate", "fraction of labels changed", "lower = stealthier: label kept"),
    "center_of_mass_shift": ("centre-of-mass shift", "pixels", "higher = stronger attack"),
}

#: Why ``n`` (samples used) can be below ``n_total`` (samples evaluated).
SAMPLES_REASON = ("metrics use only the evaluation images the clean model classifies correctly and whose clean "
                  "saliency map is non-zero; the others have no saliency map of the true class to attack")


def metric_label(key: str, unit: bool = True, direction: bool = True) -> str:
    """A readable name for a metric key (``"topk_intersection"`` -> ``"top-k intersection"``),
    with its unit and its direction (which way is a stronger attack) in parentheses when asked."""
    name, u, d = METRIC_INFO.get(key, (key.replace("_", " "), "", ""))
    extra = [s for s, want in ((u, unit), (d, direction)) if want and s]
    return f"{name} ({'; '.join(extra)})" if extra else name


def format_eps(eps: Any) -> str:
    """A budget for titles and tables: 3 significant digits, plus ``k/255`` when ``eps`` is (to 1e-6)
    a whole number of grey levels below 255 (``8/255`` -> ``"0.0314 (8/255)"``); non-numbers as ``str``."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        try:
            eps = float(eps)  # tensors, numpy scalars
        except (TypeError, ValueError):
            return str(eps)
    eps = float(eps)
    if not math.isfinite(eps):
        return str(eps)
    k = eps * 255.0
    if 1 <= round(k) < 255 and abs(k - round(k)) < 1e-6 * max(1.0, k) and abs(eps - round(eps)) > 1e-9:
        return f"{eps:.3g} ({round(k)}/255)"
    return f"{eps:.3g}"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return "-" if value is None else str(value)


def _cell(row: dict, key: str) -> str:
    if key == "n" and "n" in row and row.get("n_total") is not None:
        return f"{row['n']}/{row['n_total']}"
    return _fmt(row.get(key, ""))


def samples_summary(rows: Sequence[dict]) -> dict | None:
    """How many samples the metrics of ``rows`` use: ``{"n", "n_total", "left_out", "reason"}``
    (``n`` / ``n_total`` are ints when every row agrees, else lists in row order; ``left_out`` =
    ``n_total - n``), or None when no row carries ``n``."""
    have = [r for r in rows if isinstance(r, dict) and "n" in r]
    if not have:
        return None
    ns = [r["n"] for r in have]
    totals = [r.get("n_total") for r in have]
    same = len(set(ns)) == 1 and len(set(totals)) == 1
    out: dict[str, Any] = {"n": ns[0] if same else ns, "n_total": totals[0] if same else totals}
    if same and totals[0] is not None:
        out["left_out"] = totals[0] - ns[0]
    elif all(t is not None for t in totals):
        out["left_out"] = [t - n for n, t in zip(ns, totals)]
    out["reason"] = SAMPLES_REASON
    if any(n == 0 for n in ns):
        out["zero"] = ("no usable sample: the model classifies none of the evaluation images correctly, so no "
                       "saliency map of the true class can be attacked or compared")
    return out


def samples_line(rows: Sequence[dict]) -> str:
    """One sentence stating the samples the metrics use and why some were left out ("" when the
    rows carry no ``n``)."""
    s = samples_summary(rows)
    if s is None:
        return ""
    if "zero" in s and isinstance(s["n"], int):
        return f"n = 0 of {s['n_total']} evaluation images: {s['zero']}."
    if isinstance(s["n"], int):
        if s["n_total"] is None:
            return f"n = {s['n']} evaluation images used: {SAMPLES_REASON}."
        lead = f"n = {s['n']} of {s['n_total']} evaluation images used"
        return f"{lead}, {s['left_out']} left out: {SAMPLES_REASON}." if s.get("left_out") else \
            f"{lead} (all classified correctly by the clean model)."
    return f"n (images used / evaluated) differs between rows and is given with each: {SAMPLES_REASON}."


def format_table(rows: list[dict], columns: Sequence[tuple[str, str]] = COLUMNS, markdown: bool = False,
                 note: bool = True) -> str:
    """Rows (dicts) as an aligned text table, or a Markdown table. ``n`` cells read ``used/evaluated``;
    with ``note`` a last line states the samples used and why some were left out (:func:`samples_line`)."""
    heads = [h for _, h in columns]
    cells = [[_cell(r, k) for k, _ in columns] for r in rows]
    line = samples_line(rows) if note else ""
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines + (["", line] if line else []))
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    fmt_row = lambda cs: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cs, widths)))
    return "\n".join([fmt_row(heads), fmt_row(["-" * w for w in widths])] + [fmt_row(c) for c in cells]
                     + ([line] if line else []))


def markdown_report(title: str, setup: dict, rows: list[dict], figures: Sequence[str] = ()) -> str:
    """A Markdown report: the setup as a list, the comparison table, the samples used (and why some
    were left out), the figures."""
    out = [f"# {title}", ""]
    out += [f"- **{k}**: {v}" for k, v in setup.items()]
    out += ["", format_table(rows, markdown=True), ""]
    for f in figures:
        out += [f"![{f}]({f})", ""]
    return "\n".join(out)


def json_report(setup: dict, rows: list[dict]) -> str:
    """``{"setup": setup, "results": rows, "samples": samples_summary(rows)}`` as indented JSON
    (values JSON cannot hold become strings; ``samples`` only when the rows carry ``n``)."""
    doc: dict[str, Any] = {"setup": setup, "results": rows}
    s = samples_summary(rows)
    if s is not None:
        doc["samples"] = s
    return json.dumps(doc, indent=2, default=str)
