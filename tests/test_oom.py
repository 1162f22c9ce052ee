"""Running out of device memory: a clear error naming the batch size, or (``oom_retry`` /
``--oom-retry``) micro-batches of half the size whose results equal the unsplit computation.

Out-of-memory errors are simulated: a model (or the solver's step) that raises
``torch.OutOfMemoryError`` whenever it is given more samples than a limit."""
from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn

import upi_fast.solvers.upi_grad as upi_grad_mod
from upi_fast.cli import main
from upi_fast.io import load_perturbation
from upi_fast.solvers import BatchOutOfMemoryError, UPIGrad, UPIPCA
from upi_fast.solvers._microbatch import MicroBatcher, is_out_of_memory

from _tolerance import assert_close_scaled, f32_rtol
from hardening_support import make_image_folder, oom_model

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.numerics]


def _problem():
    """A float64 smooth model on 1 x 6 x 6 images and 20 images it classifies."""
    g = torch.Generator().manual_seed(2)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Softplus(beta=4), nn.Flatten(), nn.Linear(4 * 36, 3))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    m = m.double().eval()
    X = torch.rand(20, 1, 6, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = m(X).argmax(1)
    return m, X, y


def test_out_of_memory_is_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                         "memory: you tried to allocate 1099511627776 bytes"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("out of memory"))


def test_micro_batcher_halves_rewinds_generators_and_gives_up_at_one(caplog):
    calls = []
    gen = torch.Generator().manual_seed(0)

    def fn(lo, hi):
        calls.append((lo, hi))
        draw = torch.rand(1, generator=gen)
        if hi - lo > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return draw

    with pytest.raises(BatchOutOfMemoryError, match=r"batch of 10 samples: lower batch_size \(now 16, --batch-size\)"
                                                    r", or pass oom_retry=True \(--oom-retry\)") as info:
        MicroBatcher(False, 16).run(fn, 10, "the test")
    assert isinstance(info.value, torch.OutOfMemoryError) and info.value.batch_size == 16 and info.value.samples == 10
    mb = MicroBatcher(True, 16)
    calls.clear()
    gen.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="upi_fast"):
        parts = mb.run(fn, 10, "the test", generators=(gen,))
    assert [(lo, hi) for lo, hi, _ in parts] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert mb.limit == 2 and mb.retries == 2
    assert calls[:2] == [(0, 10), (0, 5)]
    assert "retrying in micro-batches of 5" in caplog.text and "retrying in micro-batches of 2" in caplog.text
    # the generator was rewound before each retry: the kept parts drew the first numbers of the stream
    gen.manual_seed(0)
    assert torch.equal(torch.cat([p for _, _, p in parts]), torch.rand(5, generator=gen))
    assert [(lo, hi) for lo, hi, _ in mb.run(fn, 3, "the test")] == [(0, 2), (2, 3)]  # the smaller size is kept
    with pytest.raises(BatchOutOfMemoryError, match="even for a micro-batch of 1 sample"):
        MicroBatcher(True, 4).run(lambda lo, hi: (_ for _ in ()).throw(RuntimeError("CUDA out of memory")), 4, "x")
    with pytest.raises(RuntimeError, match="shapes"):  # other errors pass through at once
        MicroBatcher(True, 4).run(lambda lo, hi: (_ for _ in ()).throw(RuntimeError("shapes")), 4, "x")


@pytest.mark.parametrize("kw", [dict(), dict(optimizer="adam", preserve_labels=0.5),
                                dict(saliency="integrated", saliency_kwargs={"steps": 3})])
def test_upi_grad_retry_equals_the_unsplit_run(kw, caplog):
    m, X, y = _problem()
    common = dict(epochs=2, batch_size=8, progress=False, seed=3, **kw)
    want = UPIGrad(m, 0.4, **common).fit((X, y))
    limit = 3 * (kw.get("saliency_kwargs", {}).get("steps", 1))  # integrated gradients: steps x samples per pass
    small = oom_model(limit, base=m)
    with pytest.raises(BatchOutOfMemoryError, match=r"lower batch_size \(now 8, --batch-size\)"):
        UPIGrad(small, 0.4, **common).fit((X, y))
    with caplog.at_level(logging.WARNING, logger="upi_fast"):
        got = UPIGrad(oom_model(limit, base=m), 0.4, oom_retry=True, **common).fit((X, y))
    assert "out of device memory" in caplog.text and "retrying in micro-batches of 2" in caplog.text
    assert got.micro_batch_ == 2 and want.micro_batch_ is None
    torch.testing.assert_close(got.delta_, want.delta_, rtol=1e-6, atol=1e-7)  # delta is float32
    torch.testing.assert_close(torch.tensor(got.history_), torch.tensor(want.history_), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fast", [False, True])
def test_upi_grad_retry_when_the_step_itself_runs_out(monkeypatch, fast):
    """The step (the HVP pass) runs out of memory, not the forward pass: monkeypatch the step (the
    reference ``_loss_grad``, or the prepared step of ``fast=True``, the default for an nn.Module)."""
    from upi_fast.solvers import _fast as fast_mod

    m, X, y = _problem()
    common = dict(epochs=1, batch_size=10, progress=False, seed=1, fast=fast, init="random")  # the ascent step alone
    want = UPIGrad(m, 0.4, **common).fit((X, y))
    owner, name = (fast_mod.FastSteps, "__call__") if fast else (upi_grad_mod, "_loss_grad")
    real = getattr(owner, name)

    def step(*args):
        x = args[2] if fast else args[1]  # (self, x, ...) or (model, x, ...)
        if x.shape[0] > 4:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
        return real(*args)

    monkeypatch.setattr(owner, name, step)
    with pytest.raises(BatchOutOfMemoryError, match="computing the attack gradient for a batch of 10 samples"):
        UPIGrad(m, 0.4, **common).fit((X, y))
    got = UPIGrad(m, 0.4, oom_retry=True, **common).fit((X, y))
    assert got.micro_batch_ == 2  # 10 -> 5 -> 2
    torch.testing.assert_close(got.delta_, want.delta_, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kw", [dict(solver="exact"), dict(solver="sketch", plus_lambda=1.0, rounds=2)])
def test_upi_pca_retry_equals_the_unsplit_run(kw):
    m, X, y = _problem()
    common = dict(batch_size=8, progress=False, seed=4, **kw)
    want = UPIPCA(m, 0.4, **common).fit((X, y))
    with pytest.raises(BatchOutOfMemoryError, match="--batch-size"):
        UPIPCA(oom_model(3, base=m), 0.4, **common).fit((X, y))
    got = UPIPCA(oom_model(3, base=m), 0.4, oom_retry=True, **common).fit((X, y))
    assert got.micro_batch_ == 2 and got.sign_ == want.sign_
    torch.testing.assert_close(got.delta_, want.delta_, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.singular_values_, want.singular_values_, rtol=1e-6, atol=1e-7)


def test_cli_oom_error_and_retry(tmp_path, capsys, monkeypatch, caplog):
    data = make_image_folder(tmp_path / "imgs", per_class=4)
    args = ["compute", "--data", data, "--size", "8", "--eps", "0.5", "--epochs", "2", "--batch-size", "6",
            "--attack-samples", "6", "--eval-samples", "6", "--no-progress", "--seed", "2"]
    assert main([*args, "--model", "hardening_support:make_model", "--out", str(tmp_path / "ref")]) == 0
    monkeypatch.setenv("UPI_TEST_OOM_LIMIT", "2")
    capsys.readouterr()
    assert main([*args, "--model", "hardening_support:oom_model", "--out", str(tmp_path / "fail")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--batch-size" in err[0] and "--oom-retry" in err[0] and "Traceback" not in err[0]
    assert main([*args, "--model", "hardening_support:oom_model", "--oom-retry", "--out", str(tmp_path / "ok")]) == 0
    assert "retrying in micro-batches" in caplog.text  # the upi_fast logger (stderr outside pytest)
    d_ref, _ = load_perturbation(tmp_path / "ref" / "upi.safetensors")
    d_ok, _ = load_perturbation(tmp_path / "ok" / "upi.safetensors")
    # float32 model (hardening_support.make_model: conv 3*3*3, linear 4*8*8 terms), both runs float32:
    # 4 passes per gradient (forward, map, HVP) for each of the 2 steps (2 epochs of one batch of 6)
    assert_close_scaled(d_ok, d_ref, f32_rtol([27, 256], depth=4 * 2, pair=True), "micro-batched CLI delta")
    assert os.path.exists(tmp_path / "ok" / "report.json")
