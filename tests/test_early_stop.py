"""UPI-Grad's early stop (``patience`` / ``min_delta``): it stops on a plateau, never while the
objective improves, a resumed run stops where the uninterrupted one does, two processes take the
same decision as one, and bad arguments are refused with the argument's name."""
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from upi_fast import distributed as D
from upi_fast.checkpoint import CheckpointManager
from upi_fast.solvers import UPIGrad

from test_distributed import CrashAfterCheckpoint, crash_after_checkpoint, free_port, tiny

pytestmark = pytest.mark.usefixtures("single_thread")


def _stopping(m, **kw):
    """Large constant steps from a random start: the epoch objective rises for three epochs, then
    falls (0.0232 -> 0.0231 on ``tiny()``), so ``patience=1`` stops after epoch 4 of 8 (3 steps each)."""
    return UPIGrad(m, 0.3, epochs=8, batch_size=16, lr=0.15, lr_schedule="constant", init="random", seed=1,
                   patience=1, progress=False, **kw)


def test_stops_on_a_plateau():
    """A step of 1e-30 cannot move delta (float32), so every epoch's objective is the same up to the
    summation order of a shuffled batch: the run must stop after 1 + patience epochs."""
    m, X, y, _ = tiny()
    r = UPIGrad(m, 0.3, epochs=6, batch_size=40, lr=1e-30, lr_schedule="constant", noise_std=0.0, patience=2,
                min_delta=1e-6, progress=False).fit((X, y))
    assert r.stopped_epoch_ == 3 and len(r.epoch_history_) == 3 and r.n_steps_ == 3 and len(r.history_) == 3
    assert max(r.epoch_history_) - min(r.epoch_history_) <= 1e-6
    assert torch.equal(r.delta_, r.start_)


def test_does_not_stop_while_improving_and_changes_nothing():
    """Full-batch small steps on a smooth model: the objective rises every epoch (checked), so even
    ``patience=1`` lets the run finish, with the same result as a run without early stop."""
    m, X, y, _ = tiny()
    kw = dict(epochs=6, batch_size=40, lr=0.01, lr_schedule="constant", noise_std=0.0, init="random", progress=False)
    r = UPIGrad(m, 0.3, patience=1, **kw).fit((X, y))
    h = r.epoch_history_
    assert len(h) == 6 and all(b > a for a, b in zip(h, h[1:]))
    assert r.stopped_epoch_ is None
    plain = UPIGrad(m, 0.3, **kw).fit((X, y))
    assert torch.equal(r.delta_, plain.delta_) and r.history_ == plain.history_
    assert plain.stopped_epoch_ is None and plain.epoch_history_ == h


def test_a_stopped_run_is_the_truncated_run():
    m, X, y, _ = tiny()
    r = _stopping(m).fit((X, y))
    assert r.stopped_epoch_ == 4 and r.n_steps_ == 12 and len(r.epoch_history_) == 4
    assert r.epoch_history_[3] <= max(r.epoch_history_[:3])
    four = UPIGrad(m, 0.3, epochs=4, batch_size=16, lr=0.15, lr_schedule="constant", init="random", seed=1,
                   progress=False).fit((X, y))
    assert torch.equal(r.delta_, four.delta_) and r.history_ == four.history_


@pytest.mark.parametrize("stop_at", [5, 9, 11])  # mid epoch 2, the end of epoch 3, inside the stopping epoch 4
def test_resumed_run_stops_where_the_uninterrupted_one_does(stop_at, tmp_path):
    m, X, y, _ = tiny()
    full = _stopping(m).fit((X, y))
    ck = str(tmp_path / "ck")
    with crash_after_checkpoint(stop_at), pytest.raises(CrashAfterCheckpoint):
        _stopping(m, checkpoint_dir=ck, checkpoint_every=1).fit((X, y))
    assert max(CheckpointManager(ck).steps()) == stop_at
    resumed = _stopping(m, checkpoint_dir=ck, checkpoint_every=1).fit((X, y), resume=True)
    assert resumed.stopped_epoch_ == full.stopped_epoch_ == 4
    assert torch.equal(resumed.delta_, full.delta_)
    assert resumed.history_ == full.history_ and resumed.epoch_history_ == full.epoch_history_


def test_resume_refuses_other_early_stop_settings(tmp_path):
    m, X, y, _ = tiny()
    ck = str(tmp_path / "ck")
    with crash_after_checkpoint(2), pytest.raises(CrashAfterCheckpoint):
        _stopping(m, checkpoint_dir=ck, checkpoint_every=1).fit((X, y))
    with pytest.raises(ValueError, match="other settings.*early_stop"):
        UPIGrad(m, 0.3, epochs=8, batch_size=16, lr=0.15, lr_schedule="constant", init="random", seed=1,
                patience=3, progress=False, checkpoint_dir=ck).fit((X, y), resume=True)


@pytest.mark.parametrize("kw, name", [
    ({"patience": 0}, "patience"), ({"patience": -2}, "patience"), ({"patience": 1.5}, "patience"),
    ({"patience": True}, "patience"), ({"patience": "3"}, "patience"),
    ({"patience": 2, "min_delta": -0.1}, "min_delta"), ({"patience": 2, "min_delta": float("nan")}, "min_delta"),
    ({"patience": 2, "min_delta": float("inf")}, "min_delta"), ({"patience": 2, "min_delta": "0.1"}, "min_delta"),
    ({"min_delta": 0.01}, "min_delta needs patience"),
])
def test_bad_arguments_name_the_argument(kw, name):
    m, _, _, _ = tiny()
    with pytest.raises(ValueError, match=name):
        UPIGrad(m, 0.3, **kw)


# ------------------------------------------------------------------------------------------ two processes
def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    assert D.init_from_env("cpu")
    m, X, _, y_mixed = tiny()
    r = _stopping(m).fit((X, y_mixed))
    save_file({"delta": r.delta_.contiguous(), "stopped": torch.tensor([r.stopped_epoch_ or 0]),
               "epochs": torch.tensor(r.epoch_history_, dtype=torch.float64)},
              os.path.join(out, f"rank{rank}.safetensors"))
    torch.distributed.destroy_process_group()


def test_two_processes_stop_at_the_same_epoch_as_one(tmp_path):
    """Every 5th label wrong: the ranks keep different numbers of samples per batch; the decision
    rests on the all-reduced step losses, so both ranks stop together, where one process stops."""
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (load_file(str(tmp_path / f"rank{k}.safetensors")) for k in (0, 1))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    m, X, _, y_mixed = tiny()
    one = _stopping(m).fit((X, y_mixed))
    assert one.stopped_epoch_ == int(r0["stopped"]) == 7
    assert r0["epochs"].tolist() == pytest.approx(one.epoch_history_, rel=1e-5)
    assert float((r0["delta"] - one.delta_).norm() / one.delta_.norm()) < 1e-5


def test_time_to_strong_helpers():
    """bench/time_to_strong.py's bookkeeping on made-up curves: the level is 95% of the best point of
    any run, a run's time is its first point at or above it, a run that never gets there has none."""
    from bench.time_to_strong import summarise, t_reach
    a = {"curve": [[0.1, 0, 0.2], [0.5, 1, 0.96], [0.9, None, 1.0]], "final": 1.0, "fit_s": 0.9, "stopped_epoch": None}
    b = {"curve": [[0.3, None, 0.9]], "final": 0.9, "fit_s": 0.3, "stopped_epoch": None}
    best, s = summarise({"x": [a], "y": [b]})
    assert best == 1.0 and t_reach(a["curve"], 0.95) == 0.5 and t_reach(b["curve"], 0.95) is None
    assert s["x"]["t95"]["mean"] == 0.5 and s["y"]["t95"]["n"] == 0 and s["x"]["t99"]["mean"] == 0.9
