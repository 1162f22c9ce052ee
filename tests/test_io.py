"""Perturbation files (safetensors + metadata) and atomic writes."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from upi_fast import __version__
from upi_fast.io import (FORMAT, load_perturbation, save_perturbation, to_jsonable, write_bytes_atomic,
                         write_json_atomic, write_text_atomic)


def test_round_trip(tmp_path):
    delta = torch.randn(3, 5, 7)
    path = tmp_path / "sub" / "delta.safetensors"  # parent created
    save_perturbation(path, delta, {"method": "upi_grad", "eps": 0.5, "norm": "l2", "model": "digits",
                                    "mean": torch.tensor([0.25, 0.5, 0.75]), "std": (1.0, 2.0, 4.0),
                                    "epochs": 20, "note": None, "nested": {"a": [1, 2]}})
    d, meta = load_perturbation(path, expected_shape=(3, 5, 7))
    assert d.dtype == torch.float32 and torch.equal(d, delta)
    assert meta["format"] == FORMAT and meta["upi_fast_version"] == __version__
    assert meta["method"] == "upi_grad" and meta["eps"] == 0.5 and meta["norm"] == "l2" and meta["model"] == "digits"
    assert meta["input_shape"] == [3, 5, 7]
    assert meta["mean"] == [0.25, 0.5, 0.75] and meta["std"] == [1.0, 2.0, 4.0]
    assert meta["epochs"] == 20 and meta["note"] is None and meta["nested"] == {"a": [1, 2]}
    assert meta["created"].endswith("+00:00")
    assert sorted(os.listdir(path.parent)) == ["delta.safetensors"]  # no temp file left


def test_float64_delta_stored_as_float32_and_defaults(tmp_path):
    delta = torch.randn(1, 4, 4, dtype=torch.float64)
    save_perturbation(tmp_path / "d.safetensors", delta, {})
    d, meta = load_perturbation(tmp_path / "d.safetensors")
    assert d.dtype == torch.float32 and torch.allclose(d.double(), delta, atol=1e-6)
    for k in ("method", "eps", "norm", "model", "mean", "std"):
        assert k in meta and meta[k] is None


def test_atomic_write_crash_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "delta.safetensors"

    def boom(src, dst):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        save_perturbation(path, torch.randn(1, 3, 3), {"method": "x"})
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_crash_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "delta.safetensors"
    old = torch.randn(1, 3, 3)
    save_perturbation(path, old, {"method": "old"})
    monkeypatch.setattr(os, "replace", lambda s, d: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        save_perturbation(path, torch.zeros(1, 3, 3), {"method": "new"})
    monkeypatch.undo()
    d, meta = load_perturbation(path)
    assert torch.equal(d, old) and meta["method"] == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["delta.safetensors"]


@pytest.mark.parametrize("cut", [1, 7, 50, -1])
def test_truncated_file_rejected(tmp_path, cut):
    path = tmp_path / "d.safetensors"
    save_perturbation(path, torch.randn(2, 4, 4), {"method": "m"})
    raw = path.read_bytes()
    path.write_bytes(raw[:cut] if cut > 0 else raw[:cut])
    with pytest.raises(ValueError, match="not a valid perturbation file"):
        load_perturbation(path)


def test_random_bytes_rejected(tmp_path):
    path = tmp_path / "d.safetensors"
    path.write_bytes(os.urandom(300))
    with pytest.raises(ValueError, match="not a valid perturbation file"):
        load_perturbation(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_perturbation(tmp_path / "nope.safetensors")


def test_wrong_shape(tmp_path):
    path = tmp_path / "d.safetensors"
    save_perturbation(path, torch.randn(1, 4, 4), {})
    with pytest.raises(ValueError, match=r"\(1, 4, 4\).*\(3, 4, 4\)"):
        load_perturbation(path, expected_shape=(3, 4, 4))


def _marked(**extra):
    return {"format": FORMAT, **{k: json.dumps(v) for k, v in extra.items()}}


def test_int_delta_rejected(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({"delta": torch.ones(1, 2, 2, dtype=torch.int32)}, str(path), metadata=_marked())
    with pytest.raises(ValueError, match="floating point"):
        load_perturbation(path)
    with pytest.raises(TypeError, match="floating"):
        save_perturbation(tmp_path / "e.safetensors", torch.ones(1, 2, 2, dtype=torch.int32), {})


def test_other_safetensors_rejected(tmp_path):
    other = tmp_path / "weights.safetensors"
    save_file({"weight": torch.randn(1, 2, 2)}, str(other))  # no marker
    with pytest.raises(ValueError, match="marker"):
        load_perturbation(other)
    wrong_key = tmp_path / "wk.safetensors"
    save_file({"weight": torch.randn(1, 2, 2)}, str(wrong_key), metadata=_marked())
    with pytest.raises(ValueError, match="exactly one tensor 'delta'"):
        load_perturbation(wrong_key)
    extra = tmp_path / "extra.safetensors"
    save_file({"delta": torch.randn(1, 2, 2), "more": torch.randn(2)}, str(extra), metadata=_marked())
    with pytest.raises(ValueError, match="exactly one tensor 'delta'"):
        load_perturbation(extra)
    flat = tmp_path / "flat.safetensors"
    save_file({"delta": torch.randn(4)}, str(flat), metadata=_marked())
    with pytest.raises(ValueError, match="3 dims"):
        load_perturbation(flat)


def test_nonfinite_rejected(tmp_path):
    bad = torch.randn(1, 3, 3)
    bad[0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        save_perturbation(tmp_path / "d.safetensors", bad, {})
    assert list(tmp_path.iterdir()) == []
    bad[0, 1, 1] = float("inf")
    path = tmp_path / "inf.safetensors"
    save_file({"delta": bad}, str(path), metadata=_marked())
    with pytest.raises(ValueError, match="NaN or Inf"):
        load_perturbation(path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        save_perturbation(tmp_path / "d.safetensors", torch.randn(2, 1, 3, 3), {})
    with pytest.raises(TypeError, match="torch.Tensor"):
        save_perturbation(tmp_path / "d.safetensors", [[[0.0]]], {})
    with pytest.raises(TypeError, match="metadata\\['fn'\\]"):
        save_perturbation(tmp_path / "d.safetensors", torch.randn(1, 2, 2), {"fn": object()})
    with pytest.raises(ValueError, match="reserved"):
        save_perturbation(tmp_path / "d.safetensors", torch.randn(1, 2, 2), {"format": "x"})
    assert list(tmp_path.iterdir()) == []


def test_json_and_text_helpers(tmp_path, monkeypatch):
    import numpy as np
    obj = {"a": torch.tensor([1.5, 2.0]), "b": np.float32(0.25), "c": (1, 2), "d": tmp_path / "x", "e": np.arange(2)}
    write_json_atomic(tmp_path / "r.json", obj)
    back = json.loads((tmp_path / "r.json").read_text())
    assert back == {"a": [1.5, 2.0], "b": 0.25, "c": [1, 2], "d": str(tmp_path / "x"), "e": [0, 1]}
    write_text_atomic(tmp_path / "t.txt", "héllo\n")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    with pytest.raises(TypeError, match="cannot encode"):
        to_jsonable({"x": object()})
    with pytest.raises(TypeError, match="bytes"):
        write_bytes_atomic(tmp_path / "b", "text")
    with pytest.raises(IsADirectoryError):
        write_bytes_atomic(tmp_path, b"x")
    # a failing write (disk full) removes the temp file and keeps the old content
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(tmp_path / "t.txt", "new")
    monkeypatch.undo()
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "t.txt"]
