"""Sample counts and figures: every table, report and figure states how many evaluation images its
metrics use and why the others were left out; figures have titles, axis / colour-bar labels with
units, readable metric names and which direction is a stronger attack; eps is formatted sensibly;
example rows name the ImageFolder's classes."""
from __future__ import annotations

import json

import pytest
import torch
from matplotlib.text import Text

from upi_fast import viz
from upi_fast.cli import main
from upi_fast.io import save_perturbation
from upi_fast.report import (SAMPLES_REASON, format_eps, format_table, json_report, markdown_report, metric_label,
                             samples_line, samples_summary)

from hardening_support import make_image_folder

pytestmark = pytest.mark.usefixtures("single_thread")

ROWS = [{"method": "UPI-Grad", "dissimilarity": 0.4, "topk_intersection": 0.5, "spearman": 0.6, "fooling_rate": 0.1,
         "n": 8, "n_total": 20, "seconds": 1.0},
        {"method": "universal random", "dissimilarity": 0.1, "topk_intersection": 0.9, "spearman": 0.9,
         "fooling_rate": 0.0, "n": 8, "n_total": 20, "seconds": 0.0}]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("reporting") / "imgs", per_class=10)


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the viz functions save (their texts are what a reader sees)."""
    saved = []
    real = viz._save_png

    def keep(fig, path):
        saved.append(fig)
        real(fig, path)
    monkeypatch.setattr(viz, "_save_png", keep)
    return saved


def _texts(fig) -> list[str]:
    return [" ".join(t.get_text().split()) for t in fig.findobj(Text) if t.get_text()]  # wrapped lines joined


def test_table_markdown_json_state_the_samples():
    text = format_table(ROWS)
    assert "n used/eval" in text and text.count("8/20") == 2
    line = "n = 8 of 20 evaluation images used, 12 left out: " + SAMPLES_REASON + "."
    assert text.splitlines()[-1] == line and samples_line(ROWS) == line
    md = markdown_report("t", {"eval_samples": 20}, ROWS)
    assert "| n used/eval |" in md and "| 8/20 |" in md and line in md
    doc = json.loads(json_report({}, ROWS))
    assert doc["samples"] == {"n": 8, "n_total": 20, "left_out": 12, "reason": SAMPLES_REASON}
    assert [r["n"] for r in doc["results"]] == [8, 8]
    assert "classifies correctly" in SAMPLES_REASON
    zero = [{"method": "x", "n": 0, "n_total": 5}]
    assert samples_line(zero).startswith("n = 0 of 5 evaluation images: no usable sample: the model classifies none")
    assert samples_summary([{"method": "no counts"}]) is None and samples_line([{"method": "x"}]) == ""
    assert format_table(ROWS, note=False).splitlines()[-1].startswith("universal random")


def test_format_eps_and_metric_labels():
    assert format_eps(8 / 255) == "0.0314 (8/255)"
    assert format_eps(0.03137254901960784) == "0.0314 (8/255)"
    assert format_eps(0.5) == "0.5" and format_eps(1.23456) == "1.23" and format_eps("?") == "?"
    assert format_eps(torch.tensor(2 / 255)) == "0.00784 (2/255)"
    assert metric_label("topk_intersection") == ("top-k intersection (fraction of the top-k pixels kept; "
                                                 "lower = stronger attack)")
    assert "higher = stronger attack" in metric_label("dissimilarity")


def test_metric_bars_readable_with_direction_and_samples(tmp_path, figures):
    viz.plot_metric_bars({r["method"]: r for r in ROWS}, tmp_path / "m.png")
    texts = " ".join(_texts(figures[-1]))
    assert "topk_intersection" not in texts and "fooling_rate" not in texts
    for want in ("top-k intersection", "saliency dissimilarity", "higher = stronger attack", "lower = stronger attack",
                 "metric value (dimensionless)", "interpretation attack metrics", "n = 8 of 20"):
        assert want in texts, want
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def test_rgb_perturbation_has_signed_channel_maps_not_a_grey_bar(tmp_path, figures):
    viz.plot_perturbation(torch.randn(3, 6, 6) * 0.1, tmp_path / "p.png", title="UPI-Grad", units="pixel units [0, 1]")
    fig = figures[-1]
    cmaps = {im.get_cmap().name for ax in fig.axes for im in ax.get_images()}
    assert "gray" not in cmaps and "RdBu_r" in cmaps
    assert len(fig.axes) == 5  # composite, R, G, B, one colour bar for the three channel maps
    texts = " ".join(_texts(fig))
    assert "red channel" in texts and "delta (pixel units [0, 1])" in texts and "x (pixel)" in texts
    assert "UPI-Grad" in fig._suptitle.get_text()


def test_compute_states_samples_everywhere(data, tmp_path, capsys, figures):
    out = tmp_path / "out"
    rc = main(["compute", "--data", data, "--model", "reporting_support:other_model", "--size", "8",
               "--eps-pixels", "8", "--epochs", "2", "--batch-size", "8", "--attack-samples", "15",
               "--eval-samples", "15", "--no-progress", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert rc == 0
    doc = json.loads((out / "report.json").read_text())
    n = doc["results"][0]["n"]
    assert 0 < n < 15 and doc["samples"]["n"] == n and doc["samples"]["left_out"] == 15 - n
    line = f"n = {n} of 15 evaluation images used, {15 - n} left out"
    assert line in stdout and f"{n}/15" in stdout
    md = (out / "report.md").read_text()
    assert line in md and f"| {n}/15 |" in md
    title = figures[-1]._suptitle.get_text()  # upi.png: the method and a readable eps
    assert "UPI-Grad" in title and "eps = " in title and "0.434710790" not in title


def test_compute_with_no_usable_sample_is_one_clear_line(data, tmp_path, capsys):
    rc = main(["compute", "--data", data, "--model", "reporting_support:wrong_model", "--size", "8", "--eps", "0.5",
               "--epochs", "1", "--batch-size", "8", "--attack-samples", "10", "--eval-samples", "10",
               "--no-progress", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "classifies none of the samples" in err and "no saliency map of the true class" in err


def test_show_names_classes_and_formats_eps(data, tmp_path, capsys, figures):
    pert = tmp_path / "upi.safetensors"
    save_perturbation(pert, torch.full((3, 8, 8), 0.01), {"method": "UPI-Grad", "eps": 8 / 255})
    rc = main(["show", str(pert), "--out", str(tmp_path / "show"), "--data", data, "--model",
               "hardening_support:make_model", "--size", "8", "--n", "3"])
    assert rc == 0, capsys.readouterr().err
    pert_fig, grid_fig = figures[-2], figures[-1]
    assert "eps = 0.0314 (8/255)" in pert_fig._suptitle.get_text()
    assert "0.0313725" not in " ".join(_texts(pert_fig))
    ylabels = [ax.get_ylabel() for ax in grid_fig.axes if ax.get_ylabel()]
    assert ylabels[:3] == ["c0", "c0", "c0"]  # the first images of the folder, by class name
    texts = " ".join(_texts(grid_fig))
    assert "label 0" not in texts and "saliency" in grid_fig._suptitle.get_text()
    assert (tmp_path / "show" / "upi_examples.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_and_transfer_figures_are_labelled(tmp_path, figures):
    series = {"UPI-Grad": {"dissimilarity": [0.1, 0.2], "topk_intersection": [0.9, 0.8], "fooling_rate": [0.0, 0.1]},
              "per-image attack": {"dissimilarity": [0.3, 0.4], "topk_intersection": [0.7, 0.6],
                                   "fooling_rate": [0.1, 0.2]}}
    viz.plot_sweep([2, 4], series, tmp_path / "s.png", budget_label="eps (grey levels)", ceiling="per-image attack",
                   title="sweep", caption="n = 8 of 20 evaluation images used")
    fig = figures[-1]
    assert [ax.get_xlabel() for ax in fig.axes] == ["eps (grey levels)"] * 3
    texts = " ".join(_texts(fig))
    for want in ("higher = stronger attack", "lower = stronger attack", "per-image attack (ceiling)",
                 "n = 8 of 20", "relative L2"):
        assert want in texts, want
    with pytest.raises(ValueError, match="strictly increasing"):
        viz.plot_sweep([4, 2], series, tmp_path / "bad.png")
    viz.plot_transfer(["a", "b"], ["a", "b"], {"dissimilarity": [[0.3, 0.1], [0.2, 0.4]],
                                               "fooling_rate": [[0.1, 0.0], [0.0, float("nan")]]},
                      tmp_path / "t.png", target_notes=["n = 8/20", "n = 20/20"], caption="n differs")
    texts = " ".join(_texts(figures[-1]))
    for want in ("source model (UPI computed on)", "target model (UPI evaluated on)", "n = 8/20",
                 "higher = stronger attack", "fraction of labels changed", "transfer", "0.300", "-"):
        assert want in texts, want
    assert not (tmp_path / "bad.png").exists()
