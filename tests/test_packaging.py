"""Packaging: ``python -m build`` makes an sdist and a pure-Python wheel, and the wheel installs and
imports on a machine without CUDA.

One build per session (module fixture, from a copy of the working tree): ``python -m build`` with
its default build isolation, i.e.
an sdist first, then the wheel built *from the sdist* in a fresh environment without torch -- so
setup_cuda.py must skip the C++/CUDA extension cleanly, and the sdist must carry everything the
build needs. The wheel is then installed with ``pip install --no-deps --target`` (torch comes from
this environment) and imported in a subprocess that sees no GPU (``CUDA_VISIBLE_DEVICES=""``) and
not this checkout.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

import upi_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("build") is None,
                                reason="the 'build' package is not installed (pip install build; it is in the "
                                       "dev extra)")


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    # Build from a copy of the working tree (built files such as upi_fast/_C*.so included, to check
    # that they stay out), so that the build writes nothing (egg-info, build/) into the checkout.
    src = tmp_path_factory.mktemp("src") / "upi_fast-src"
    skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", ".pytest_cache", ".hypothesis",
                                  "upi_out", "__pycache__")
    shutil.copytree(ROOT, src, ignore=skip)
    out = tmp_path_factory.mktemp("dist")
    env = {k: v for k, v in os.environ.items() if k not in ("UPI_FAST_BUILD_CUDA", "TRITON_INTERPRET")}
    res = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(src)], capture_output=True,
                         text=True, env=env, timeout=600)
    log = res.stdout + res.stderr
    assert res.returncode == 0, f"python -m build failed:\n{log[-5000:]}"
    sdists = list(out.glob("*.tar.gz"))
    wheels = list(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, f"expected one sdist and one wheel, got {os.listdir(out)}"
    return {"sdist": sdists[0], "wheel": wheels[0], "log": log, "dir": out}


def test_build_skips_the_extension_cleanly_without_torch(dist):
    assert "skipping the C++/CUDA extension upi_fast._C: torch is not importable in the build environment" \
        in dist["log"]
    assert "Traceback" not in dist["log"]


def test_sdist_carries_sources_and_nothing_built(dist):
    with tarfile.open(dist["sdist"]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    need = ["setup.py", "setup_cuda.py", "pyproject.toml", "MANIFEST.in", "README.md", "CHANGELOG.md",
            "CMakeLists.txt", "csrc/register.cpp", "csrc/upi_fast.h", "csrc/saliency_dissim.cu", "csrc/softplus.cu",
            "csrc/sketch_update.cu", "kernels/__init__.py", "kernels/saliency_dissim.py", "bench/harness.py",
            "docs/api.md", "docs/build_api.py", "docs/api_intro.md", "tests/conftest.py",
            "upi_fast/functional.py", "upi_fast/adapters.py", "upi_fast/_version.py"]
    need += [f"examples/{f}" for f in os.listdir(os.path.join(ROOT, "examples")) if f.endswith(".py")]
    missing = [n for n in need if n not in names]
    assert not missing, f"the sdist lacks {missing}"
    junk = [n for n in names if n.endswith((".so", ".pyc", ".o", ".a")) or "__pycache__" in n
            or n.startswith((".agents", "build/", "dist/", ".venv")) or re.match(r"bench/results/.+/", n)]
    assert not junk, f"the sdist carries build products or local files: {junk[:10]}"


def test_wheel_is_pure_python_with_all_packages(dist):
    name = dist["wheel"].name
    assert name == f"upi_fast-{upi_fast.__version__}-py3-none-any.whl", name
    with zipfile.ZipFile(dist["wheel"]) as zf:
        names = set(zf.namelist())
        meta = zf.read(f"upi_fast-{upi_fast.__version__}.dist-info/METADATA").decode()
        entry = zf.read(f"upi_fast-{upi_fast.__version__}.dist-info/entry_points.txt").decode()
    for n in ("upi_fast/__init__.py", "upi_fast/functional.py", "upi_fast/adapters.py", "upi_fast/info.py",
              "upi_fast/ops/__init__.py", "upi_fast/linalg/sketch.py", "upi_fast/solvers/upi_grad.py",
              "upi_fast/kernels/saliency_dissim.py", "upi_fast/bench/harness.py"):
        assert n in names, f"the wheel lacks {n}"
    assert not [n for n in names if n.endswith((".so", ".pyd"))], "a pure wheel must not carry a compiled module"
    assert "upi-fast = upi_fast.cli:main" in entry
    assert "Requires-Python: >=3.10" in meta and "Requires-Dist: torch>=2.4" in meta
    dev = [line.split(";")[0].split("Requires-Dist:")[1].strip() for line in meta.splitlines()
           if line.startswith("Requires-Dist:") and "extra == \"dev\"" in line]
    for tool in ("pytest", "hypothesis", "torchvision", "build"):
        assert any(d.startswith(tool) for d in dev), f"the dev extra lacks {tool}: {dev}"


# This venv has the checkout installed in editable mode; its import hook would hand the installed
# copy the checkout's built extension ``upi_fast._C`` (a submodule the wheel does not have). A
# machine with only the wheel has no such hook: remove it before importing.
_NO_EDITABLE = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
                "if not str(getattr(f, '__module__', '')).startswith('__editable__')]\n")

_PROBE = _NO_EDITABLE + r"""
import json, sys
import upi_fast, upi_fast.functional, upi_fast.adapters
from upi_fast import info
import torch
x = torch.rand(2, 3, 8, 8)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Softplus(), torch.nn.Flatten(),
                            torch.nn.Linear(256, 5))
maps = upi_fast.saliency(model, x, torch.tensor([0, 3]))
print(json.dumps({"file": upi_fast.__file__, "version": upi_fast.__version__, "backends": upi_fast.backends(),
                  "info": info.info(), "maps": list(maps.shape)}))
"""


def test_wheel_installs_and_imports_without_cuda(dist, tmp_path):
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target),
                          str(dist["wheel"])], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "UPI_FAST_BACKEND", "PYTHONPATH")}
    env.update(PYTHONPATH=str(target), CUDA_VISIBLE_DEVICES="")
    res = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    d = json.loads(res.stdout.strip().splitlines()[-1])
    assert os.path.realpath(d["file"]).startswith(os.path.realpath(target)), \
        f"imported {d['file']}, not the installed wheel"
    assert d["version"] == upi_fast.__version__ and d["maps"] == [2, 64]
    assert d["backends"] == {"torch": True, "triton": False, "cuda": False}
    assert "error" in d["info"]["extension"] and set(d["info"]["unavailable"]) == {"triton", "cuda"}
    # the command-line report from the installed copy
    res = subprocess.run([sys.executable, "-c", _NO_EDITABLE + "import runpy; runpy.run_module('upi_fast.info', "
                          "run_name='__main__')"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert re.search(r"torch\s+available", res.stdout) and re.search(r"cuda\s+unavailable", res.stdout), res.stdout
