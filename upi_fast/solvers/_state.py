"""Checkpoint plumbing shared by the solvers: when to save, who writes, what must match to resume."""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Callable, Mapping

import torch

from ..checkpoint import CheckpointManager
from ..distributed import Comm
from ..io import to_jsonable

__all__ = ["check_checkpoint_args", "RunCheckpoints"]


def check_checkpoint_args(checkpoint_dir, checkpoint_every) -> None:
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be a path or None, got {type(checkpoint_dir).__name__}")
    if checkpoint_every is not None:
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every <= 0:
            raise ValueError(f"checkpoint_every must be a positive integer or None, got {checkpoint_every!r}")
        if checkpoint_dir is None:
            raise ValueError("checkpoint_every needs a checkpoint_dir")


def _normalised(obj) -> object:
    """``obj`` as it reads back from a checkpoint's JSON (tuples -> lists, inf kept)."""
    def enc(v):
        if isinstance(v, float) and math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if isinstance(v, (list, tuple)):
            return [enc(t) for t in v]
        if isinstance(v, dict):
            return {k: enc(t) for k, t in v.items()}
        if isinstance(v, torch.device):
            return str(v)
        if v is not None and not isinstance(v, (bool, int, float, str)):
            return str(v)
        return v
    return json.loads(json.dumps(to_jsonable(enc(obj)), sort_keys=True))


class RunCheckpoints:
    """One solver run's checkpoints: saving every ``every`` steps (rank 0 writes), restoring the newest
    good one, and refusing to resume a different run.

    Args:
        directory: the checkpoint folder (None: no checkpointing; every method is then a no-op).
        every: steps between checkpoints (None: only restoring).
        kind: the solver's name (stored; a checkpoint of another solver is refused).
        config: the settings that must match to resume (hyper-parameters, data signature).
        comm: the process group.
        resume: continue from the newest checkpoint; without it an existing checkpoint in
            ``directory`` is an error (so that an old run is never silently mixed with a new one).
    """

    def __init__(self, directory, every: int | None, kind: str, config: Mapping, comm: Comm, resume: bool) -> None:
        if resume and directory is None:
            raise ValueError("resume=True needs a checkpoint_dir")
        self.kind, self.comm = kind, comm
        self.config = _normalised(dict(config))
        self.manager = None if directory is None else CheckpointManager(directory, every, writer=comm.is_main)
        if self.manager is not None and not resume and self.manager.steps():
            raise ValueError(f"checkpoint_dir {str(directory)!r} already holds checkpoints "
                             f"(steps {sorted(self.manager.steps())}): pass resume=True (--resume) to continue that "
                             "run, or use an empty folder")

    def restore(self) -> tuple[dict[str, torch.Tensor], dict] | None:
        """``(tensors, meta)`` of the newest good checkpoint (None when there is none: a fresh start,
        with a warning). Raises ValueError when it belongs to another solver or configuration."""
        if self.manager is None:
            return None
        self.comm.barrier()  # every process sees the same files
        with warnings.catch_warnings():
            if not self.comm.is_main:
                warnings.simplefilter("ignore")
            found = self.manager.load_latest()
            if found is None:
                warnings.warn(f"resume: no checkpoint in {str(self.manager.directory)!r}; starting from scratch",
                              UserWarning, stacklevel=3)
        steps = self.comm.all_gather_objects(None if found is None else found[0])
        if len(set(steps)) != 1:
            raise ValueError(f"resume: the processes found different checkpoints ({steps}); is checkpoint_dir on a "
                             "file system every process sees?")
        if found is None:
            return None
        _, tensors, meta = found
        if meta.get("kind") != self.kind:
            raise ValueError(f"resume: the checkpoint in {str(self.manager.directory)!r} was written by "
                             f"{meta.get('kind')!r}, not {self.kind!r}")
        saved = meta.get("config", {})
        diff = sorted(k for k in set(saved) | set(self.config) if saved.get(k) != self.config.get(k))
        if diff:
            detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {self.config.get(k)!r}" for k in diff)
            raise ValueError(f"resume: the checkpoint in {str(self.manager.directory)!r} belongs to a run with other "
                             f"settings ({detail})")
        return tensors, meta

    def maybe_save(self, step: int, build: Callable[[], tuple[dict, dict]]) -> None:
        """When ``step`` is due, ``build()`` (on every rank: it may gather) and write (rank 0)."""
        if self.manager is None or not self.manager.due(step):
            return
        tensors, meta = build()
        self.manager.save(step, tensors, {**meta, "kind": self.kind, "config": self.config,
                                          "world_size": self.comm.world})
