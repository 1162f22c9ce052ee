"""Comparison tables of perturbations: rendering to text, Markdown and JSON (no computation here)."""
from __future__ import annotations

import json
from typing import Any, Sequence

__all__ = ["COLUMNS", "format_table", "markdown_report", "json_report"]

#: (row key, column heading) of the default comparison table.
COLUMNS = (("method", "method"), ("dissimilarity", "rel. L2 dissim."), ("topk_intersection", "top-k inter."),
           ("spearman", "Spearman"), ("fooling_rate", "fooling rate"), ("seconds", "seconds"))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_table(rows: list[dict], columns: Sequence[tuple[str, str]] = COLUMNS, markdown: bool = False) -> str:
    """Rows (dicts) as an aligned text table, or a Markdown table."""
    heads = [h for _, h in columns]
    cells = [[_fmt(r.get(k, "")) for k, _ in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    fmt_row = lambda cs: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cs, widths)))
    return "\n".join([fmt_row(heads), fmt_row(["-" * w for w in widths])] + [fmt_row(c) for c in cells])


def markdown_report(title: str, setup: dict, rows: list[dict], figures: Sequence[str] = ()) -> str:
    """A Markdown report: the setup as a list, the comparison table, the figures."""
    out = [f"# {title}", ""]
    out += [f"- **{k}**: {v}" for k, v in setup.items()]
    out += ["", format_table(rows, markdown=True), ""]
    for f in figures:
        out += [f"![{f}]({f})", ""]
    return "\n".join(out)


def json_report(setup: dict, rows: list[dict]) -> str:
    """``{"setup": setup, "results": rows}`` as indented JSON (values JSON cannot hold become strings)."""
    return json.dumps({"setup": setup, "results": rows}, indent=2, default=str)
