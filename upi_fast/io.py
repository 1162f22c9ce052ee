"""Perturbation files and atomic writes: the one home for everything upi_fast writes to disk.

A perturbation file is a `safetensors <https://github.com/huggingface/safetensors>`_ file holding
exactly one tensor, ``"delta"`` (C x H x W, float32, in the model's input units), and string
metadata. Every metadata value is JSON-encoded, so numbers, lists and ``None`` survive the round
trip; the key ``"format"`` carries the marker :data:`FORMAT` that tells a perturbation file from
any other safetensors file. Loading never unpickles anything.

Every write goes through :func:`write_bytes_atomic`: the bytes go to a temporary file in the
destination's directory, which is flushed, fsync'ed and then renamed over the destination with
``os.replace`` (atomic on POSIX and Windows). An interrupted write leaves either the old file or
no file, never a half-written one, and the temporary file is removed on error.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ._version import __version__

__all__ = ["FORMAT", "save_perturbation", "load_perturbation", "write_bytes_atomic", "write_text_atomic",
           "write_json_atomic", "to_jsonable", "EVALUATION_DEFAULTS", "evaluation_settings"]

#: Value of the ``"format"`` metadata key that marks a upi_fast perturbation file.
FORMAT = "upi_fast.perturbation/1"

_DELTA_KEY = "delta"
# Metadata keys every perturbation file carries (None when the caller did not give them).
_STANDARD_KEYS = ("method", "eps", "norm", "model", "input_shape", "mean", "std", "created", "upi_fast_version")

#: What evaluating a perturbation needs besides the model, as ``upi-fast compute`` records it in the
#: metadata, and the value assumed when a file lacks the key (or holds None / an invalid value):
#:
#: * ``size``: side of the square images (also ``input_shape[-1]``); None: the loader's default;
#: * ``mean`` / ``std``: the per-channel normalisation the model was wrapped in (None: none), so
#:   that the perturbation, in pixel units [0, 1], is added before it;
#: * the saliency map attacked: ``saliency`` (simple / integrated / smoothgrad), ``target_kind``
#:   (prob / logit), ``integration`` and ``steps`` (integrated gradients' rule and path points M),
#:   ``smoothgrad_std`` (noise standard deviation, pixel units) and ``smoothgrad_samples`` (draws).
#:
#: ``compute`` also records ``eps`` with ``eps_units`` (``"pixels [0, 1]"``) and ``norm`` (``"2"`` /
#: ``"inf"``), ``eps_pixels`` (the 0-255 budget it was given, or None) and the model: ``model`` (spec),
#: ``weights`` (file name), ``weights_sha256`` and ``num_classes``.
EVALUATION_DEFAULTS: dict[str, Any] = {"size": None, "mean": None, "std": None, "saliency": "simple",
                                       "target_kind": "prob", "integration": "uniform_endpoints", "steps": 10,
                                       "smoothgrad_std": 0.15, "smoothgrad_samples": 10}


# --------------------------------------------------------------------------------------------- atomic writes
def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory + fsync + os.replace).

    The parent directory is created when missing. The new file gets the usual permissions
    (0o666 minus the umask). On any error the temporary file is removed and the destination is
    left untouched.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    path = Path(os.fspath(path))
    if path.name in ("", ".", ".."):
        raise ValueError(f"path must name a file, got {str(path)!r}")
    if path.is_dir():
        raise IsADirectoryError(f"path {str(path)!r} is a directory")
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (best effort: not every platform / file system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write the string ``text`` to ``path`` atomically (see :func:`write_bytes_atomic`)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    write_bytes_atomic(path, text.encode(encoding))


def to_jsonable(obj: Any) -> Any:
    """``obj`` with tensors, numpy arrays/scalars, tuples, sets and paths turned into JSON types.

    Non-finite floats are kept (Python's ``json`` writes them as ``NaN`` / ``Infinity``).
    Raises TypeError for anything else that JSON cannot represent.
    """
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"JSON object keys must be strings, got {k!r}")
            out[k] = to_jsonable(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(to_jsonable(v) for v in obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    tolist = getattr(obj, "tolist", None)  # numpy arrays and scalars
    if callable(tolist) and type(obj).__module__.startswith("numpy"):
        return tolist()
    raise TypeError(f"cannot encode a {type(obj).__name__} as JSON: {obj!r}")


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (UTF-8, trailing newline) to ``path`` atomically.

    Tensors, numpy values, tuples and paths are converted by :func:`to_jsonable`.
    """
    text = json.dumps(to_jsonable(obj), indent=indent, ensure_ascii=False)
    write_text_atomic(path, text + "\n")


# --------------------------------------------------------------------------------------------- perturbations
def _check_delta_tensor(delta) -> None:
    if not isinstance(delta, torch.Tensor):
        raise TypeError(f"delta must be a torch.Tensor of shape (C, H, W), got {type(delta).__name__}")
    if delta.dim() != 3:
        raise ValueError(f"delta must have shape (C, H, W), got {tuple(delta.shape)}")
    if delta.numel() == 0:
        raise ValueError(f"delta is empty, shape {tuple(delta.shape)}")
    if not delta.is_floating_point():
        raise TypeError(f"delta must be a floating-point tensor, got {delta.dtype}")
    if not bool(torch.isfinite(delta).all()):
        raise ValueError("delta contains NaN or Inf values")


def save_perturbation(path: str | os.PathLike, delta: torch.Tensor, metadata: Mapping[str, Any] | None = None) -> None:
    """Save a universal perturbation ``delta`` (C, H, W) with ``metadata`` to a safetensors file.

    ``delta`` is stored as float32 on the CPU. The metadata always has the keys ``method``, ``eps``,
    ``norm``, ``model``, ``input_shape``, ``mean``, ``std`` (None when not given), ``created`` (UTC,
    ISO 8601), ``upi_fast_version`` and the ``format`` marker; any other key passed is stored too.
    ``input_shape`` defaults to ``delta``'s shape. Every value is JSON-encoded (tensors and numpy
    values become lists). The file is written atomically.

    Raises:
        TypeError: ``delta`` is not a floating tensor, or a metadata value is not JSON-encodable.
        ValueError: ``delta`` is not 3-D or holds NaN / Inf; a metadata key is not a string.
    """
    from safetensors.torch import save as st_save

    _check_delta_tensor(delta)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    meta: dict[str, Any] = {k: None for k in _STANDARD_KEYS}
    meta["input_shape"] = list(delta.shape)
    meta["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    meta["upi_fast_version"] = __version__
    for k, v in metadata.items():
        if not isinstance(k, str):
            raise ValueError(f"metadata keys must be strings, got {k!r}")
        if k == "format":
            raise ValueError("metadata key 'format' is reserved for the upi_fast file marker")
        meta[k] = v
    encoded = {"format": FORMAT}
    for k, v in meta.items():
        try:
            encoded[k] = json.dumps(to_jsonable(v))
        except TypeError as e:
            raise TypeError(f"metadata[{k!r}]: {e}") from None
    tensor = delta.detach().to(device="cpu", dtype=torch.float32).contiguous()
    write_bytes_atomic(path, st_save({_DELTA_KEY: tensor}, metadata=encoded))


def _floats_or_none(v) -> tuple | None:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, list) or not v:
        return None
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in v):
        return None
    return tuple(float(t) for t in v)


def _positive_int_or_none(v) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def evaluation_settings(metadata: Mapping[str, Any], delta_shape: Sequence[int] | None = None) -> dict[str, Any]:
    """The settings of :data:`EVALUATION_DEFAULTS` that a perturbation file's ``metadata`` states,
    checked (a missing, None or malformed value is left out, so that the caller falls back on its
    own value): ``size`` from ``size`` or the square ``input_shape`` (or ``delta_shape``), ``mean`` /
    ``std`` as tuples of floats (a file stating neither: no normalisation, ``None``, when it was
    written by ``compute``, which always records both), the saliency settings by type."""
    from .saliency import INTEGRATION_RULES, METHODS, TARGET_KINDS

    out: dict[str, Any] = {}
    shape = metadata.get("input_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(_positive_int_or_none(t) for t in shape)):
        shape = list(delta_shape) if delta_shape is not None else None
    size = _positive_int_or_none(metadata.get("size"))
    if size is None and shape is not None and shape[-1] == shape[-2]:
        size = int(shape[-1])
    if size is not None:
        out["size"] = size
    for key in ("mean", "std"):
        if key in metadata:
            val = _floats_or_none(metadata[key])
            if val is not None or metadata[key] is None:
                out[key] = val
    for key, choices in (("saliency", METHODS), ("target_kind", TARGET_KINDS), ("integration", INTEGRATION_RULES)):
        if metadata.get(key) in choices:
            out[key] = metadata[key]
    for key in ("steps", "smoothgrad_samples"):
        if _positive_int_or_none(metadata.get(key)) is not None:
            out[key] = metadata[key]
    sg = metadata.get("smoothgrad_std")
    if isinstance(sg, (int, float)) and not isinstance(sg, bool) and math.isfinite(sg) and sg > 0:
        out["smoothgrad_std"] = float(sg)
    return out


def _invalid(path, why: str) -> ValueError:
    return ValueError(f"{os.fspath(path)!r} is not a valid perturbation file: {why}")


def load_perturbation(path: str | os.PathLike,
                      expected_shape: Sequence[int] | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Load a perturbation saved by :func:`save_perturbation`.

    Returns:
        ``(delta, metadata)``: ``delta`` a float32 CPU tensor (C, H, W); ``metadata`` a dict whose
        values are JSON-decoded (a value that is not valid JSON is returned as its raw string).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a safetensors file (truncated, random bytes), lacks the upi_fast
            marker, does not hold exactly one floating 3-D tensor ``"delta"``, holds NaN / Inf, or
            ``delta``'s shape differs from ``expected_shape`` (both shapes in the message).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    p = Path(os.fspath(path))
    if not p.exists():
        raise FileNotFoundError(f"perturbation file not found: {str(p)!r}")
    if not p.is_file():
        raise _invalid(p, "not a regular file")
    raw = p.read_bytes()
    header = _read_header(p, raw)
    meta_raw = header.pop("__metadata__", None) or {}
    if not isinstance(meta_raw, dict) or meta_raw.get("format") != FORMAT:
        raise _invalid(p, f"missing the upi_fast marker (metadata 'format' = {FORMAT!r})")
    if set(header) != {_DELTA_KEY}:
        raise _invalid(p, f"expected exactly one tensor {_DELTA_KEY!r}, found {sorted(header)}")
    try:
        tensors = st_load(raw)
    except (SafetensorError, RuntimeError, ValueError, TypeError) as e:
        raise _invalid(p, str(e)) from None
    delta = tensors[_DELTA_KEY]
    if not delta.is_floating_point():
        raise _invalid(p, f"'delta' must be floating point, got {delta.dtype}")
    if delta.dim() != 3:
        raise _invalid(p, f"'delta' must have 3 dims (C, H, W), got shape {tuple(delta.shape)}")
    if delta.numel() == 0:
        raise _invalid(p, f"'delta' is empty, shape {tuple(delta.shape)}")
    if not bool(torch.isfinite(delta).all()):
        raise _invalid(p, "'delta' contains NaN or Inf values")
    if expected_shape is not None:
        exp = tuple(int(s) for s in expected_shape)
        if tuple(delta.shape) != exp:
            raise ValueError(f"perturbation in {str(p)!r} has shape {tuple(delta.shape)}, expected {exp}")
    meta = {}
    for k, v in meta_raw.items():
        try:
            meta[k] = json.loads(v)
        except (TypeError, ValueError):
            meta[k] = v
    return delta.to(torch.float32), meta


def _read_header(p: Path, raw: bytes) -> dict:
    """Parse the safetensors header (8-byte little-endian length + JSON) and check the offsets
    cover the file exactly, so truncated or padded files are caught before any tensor is read."""
    if len(raw) < 8:
        raise _invalid(p, f"file too short ({len(raw)} bytes)")
    n = int.from_bytes(raw[:8], "little")
    if n < 2 or 8 + n > len(raw):
        raise _invalid(p, "bad header length (truncated or not a safetensors file)")
    try:
        header = json.loads(raw[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _invalid(p, "header is not JSON (not a safetensors file)") from None
    if not isinstance(header, dict):
        raise _invalid(p, "header is not a JSON object")
    data_len = len(raw) - 8 - n
    end = 0
    for k, info in header.items():
        if k == "__metadata__":
            continue
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) for o in offs)):
            raise _invalid(p, f"tensor {k!r} has no valid data offsets")
        end = max(end, offs[1])
    if end != data_len:
        raise _invalid(p, f"data section has {data_len} bytes, header describes {end} (truncated or corrupt)")
    return header
