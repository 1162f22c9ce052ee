"""The backend switch of the custom ops (``set_backend`` / ``UPI_FAST_BACKEND`` / ``auto``) and the
whole saliency-attack pipeline run through the Triton kernels under the interpreter."""
import importlib
import logging
import os
import subprocess
import sys

import pytest
import torch

import upi_fast
import upi_fast.ops as ops
from _models import relu_cnn
from _tolerance import f32_rtol

# float results compared between code paths: rerun by .ci/run with other CPU kernels forced
pytestmark = pytest.mark.numerics

TRITON_OPS = ("softplus", "softplus_backward", "softplus_double_backward", "saliency_dissim", "sketch_update")


def test_unknown_and_unavailable_backends_raise_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="backend must be one of"):
        upi_fast.set_backend("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="'cuda' is unavailable"):
            upi_fast.set_backend("cuda")
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="'triton' is unavailable: no CUDA device.*TRITON_INTERPRET"):
            upi_fast.set_backend("triton")
    monkeypatch.setattr(ops, "_triton_importable", lambda: False)
    assert upi_fast.backends()["triton"] is False
    with pytest.raises(RuntimeError, match="triton package is not installed"):
        upi_fast.set_backend("triton")
    assert upi_fast.get_backend() in ops.BACKENDS  # a failed request changes nothing


def test_environment_variable_selects_the_backend(monkeypatch):
    monkeypatch.setitem(ops._state, "backend", None)
    monkeypatch.setenv("UPI_FAST_BACKEND", "torch")
    assert upi_fast.get_backend() == "torch"
    monkeypatch.setitem(ops._state, "backend", None)
    monkeypatch.setenv("UPI_FAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="UPI_FAST_BACKEND"):
        upi_fast.get_backend()
    monkeypatch.setitem(ops._state, "backend", "auto")


def test_resolution_per_device_and_quiet_fallback(monkeypatch, caplog):
    upi_fast.set_backend("auto")
    assert ops.resolve_backend("cpu") == "torch"          # auto: CPU tensors always use torch
    upi_fast.set_backend("triton")                        # available here through the interpreter
    assert ops.resolve_backend("cpu") == "triton"
    assert ops.resolve_backend("cuda") == "triton"
    upi_fast.set_backend("torch")
    assert ops.resolve_backend("cuda") == "torch"
    # auto on a CUDA tensor: cuda, else triton, else torch, each fall-back logged once at DEBUG.
    monkeypatch.setitem(ops._state, "backend", "auto")
    monkeypatch.setitem(ops._state, "logged", set())
    avail = {"torch": True, "triton": True, "cuda": True}
    monkeypatch.setattr(ops, "backends", lambda: dict(avail))
    with caplog.at_level(logging.DEBUG, logger="upi_fast"):
        assert ops.resolve_backend("cuda") == "cuda"
        assert not caplog.records
        avail["cuda"] = False
        assert ops.resolve_backend("cuda") == "triton"
        avail["triton"] = False
        assert ops.resolve_backend("cuda") == "torch"
    messages = [r.getMessage() for r in caplog.records]
    assert all(r.levelno == logging.DEBUG for r in caplog.records)
    assert any("'cuda' unavailable" in m for m in messages) and any("'triton' unavailable" in m for m in messages)


def _op_inputs(op: str, gen: torch.Generator):
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    if op == "softplus":
        return (r(7, 5) * 0.4, 3.0)
    if op == "softplus_backward":
        return (r(7, 5), r(7, 5) * 0.4, 3.0)
    if op == "softplus_double_backward":
        return (r(7, 5), r(7, 5), r(7, 5) * 0.4, 3.0)
    if op == "saliency_dissim":
        ref = torch.rand(3, 30, generator=gen, dtype=torch.float64)
        return (r(3, 2, 5, 6), ref / ref.sum(1, keepdim=True), "rel_l2", True)
    return (torch.zeros(6, 23, dtype=torch.float64), r(9, 23), 5, 11, True)  # sketch_update


def _run_op(op: str, args):
    args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    out = getattr(torch.ops.upi_fast, op)(*args)
    return args[0] if op == "sketch_update" else out  # sketch_update: W, updated in place


def test_switching_backends_on_cpu_changes_the_implementation_not_the_registrations():
    """Back and forth between torch / triton / auto: every op on CPU tensors equals its reference
    (exactly on torch and auto, which call it; to float64 rounding on the Triton kernels under the
    interpreter), and the dispatcher's table of every ``upi_fast::`` op stays as it was: one
    registration per key (the dispatcher for CPU and CUDA, the reference as the default kernel)."""
    gen = torch.Generator().manual_seed(0)
    inputs = {op: _op_inputs(op, gen) for op in TRITON_OPS}
    want = {}
    for op in TRITON_OPS:
        args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in inputs[op])
        out = ops.table.load(ops.table.by_name(op).torch)(*args)
        want[op] = args[0] if op == "sketch_update" else out
    dumps = {op: torch._C._dispatch_dump(f"upi_fast::{op}") for op in TRITON_OPS}
    for op, dump in dumps.items():
        keys = [line.split(":")[0] for line in dump.splitlines() if ": registered at" in line
                and not line.startswith("debug")]
        assert "CUDA (inactive)" not in keys and "CPU (inactive)" not in keys, dump
        assert len(keys) == len(set(keys)) and {"CPU", "CUDA", "CompositeExplicitAutograd[alias]"} <= set(keys), dump
    try:
        for name in ("torch", "triton", "auto", "triton", "torch", "triton", "auto"):
            upi_fast.set_backend(name)
            for op in TRITON_OPS:
                got = _run_op(op, inputs[op])
                pairs = zip(got, want[op]) if isinstance(got, tuple) else [(got, want[op])]
                for g, w in pairs:
                    if name == "triton":
                        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-13 * w.abs().max().item())
                    else:
                        assert torch.equal(g, w), (name, op)
                assert torch._C._dispatch_dump(f"upi_fast::{op}") == dumps[op], (name, op)
    finally:
        upi_fast.set_backend("auto")


def test_importing_upi_fast_does_not_import_triton():
    code = "import sys, upi_fast; assert 'triton' not in sys.modules, 'triton imported'; print('ok')"
    env = {k: v for k, v in os.environ.items() if k != "UPI_FAST_BACKEND"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


def _spy_all(monkeypatch):
    calls = {op: 0 for op in TRITON_OPS}
    for op in TRITON_OPS:
        spec = ops._REGISTRY[op]["triton"]
        fn = spec if callable(spec) else getattr(importlib.import_module(spec.split(":")[0]), spec.split(":")[1])

        def wrapped(*args, _fn=fn, _op=op):
            calls[_op] += 1
            return _fn(*args)

        monkeypatch.setitem(ops._REGISTRY[op], "triton", wrapped)
    return calls


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_saliency_loss_grad_end_to_end_triton_matches_torch(monkeypatch, dtype):
    """``saliency_loss_grad`` (reverse-over-reverse HVPs through a softplus-surrogate ReLU CNN, fused
    dissimilarity) with every op on the Triton kernels equals the torch backend: to rounding in
    float64 (the kernels compute in float64), to float32 accuracy in float32."""
    model = relu_cnn(channels=2, size=(9, 7), dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 9, 7, generator=gen, dtype=torch.float64).to(dtype)
    y = torch.tensor([0, 3, 1])
    delta = (0.05 * torch.randn(2, 9, 7, generator=gen, dtype=torch.float64)).to(dtype)
    calls = _spy_all(monkeypatch)
    calls.pop("sketch_update")
    kinds = ("l2", "rel_l2", "cosine") if dtype == torch.float64 else ("rel_l2",)
    results = {}
    for backend in ("torch", "triton"):
        upi_fast.set_backend(backend)
        with upi_fast.softplus_surrogate(model, beta=10.0):
            I_ref = upi_fast.saliency(model, x, y)
            for kind in kinds:
                results[backend, kind] = upi_fast.saliency_loss_grad(model, x, y, I_ref, delta, kind,
                                                                     "double_backward")
            results[backend, "fd"] = upi_fast.saliency_loss_grad(model, x, y, I_ref, delta, "l2",
                                                                 "finite_difference")
        if backend == "torch":
            assert not any(calls.values()), f"torch backend reached Triton: {calls}"
    assert all(calls.values()), f"some ops did not run on Triton: {calls}"
    # float64: to rounding (far above sqrt(n) eps64). float32: relu_cnn(2, (9, 7)) reductions (conv 2*9, conv
    # 6*9, linear 6*9*7, linear 16) in the 4 passes of a double-backward gradient, kernels vs torch (pair):
    # 1.3e-4 elementwise, with the tensor's scale as the absolute floor
    rtol = 1e-9 if dtype == torch.float64 else f32_rtol([18, 54, 378, 16], depth=4, pair=True)
    for key in results:
        if key[0] != "torch":
            continue
        (l0, g0), (l1, g1) = results[key], results["triton", key[1]]
        assert torch.isfinite(g1).all() and g1.abs().max() > 0
        torch.testing.assert_close(l1, l0, rtol=rtol, atol=rtol * l0.abs().max().item())
        torch.testing.assert_close(g1, g0, rtol=rtol, atol=rtol * g0.abs().max().item())


def test_upi_pca_with_streaming_sketch_triton_matches_torch(monkeypatch):
    """A solver end to end (UPI-PCA, softplus surrogate, reverse-over-reverse directions, the
    single-pass sketch): with the triton backend every op, the sketch update included, runs on the
    kernels, and the perturbation equals the torch backend's to float32 accuracy."""
    from upi_fast.solvers import UPIPCA
    model = relu_cnn(channels=1, size=(8, 8), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(24, 1, 8, 8, generator=gen)
    y = torch.randint(0, 5, (24,), generator=gen)
    calls = _spy_all(monkeypatch)
    deltas = {}
    for backend in ("torch", "triton"):
        upi_fast.set_backend(backend)
        solver = UPIPCA(model, 0.5, surrogate="softplus", solver="sketch", progress=False, batch_size=12, seed=1)
        deltas[backend] = solver.fit((X, y)).delta_.flatten()
        if backend == "torch":
            assert not any(calls.values()), f"torch backend reached Triton: {calls}"
    assert all(calls.values()), f"some ops did not run on Triton: {calls}"
    a, b = deltas["torch"], deltas["triton"]
    assert torch.dot(a, b) / (a.norm() * b.norm()) > 1 - 1e-6
    torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3 * a.abs().max().item())
