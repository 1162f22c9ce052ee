"""Every worked example in examples/ runs end to end (``--smoke``: tiny generated or embedded data).

Each runs in its own process, as a user would run it (single-threaded, see below); together they
take well under a minute on 2 CPU cores. A new example must be added to ``EXAMPLES`` (checked).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES_DIR = os.path.join(ROOT, "examples")

# script -> (extra arguments, lines the output must contain, files it must write into --out)
EXAMPLES = {
    "01_upi_for_your_model.py": (["--out", "{out}"], ["UPI-grad", "universal random", "wrote"],
                                 ["upi.safetensors", "upi.png", "results.json"]),
    "02_transfer_across_models.py": (["--out", "{out}"], ["digits CNN (source)", "wide CNN", "MLP"],
                                     ["upi.safetensors", "transfer.json"]),
    "03_backend_ops.py": ([], ["fused saliency_dissim vs. unfused autograd", "streaming sketch", "all checks passed"],
                          []),
}


def test_every_example_is_run_here():
    scripts = sorted(f for f in os.listdir(EXAMPLES_DIR) if f.endswith(".py"))
    assert scripts == sorted(EXAMPLES), "add the new example to EXAMPLES in tests/test_examples.py"


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs(script, tmp_path):
    extra, expect, files = EXAMPLES[script]
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(EXAMPLES_DIR, script), "--smoke"] + [a.format(out=out) for a in extra]
    # One thread: on a shared, oversubscribed CPU, OpenMP's spinning threads made these runs 3-10x
    # slower (measured: example 1 took 32 s with 2 threads, 9.5 s with 1, at load average 4 on 2 cores).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert res.returncode == 0, f"{script} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    for line in expect:
        assert line in res.stdout, f"{script}: {line!r} not in its output:\n{res.stdout[-3000:]}"
    for f in files:
        assert (out / f).is_file(), f"{script} did not write {f}"
    if script == "02_transfer_across_models.py":
        rows = json.loads((out / "transfer.json").read_text())["rows"]
        assert len(rows) == 4 and all(r["upi"]["n"] > 0 for r in rows)
    assert not list(tmp_path.glob("upi_out")), f"{script} wrote into the working directory"
