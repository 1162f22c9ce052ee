"""Custom ops of upi_fast and the rule that picks their implementation.

Every op is declared once with ``torch.library`` as ``upi_fast::<name>`` (one file per op in
this package: schema, fake kernel, pure-PyTorch reference, autograd). Implementations:

* ``torch``  -- the pure-PyTorch reference (always available, every device);
* ``triton`` -- Triton kernels from :mod:`upi_fast.kernels` (CUDA tensors; CPU tensors too when
  ``TRITON_INTERPRET=1`` was set before the first kernel import);
* ``cuda``   -- the C++/CUDA extension ``upi_fast._C`` (CUDA tensors), which registers its kernels
  for the ``CUDA`` dispatch key of the same schemas.

The dispatch rule, per call and per device of the inputs:

* ``set_backend("torch" | "triton" | "cuda")`` (or ``UPI_FAST_BACKEND``) forces a backend; asking
  for one that is unavailable raises :class:`RuntimeError` at once. CPU tensors use ``triton``
  only under the interpreter, and ``torch`` otherwise.
* ``"auto"`` (the default) uses, for CUDA tensors, ``cuda`` if the extension is built, else
  ``triton`` if Triton imports, else ``torch``; CPU tensors always use ``torch``. Each quiet
  fall-back is logged once at DEBUG level on the ``upi_fast`` logger.

The module holds the backend state and this rule, nothing else.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import warnings
from typing import Callable

import torch

__all__ = ["set_backend", "get_backend", "backends", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton", "cuda")
_log = logging.getLogger("upi_fast")

_state: dict = {"backend": None, "cuda_lib": None, "logged": set()}
# op name -> {"torch": callable, "triton": "module:function"}; filled by the op modules.
_REGISTRY: dict[str, dict[str, object]] = {}


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _cuda_ext():
    """The loaded extension module ``upi_fast._C``, or ``None`` when it is not built (or unusable).

    Importing it registers its C++ kernels for the ``CUDA`` dispatch key of the ops; it initialises
    no CUDA context. If the Python router was registered for ``CUDA`` before the extension loaded,
    the C++ kernels (the newer registration) would shadow it, so the router is registered again.
    """
    if "ext" not in _state:
        try:
            ext = importlib.import_module("upi_fast._C")
        except (ImportError, OSError) as exc:  # not built, built against another torch, stale schemas
            _state["ext"] = None
            _state["ext_error"] = f"{type(exc).__name__}: {exc}"
            return None
        _state["ext"] = ext
        if _state["cuda_lib"] is not None:
            _state["cuda_lib"]._destroy()
            _state["cuda_lib"] = None
            _sync_cuda_registration()
    return _state["ext"]


def _cuda_ext_missing_ops() -> list[str]:
    """Ops of this package that the loaded extension does not register (all of them without it)."""
    ext = _cuda_ext()
    have = set(getattr(ext, "registered_ops", lambda: [])()) if ext is not None else set()
    return sorted(set(_REGISTRY) - have)


def backends() -> dict[str, bool]:
    """Which backends can run here: ``{"torch": True, "triton": bool, "cuda": bool}``.

    ``triton`` is available when Triton imports and either a CUDA device is present or
    ``TRITON_INTERPRET=1`` is set; ``cuda`` when the extension ``upi_fast._C`` imports, registers a
    kernel for every op, and a CUDA device is present. Calling this loads nothing on a GPU.
    """
    has_gpu = torch.cuda.is_available()
    return {
        "torch": True,
        "triton": _triton_importable() and (has_gpu or _interpreter_on()),
        "cuda": has_gpu and _cuda_ext() is not None and not _cuda_ext_missing_ops(),
    }


def _why_unavailable(name: str) -> str:
    if name == "triton":
        if not _triton_importable():
            return "the triton package is not installed"
        return "no CUDA device is present (set TRITON_INTERPRET=1 to run Triton kernels on the CPU)"
    if name == "cuda":
        if _cuda_ext() is None:
            return ("the C++/CUDA extension upi_fast._C is not built or does not load "
                    f"({_state.get('ext_error', 'import failed')}); rebuild it with UPI_FAST_BUILD_CUDA=1 "
                    "(csrc/README.md)")
        missing = _cuda_ext_missing_ops()
        if missing:
            return (f"the C++/CUDA extension upi_fast._C has no kernel for {missing} (built from older "
                    "sources); rebuild it with UPI_FAST_BUILD_CUDA=1 (csrc/README.md)")
        return "no CUDA device is present"
    return "unknown reason"


def set_backend(name: str) -> None:
    """Select the implementation of the custom ops: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"``.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when an explicitly requested
    backend is unavailable on this machine (the message says why).
    """
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name in ("triton", "cuda") and not backends()[name]:
        raise RuntimeError(f"backend {name!r} is unavailable: {_why_unavailable(name)}")
    _state["backend"] = name
    _sync_cuda_registration()


def get_backend() -> str:
    """The backend set by :func:`set_backend` (or ``UPI_FAST_BACKEND``; default ``"auto"``)."""
    if _state["backend"] is None:
        env = os.environ.get("UPI_FAST_BACKEND", "auto")
        if env not in BACKENDS:
            raise ValueError(f"UPI_FAST_BACKEND must be one of {BACKENDS}, got {env!r}")
        _state["backend"] = env
    return _state["backend"]


def resolve_backend(device: torch.device | str) -> str:
    """The backend that serves tensors on ``device`` under the current setting."""
    device = torch.device(device)
    chosen = get_backend()
    if device.type != "cuda":
        if chosen == "triton" and _interpreter_on():
            return "triton"
        if chosen not in ("auto", "torch"):
            _log_once(f"backend {chosen!r} serves CUDA tensors only; {device.type} tensors use 'torch'")
        return "torch"
    if chosen != "auto":
        return chosen
    avail = backends()
    for name in ("cuda", "triton"):
        if avail[name]:
            return name
        _log_once(f"auto backend: {name!r} unavailable ({_why_unavailable(name)}), falling back")
    return "torch"


def _log_once(msg: str) -> None:
    if msg not in _state["logged"]:
        _state["logged"].add(msg)
        _log.debug(msg)


def register(op: str, torch_impl: Callable, triton_impl: str | None) -> None:
    """Called by each op module: the reference implementation and the ``module:function`` of its
    Triton launcher (imported on first use, so importing upi_fast compiles nothing)."""
    _REGISTRY[op] = {"torch": torch_impl, "triton": triton_impl}
    _CPU_LIB.impl(op, router(op), "CPU")


def implementation(op: str, device: torch.device) -> Callable:
    """The Python implementation of ``op`` for tensors on ``device`` (torch or triton)."""
    backend = resolve_backend(device)
    entry = _REGISTRY[op]
    if backend == "triton" and entry["triton"] is not None:
        spec = entry["triton"]
        if not callable(spec):
            mod, fn = spec.split(":")
            spec = getattr(importlib.import_module(mod), fn)
            entry["triton"] = spec
        return spec
    if backend == "cuda":
        # When the cuda backend is usable its C++ kernels serve CUDA tensors directly (this router is
        # not registered for CUDA then), so reaching here means it was forced but is unusable.
        raise RuntimeError(f"backend 'cuda' is unavailable: {_why_unavailable('cuda')}")
    return entry["torch"]


def router(op: str) -> Callable:
    """A kernel for the dispatcher that forwards to :func:`implementation` for the input's device."""

    def _kernel(*args):
        dev = next(a.device for a in args if isinstance(a, torch.Tensor))
        return implementation(op, dev)(*args)

    _kernel.__name__ = f"{op}_router"
    return _kernel


def _sync_cuda_registration() -> None:
    """Make the ``CUDA`` dispatch key of every op point at the selected backend.

    The C++ extension registers its kernels for ``CUDA`` when it is imported, which happens here
    first. Unless the ``cuda`` backend is in force and usable, the Python router is registered on
    top of them (the most recent registration for a key is the one that runs); selecting ``cuda``
    destroys the Python registration, and the C++ kernels serve again (verified with
    ``torch._C._dispatch_dump``, see tests/test_cuda_ext.py).
    """
    _cuda_ext()  # before the router: a registration made after the router's would shadow it
    want_python = not (torch.cuda.is_available() and resolve_backend("cuda") == "cuda" and backends()["cuda"])
    lib = _state["cuda_lib"]
    if want_python and lib is None:
        lib = torch.library.Library("upi_fast", "IMPL")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "overriding a previously registered kernel"
            for op in _REGISTRY:
                lib.impl(op, router(op), "CUDA")
        _state["cuda_lib"] = lib
    elif not want_python and lib is not None:
        lib._destroy()
        _state["cuda_lib"] = None


# CPU kernels of every op: the Python router (torch reference, or Triton under the interpreter).
_CPU_LIB = torch.library.Library("upi_fast", "IMPL")

# Import the op modules last: they call ``register`` above.
from . import saliency_dissim, softplus, sketch_update  # noqa: E402,F401

_sync_cuda_registration()
