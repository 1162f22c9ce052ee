"""Data parallelism with ``torch.distributed``: the process group, collectives, rank-0 I/O.

Every helper works without a process group (one process): the collectives are then no-ops, so the
solvers call them unconditionally and a single process runs exactly the same code path.

* :func:`init_from_env` / :func:`launched`: start the default process group when the environment
  says so (``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``): NCCL for CUDA devices, gloo on the CPU.
* :class:`Comm` (:func:`current`): this process's rank, the world size and the collectives the
  solvers need (sum all-reduce, broadcast, gathers of counts and of small objects, barrier).
  Tensors travel through the device the backend wants (CUDA for NCCL, CPU for gloo) and come back
  on their own device.
* :func:`merge_sketch`: sum :class:`~upi_fast.linalg.StreamingSketch` states over all ranks (the
  sketch is linear in the rows, so sketches of disjoint global rows merge exactly).
* :func:`shard_bounds`: the contiguous share ``[lo, hi)`` of ``n`` items that a rank handles.

Rank-0 I/O: only :attr:`Comm.is_main` writes files, logs and shows progress bars
(:func:`main_only`).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

__all__ = ["Comm", "current", "init_from_env", "launched", "env_world_size", "local_device", "shard_bounds",
           "merge_sketch", "main_only"]


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset). A malformed value is a clear error."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE must be an integer, got {raw!r}") from None
    if world < 1:
        raise ValueError(f"environment variable WORLD_SIZE must be >= 1, got {world}")
    return world


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}") from None


def local_device(device: str | torch.device | None) -> torch.device:
    """The device this process should use: ``cuda:LOCAL_RANK`` for any CUDA request when several
    processes run (one GPU per process), else ``device`` itself (``cpu`` when None)."""
    if device is None:
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and env_world_size() > 1:
        return torch.device("cuda", _env_int("LOCAL_RANK", 0))
    return dev


def init_from_env(device: str | torch.device | None = None, timeout_s: float = 1800.0) -> bool:
    """Initialise the default process group from the ``torchrun`` environment.

    Does nothing (returns False) when ``WORLD_SIZE`` is unset or 1, or when a group already
    exists. Otherwise starts the group with NCCL when ``device`` is a CUDA device (after
    ``torch.cuda.set_device(LOCAL_RANK)``) and gloo otherwise, and returns True (the caller then
    owns the group and should :func:`torch.distributed.destroy_process_group` it; :func:`launched`
    does both).

    Raises:
        ValueError: the environment is incomplete (``RANK``, ``MASTER_ADDR`` or ``MASTER_PORT``
            missing) or malformed.
    """
    world = env_world_size()
    if world == 1 or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed support")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world} but the environment lacks {', '.join(missing)}: "
                         "launch with torchrun (e.g. torchrun --nproc_per_node 2 -m upi_fast.cli compute ...)")
    rank = _env_int("RANK", 0)
    if not 0 <= rank < world:
        raise ValueError(f"environment variable RANK must be in [0, {world - 1}], got {rank}")
    dev = local_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was requested but CUDA is not available on this machine")
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return True


@contextlib.contextmanager
def launched(device: str | torch.device | None = None) -> Iterator["Comm"]:
    """``with launched(device) as comm:`` -- the group started by :func:`init_from_env` (if the
    environment asks for one), a barrier on normal exit and the group destroyed afterwards (only
    when this call created it)."""
    owner = init_from_env(device)
    try:
        comm = current()
        yield comm
        comm.barrier()
    finally:
        if owner and dist.is_initialized():
            dist.destroy_process_group()


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """The contiguous share ``[lo, hi)`` of ``n`` items for ``rank`` of ``world`` (sizes differ by at
    most one; ranks past the items get empty shares)."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, world - 1] with world >= 1, got rank {rank}, world {world}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return rank * n // world, (rank + 1) * n // world


class Comm:
    """The collectives of one process (a no-op set when ``world == 1``).

    Attributes:
        rank, world: this process's rank and the number of processes.
        is_main: ``rank == 0`` (the process that writes files, logs and shows progress).
    """

    def __init__(self, rank: int = 0, world: int = 1, backend: str | None = None) -> None:
        self.rank, self.world, self.backend = rank, world, backend

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def _wire(self) -> torch.device:
        if self.backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over all ranks, in place (every rank gets the same sum). Returns ``t``."""
        if not self.active:
            return t
        wire = self._wire()
        buf = t if t.device == wire else t.to(wire)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        if buf is not t:
            t.copy_(buf)
        return t

    def sum_floats(self, *values: float) -> list[float]:
        """Sums over all ranks of a few Python numbers (float64 on the wire)."""
        t = torch.tensor(values, dtype=torch.float64)
        return self.all_reduce_(t).tolist()

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``t`` on every rank with rank ``src``'s value, in place. Returns ``t``."""
        if not self.active:
            return t
        wire = self._wire()
        buf = t if t.device == wire else t.to(wire)
        dist.broadcast(buf, src=src)
        if buf is not t:
            t.copy_(buf)
        return t

    def all_gather_ints(self, value: int) -> list[int]:
        """Every rank's ``value``, in rank order."""
        if not self.active:
            return [int(value)]
        wire = self._wire()
        mine = torch.tensor([int(value)], dtype=torch.int64, device=wire)
        out = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(out, mine)
        return [int(o.item()) for o in out]

    def all_gather_objects(self, obj: Any) -> list:
        """Every rank's ``obj`` (pickled between this job's own processes; move tensors to the CPU
        first), in rank order. For small or infrequent payloads (states, metadata)."""
        if not self.active:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.active:
            if self.backend == "nccl":
                dist.barrier(device_ids=[torch.cuda.current_device()])
            else:
                dist.barrier()

    def __repr__(self) -> str:
        return f"Comm(rank={self.rank}, world={self.world}, backend={self.backend!r})"


def current() -> Comm:
    """The :class:`Comm` of the default process group (rank 0 of 1 when there is none)."""
    if dist.is_available() and dist.is_initialized():
        return Comm(dist.get_rank(), dist.get_world_size(), dist.get_backend())
    return Comm()


def main_only(fn: Callable[..., Any], comm: Comm | None = None) -> Callable[..., Any]:
    """``fn`` on rank 0, a do-nothing function elsewhere (for loggers and writers)."""
    comm = comm or current()
    if comm.is_main:
        return fn
    return lambda *a, **k: None


def _merge_ranges(ranges: list[list[int]]) -> list[list[int]]:
    out: list[list[int]] = []
    for s, e in sorted(ranges):
        if out and s < out[-1][1]:
            raise ValueError(f"sketches of different ranks overlap (global rows [{s}, {e}) and "
                             f"[{out[-1][0]}, {out[-1][1]})): each rank must sketch disjoint global rows")
        if out and s == out[-1][1]:
            out[-1][1] = e
        else:
            out.append([s, e])
    return out


def merge_sketch(sketch, comm: Comm | None = None):
    """Sum a :class:`~upi_fast.linalg.StreamingSketch` over all ranks, in place: afterwards every
    rank holds the sketch of all ranks' rows (exact, the sketch is linear). The ranks must have
    sketched disjoint global rows with the same parameters (seed, k, ...). Returns ``sketch``."""
    comm = comm or current()
    if not comm.active:
        return sketch
    state = sketch.state_dict()
    params = {k: state[k] for k in ("d", "k", "oversample", "seed", "normalize_rows")}
    every = comm.all_gather_objects((params, state["ranges"].tolist(), int(state["n_rows"]), int(state["next_row"])))
    if any(p != params for p, _, _, _ in every):
        raise ValueError("merge_sketch: the ranks' sketches have different parameters "
                         f"({[p for p, _, _, _ in every]})")
    for name in ("W", "Kt", "fro2"):
        comm.all_reduce_(state[name])
    state["ranges"] = torch.tensor(_merge_ranges([r for _, rs, _, _ in every for r in rs]),
                                   dtype=torch.int64).reshape(-1, 2)
    state["n_rows"] = sum(n for _, _, n, _ in every)
    state["next_row"] = max(nx for _, _, _, nx in every)
    sketch.load_state_dict(state)
    return sketch
