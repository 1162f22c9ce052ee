"""Data parallelism: two gloo processes on the CPU (loopback) against one process.

One spawn runs every distributed case (the solvers through the API, an interrupted and resumed
2-process run, and ``upi-fast compute`` started from a torchrun-like environment); the parent
computes the single-process references and compares.
"""
import contextlib
import json
import os
import pickle
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from upi_fast import distributed as D
from upi_fast.solvers import UPIGrad, UPIPCA

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------------ shared helpers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny():
    """A smooth 3-class CNN on 1 x 6 x 6 images; ``y`` its own predictions, ``y_mixed`` with every
    5th label wrong (so the processes keep different numbers of samples per batch)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Softplus(beta=4), nn.Flatten(), nn.Linear(4 * 36, 3)).eval()
    X = torch.rand(40, 1, 6, 6)
    with torch.no_grad():
        y = m(X).argmax(1)
    y_mixed = y.clone()
    y_mixed[::5] = (y_mixed[::5] + 1) % 3
    return m, X, y, y_mixed


def rgb_model() -> nn.Module:
    """``--model test_distributed:rgb_model``: a seeded CNN on 3 x 8 x 8 images, 10 classes."""
    g = torch.Generator().manual_seed(1)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Softplus(beta=4), nn.Flatten(), nn.Linear(4 * 64, 10))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


def make_cifar(folder, n: int = 48) -> str:
    """A CIFAR-10 python folder (``test_batch``) whose labels are ``rgb_model``'s predictions at size 8,
    every 6th one wrong."""
    from upi_fast.data import cifar10
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)

    def write(labels):
        with open(os.path.join(folder, "test_batch"), "wb") as f:
            pickle.dump({b"data": data, b"labels": list(map(int, labels))}, f, protocol=2)

    write([0] * n)
    ds = cifar10(folder, size=8)
    X = torch.stack([ds[i][0] for i in range(n)])
    with torch.no_grad():
        pred = rgb_model()(X).argmax(1)
    pred[::6] = (pred[::6] + 1) % 10
    write(pred.tolist())
    return str(folder)


def cli_args(data: str, out: str, *extra: str) -> list[str]:
    return ["compute", "--data", data, "--model", "test_distributed:rgb_model", "--size", "8", "--eps", "0.5",
            "--method", "grad", "--epochs", "2", "--batch-size", "8", "--attack-samples", "24",
            "--eval-samples", "12", "--no-progress", "--seed", "1", "--out", out, *extra]


def solver_cases() -> dict:
    """The API cases, run identically by one process and by each of two."""
    from upi_fast.solvers import UPIGrad, UPIPCA
    m, X, y, y_mixed = tiny()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y_mixed), batch_size=10)
    shuffled = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y_mixed), batch_size=10, shuffle=True)
    out = {}
    # cached tensors, Adam, smoothing noise
    out["grad_tensors"] = UPIGrad(m, 0.3, epochs=2, batch_size=16, optimizer="adam", progress=False, seed=1).fit(
        (X, y)).delta_
    # streamed loader with misclassified samples (per-rank counts differ), label preservation
    out["grad_loader"] = UPIGrad(m, 0.3, epochs=2, batch_size=16, preserve_labels=0.5, progress=False, seed=2).fit(
        shuffled).delta_
    pca = UPIPCA(m, 0.3, solver="sketch", n_components=2, progress=False, seed=3, batch_size=8).fit(loader)
    out["pca_sketch"], out["pca_sketch_S"] = pca.delta_, pca.singular_values_
    out["pca_plus_exact"] = UPIPCA(m, 0.3, solver="exact", plus_lambda=1.0, rounds=2, progress=False, seed=4,
                                   batch_size=16).fit((X, y_mixed)).delta_
    return out


class CrashAfterCheckpoint(Exception):
    """Raised right after a chosen checkpoint is on disk: the run stops there, as a kill would."""


@contextlib.contextmanager
def crash_after_checkpoint(stop_at: int):
    """Within the block, a run raises :class:`CrashAfterCheckpoint` once checkpoint ``stop_at`` is written."""
    import upi_fast.checkpoint as C
    orig = C.CheckpointManager.save

    def save(self, step, tensors, meta):
        path = orig(self, step, tensors, meta)
        if step == stop_at:
            raise CrashAfterCheckpoint(step)
        return path

    C.CheckpointManager.save = save
    try:
        yield
    finally:
        C.CheckpointManager.save = orig


def _interrupted_then_resumed(make, data, stop_at: int, comm) -> torch.Tensor:
    """Run ``make()`` until checkpoint ``stop_at`` is written (every process stops there), then resume."""
    try:
        with crash_after_checkpoint(stop_at):
            make().fit(data)
        raise AssertionError("the run was not interrupted")
    except CrashAfterCheckpoint:
        pass
    comm.barrier()
    return make().fit(data, resume=True).delta_


def _worker(rank: int, world: int, ports: list, out: str, data_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(ports[0]), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert D.init_from_env("cpu")
    comm = D.current()
    assert (comm.rank, comm.world, comm.backend) == (rank, world, "gloo")
    res = solver_cases()
    # helpers
    t = torch.tensor([float(rank + 1)])
    comm.all_reduce_(t)
    res["sum"] = t
    res["ints"] = torch.tensor(comm.all_gather_ints(rank * 10))
    # an interrupted, resumed 2-process run equals the uninterrupted one
    m, X, _, y_mixed = tiny()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y_mixed), batch_size=10)
    res["pca_sketch_resumed"] = _interrupted_then_resumed(
        lambda: UPIPCA(m, 0.3, solver="sketch", n_components=2, progress=False, seed=3, batch_size=8,
                       checkpoint_dir=os.path.join(out, "ck_pca"), checkpoint_every=2), loader, 4, comm)
    res["grad_resumed"] = _interrupted_then_resumed(
        lambda: UPIGrad(m, 0.3, epochs=2, batch_size=16, optimizer="adam", progress=False, seed=1,
                        checkpoint_dir=os.path.join(out, "ck_grad"), checkpoint_every=1), (X, y_mixed), 3, comm)
    class Iterable(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(X, y_mixed))

    try:
        UPIGrad(m, 0.3, progress=False).fit(torch.utils.data.DataLoader(Iterable(), batch_size=8))
        raise AssertionError("an IterableDataset was accepted by a distributed run")
    except ValueError as exc:
        assert "map-style" in str(exc)
    res["grad_plain"] = UPIGrad(m, 0.3, epochs=2, batch_size=16, optimizer="adam", progress=False, seed=1).fit(
        (X, y_mixed)).delta_
    save_file({k: v.contiguous() for k, v in res.items()}, os.path.join(out, f"rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()
    # `upi-fast compute` from a torchrun environment: it starts and ends its own process group
    from upi_fast.cli import main
    os.environ["MASTER_PORT"] = str(ports[1])
    assert main(cli_args(data_dir, os.path.join(out, "cli"))) == 0
    assert not torch.distributed.is_initialized()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ------------------------------------------------------------------------------------------ tests
pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.numerics]


def test_helpers_are_no_ops_without_a_process_group():
    comm = D.current()
    assert (comm.rank, comm.world, comm.is_main, comm.active) == (0, 1, True, False)
    t = torch.tensor([1.5, 2.0])
    assert comm.all_reduce_(t) is t and t.tolist() == [1.5, 2.0]
    assert comm.broadcast_(t) is t and comm.all_gather_ints(7) == [7] and comm.sum_floats(1.0, 2.0) == [1.0, 2.0]
    assert comm.all_gather_objects({"a": 1}) == [{"a": 1}]
    comm.barrier()
    assert D.init_from_env() is False  # WORLD_SIZE unset: nothing to start
    assert [D.shard_bounds(10, 3, r) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert D.shard_bounds(1, 2, 0) == (0, 0) and D.shard_bounds(1, 2, 1) == (0, 1)
    calls = []
    assert D.main_only(calls.append)("x") is None and calls == ["x"]
    assert D.local_device(None) == torch.device("cpu")


def test_bad_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        D.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        D.init_from_env()


def test_merge_sketch_refuses_overlapping_rows():
    with pytest.raises(ValueError, match="overlap"):
        D._merge_ranges([[0, 5], [4, 8]])
    assert D._merge_ranges([[5, 8], [0, 5], [10, 12]]) == [[0, 8], [10, 12]]


def test_two_gloo_processes_match_one_process(tmp_path, monkeypatch):
    """Same delta as one process with the same global batch (1e-5 relative) for UPI-Grad (cached and
    streamed, with misclassified samples) and UPI-PCA (sketch, exact PCA+ with 2 rounds); both ranks
    hold the same delta; an interrupted 2-process run resumes to the uninterrupted result; and
    ``upi-fast compute`` under a torchrun environment matches the single-process command."""
    data_dir = make_cifar(tmp_path / "cifar")
    mp.spawn(_worker, args=(2, [free_port(), free_port()], str(tmp_path), data_dir), nprocs=2, join=True)
    r0 = load_file(str(tmp_path / "rank0.safetensors"))
    r1 = load_file(str(tmp_path / "rank1.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # every rank ends with the same result
    assert r0["sum"].item() == 3.0 and r0["ints"].tolist() == [0, 10]
    ref = solver_cases()
    for k, v in ref.items():
        assert _rel(r0[k], v) < 1e-5, (k, _rel(r0[k], v))
    assert torch.equal(r0["pca_sketch_resumed"], r0["pca_sketch"])
    assert torch.equal(r0["grad_resumed"], r0["grad_plain"])
    # the command line: single process here, 2 processes in the spawn
    from upi_fast.cli import main
    from upi_fast.io import load_perturbation
    monkeypatch.syspath_prepend(TESTS_DIR)
    assert main(cli_args(data_dir, str(tmp_path / "cli1"))) == 0
    d1, meta1 = load_perturbation(tmp_path / "cli1" / "upi.safetensors")
    d2, meta2 = load_perturbation(tmp_path / "cli" / "upi.safetensors")
    assert meta1["processes"] == 1 and meta2["processes"] == 2
    assert _rel(d2, d1) < 1e-5
    rep1 = json.loads((tmp_path / "cli1" / "report.json").read_text())
    rep2 = json.loads((tmp_path / "cli" / "report.json").read_text())
    for a, b in zip(rep1["results"], rep2["results"]):
        assert a["n"] == b["n"] and a["n_total"] == b["n_total"] == 12
        for m in ("dissimilarity", "topk_intersection", "spearman", "fooling_rate"):
            assert a[m] == pytest.approx(b[m], rel=1e-4, abs=1e-6), m


def test_data_parallel_order_and_shares():
    from upi_fast.data import ShareSampler, derive_seed, epoch_order, global_batches
    a, b = epoch_order(50, 3, 0, True), epoch_order(50, 3, 1, True)
    assert torch.equal(a, epoch_order(50, 3, 0, True)) and not torch.equal(a, b)  # a pure function of (seed, epoch)
    assert sorted(a.tolist()) == list(range(50)) and torch.equal(epoch_order(5, 3, 7, False), torch.arange(5))
    assert derive_seed(1, 2) != derive_seed(2, 1) and 0 <= derive_seed(-5, 3) < 2**63
    batches = global_batches(a, 8)
    assert [len(t) for t in batches] == [8] * 6 + [2] and len(global_batches(a, 8, drop_last=True)) == 6
    for start in (0, 4):
        shares = [list(ShareSampler(batches, r, 3, start)) for r in range(3)]
        assert [len(ShareSampler(batches, r, 3, start)) for r in range(3)] == [len(s) for s in shares]
        got = sorted(i for s in shares for blk in s for i in blk)
        assert got == sorted(torch.cat(batches[start:]).tolist())  # a partition of the batches from `start`
        assert all(len(blk) for s in shares for blk in s)  # empty shares are skipped (the 2-item batch)
    assert list(ShareSampler(batches, 1, 3).shares())[-1] == (6, 0, 1)


def test_precision_option():
    m, X, y, _ = tiny()
    with pytest.raises(ValueError, match="precision"):
        UPIGrad(m, 0.3, precision="fp8")
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        UPIPCA(m, 0.3, precision="fp16", progress=False).fit((X, y))
    # bf16 autocast is allowed on the CPU: delta stays float32, in the ball, finite
    s = UPIGrad(m, 0.3, epochs=1, batch_size=20, precision="bf16", progress=False).fit((X, y))
    assert s.delta_.dtype == torch.float32 and torch.isfinite(s.delta_).all() and s.delta_.norm() <= 0.3 * (1 + 1e-5)
    p = UPIPCA(m, 0.3, precision="bf16", progress=False).fit((X, y))
    ref = UPIPCA(m, 0.3, progress=False).fit((X, y))
    cos = float(p.components_[0] @ ref.components_[0]) / float(p.components_[0].norm() * ref.components_[0].norm())
    assert abs(cos) > 0.9, cos


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_on_cuda(precision):
    m, X, y, _ = tiny()
    m = m.cuda()
    ref = UPIPCA(m, 0.3, progress=False, device="cuda").fit((X, y))
    p = UPIPCA(m, 0.3, precision=precision, progress=False, device="cuda").fit((X, y))
    cos = float(p.components_[0] @ ref.components_[0]) / float(p.components_[0].norm() * ref.components_[0].norm())
    assert abs(cos) > 0.9, cos
    g = UPIGrad(m, 0.3, epochs=2, batch_size=16, precision=precision, progress=False, device="cuda").fit((X, y))
    assert g.delta_.dtype == torch.float32 and torch.isfinite(g.delta_).all()


def test_clean_batches_cached_streamed_and_resumed_agree():
    """Tensors cached, tensors read uncached and a DataLoader give the same global batches when every
    sample is classified correctly; starting at batch k skips exactly the first k."""
    from upi_fast.solvers._batches import CleanBatches
    from upi_fast.solvers._common import make_spec
    m, X, y, _ = tiny()
    spec = make_spec("simple", "prob", "l2", None)
    kw = dict(shuffle=False, seed=5)
    cached = CleanBatches(m, (X, y), 16, spec, torch.device("cpu"), **kw)
    uncached = CleanBatches(m, (X, y), 16, spec, torch.device("cpu"), cache=False, **kw)
    loader = CleanBatches(m, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16), 99,
                          spec, torch.device("cpu"), **kw)
    assert (cached.kind, uncached.kind, loader.kind) == ("cached", "indexed", "indexed")
    runs = [list(c.epoch(1)) for c in (cached, uncached, loader)]
    for a, b in zip(runs[0], runs[1] + runs[2]):
        assert torch.equal(a.x, b.x) and torch.equal(a.I_ref, b.I_ref) and a.counts == b.counts == [a.size]
    assert [b.index for b in loader.epoch(1, start=2)] == [2] and loader.n_correct == 40
    shuffled = CleanBatches(m, (X, y), 16, spec, torch.device("cpu"), shuffle=True, seed=5)
    first = [b.x for b in shuffled.epoch(0)]
    assert [torch.equal(a, b.x) for a, b in zip(first, shuffled.epoch(0))] == [True] * 3
    assert not all(torch.equal(a, b.x) for a, b in zip(first, shuffled.epoch(1)))
