"""Checkpoints of long solver runs: atomic, checksummed, the last few kept, corrupt ones skipped.

A checkpoint is one `safetensors <https://github.com/huggingface/safetensors>`_ file
``ckpt-<step>.safetensors`` holding named tensors and two metadata strings: ``"meta"`` (JSON: the
solver's counters and configuration) and ``"sha256"``, a checksum over the metadata JSON and every
tensor (name, dtype, shape, bytes). Files are written through :func:`upi_fast.io.write_bytes_atomic`
(temporary file, fsync, rename), so a crash while writing never leaves a half-written checkpoint
under the final name; a checkpoint damaged afterwards (truncated copy, flipped bits) fails the
checksum and :class:`CheckpointManager` falls back to the previous one with a warning. Loading
never unpickles anything.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Mapping

import torch

from .io import to_jsonable, write_bytes_atomic

__all__ = ["CheckpointError", "FORMAT", "save_checkpoint", "load_checkpoint", "CheckpointManager",
           "generator_state", "set_generator_state"]

#: Value of the ``"format"`` metadata key of a upi_fast checkpoint.
FORMAT = "upi_fast.checkpoint/1"
_NAME = re.compile(r"^ckpt-(\d{9})\.safetensors$")


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt (checksum mismatch) or not a checkpoint."""


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.view(torch.uint8).numpy())


def _checksum(meta_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    h.update(meta_json.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode("utf-8"))
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> None:
    """Write ``tensors`` (name -> tensor, any device; stored on the CPU) and the JSON-able ``meta``
    atomically to ``path`` with a SHA-256 checksum over both."""
    from safetensors.torch import save as st_save

    if not isinstance(tensors, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in tensors.items()):
        raise TypeError("tensors must be a dict of str -> torch.Tensor")
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta_json = json.dumps(to_jsonable(dict(meta)), sort_keys=True)
    blob = st_save(cpu, metadata={"format": FORMAT, "meta": meta_json, "sha256": _checksum(meta_json, cpu)})
    write_bytes_atomic(path, blob)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Returns ``(tensors, meta)`` (tensors on the CPU).

    Raises:
        CheckpointError: the file is missing, truncated, not a upi_fast checkpoint, or its checksum
            does not match its contents (the message names the file and the reason).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    p = Path(os.fspath(path))
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint {str(p)!r} cannot be read: {e}") from None
    if len(raw) < 8:
        raise CheckpointError(f"checkpoint {str(p)!r} is truncated ({len(raw)} bytes)")
    n = int.from_bytes(raw[:8], "little")
    if 8 + n > len(raw):
        raise CheckpointError(f"checkpoint {str(p)!r} is truncated (header of {n} bytes, file of {len(raw)})")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
        info = header.get("__metadata__") or {}
    except (UnicodeDecodeError, ValueError, AttributeError):
        raise CheckpointError(f"checkpoint {str(p)!r} is corrupt (unreadable header)") from None
    if info.get("format") != FORMAT:
        raise CheckpointError(f"{str(p)!r} is not a upi_fast checkpoint (no {FORMAT!r} marker)")
    try:
        tensors = st_load(raw)
    except (SafetensorError, RuntimeError, ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(p)!r} is truncated or corrupt ({e})") from None
    meta_json = info.get("meta", "")
    if _checksum(meta_json, tensors) != info.get("sha256"):
        raise CheckpointError(f"checkpoint {str(p)!r} is corrupt: SHA-256 checksum mismatch")
    try:
        meta = json.loads(meta_json)
    except ValueError:
        raise CheckpointError(f"checkpoint {str(p)!r} is corrupt (metadata is not JSON)") from None
    return tensors, meta


def generator_state(gen: torch.Generator) -> torch.Tensor:
    """A generator's state as a uint8 CPU tensor (CPU or CUDA generators)."""
    return gen.get_state().clone()


def set_generator_state(gen: torch.Generator, state: torch.Tensor) -> None:
    gen.set_state(state.to(device="cpu", dtype=torch.uint8).contiguous())


class CheckpointManager:
    """The checkpoints of one run in ``directory``: ``ckpt-<step>.safetensors``, the newest
    ``keep`` kept.

    Args:
        directory: where the files go (created on the first save).
        every: :meth:`due` is true every ``every`` steps (None: never).
        keep: how many checkpoints to keep (>= 1; the default 2 leaves a fallback when the newest
            is damaged).
        writer: whether this process writes (rank 0 of a distributed run); others only read.
    """

    def __init__(self, directory: str | os.PathLike, every: int | None = None, keep: int = 2,
                 writer: bool = True) -> None:
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"checkpoint_dir must be a path, got {type(directory).__name__}")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every <= 0):
            raise ValueError(f"checkpoint_every must be a positive integer or None, got {every!r}")
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an integer >= 1, got {keep!r}")
        self.directory = Path(os.fspath(directory))
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"checkpoint_dir {str(self.directory)!r} is a file, expected a folder")
        self.every, self.keep, self.writer = every, keep, writer

    def path(self, step: int) -> Path:
        return self.directory / f"ckpt-{step:09d}.safetensors"

    def steps(self) -> list[int]:
        """Steps of the checkpoint files present, newest first."""
        if not self.directory.is_dir():
            return []
        found = [int(m.group(1)) for m in map(_NAME.match, os.listdir(self.directory)) if m]
        return sorted(found, reverse=True)

    def due(self, step: int) -> bool:
        return self.every is not None and step > 0 and step % self.every == 0

    def save(self, step: int, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> Path | None:
        """Write checkpoint ``step`` (writer only) and delete all but the newest ``keep``, plus any
        temporary file a killed writer left behind. Returns the path (None on non-writers)."""
        if not self.writer:
            return None
        path = self.path(step)
        save_checkpoint(path, tensors, {**dict(meta), "step": step})
        for old in self.steps()[self.keep:]:
            self._unlink(self.path(old))
        for name in os.listdir(self.directory):
            if name.startswith(".ckpt-") and name.endswith(".tmp") and not name.startswith(f".{path.name}."):
                self._unlink(self.directory / name)
        return path

    @staticmethod
    def _unlink(p: Path) -> None:
        try:
            p.unlink()
        except FileNotFoundError:
            pass

    def load_latest(self) -> tuple[int, dict[str, torch.Tensor], dict] | None:
        """The newest checkpoint that verifies, as ``(step, tensors, meta)``; None when there is none.

        A damaged checkpoint is reported with a :class:`UserWarning` naming the file and the reason,
        and the previous one is tried.

        Raises:
            CheckpointError: checkpoints exist but none of them verifies.
        """
        steps = self.steps()
        problems = []
        for step in steps:
            try:
                tensors, meta = load_checkpoint(self.path(step))
            except CheckpointError as e:
                problems.append(str(e))
                warnings.warn(f"{e}; falling back to the previous checkpoint", UserWarning, stacklevel=2)
                continue
            return step, tensors, meta
        if problems:
            raise CheckpointError(f"no usable checkpoint in {str(self.directory)!r}: " + "; ".join(problems))
        return None
