"""The benchmark entry point: ``python -m bench --smoke`` runs every suite at tiny sizes and writes the
JSON, PNG and summary outputs, with each table's reference column (a subprocess, ~20 s on 2 cores)."""
import json
import os
import subprocess
import sys

import pytest

from upi_fast.bench.__main__ import SUITES, main, summary_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "bench", "--smoke", "--threads", "1", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder, proc.stdout


def test_every_suite_writes_json_and_png(smoke_run):
    folder, _ = smoke_run
    assert folder.name.endswith("-cpu-1t")
    for suite in SUITES:
        payload = json.loads((folder / f"{suite}.json").read_text())
        assert payload["suite"] == suite
        assert payload["command"].startswith("python -m bench") and "--smoke" in payload["command"]
        png = (folder / f"{suite}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert not list(folder.glob("*.tmp"))  # written atomically
    assert list(folder.glob("upi_grad_profile_*.txt"))


def test_upi_grad_table_has_reference_column_and_sane_ratios(smoke_run):
    folder, stdout = smoke_run
    res = json.loads((folder / "upi_grad.json").read_text())
    rows = res["models"]["digits CNN"]["rows"]
    ref = next(r for r in rows if r["name"] == res["reference"])
    assert ref["speedup_vs_reference"] == pytest.approx(1.0)
    names = {r["name"] for r in rows}
    assert {"per-sample loop (double backward, 1 image per call)", "best path (autotuned)"} <= names
    for r in rows:
        assert r["median_s"] > 0 and r["items_per_s"] > 0 and r["repeats"] >= 1
        assert r["speedup_vs_reference"] == pytest.approx(ref["median_s"] / ref["items"] / (r["median_s"] / r["items"]))
        assert r["in_gradients"] > 0  # the headline unit: a multiple of one input gradient, same run
        if r["name"] not in ("per-sample loop (double backward, 1 image per call)", "one input gradient (the unit)"):
            assert r["cos_vs_ref"] is not None
    best = next(r for r in rows if r["name"] == "best path (autotuned)")
    assert best["exact"] == "yes" and best["cos_vs_ref"] > 0.999  # the exact fp32 path: same gradient
    strength = res["strength"]["rows"]
    assert strength[0]["strength_vs_ref"] == pytest.approx(1.0) and all(0 <= r["dissimilarity"] for r in strength)
    assert "| speedup_vs_reference |" in stdout and "| vs_reference | reference |" in stdout


def test_summary_has_every_suite_with_its_reference(smoke_run):
    folder, _ = smoke_run
    summary = json.loads((folder / "summary.json").read_text())
    assert not summary["failures"]
    assert {r["suite"] for r in summary["rows"]} == set(SUITES)
    assert all(r["reference"] for r in summary["rows"])
    md = (folder / "summary.md").read_text()
    assert "Command: `python -m bench" in md and "| suite | section | contender |" in md
    for suite in ("upi_grad", "hvp", "upi_pca"):
        refs = [r for r in summary["rows"] if r["suite"] == suite and r["vs_reference"] == pytest.approx(1.0)]
        assert refs, suite


def test_summary_rows_of_a_hand_made_result():
    res = {"reference": "ref", "models": {"m": {"rows": [
        {"name": "ref", "median_s": 2.0, "iqr_s": 0.1, "items_per_s": 5.0, "speedup_vs_reference": 1.0},
        {"name": "fast", "median_s": 1.0, "iqr_s": 0.1, "items_per_s": 10.0, "speedup_vs_reference": 2.0}]}}}
    rows = summary_rows("upi_grad", res)
    assert [r["vs_reference"] for r in rows] == [1.0, 2.0] and rows[1]["reference"] == "ref"
    assert summary_rows("svd", {"in_memory": {"rows": [{"name": "a", "median_s": float("nan")}]}})[0]["median_s"] is None


def test_bad_arguments_exit_with_usage_error(capsys):
    assert main(["no_such_suite"]) == 2  # one line, exit code 2, as every upi-fast error
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown suite 'no_such_suite'" in err[0]
    assert main(["--threads", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads must be >= 1" in err[0]
