"""Structure rules (issue 15, "one home per concept"): no module in upi_fast/ over 500 lines, no
branch on a saliency method's name outside upi_fast/methods/, no import cycle in upi_fast/ and bench/."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 500


def _modules(package: str) -> dict[str, str]:
    """Dotted module name -> path, for every .py file under ``package`` (a top-level folder)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, package)):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
        for f in sorted(filenames):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join(parts)] = path
    return out


def _tree(path: str) -> ast.Module:
    with open(path, encoding="utf-8") as fh:
        return ast.parse(fh.read(), path)


@pytest.mark.parametrize("name,path", sorted(_modules("upi_fast").items()))
def test_no_module_over_500_lines(name, path):
    with open(path, encoding="utf-8") as fh:
        n = sum(1 for _ in fh)
    assert n <= MAX_LINES, f"{name} has {n} lines (at most {MAX_LINES}): split it by concern"


def _names_compared(tree: ast.Module, names: set) -> list[int]:
    """Lines where a comparison involves one of ``names`` as a string constant (``x == "simple"``,
    ``x in ("simple", ...)``, ``x != "smoothgrad"``)."""

    def consts(node) -> set:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        return set()

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            if any(consts(side) & names for side in [node.left, *node.comparators]):
                lines.append(node.lineno)
        elif isinstance(node, ast.MatchValue) and consts(node.value) & names:
            lines.append(node.lineno)
    return lines


def test_no_method_name_branches_outside_the_registry():
    from upi_fast.methods import METHODS
    names = set(METHODS)
    bad = []
    for name, path in _modules("upi_fast").items():
        if name == "upi_fast.methods" or name.startswith("upi_fast.methods."):
            continue
        bad += [f"{name}:{line}" for line in _names_compared(_tree(path), names)]
    assert not bad, ("these modules compare a saliency method's name (ask the method object of "
                     f"upi_fast.methods instead: its points, noise, input factor, options): {bad}")


def _imports(name: str, path: str, known: set) -> set:
    """Modules of ``known`` imported anywhere in the file (module level or inside functions)."""
    is_pkg = os.path.basename(path) == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(_tree(path)):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[:len(base) - node.level + 1]
                mod = ".".join(pkg + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                out.add(t)
    return out


def _cycles(graph: dict) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_no_import_cycle():
    mods = {**_modules("upi_fast"), **_modules("bench")}
    known = set(mods)
    # a package's __init__ importing its own submodules is how a package is built, not a cycle
    graph = {}
    for name, path in mods.items():
        deps = _imports(name, path, known)
        graph[name] = {d for d in deps if not (os.path.basename(path) == "__init__.py" and d.startswith(name + "."))}
    cycles = _cycles(graph)
    assert not cycles, f"import cycles: {cycles}"
