"""``upi-fast transfer`` / :func:`upi_fast.transfer.transfer`: every model's UPI on every model, end
to end on a tiny generated ImageFolder with a torchvision ResNet-18 (random weights saved to a
safetensors file) and tiny CNNs; transfer.json, transfer.png and the tables; bad input is one line
naming ``--models``, exit code 2."""
from __future__ import annotations

import json

import pytest
import torch

from upi_fast.cli import main
from upi_fast.transfer import model_labels, parse_models

from hardening_support import make_image_folder, make_model

pytestmark = pytest.mark.usefixtures("single_thread")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMMON = ["--size", "8", "--eps-pixels", "8", "--epochs", "2", "--batch-size", "8", "--attack-samples", "15",
          "--eval-samples", "15", "--no-progress"]
METRICS = {"dissimilarity", "topk_intersection", "spearman", "fooling_rate"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import torchvision
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("transfer")
    f = {"data": make_image_folder(root / "imgs", per_class=10)}
    torch.manual_seed(0)
    r18 = torchvision.models.resnet18(num_classes=3)
    f["r18"] = str(root / "r18.safetensors")
    save_file({k: v.contiguous() for k, v in r18.state_dict().items()}, f["r18"])
    f["small"] = str(root / "small.safetensors")
    save_file({k: v.contiguous() for k, v in make_model().state_dict().items()}, f["small"])
    return f


def _check_png(path):
    from matplotlib.image import imread
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    img = imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 400
    assert float(img[..., :3].std()) > 0.01


def test_transfer_cli_torchvision_and_small_cnn(files, tmp_path, capsys):
    out = tmp_path / "out"
    models = f"torchvision:resnet18={files['r18']},hardening_support:make_model={files['small']}"
    rc = main(["transfer", "--data", files["data"], "--models", models, "--num-classes", "3", "--out", str(out)]
              + COMMON)
    stdout = capsys.readouterr().out
    assert rc == 0
    doc = json.loads((out / "transfer.json").read_text())
    _check_png(out / "transfer.png")
    labels = ["torchvision:resnet18 [r18.safetensors]", "hardening_support:make_model [small.safetensors]"]
    assert doc["models"] == labels
    assert set(doc["matrix"]) == METRICS and set(doc["random"]) == METRICS
    for m, mat in doc["matrix"].items():
        assert len(mat) == 2 and all(len(row) == 2 for row in mat)
        assert len(doc["random"][m]) == 2
    for row in doc["matrix"]["fooling_rate"] + doc["matrix"]["topk_intersection"]:
        assert all(0.0 <= v <= 1.0 for v in row)
    rows = doc["results"]
    assert len(rows) == 4 and sum(r["white_box"] for r in rows) == 2
    for r in rows:  # the matrix is the rows, source x target
        i, j = labels.index(r["source"]), labels.index(r["target"])
        assert doc["matrix"]["dissimilarity"][i][j] == r["dissimilarity"]
        assert r["white_box"] == (i == j)
        # a target's samples are the ones it classifies correctly, whatever the source
        assert (r["n"], r["n_total"]) == (doc["n"][j], doc["n_total"][j])
    assert doc["n_total"] == [15, 15] and doc["n"][1] == 15 and 0 < doc["n"][0] <= 15
    assert doc["setup"]["eps_pixels"] == 8.0 and doc["setup"]["method"] == "UPI-Grad"
    assert "source \\ target" in stdout and "n 15/15" in stdout and f"n {doc['n'][0]}/15" in stdout
    assert "higher = stronger attack" in stdout
    assert f"wrote {out / 'transfer.json'}" in stdout


def test_transfer_repeated_models_option_and_left_out(files, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["transfer", "--data", files["data"], "--models", "hardening_support:make_model",
               "--models", "reporting_support:other_model", "--method", "pca", "--out", str(out)] + COMMON)
    stdout = capsys.readouterr().out
    assert rc == 0
    doc = json.loads((out / "transfer.json").read_text())
    assert doc["models"] == ["hardening_support:make_model", "reporting_support:other_model"]
    assert doc["n"][0] == 15 and 0 < doc["n"][1] < 15  # the other model misclassifies some images
    assert doc["samples"]["n"] == [r["n"] for r in doc["results"]]
    assert doc["samples"]["left_out"] == [15 - r["n"] for r in doc["results"]]
    assert "differs between rows" in stdout and doc["setup"]["method"] == "UPI-PCA"


def test_parse_models_and_labels():
    assert parse_models("torchvision:resnet18=a/r18.safetensors, digits") == [
        ("torchvision:resnet18", "a/r18.safetensors"), ("digits", None)]
    with pytest.raises(ValueError, match="SPEC or SPEC=WEIGHTS") as info:
        parse_models("torchvision:resnet18=")
    assert info.value.option == "--models"
    assert model_labels([("m:f", "x/w.pt"), ("m:f", "y/w.pt")]) == ["m:f [w.pt] #1", "m:f [w.pt] #2"]


@pytest.mark.parametrize("models,text", [
    ("torchvision:resnet18={missing}", "no such weights file"),
    ("torchvision:resnetXX", "unknown torchvision classification model"),
    ("torchvision:resnet18=", "SPEC or SPEC=WEIGHTS"),
    ("reporting_support:wrong_model", "classifies none of the samples"),
])
def test_transfer_bad_models_is_one_line(files, tmp_path, capsys, models, text):
    models = models.format(missing=tmp_path / "missing.safetensors")
    rc = main(["transfer", "--data", files["data"], "--models", models, "--out", str(tmp_path / "out")] + COMMON)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("upi-fast: error:")
    assert "--models" in err and text in err
    assert not (tmp_path / "out" / "transfer.json").exists()
