"""The command line's round trip on a small local ImageFolder (issue 16): ``compute`` with a
torchvision model whose 3-class head is read from a weights file (no ``--num-classes``), the
perturbation file carrying what evaluation needs, ``evaluate FILE`` and ``show FILE`` taking size,
normalisation and saliency settings from it (a disagreeing flag is used and warned about), a class
count that does not match the data as a one-line error, and the resizing message."""
from __future__ import annotations

import hashlib
import json
import os
import warnings

import numpy as np
import pytest
import torch

from upi_fast.cli import main
from upi_fast.io import EVALUATION_DEFAULTS, evaluation_settings, load_perturbation, save_perturbation

torchvision = pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")

MEAN, STD = "0.485,0.456,0.406", "0.229,0.224,0.225"


def _folder(root, classes, per_class, size=24, seed=0):
    """Noise images whose class shows in their colour (class i: channel i % 3 bright)."""
    rng = np.random.default_rng(seed)
    for k, c in enumerate(classes):
        os.makedirs(root / c, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 120, (size, size, 3))
            img[..., k % 3] += 135
            Image.fromarray(img.astype(np.uint8)).save(root / c / f"{i}.png")
    return str(root)


def _trained_resnet18(data: str) -> "torch.nn.Module":
    """A resnet18 with a 3-class head, fitted in a few steps to the colour-coded images (so that the
    pipeline finds correctly classified samples), in eval mode."""
    from upi_fast.data import open_dataset
    ds = open_dataset(data, size=32)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net.train()
    for _ in range(25):
        loss = torch.nn.functional.cross_entropy(net((x - mean) / std), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # BatchNorm statistics of these images exactly (a cumulative average)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        net((x - mean) / std)
    net.eval()
    with torch.no_grad():
        acc = float((net((x - mean) / std).argmax(1) == y).float().mean())
    assert acc >= 0.9, acc  # the fixture's premise
    return net


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp("roundtrip")
    data = _folder(root / "data", ("cat", "dog", "fox"), 6)
    data5 = _folder(root / "data5", ("a", "b", "c", "d", "e"), 1, seed=1)
    with torch.random.fork_rng(devices=[]):
        net = _trained_resnet18(data)
    weights = root / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    return {"root": root, "data": data, "data5": data5, "weights": str(weights)}


def _run(capsys, argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _model_args(world, *extra):
    return ["--model", "torchvision:resnet18", "--weights", world["weights"], *extra]


@pytest.fixture(scope="module")
def computed(world):
    """``compute`` once: 3-class head from the weights, images resized 24 -> 32, ImageNet normalisation."""
    import contextlib
    import io as _io
    out = world["root"] / "out"
    argv = ["compute", "--data", world["data"], *_model_args(world, "--size", "32", "--mean", MEAN, "--std", STD),
            "--eps-pixels", "8", "--epochs", "1", "--attack-samples", "6", "--eval-samples", "12",
            "--batch-size", "6", "--no-progress", "--out", str(out)]
    buf_out, buf_err = _io.StringIO(), _io.StringIO()
    with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        rc = main(argv)
    assert rc == 0, buf_err.getvalue()
    return {"path": str(out / "upi.safetensors"), "stdout": buf_out.getvalue(), "stderr": buf_err.getvalue()}


def test_compute_infers_classes_and_records_what_evaluation_needs(world, computed):
    assert "resizing images from 24x24 to 32x32" in computed["stdout"] and "--size 32" in computed["stdout"]
    delta, meta = load_perturbation(computed["path"])
    assert tuple(delta.shape) == (3, 32, 32)
    assert meta["input_shape"] == [3, 32, 32] and meta["size"] == 32
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert (meta["saliency"], meta["target_kind"], meta["integration"]) == ("simple", "prob", "uniform_endpoints")
    assert meta["steps"] == 10 and meta["smoothgrad_std"] == 0.15 and meta["smoothgrad_samples"] == 10
    assert meta["eps_units"] == "pixels [0, 1]" and meta["norm"] == "2" and meta["eps_pixels"] == 8.0
    assert meta["eps"] == pytest.approx(8 / 255 * (3 * 32 * 32) ** 0.5)
    assert meta["model"] == "torchvision:resnet18" and meta["weights"] == "r18.safetensors"
    with open(world["weights"], "rb") as f:
        assert meta["weights_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert meta["num_classes"] == 3  # from fc.weight (3, 512), no --num-classes given


def test_evaluate_takes_size_normalisation_and_saliency_from_the_file(world, computed, capsys):
    out = world["root"] / "ev"
    rc, stdout, err = _run(capsys, ["evaluate", computed["path"], "--data", world["data"], *_model_args(world),
                                    "--eval-samples", "18", "--out", out])
    assert rc == 0, err
    assert "warning" not in err
    assert "from upi.safetensors: --size 32, --mean 0.485,0.456,0.406, --std 0.229,0.224,0.225" in stdout
    assert "resizing images from 24x24 to 32x32" in stdout and "size 32 from upi.safetensors" in stdout
    setup = json.loads((out / "evaluation.json").read_text())["setup"]
    assert setup["size"] == 32
    assert setup["mean"] == pytest.approx([0.485, 0.456, 0.406]) and setup["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert setup["saliency"] == "simple" and setup["target_kind"] == "prob"
    assert {"size", "mean", "std", "saliency", "target_kind"} <= set(setup["from perturbation file"])
    assert "integration" not in setup["from perturbation file"]  # does not apply to the simple gradient


def test_a_flag_that_disagrees_with_the_file_is_used_with_a_warning(world, computed, capsys):
    out = world["root"] / "ev_flag"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        rc, stdout, err = _run(capsys, ["evaluate", computed["path"], "--data", world["data"], *_model_args(world),
                                        "--mean", "0.5,0.5,0.5", "--target-kind", "logit", "--eval-samples", "18",
                                        "--out", out])
    assert rc == 0, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    mean_warn = [ln for ln in lines if "--mean" in ln]
    assert len(mean_warn) == 1 and mean_warn[0].startswith("upi-fast: warning: ")
    assert "0.5,0.5,0.5" in mean_warn[0] and "0.485,0.456,0.406" in mean_warn[0]
    assert any("--target-kind logit" in ln and "prob" in ln for ln in lines)
    setup = json.loads((out / "evaluation.json").read_text())["setup"]
    assert setup["mean"] == [0.5, 0.5, 0.5] and setup["target_kind"] == "logit"
    assert setup["std"] == pytest.approx([0.229, 0.224, 0.225])  # still the file's


def test_a_size_that_cannot_fit_the_file_is_one_line(world, computed, capsys):
    rc, _, err = _run(capsys, ["evaluate", computed["path"], "--data", world["data"], *_model_args(world),
                               "--size", "64"])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("upi-fast: error: ")
    assert "--size 64" in lines[0] and "(3, 32, 32)" in lines[0]


def test_show_uses_the_files_settings(world, computed, capsys):
    out = world["root"] / "show"
    rc, stdout, err = _run(capsys, ["show", computed["path"], "--data", world["data"], *_model_args(world),
                                    "--n", "3", "--out", out])
    assert rc == 0, err
    assert "from upi.safetensors: --size 32" in stdout
    assert (out / "upi.png").is_file() and (out / "upi_examples.png").is_file()


def test_class_count_mismatch_is_one_line(world, computed, capsys):
    rc, _, err = _run(capsys, ["evaluate", computed["path"], "--data", world["data5"], *_model_args(world)])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith("upi-fast: error: --data: ")
    assert "5 classes" in lines[0] and "fc.weight (3, 512)" in lines[0]
    # --num-classes against the weights
    rc, _, err = _run(capsys, ["compute", "--data", world["data"], *_model_args(world, "--num-classes", "4"),
                               "--size", "32", "--eps", "1", "--out", world["root"] / "never"])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "--num-classes" in lines[0] and "3 classes" in lines[0], err
    assert not (world["root"] / "never").exists()


def test_default_size_is_announced(world):
    """Without --size an ImageFolder's images are resized to 224, and the log says so (from what to what)."""
    from upi_fast.pipeline import _open
    lines = []
    ds = _open(world["data"], None, lines.append)
    assert tuple(ds[0][0].shape) == (3, 224, 224)
    assert len(lines) == 1 and lines[0].startswith("resizing images from 24x24 to 224x224") and "--size" in lines[0]
    lines.clear()
    _open(world["data"], 24, lines.append)
    assert lines == []  # stored size: nothing to say


def test_torchvision_without_weights_gets_the_datas_class_count(world):
    from upi_fast.models import model_num_classes
    from upi_fast.pipeline import _model, _open
    ds = _open(world["data5"], 32)
    assert model_num_classes(_model("torchvision:resnet18", None, None, None, None, ds, world["data5"]))[0] == 5


def test_evaluation_settings_of_a_bare_file(tmp_path):
    """A file saved without metadata: size from the delta's shape, no normalisation, defaults otherwise."""
    save_perturbation(tmp_path / "p.safetensors", torch.zeros(3, 16, 16))
    delta, meta = load_perturbation(tmp_path / "p.safetensors")
    st = evaluation_settings(meta, tuple(delta.shape))
    assert st == {"size": 16, "mean": None, "std": None}
    assert EVALUATION_DEFAULTS["saliency"] == "simple"
    bad = evaluation_settings({"input_shape": [3, 8, 8], "mean": "x", "saliency": "magic", "steps": -1})
    assert bad == {"size": 8}
