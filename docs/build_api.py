#!/usr/bin/env python
"""Generate the API reference ``docs/api.md`` from the docstrings, and check the public API.

Usage (from the repository root)::

    python docs/build_api.py           # rewrite docs/api.md
    python docs/build_api.py --check   # exit 1 if docs/api.md is stale or the public API has problems

:data:`PUBLIC` is the statement of what is public: every name listed there (a module's ``__all__``
unless an explicit list is given) is documented in ``docs/api.md`` and checked by
``tests/test_public_api.py`` (docstring, type hints, ``#:`` comment for constants). The page starts
with ``docs/api_intro.md`` (hand-written), followed by one section per public module.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import os
import re
import sys
import types
import typing
from typing import Any, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
API_MD = os.path.join(HERE, "api.md")
INTRO_MD = os.path.join(HERE, "api_intro.md")

#: The public API: (module, names). ``None`` means the module's ``__all__``. Order = page order.
PUBLIC: list[tuple[str, tuple[str, ...] | None]] = [
    ("upi_fast", None),
    ("upi_fast.functional", None),
    ("upi_fast.adapters", None),
    ("upi_fast.metrics", None),
    ("upi_fast.baselines", None),
    ("upi_fast.linalg", None),
    ("upi_fast.accel", None),
    ("upi_fast.io", None),
    ("upi_fast.models", None),
    ("upi_fast.data", ("TensorSplit", "DigitsSplits", "digits", "image_folder", "cifar10", "open_dataset",
                       "split_indices", "make_loader", "as_batches")),
    ("upi_fast.viz", None),
    ("upi_fast.info", None),
]

_SECTION = re.compile(r"^(Args|Arguments|Parameters|Returns|Return|Yields|Raises|Attributes|Example|Examples|"
                      r"Note|Notes|Warning|See also)(::|:)\s*$")
_ENTRY = re.compile(r"^(\*{0,2}[A-Za-z_][\w.]*(?:\s*,\s*\*{0,2}[A-Za-z_][\w.]*)*)(\s*\([^)]*\))?:(\s+.*|)$")
_ROLE = re.compile(r":(?:func|class|data|mod|meth|attr|obj|exc):`([^`]+)`")
_LIST_SECTIONS = ("Args", "Arguments", "Parameters", "Raises", "Attributes")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One defect of the public API: where it is defined, which name, and what is wrong."""
    file: str
    name: str
    what: str

    def __str__(self) -> str:
        return f"{self.file}: {self.name}: {self.what}"


# --------------------------------------------------------------------------------------------- enumeration
def _setup_path() -> None:
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


def public_modules() -> list[tuple[str, types.ModuleType, list[str]]]:
    """``(module name, module, public names)`` for every entry of :data:`PUBLIC`."""
    _setup_path()
    out = []
    for modname, names in PUBLIC:
        mod = importlib.import_module(modname)  # never getattr: upi_fast.saliency is the function
        out.append((modname, mod, list(names) if names is not None else list(getattr(mod, "__all__", []))))
    return out


def public_objects() -> Iterator[tuple[str, str, Any]]:
    """``(module name, name, object)`` for every public name, in page order."""
    for modname, mod, names in public_modules():
        for name in names:
            yield modname, name, getattr(mod, name, None)


def _rel(path: str | None) -> str:
    if not path:
        return "?"
    path = os.path.realpath(path)
    return os.path.relpath(path, ROOT) if path.startswith(os.path.realpath(ROOT)) else path


def _source_file(obj: Any) -> str:
    try:
        return _rel(inspect.getsourcefile(inspect.unwrap(obj)))
    except TypeError:
        return "?"


def _upi_modules() -> list[types.ModuleType]:
    return [m for n, m in sorted(sys.modules.items())
            if isinstance(m, types.ModuleType) and (n == "upi_fast" or n.startswith("upi_fast."))]


_COMMENTS: dict[str, dict[str, str]] = {}


def _doc_comments(mod: types.ModuleType) -> dict[str, str]:
    """``{name: text}`` of the module-level assignments preceded by ``#:`` comment lines."""
    path = getattr(mod, "__file__", None)
    if not path or not path.endswith(".py"):
        return {}
    if path not in _COMMENTS:
        with open(path, encoding="utf-8") as fh:
            src = fh.read()
        lines = src.splitlines()
        found: dict[str, str] = {}
        for node in ast.parse(src).body:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target] \
                if isinstance(node, ast.AnnAssign) else []
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            if not names:
                continue
            i, text = node.lineno - 2, []
            while i >= 0 and lines[i].strip().startswith("#:"):
                text.insert(0, lines[i].strip()[2:].strip())
                i -= 1
            if text:
                for n in names:
                    found[n] = " ".join(text)
        _COMMENTS[path] = found
    return _COMMENTS[path]


def constant_doc(obj: Any) -> tuple[str | None, str, str]:
    """``(the #: comment documenting this constant or None, the file defining it, its name there)``;
    searched by identity over the loaded upi_fast modules (a constant may be re-exported under
    another name)."""
    defining = ("?", "?")
    for mod in _upi_modules():
        comments = _doc_comments(mod)
        for name, value in vars(mod).items():
            if value is obj and not name.startswith("__"):
                if name in comments:
                    return comments[name], _rel(mod.__file__), f"{mod.__name__}.{name}"
                if defining[0] == "?" and _assigns(mod, name):
                    defining = (_rel(mod.__file__), f"{mod.__name__}.{name}")
    return None, defining[0], defining[1]


def _assigns(mod: types.ModuleType, name: str) -> bool:
    path = getattr(mod, "__file__", None)
    if not path or not path.endswith(".py"):
        return False
    with open(path, encoding="utf-8") as fh:
        return re.search(rf"^{re.escape(name)}\s*(:[^=]*)?=", fh.read(), re.M) is not None


def own_doc(obj: Any) -> str | None:
    """The object's own docstring, cleaned (never one inherited from a base class)."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) and doc.strip() else None


def _is_constant(obj: Any) -> bool:
    return not (inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismodule(obj) or inspect.isbuiltin(obj))


def _public_members(cls: type) -> list[tuple[str, Any]]:
    """Methods and properties defined by ``cls`` itself (upi_fast code), public or ``__call__``."""
    out = []
    for name, raw in vars(cls).items():
        if name.startswith("_") and name != "__call__":
            continue
        if isinstance(raw, (staticmethod, classmethod)):
            raw = raw.__func__
        if isinstance(raw, property) or inspect.isfunction(raw):
            out.append((name, raw))
    return out


def _init_of(cls: type) -> Any | None:
    """``cls.__init__`` when upi_fast code (or a dataclass) defines it, else None."""
    init = vars(cls).get("__init__")
    if init is None or not inspect.isfunction(init) or getattr(cls, "_is_protocol", False):
        return None
    return init


# --------------------------------------------------------------------------------------------- checks
def _hint_problems(fn: Any, file: str, qual: str, *, is_init: bool = False) -> list[Problem]:
    out = []
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return [Problem(file, qual, "no inspectable signature")]
    missing = [p.name for i, p in enumerate(sig.parameters.values())
               if p.annotation is inspect.Parameter.empty and not (i == 0 and p.name in ("self", "cls"))]
    if missing:
        out.append(Problem(file, qual, f"parameters without type hints: {', '.join(missing)}"))
    if sig.return_annotation is inspect.Signature.empty:
        out.append(Problem(file, qual, "no return type hint" + (" (-> None)" if is_init else "")))
    try:
        typing.get_type_hints(fn)
    except Exception as exc:  # a name that does not resolve in the function's module
        out.append(Problem(file, qual, f"type hints do not resolve: {type(exc).__name__}: {exc}"))
    return out


def _object_problems(modname: str, name: str, obj: Any, public_mods: set[str]) -> list[Problem]:
    """Problems of one public object, named by where it is defined (re-exports share them)."""
    qual = _canonical(obj) or f"{modname}.{name}"
    if obj is None and name != "__version__":
        return [Problem(modname, qual, "listed as public but missing from the module")]
    if name == "__version__":
        return [] if isinstance(obj, str) else [Problem(modname, qual, "not a string")]
    if inspect.ismodule(obj):
        if obj.__name__ not in public_mods:
            return [Problem(_rel(getattr(obj, "__file__", None)), qual,
                            f"submodule {obj.__name__} is exported but not in the public statement (PUBLIC)")]
        return []
    if _is_constant(obj):
        text, file, defined = constant_doc(obj)
        return [] if text else [Problem(file, defined if defined != "?" else f"{modname}.{name}",
                                        "constant without a '#:' comment above its assignment")]
    file = _source_file(obj)
    out = []
    if not own_doc(obj):
        out.append(Problem(file, qual, "no docstring"))
    if inspect.isfunction(obj):
        out += _hint_problems(obj, file, qual)
    elif inspect.isclass(obj):
        init = _init_of(obj)
        if init is not None:
            out += _hint_problems(init, file, f"{qual}.__init__", is_init=True)
        for mname, member in _public_members(obj):
            mq = f"{qual}.{mname}"
            fn = member.fget if isinstance(member, property) else member
            if fn is None:
                continue
            if mname not in ("__call__", "extra_repr") and not own_doc(fn):  # torch's repr hook needs none
                out.append(Problem(file, mq, "no docstring"))
            if isinstance(member, property):
                if inspect.signature(fn).return_annotation is inspect.Signature.empty:
                    out.append(Problem(file, mq, "property without a return type hint"))
            else:
                out += _hint_problems(fn, file, mq)
    return out


def problems() -> list[Problem]:
    """Every defect of the public API (see :class:`Problem`), deduplicated, in page order."""
    mods = public_modules()
    public_mods = {m for m, _, _ in mods}
    out: list[Problem] = []
    for modname, mod, names in mods:
        if not own_doc(mod):
            out.append(Problem(_rel(mod.__file__), modname, "module without a docstring"))
        if not isinstance(getattr(mod, "__all__", None), (list, tuple)):
            out.append(Problem(_rel(mod.__file__), modname, "module without __all__"))
        else:
            for n in names:
                if n not in mod.__all__:
                    out.append(Problem(_rel(mod.__file__), f"{modname}.{n}", "public name missing from __all__"))
        for n in names:
            out += _object_problems(modname, n, getattr(mod, n, None), public_mods)
    seen, uniq = set(), []
    for p in out:
        key = (p.file, p.what, p.name)
        if key not in seen:
            seen.add(key)
            uniq.append(p)
    return uniq


# --------------------------------------------------------------------------------------------- rendering
class _Ann:
    """An annotation printed verbatim (``inspect`` would quote string annotations)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _ann_text(a: Any) -> str:
    if isinstance(a, str):
        return a
    if isinstance(a, typing.ForwardRef):
        return a.__forward_arg__
    if isinstance(a, type) and not isinstance(a, types.GenericAlias):
        return a.__name__ if a.__module__ == "builtins" else f"{a.__module__}.{a.__qualname__}"
    return inspect.formatannotation(a)


def _signature(fn: Any, name: str, drop_first: bool = False) -> str:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return f"{name}(...)"
    params = list(sig.parameters.values())
    if drop_first and params and params[0].name in ("self", "cls"):
        params = params[1:]
    params = [p.replace(annotation=_Ann(_ann_text(p.annotation))) if p.annotation is not p.empty else p
              for p in params]
    ret = sig.return_annotation if not inspect.isclass(fn) else inspect.Signature.empty
    sig = sig.replace(parameters=params,
                      return_annotation=_Ann(_ann_text(ret)) if ret is not sig.empty else sig.empty)
    text = f"{name}{sig}"
    if len(text) <= 100:
        return text
    # One parameter per line, with the / and * markers where inspect would put them.
    parts, kinds = [], [p.kind for p in params]
    for i, p in enumerate(params):
        if p.kind == p.KEYWORD_ONLY and (i == 0 or kinds[i - 1] not in (p.KEYWORD_ONLY, p.VAR_POSITIONAL)):
            parts.append("*")
        parts.append(str(p))
        if p.kind == p.POSITIONAL_ONLY and (i + 1 == len(params) or kinds[i + 1] != p.POSITIONAL_ONLY):
            parts.append("/")
    tail = f" -> {sig.return_annotation!r}" if sig.return_annotation is not sig.empty else ""
    return f"{name}(\n" + "".join(f"    {s},\n" for s in parts) + f"){tail}"


def _docstring_md(doc: str | None) -> str:
    """A Google-style docstring as Markdown: sections in bold, argument lists as bullets,
    ``::`` blocks fenced. ``code`` in double back-quotes already renders as code."""
    if not doc:
        return "*(no docstring)*"
    lines = doc.expandtabs().splitlines()
    out: list[str] = []
    section = None
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _SECTION.match(line.strip()) if not line.startswith(" ") else None
        if m:
            section = m.group(1)
            out += ["", f"**{section}:**", ""]
            if m.group(2) == "::":
                i = _fenced(lines, i + 1, out)
                section = None
                continue
            i += 1
            continue
        if section and line.startswith(" ") and line.strip():
            body = line.strip()
            em = _ENTRY.match(body)
            if section in _LIST_SECTIONS and em and _indent(line) <= 4:
                rest = em.group(3).strip()
                out.append(f"- `{em.group(1)}`{em.group(2) or ''}: {rest}".rstrip())
            elif section in _LIST_SECTIONS and out and out[-1].startswith("- "):
                out[-1] += " " + body
            else:
                out.append(body)
            i += 1
            continue
        if not line.strip():
            if section and i + 1 < len(lines) and lines[i + 1].startswith(" "):
                i += 1
                continue
            section = None
            out.append("")
            i += 1
            continue
        section = None
        if line.rstrip().endswith("::") and not line.startswith(" "):
            out.append(line.rstrip()[:-1])
            i = _fenced(lines, i + 1, out)
            continue
        out.append(line)
        i += 1
    text = "\n".join(out).strip("\n")
    text = _ROLE.sub(lambda m: f"`{m.group(1).lstrip('~')}`", text)  # :func:`x` -> `x`
    return re.sub(r"\n{3,}", "\n\n", text)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _fenced(lines: list[str], i: int, out: list[str]) -> int:
    """Emit the indented block starting at ``lines[i]`` (after blank lines) as a fenced block."""
    while i < len(lines) and not lines[i].strip():
        i += 1
    block = []
    while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
        block.append(lines[i])
        i += 1
    while block and not block[-1].strip():
        block.pop()
    if block:
        base = min(_indent(b) for b in block if b.strip())
        out += ["", "```python"] + [b[base:] for b in block] + ["```", ""]
    return i


def _anchor(qual: str) -> str:
    return qual.replace(".", "-").replace("_", "-").lower()


def _canonical(obj: Any) -> str | None:
    """A key identifying the object across re-exports (None for values compared by identity)."""
    if inspect.isfunction(obj) or inspect.isclass(obj):
        return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', '?')}"
    return None


def _render_object(qual: str, name: str, obj: Any, out: list[str]) -> None:
    out.append(f'<a id="{_anchor(qual)}"></a>')
    if inspect.isclass(obj):
        kind = "class"
        protocol = getattr(obj, "_is_protocol", False)
        sig = f"{name}" if protocol else _signature(obj, name)
        out += [f"### class `{qual}`", "", "```python", f"class {sig}", "```", "", _docstring_md(own_doc(obj))]
        for mname, member in _public_members(obj):
            fn = member.fget if isinstance(member, property) else member
            if fn is None:
                continue
            head = f"{name}.{mname}"
            if isinstance(member, property):
                ret = inspect.signature(fn).return_annotation
                ann = f": {_ann_text(ret)}" if ret is not inspect.Signature.empty else ""
                out += ["", f"#### property `{head}`", "", "```python", f"{mname}{ann}", "```"]
            else:
                out += ["", f"#### `{head}`", "", "```python", _signature(fn, mname, drop_first=True), "```"]
            doc = own_doc(fn)
            if doc or mname != "__call__":
                out += ["", _docstring_md(doc)]
        del kind
    elif inspect.isfunction(obj):
        out += [f"### `{qual}`", "", "```python", _signature(obj, name), "```", "", _docstring_md(own_doc(obj))]
    else:
        text, _, _ = constant_doc(obj)
        value = repr(obj)
        if len(value) > 300:
            value = value[:297] + "..."
        text = _ROLE.sub(lambda m: f"`{m.group(1).lstrip('~')}`", text) if text else "*(undocumented)*"
        out += [f"### `{qual}`", "", "```python", f"{name} = {value}", "```", "", text]
    out.append("")


def render() -> str:
    """The whole of ``docs/api.md`` as a string."""
    with open(INTRO_MD, encoding="utf-8") as fh:
        out = [fh.read().rstrip("\n"), ""]
    mods = public_modules()
    public_mods = {m for m, _, _ in mods}
    first: dict[Any, str] = {}
    out += ["## Contents", ""]
    for modname, _, names in mods:
        out.append(f"- [`{modname}`](#{_anchor(modname)}) ({len(names)} names)")
    out.append("")
    for modname, mod, names in mods:
        out += [f'<a id="{_anchor(modname)}"></a>', "", f"## `{modname}`", "", _docstring_md(own_doc(mod)), ""]
        for name in names:
            obj = getattr(mod, name, None)
            qual = f"{modname}.{name}"
            if name == "__version__":
                out += [f'<a id="{_anchor(qual)}"></a>', f"### `{qual}`", "",
                        "The version string (PEP 440) of the installed package, from `upi_fast/_version.py`; "
                        "see CHANGELOG.md.", ""]
                continue
            if inspect.ismodule(obj):
                target = obj.__name__
                note = f"[`{target}`](#{_anchor(target)})" if target in public_mods else f"`{target}`"
                out += [f"- `{name}`: the submodule {note}.", ""]
                continue
            key = _canonical(obj) or id(obj)
            if key in first:
                out += [f"- `{name}`: the same object as [`{first[key]}`](#{_anchor(first[key])}).", ""]
                continue
            first[key] = qual
            _render_object(qual, name, obj, out)
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text).rstrip("\n") + "\n"
    return text


def main(argv: list[str] | None = None) -> int:
    """Rewrite docs/api.md (atomically), or with ``--check`` report whether it is current."""
    parser = argparse.ArgumentParser(description="Generate docs/api.md from the docstrings.")
    parser.add_argument("--check", action="store_true",
                        help="do not write; exit 1 if docs/api.md is stale or the public API has problems")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        bad = problems()
        for p in bad:
            print(f"public API: {p}", file=sys.stderr)
        try:
            with open(API_MD, encoding="utf-8") as fh:
                current = fh.read()
        except FileNotFoundError:
            current = None
        if current != text:
            print("docs/api.md is stale: run `python docs/build_api.py`", file=sys.stderr)
            return 1
        return 1 if bad else 0
    tmp = API_MD + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, API_MD)
    print(f"wrote {_rel(API_MD)} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
