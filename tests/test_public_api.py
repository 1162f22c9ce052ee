"""The public API (docs/build_api.py's PUBLIC): documented, typed, exported, and cheap to import.

* Every public name has a docstring; functions, classes' ``__init__`` and public methods have type
  hints on every parameter and the return, and the hints resolve; public constants carry a ``#:``
  comment; every public module has ``__all__``. One test per *defining file*, so a failure names
  the file to fix (and its owner) and lists every defect in it.
* docs/api.md is what ``python docs/build_api.py`` generates from the current docstrings.
* ``upi_fast.functional`` re-exports the top-level building blocks.
* ``import upi_fast`` compiles nothing, imports no Triton / matplotlib / scikit-learn / torchvision,
  initialises no CUDA context, and takes under a second after torch.
* ``upi_fast.info`` / ``python -m upi_fast.info`` report the backends.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import subprocess
import sys

import pytest

import upi_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_build_api():
    spec = importlib.util.spec_from_file_location("upi_fast_docs_build_api", os.path.join(ROOT, "docs", "build_api.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


build_api = _load_build_api()


def _defining_files() -> list[str]:
    files = set()
    for modname, mod, _ in build_api.public_modules():
        files.add(build_api._rel(mod.__file__))
    for _, _, obj in build_api.public_objects():
        if inspect.isfunction(obj) or inspect.isclass(obj):
            files.add(build_api._source_file(obj))
        elif inspect.ismodule(obj):
            files.add(build_api._rel(getattr(obj, "__file__", None)))
        elif obj is not None and not isinstance(obj, str):
            files.add(build_api.constant_doc(obj)[1])
    return sorted(files)


PROBLEMS = build_api.problems()


@pytest.mark.parametrize("path", _defining_files() + sorted({p.file for p in PROBLEMS} - set(_defining_files())))
def test_public_names_are_documented_and_typed(path):
    bad = [p for p in PROBLEMS if p.file == path]
    assert not bad, (f"{len(bad)} public-API defect(s) in {path} (see docs/build_api.py: docstrings, type hints on "
                     "every parameter and the return, '#:' comments above public constants):\n"
                     + "\n".join(f"  {p.name}: {p.what}" for p in bad))


def test_public_statement_lists_real_modules_and_names():
    for modname, mod, names in build_api.public_modules():
        assert names, f"{modname} exports nothing"
        missing = [n for n in names if not hasattr(mod, n)]
        assert not missing, f"{modname} lacks the public names {missing}"


def test_problem_checker_catches_defects():
    """The checker itself: an undocumented, untyped function and an undocumented constant are caught."""
    ns: dict = {}
    exec("def f(a, b: int = 1):\n    return a\n", ns)
    f = ns["f"]
    f.__module__ = "upi_fast.fake"
    what = [p.what for p in build_api._object_problems("upi_fast.fake", "f", f, set())]
    assert "no docstring" in what and any("a" in w and "without type hints" in w for w in what) \
        and "no return type hint" in what
    what = [p.what for p in build_api._object_problems("upi_fast.fake", "C", ("x",), set())]
    assert what == ["constant without a '#:' comment above its assignment"]


def test_api_md_is_up_to_date():
    with open(build_api.API_MD, encoding="utf-8") as fh:
        current = fh.read()
    assert current == build_api.render(), "docs/api.md is stale: run `python docs/build_api.py` and commit the result"


def test_api_md_renders_docstring_sections():
    text = build_api.render()
    assert "## What is public" in text and "## `upi_fast.functional`" in text
    assert "- `model`: classifier returning logits (B, K)" in text  # Args entries become bullets
    assert "0x" not in text, "a default value printed with its memory address makes the page unstable"


def test_functional_reexports_the_building_blocks():
    from upi_fast import functional as F

    top = [n for n in upi_fast.__all__ if n not in ("__version__", "UPIGrad", "UPIPCA", "BatchOutOfMemoryError")
           and not inspect.ismodule(getattr(upi_fast, n))]
    missing = [n for n in top if getattr(F, n, None) is not getattr(upi_fast, n)]
    assert not missing, f"top-level building blocks missing from upi_fast.functional: {missing}"
    metric_fns = [n for n in upi_fast.metrics.__all__]
    assert all(getattr(F, n) is getattr(upi_fast.metrics, n) for n in metric_fns)
    for n in ("saliency_dissim", "fused_saliency_loss", "sketch_update", "StreamingSketch", "randomized_svd",
              "pca_plus_eigenvector", "project", "saliency_loss_grad", "raw_gradient", "postprocess_maps"):
        assert n in F.__all__
    assert len(set(F.__all__)) == len(F.__all__)


_IMPORT_PROBE = r"""
import sys, time, json
import torch
t0 = time.perf_counter()
import upi_fast, upi_fast.functional, upi_fast.adapters, upi_fast.info
seconds = time.perf_counter() - t0
heavy = [m for m in ("triton", "upi_fast.kernels", "matplotlib", "sklearn", "torchvision", "scipy", "pandas")
         if m in sys.modules]
print(json.dumps({"seconds": seconds, "heavy": heavy, "cuda_initialized": torch.cuda.is_initialized()}))
"""


def test_import_is_cheap_and_has_no_side_effects():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert res["heavy"] == [], f"import upi_fast loaded {res['heavy']} (make those imports lazy)"
    assert not res["cuda_initialized"], "import upi_fast initialised CUDA"
    assert res["seconds"] < 1.0, f"import upi_fast took {res['seconds']:.2f} s after torch (budget: 1 s)"


def test_info_reports_backends():
    from upi_fast import info

    d = info.info()
    assert d["upi_fast"] == upi_fast.__version__
    assert d["backends"] == upi_fast.backends()
    assert d["backends"]["torch"] is True
    assert set(d["unavailable"]) == {k for k, v in d["backends"].items() if not v}
    assert all(isinstance(v, str) and v for v in d["unavailable"].values())
    text = info.format_info(d)
    for name in ("torch", "triton", "cuda"):
        assert f"  {name}" in text
    json.dumps(d)  # JSON-serialisable


def test_info_command_line():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "upi_fast.info", "--json"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    d = json.loads(res.stdout)
    assert d["backends"]["torch"] is True and d["upi_fast"] == upi_fast.__version__
