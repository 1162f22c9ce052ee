"""``upi-fast sweep`` / :func:`upi_fast.sweep.sweep`: every method at several budgets, end to end on
a tiny generated ImageFolder (30 RGB 8 x 8 PNGs, 3 classes) with a tiny CNN; sweep.json, sweep.png,
the table and the progress lines; bad input is one line naming the option, exit code 2."""
from __future__ import annotations

import json
import math

import pytest

from upi_fast.cli import main
from upi_fast.pipeline import ComputeConfig
from upi_fast.sweep import METHODS, check_budgets, parse_methods, sweep

from hardening_support import make_image_folder

pytestmark = pytest.mark.usefixtures("single_thread")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMMON = ["--size", "8", "--epochs", "2", "--batch-size", "8", "--attack-samples", "15", "--eval-samples", "15",
          "--no-progress"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("sweep") / "imgs", per_class=10)


def _check_png(path):
    from matplotlib.image import imread
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 600  # three panels side by side
    assert float(img[..., :3].std()) > 0.01


def test_sweep_cli_end_to_end(data, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["sweep", "--data", data, "--model", "hardening_support:make_model", "--eps-pixels", "16,2,6",
               "--methods", "per-image,grad,random,pca,uap", "--out", str(out)] + COMMON)
    stdout = capsys.readouterr().out
    assert rc == 0
    doc = json.loads((out / "sweep.json").read_text())
    _check_png(out / "sweep.png")
    assert not list(out.glob("*.tmp"))
    # the budget axis: sorted, strictly increasing, converted to model units (L2: RMS grey levels)
    assert doc["budget"]["name"] == "eps_pixels" and doc["budget"]["values"] == [2.0, 6.0, 16.0]
    eps = doc["budget"]["eps"]
    assert eps == pytest.approx([b / 255 * math.sqrt(3 * 8 * 8) for b in (2, 6, 16)])
    labels = ["UPI-Grad", "UPI-PCA", "classification UAP", "universal random", "per-image attack"]
    assert doc["methods"] == labels and doc["ceiling"] == "per-image attack"
    assert set(doc["series"]) == set(labels)
    for lab in labels:
        assert set(doc["series"][lab]) == {"dissimilarity", "topk_intersection", "spearman", "fooling_rate"}
        assert all(len(v) == 3 for v in doc["series"][lab].values())
    rows = doc["results"]
    assert len(rows) == 15 and [r["budget"] for r in rows] == [2.0] * 5 + [6.0] * 5 + [16.0] * 5
    for r in rows:
        assert 0.0 <= r["topk_intersection"] <= 1.0 and 0.0 <= r["fooling_rate"] <= 1.0 and r["dissimilarity"] >= 0
        if "delta_norm" in r:  # every universal perturbation lies in the ball
            assert r["delta_norm"] <= r["eps"] * (1 + 1e-5)
    # the same clean model and evaluation split for every row: the same samples
    assert {(r["n"], r["n_total"]) for r in rows} == {(15, 15)}
    assert doc["samples"]["n"] == 15 and doc["samples"]["n_total"] == 15 and doc["samples"]["left_out"] == 0
    assert all(r["draws"] == 3 for r in rows if r["key"] == "random")
    # the per-image attack (the ceiling) beats universal noise of the same norm at every budget
    per, rand = doc["series"]["per-image attack"], doc["series"]["universal random"]
    assert all(p > q for p, q in zip(per["dissimilarity"], rand["dissimilarity"]))
    assert "[1/15]" in stdout and "[15/15]" in stdout and "n 15/15" in stdout
    assert "n used/eval" in stdout and "n = 15 of 15 evaluation images used" in stdout
    assert f"wrote {out / 'sweep.json'}" in stdout and f"wrote {out / 'sweep.png'}" in stdout


def test_sweep_reports_left_out_samples(data, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["sweep", "--data", data, "--model", "reporting_support:other_model", "--eps-pixels", "4,8",
               "--methods", "grad,random", "--out", str(out)] + COMMON)
    stdout = capsys.readouterr().out
    assert rc == 0
    doc = json.loads((out / "sweep.json").read_text())
    n = doc["samples"]["n"]
    assert 0 < n < 15 and doc["samples"]["n_total"] == 15 and doc["samples"]["left_out"] == 15 - n
    assert "classifies correctly" in doc["samples"]["reason"]
    assert {r["n"] for r in doc["results"]} == {n}
    assert f"n = {n} of 15 evaluation images used, {15 - n} left out" in stdout


def test_sweep_api_linf_eps(data, tmp_path):
    cfg = ComputeConfig(data=data, model="hardening_support:make_model", out=str(tmp_path), size=8, norm="inf",
                        attack_samples=10, eval_samples=10, batch_size=8, progress=False)
    lines = []
    res = sweep(cfg, [0.05, 0.01], methods="random", budget="eps", random_draws=2, log=lines.append)
    assert res["budget"]["values"] == [0.01, 0.05] and res["budget"]["eps"] == [0.01, 0.05]
    assert [r["delta_norm"] for r in res["results"]] == pytest.approx([0.01, 0.05])  # Linf: exactly the budget
    assert res["setup"]["norm"] == "inf" and len(lines) == 4  # header, 2 progress lines, the table


def test_parse_helpers():
    assert parse_methods("random, grad,per-image") == ("grad", "random", "per-image")
    assert parse_methods(list(METHODS)) == METHODS
    assert check_budgets([8, 1, 4]) == (1.0, 4.0, 8.0)
    for bad, match in (("grad,foo", "unknown method 'foo'"), ("grad,grad", "given twice"), ("", "at least one")):
        with pytest.raises(ValueError, match=match) as info:
            parse_methods(bad)
        assert info.value.option == "--methods"
    with pytest.raises(ValueError, match="finite number > 0"):
        check_budgets([1, -2])


@pytest.mark.parametrize("extra,option,text", [
    (["--eps-pixels", "2", "--methods", "grad,foo"], "--methods", "unknown method 'foo'"),
    (["--eps-pixels", "2,0"], "--eps-pixels", "> 0"),
    (["--eps-pixels", "2,2"], "--eps-pixels", "twice"),
    (["--eps-pixels", "2", "--eps", "0.1"], "--eps", "not allowed with"),
    (["--eps-pixels", "2", "--random-draws", "0"], "--random-draws", "> 0"),
    ([], "--eps-pixels", "required"),
])
def test_sweep_bad_input_is_one_line(data, tmp_path, capsys, extra, option, text):
    rc = main(["sweep", "--data", data, "--model", "hardening_support:make_model", "--out", str(tmp_path)]
              + COMMON + extra)
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("upi-fast: error:")
    assert option in err and text in err
    assert not (tmp_path / "sweep.json").exists()


def test_sweep_no_usable_sample_is_one_line(data, tmp_path, capsys):
    rc = main(["sweep", "--data", data, "--model", "reporting_support:wrong_model", "--eps-pixels", "4",
               "--methods", "random", "--out", str(tmp_path / "out")] + COMMON)
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "classifies none of the samples" in err and "no saliency map of the true class" in err
    assert not (tmp_path / "out" / "sweep.json").exists()
