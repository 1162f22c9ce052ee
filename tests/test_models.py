"""Models: the cached digits CNN, load_model specs and safe weights loading."""
import os
import pickle
import sys
import types
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from upi_fast.data import digits
from upi_fast.models import (DIGITS_ARCH, Normalized, build_digits_cnn, digits_cnn, digits_cnn_cache_path,
                             load_model, load_state_dict_file, model_name)


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """One training per test session, into a fresh cache folder: (cache_dir, model)."""
    cache = tmp_path_factory.mktemp("upi_fast_cache")
    return cache, digits_cnn(cache_dir=cache)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_digits_cnn_accuracy_and_form(digits_cache):
    _, model = digits_cache
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    kinds = {type(m) for m in model.modules()} - {nn.Sequential}
    assert kinds <= {nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Linear}  # piecewise linear
    X, y = digits().eval
    with torch.no_grad():
        acc = (model(X).argmax(1) == y).float().mean().item()
    assert acc >= 0.95
    assert model_name(model) == "digits(size=16, seed=0)"


def test_digits_cnn_cache_round_trip(digits_cache):
    cache, model = digits_cache
    path = digits_cnn_cache_path(cache, 16, 0)
    assert path.is_file() and DIGITS_ARCH in path.name and "size16" in path.name and "seed0" in path.name
    assert sorted(p.name for p in cache.iterdir()) == [path.name]  # atomic write left no temp file
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid cache loads without warning
        again = digits_cnn(cache_dir=cache)
    assert again is not model and _same_weights(again, model)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "stale"])
def test_digits_cnn_corrupt_cache_is_retrained(digits_cache, tmp_path, damage, monkeypatch):
    import copy

    import upi_fast.models as models

    cache, model = digits_cache
    good = digits_cnn_cache_path(cache, 16, 0).read_bytes()
    path = digits_cnn_cache_path(tmp_path, 16, 0)
    if damage == "truncate":
        bad = good[: len(good) // 2]
    elif damage == "flip":  # one weight byte changed: still a valid safetensors file
        bad = bytearray(good)
        bad[-100] ^= 0xFF
        bad = bytes(bad)
    elif damage == "stale":  # valid file, other architecture / metadata
        save_file(build_digits_cnn(8).state_dict(), str(path), metadata={"arch": DIGITS_ARCH, "size": "8"})
        bad = path.read_bytes()
    else:
        bad = os.urandom(1000)
    path.write_bytes(bad)
    if damage == "flip":  # detected by the checksum only
        from safetensors.torch import load_file
        assert len(load_file(str(path))) == len(model.state_dict())
    calls = []

    def fake_train(size, seed, progress):  # retraining itself is covered by the session fixture
        calls.append((size, seed))
        return copy.deepcopy(model), 0.97

    monkeypatch.setattr(models, "_train_digits", fake_train)
    with pytest.warns(UserWarning, match="corrupt or stale"):
        fixed = digits_cnn(cache_dir=tmp_path)
    assert calls == [(16, 0)] and _same_weights(fixed, model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reloaded = digits_cnn(cache_dir=tmp_path)  # the replaced cache file is valid
    assert calls == [(16, 0)] and _same_weights(reloaded, model)
    digits_cnn(cache_dir=tmp_path, retrain=True)
    assert len(calls) == 2


def test_digits_cnn_keeps_global_rng(digits_cache):
    cache, _ = digits_cache
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    digits_cnn(cache_dir=cache)
    assert torch.equal(before, torch.random.get_rng_state())


def test_load_model_digits(digits_cache, tmp_path, monkeypatch):
    cache, model = digits_cache
    monkeypatch.setenv("UPI_FAST_CACHE", str(cache))
    m = load_model("digits")
    assert _same_weights(m, model) and not m.training
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    m2 = load_model("digits", weights=tmp_path / "w.safetensors")
    assert _same_weights(m2, model)
    with pytest.raises(ValueError, match="10 classes"):
        load_model("digits", num_classes=5)


def test_torchvision_random_and_weights_round_trip(tmp_path):
    torch.manual_seed(0)
    m = load_model("torchvision:resnet18", num_classes=7)
    assert isinstance(m, nn.Module) and not m.training
    assert m.fc.out_features == 7 and model_name(m) == "torchvision:resnet18"
    sd = m.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "r.safetensors"))
    torch.save(sd, tmp_path / "r.pt")
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "ckpt.pth")
    for f in ("r.safetensors", "r.pt", "ckpt.pth"):
        m2 = load_model("torchvision:resnet18", weights=tmp_path / f, num_classes=7)
        assert _same_weights(m2, m) and not m2.training, f
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m2(x), m(x))
    assert "r.pt" in model_name(m2) or "ckpt.pth" in model_name(m2)


def test_weights_mismatch_lists_keys(tmp_path):
    m = load_model("torchvision:resnet18", num_classes=7)
    sd = m.state_dict()
    sd.pop("fc.bias")
    sd["extra.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ValueError, match=r"missing keys \(1\): \['fc.bias'\].*unexpected keys \(1\): \['extra.weight'\]"):
        load_model("torchvision:resnet18", weights=tmp_path / "w.safetensors", num_classes=7)
    # without num_classes the head's size comes from the weights (issue 16); a num_classes that
    # disagrees with them names both
    from upi_fast.models import model_num_classes
    assert model_num_classes(load_model("torchvision:resnet18", weights=_save_pt(tmp_path, m.state_dict())))[0] == 7
    with pytest.raises(ValueError, match=r"num_classes=1000 does not match.*fc.weight has shape \(7, 512\)"):
        load_model("torchvision:resnet18", weights=_save_pt(tmp_path, m.state_dict()), num_classes=1000)


def _save_pt(tmp_path, sd):
    p = tmp_path / "w.pt"
    torch.save(sd, p)
    return p


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pt_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Evil(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(ValueError, match="refusing to load weights"):
        load_model("torchvision:resnet18", weights=evil)
    with pytest.raises(ValueError, match="refusing"):
        load_state_dict_file(evil)
    raw = tmp_path / "raw.pkl"  # a bare (non-zip) pickle
    raw.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    with pytest.raises(ValueError, match="refusing"):
        load_state_dict_file(raw)
    assert not marker.exists()


def test_weights_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_model("torchvision:resnet18", weights=tmp_path / "missing.pt")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(64))
    with pytest.raises(ValueError, match="safetensors"):
        load_state_dict_file(junk)
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="state dict"):
        load_state_dict_file(tmp_path / "list.pt")


def test_bad_specs():
    with pytest.raises(ValueError, match="resnet18"):
        load_model("torchvision:resnet19")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        load_model("no_such_module_xyz:build")
    with pytest.raises(ValueError, match="has no attribute"):
        load_model("torch.nn:NoSuchThing")
    with pytest.raises(ValueError, match="must be 'digits'"):
        load_model("resnet18")
    with pytest.raises(TypeError, match="spec"):
        load_model(None)
    with pytest.raises(ValueError, match="num_classes"):
        load_model("torchvision:resnet18", num_classes=0)
    mod = types.ModuleType("_upi_fast_test_factories")
    mod.not_a_module = lambda: 42
    mod.tiny = lambda: nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    sys.modules[mod.__name__] = mod
    try:
        with pytest.raises(ValueError, match="not an nn.Module"):
            load_model("_upi_fast_test_factories:not_a_module")
        m = load_model("_upi_fast_test_factories:tiny")
        assert isinstance(m, nn.Sequential) and model_name(m) == "_upi_fast_test_factories:tiny"
    finally:
        del sys.modules[mod.__name__]


def test_normalized_wrapper():
    inner = build_digits_cnn(8)
    m = load_model("torch.nn:Identity", mean=[0.5], std=[0.25])
    assert isinstance(m, Normalized) and "normalized" in model_name(m)
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(m(x), (x - 0.5) / 0.25)
    w = Normalized(inner, [0.1, 0.2, 0.3], [1.0, 2.0, 4.0])
    assert set(w.state_dict()) == {"model." + k for k in inner.state_dict()}  # mean/std not persisted
    y = torch.rand(1, 3, 4, 4)
    z = Normalized(nn.Identity(), [0.1, 0.2, 0.3], [1.0, 2.0, 4.0]).double()(y.double())
    assert z.dtype == torch.float64
    assert torch.allclose(z[0, 2], (y[0, 2].double() - 0.3) / 4.0)
    with pytest.raises(ValueError, match="std must be > 0"):
        Normalized(inner, [0.0], [0.0])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        w(torch.rand(1, 1, 8, 8))
