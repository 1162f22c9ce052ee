"""What this installation can run: versions, the CUDA device, and which op backends are available.

``python -m upi_fast.info`` prints it (``--json`` for a machine-readable form); :func:`info` returns
it as a dict. Nothing here runs at import; :func:`info` imports no Triton and allocates nothing on
a GPU (asking for the device names initialises the CUDA runtime, without allocating memory).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from typing import Any, Sequence

__all__ = ["info", "format_info", "main"]


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def info() -> dict[str, Any]:
    """Versions and backends of this installation.

    Returns:
        A dict with ``upi_fast`` / ``python`` / ``platform`` / ``torch`` / ``triton`` versions
        (``triton`` None when not installed), ``torch_cuda`` (the CUDA version torch was built
        for, None for a CPU build), ``cuda_devices`` (names of the visible CUDA devices, empty
        without one), ``triton_interpret`` (bool), ``extension`` (the C++/CUDA extension
        ``upi_fast._C``: its build information, or ``{"error": why it does not load}``),
        ``backends`` (:func:`upi_fast.backends`: ``{"torch": True, "triton": bool, "cuda": bool}``),
        ``unavailable`` (``{backend: reason}`` for each unavailable one), ``backend`` (the selected
        setting, :func:`upi_fast.get_backend`) and ``cuda_tensors_use`` (the backend that serves
        CUDA tensors under that setting, None without a CUDA device).
    """
    import torch

    from . import __version__, ops

    avail = ops.backends()
    has_gpu = torch.cuda.is_available()
    ext = ops._cuda_ext()
    if ext is not None:
        try:
            extension: dict[str, Any] = dict(ext.build_info())
        except Exception as exc:  # an extension built from other sources
            extension = {"error": f"build_info() failed: {type(exc).__name__}: {exc}"}
    else:
        extension = {"error": ops._state.get("ext_error", "not built")}
    return {
        "upi_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if has_gpu else [],
        "triton": _dist_version("triton"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
        "extension": extension,
        "backends": avail,
        "unavailable": {name: ops._why_unavailable(name) for name, ok in avail.items() if not ok},
        "backend": ops.get_backend(),
        "cuda_tensors_use": ops.resolve_backend("cuda") if has_gpu else None,
    }


def format_info(data: dict[str, Any] | None = None) -> str:
    """:func:`info` (or ``data``) as a few human-readable lines."""
    d = info() if data is None else data
    ext = d["extension"]
    ext_line = (f"built for CUDA {ext.get('cuda_version')} ({', '.join(ext.get('cuda_archs', []))}), "
                f"torch {ext.get('torch_version')}" if "error" not in ext else f"not loaded ({ext['error']})")
    lines = [
        f"upi_fast {d['upi_fast']}  (Python {d['python']}, {d['platform']})",
        f"torch    {d['torch']}  (CUDA build: {d['torch_cuda'] or 'no, CPU only'})",
        f"triton   {d['triton'] or 'not installed'}" + ("  (TRITON_INTERPRET=1)" if d["triton_interpret"] else ""),
        f"CUDA devices: {', '.join(d['cuda_devices']) if d['cuda_devices'] else 'none'}",
        f"C++/CUDA extension upi_fast._C: {ext_line}",
        "backends:",
    ]
    for name, ok in d["backends"].items():
        lines.append(f"  {name:<7} {'available' if ok else 'unavailable: ' + d['unavailable'].get(name, '')}")
    use = d["cuda_tensors_use"]
    cpu = "'triton' (interpreter)" if d["backend"] == "triton" and d["triton_interpret"] else "'torch'"
    lines.append(f"selected: {d['backend']!r}; CPU tensors use {cpu}" + (f", CUDA tensors use {use!r}" if use else ""))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m upi_fast.info [--json]``: print :func:`format_info` (or :func:`info` as JSON)."""
    parser = argparse.ArgumentParser(prog="python -m upi_fast.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the information as JSON")
    args = parser.parse_args(argv)
    print(json.dumps(info(), indent=2) if args.json else format_info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
