"""Checkpoints: atomic checksummed files, fallback past damaged ones, and resumed runs that end
exactly as uninterrupted ones (in process, and after a SIGKILL of a ``upi-fast compute`` process)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from upi_fast.checkpoint import CheckpointError, CheckpointManager, load_checkpoint, save_checkpoint
from upi_fast.solvers import UPIGrad, UPIPCA

from test_distributed import TESTS_DIR, CrashAfterCheckpoint, cli_args, crash_after_checkpoint, make_cifar, tiny


pytestmark = pytest.mark.usefixtures("single_thread")


def _tensors():
    return {"delta": torch.randn(2, 3, 4), "gen": torch.Generator().manual_seed(3).get_state(),
            "history": torch.tensor([0.5, 0.25], dtype=torch.float64), "half": torch.randn(5).to(torch.bfloat16),
            "count": torch.tensor(7)}


def test_save_load_roundtrip_and_damage_is_detected(tmp_path):
    t, meta = _tensors(), {"epoch": 2, "norm": float("inf"), "shape": (1, 2)}
    p = tmp_path / "ckpt-000000001.safetensors"
    save_checkpoint(p, t, meta)
    got, m = load_checkpoint(p)
    assert set(got) == set(t) and all(torch.equal(got[k], t[k]) for k in t)
    assert m == {"epoch": 2, "norm": float("inf"), "shape": [1, 2]}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    raw = p.read_bytes()
    flipped = bytearray(raw)
    flipped[-3] ^= 0x40  # a bit in the last tensor's data
    p.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(p)
    p.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(p)
    p.write_bytes(raw[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(p)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(p))
    with pytest.raises(CheckpointError, match="not a upi_fast checkpoint"):
        load_checkpoint(p)
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(tmp_path / "missing.safetensors")
    with pytest.raises(TypeError, match="tensors"):
        save_checkpoint(p, {"x": [1, 2]}, {})


def test_manager_keeps_two_and_falls_back_past_damage(tmp_path):
    mgr = CheckpointManager(tmp_path / "ck", every=2)
    assert mgr.load_latest() is None and [mgr.due(s) for s in range(5)] == [False, False, True, False, True]
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / ".ckpt-000000001.safetensors.dead.tmp").write_bytes(b"left by a killed writer")
    for step in (1, 2, 3):
        mgr.save(step, {"v": torch.full((3,), float(step))}, {"k": step})
    assert sorted(os.listdir(tmp_path / "ck")) == ["ckpt-000000002.safetensors", "ckpt-000000003.safetensors"]
    step, t, meta = mgr.load_latest()
    assert step == 3 and meta == {"k": 3, "step": 3} and t["v"].tolist() == [3.0] * 3
    newest = mgr.path(3)
    newest.write_bytes(newest.read_bytes()[:-7])
    with pytest.warns(UserWarning, match="ckpt-000000003.*truncated.*falling back"):
        step, t, _ = mgr.load_latest()
    assert step == 2 and t["v"].tolist() == [2.0] * 3
    older = mgr.path(2)
    older.write_bytes(older.read_bytes()[:20])
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no usable checkpoint"):
        mgr.load_latest()
    with pytest.raises(ValueError, match="checkpoint_every"):
        CheckpointManager(tmp_path, every=0)
    assert not CheckpointManager(tmp_path / "ck", writer=False).save(9, {"v": torch.zeros(1)}, {})




def _loader(shuffle=False, batch_size=10):
    m, X, y, y_mixed = tiny()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y_mixed), batch_size=batch_size,
                                       shuffle=shuffle)


class _Iterable(torch.utils.data.IterableDataset):
    """No indexing: read as it comes (resuming skips batches by reading them)."""

    def __iter__(self):
        m, X, y, y_mixed = tiny()
        return iter(zip(X, y_mixed))


CASES = {
    "grad_adam_tensors": (lambda m, **kw: UPIGrad(m, 0.3, epochs=3, batch_size=16, optimizer="adam", seed=1, **kw),
                          "tensors", 1, 4),
    "grad_shuffled_loader": (lambda m, **kw: UPIGrad(m, 0.3, epochs=3, batch_size=16, seed=2, **kw),
                             "shuffled", 2, 6),
    "grad_iterable": (lambda m, **kw: UPIGrad(m, 0.3, epochs=2, batch_size=16, seed=6, **kw), "iterable", 1, 5),
    "pca_sketch_rounds": (lambda m, **kw: UPIPCA(m, 0.3, solver="sketch", rounds=2, n_components=2, seed=3,
                                                 batch_size=8, **kw), "loader", 1, 7),
    "pca_plus_exact": (lambda m, **kw: UPIPCA(m, 0.3, solver="exact", plus_lambda=1.0, rounds=2, seed=4,
                                              batch_size=8, **kw), "tensors", 1, 5),
    "pca_fd": (lambda m, **kw: UPIPCA(m, 0.3, solver="frequent_directions", rounds=2, seed=5, batch_size=8, **kw),
               "tensors", 3, 6),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_resumed_run_is_bit_identical(case, tmp_path):
    make, kind, every, stop_at = CASES[case]
    m, X, y, y_mixed = tiny()
    data = {"tensors": (X, y_mixed), "loader": _loader(), "shuffled": _loader(shuffle=True),
            "iterable": torch.utils.data.DataLoader(_Iterable(), batch_size=8)}[kind]
    full = make(m, progress=False).fit(data)
    ck = tmp_path / "ck"
    with crash_after_checkpoint(stop_at), pytest.raises(CrashAfterCheckpoint):
        make(m, progress=False, checkpoint_dir=str(ck), checkpoint_every=every).fit(data)
    assert max(CheckpointManager(ck).steps()) == stop_at and len(CheckpointManager(ck).steps()) == 2
    resumed = make(m, progress=False, checkpoint_dir=str(ck), checkpoint_every=every).fit(data, resume=True)
    assert torch.equal(resumed.delta_, full.delta_)
    if isinstance(full, UPIGrad):
        assert resumed.history_ == full.history_ and resumed.n_steps_ == full.n_steps_
    else:
        assert torch.equal(resumed.singular_values_, full.singular_values_) and resumed.sign_ == full.sign_


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    m, X, y, _ = tiny()
    make = lambda: UPIGrad(m, 0.3, epochs=2, batch_size=8, optimizer="adam", progress=False, seed=7,
                           checkpoint_dir=str(tmp_path), checkpoint_every=2)
    full = UPIGrad(m, 0.3, epochs=2, batch_size=8, optimizer="adam", progress=False, seed=7).fit((X, y))
    with crash_after_checkpoint(6), pytest.raises(CrashAfterCheckpoint):
        make().fit((X, y))
    newest = CheckpointManager(tmp_path).path(6)
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 3])
    with pytest.warns(UserWarning, match="truncated or corrupt.*falling back"):
        resumed = make().fit((X, y), resume=True)
    assert torch.equal(resumed.delta_, full.delta_)


def test_checkpoint_arguments_and_mismatches(tmp_path, monkeypatch):
    m, X, y, _ = tiny()
    with pytest.raises(ValueError, match="checkpoint_every"):
        UPIGrad(m, 0.3, checkpoint_every=2)
    with pytest.raises(ValueError, match="checkpoint_every"):
        UPIPCA(m, 0.3, checkpoint_dir=str(tmp_path), checkpoint_every=0)
    with pytest.raises(TypeError, match="checkpoint_dir"):
        UPIGrad(m, 0.3, checkpoint_dir=3)
    with pytest.raises(ValueError, match="resume=True needs a checkpoint_dir"):
        UPIGrad(m, 0.3, epochs=1, progress=False).fit((X, y), resume=True)
    with pytest.raises(ValueError, match="spills rows"):
        UPIPCA(m, 0.3, solver="subspace", checkpoint_dir=str(tmp_path), progress=False).fit((X, y))
    # resume with an empty folder: a fresh run (warned), equal to a plain one
    plain = UPIGrad(m, 0.3, epochs=1, batch_size=16, progress=False).fit((X, y))
    with pytest.warns(UserWarning, match="no checkpoint"):
        fresh = UPIGrad(m, 0.3, epochs=1, batch_size=16, progress=False, checkpoint_dir=str(tmp_path / "a"),
                        checkpoint_every=1).fit((X, y), resume=True)
    assert torch.equal(fresh.delta_, plain.delta_)
    # a new run never mixes with old checkpoints; another configuration or solver is refused
    with pytest.raises(ValueError, match="already holds checkpoints"):
        UPIGrad(m, 0.3, epochs=1, batch_size=16, progress=False, checkpoint_dir=str(tmp_path / "a")).fit((X, y))
    with pytest.raises(ValueError, match="other settings.*eps"):
        UPIGrad(m, 0.4, epochs=1, batch_size=16, progress=False, checkpoint_dir=str(tmp_path / "a")).fit(
            (X, y), resume=True)
    with pytest.raises(ValueError, match="written by 'UPIGrad'"):
        UPIPCA(m, 0.3, batch_size=16, progress=False, checkpoint_dir=str(tmp_path / "a")).fit((X, y), resume=True)


# ------------------------------------------------------------------------------------------ SIGKILL
_RUNNER = """
import os, sys, time
import upi_fast.checkpoint as C
kill_at = int(os.environ.get("UPI_TEST_HANG_AT", "0"))
if kill_at:
    orig = C.CheckpointManager.save
    def save(self, step, tensors, meta):
        path = orig(self, step, tensors, meta)
        print(f"CKPT {step}", flush=True)
        if step >= kill_at:
            time.sleep(120)  # killed here by the test
        return path
    C.CheckpointManager.save = save
from upi_fast.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start(args, hang_at: int = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": TESTS_DIR + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "UPI_TEST_HANG_AT": str(hang_at)}
    return subprocess.Popen([sys.executable, "-c", _RUNNER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _kill_after(proc: subprocess.Popen, step: int, timeout: float = 120) -> list[int]:
    """Read the run's checkpoint lines until ``CKPT step``, then SIGKILL it. Returns the steps seen."""
    seen, t0 = [], time.time()
    for line in proc.stdout:
        if line.startswith("CKPT "):
            seen.append(int(line.split()[1]))
            if seen[-1] == step:
                break
        assert time.time() - t0 < timeout
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    return seen


def test_sigkilled_compute_resumes_to_the_uninterrupted_result(tmp_path):
    """``upi-fast compute --checkpoint-every 2`` killed with SIGKILL after checkpoint 4, resumed with
    ``--resume`` (from 4), killed again after 8; the newest checkpoint (8) truncated on purpose; resumed
    again: the damaged file is reported, checkpoint 6 used, and the final perturbation equals the one
    of an uninterrupted run bit for bit."""
    from upi_fast.io import load_perturbation
    data = make_cifar(tmp_path / "cifar")
    ref = _start(cli_args(data, str(tmp_path / "ref"), "--epochs", "4"))  # 3 batches per epoch, 12 steps
    out = str(tmp_path / "run")
    run = cli_args(data, out, "--epochs", "4", "--checkpoint-every", "2")
    assert _kill_after(_start(run, hang_at=4), 4) == [2, 4]
    assert _kill_after(_start([*run, "--resume"], hang_at=8), 8) == [6, 8]  # continued from 4
    ck = CheckpointManager(os.path.join(out, "checkpoints"))
    assert ck.steps() == [8, 6]
    newest = ck.path(8)
    newest.write_bytes(newest.read_bytes()[:100])
    last = _start([*run, "--resume"])
    stdout, stderr = last.communicate(timeout=120)
    assert last.returncode == 0, stderr
    assert "ckpt-000000008.safetensors" in stderr and "falling back to the previous checkpoint" in stderr
    assert ref.wait(timeout=120) == 0, ref.stderr.read()
    ref.stdout.close()
    ref.stderr.close()
    d_ref, _ = load_perturbation(tmp_path / "ref" / "upi.safetensors")
    d_run, _ = load_perturbation(os.path.join(out, "upi.safetensors"))
    assert torch.equal(d_run, d_ref)
    assert ck.steps() == [12, 10]
