"""Custom ops of upi_fast and the rule that picks their implementation.

Every op is declared once, in the table of :mod:`upi_fast.ops.table` (schema, implementations,
tests), and defined from it as ``upi_fast::<name>``; one file per op in this package holds its fake
kernel, its pure-PyTorch reference and its autograd formula. Implementations:

* ``torch``  -- the pure-PyTorch reference (always available, every device); also the op's default
  kernel (``CompositeExplicitAutograd``), which serves the devices other than CPU and CUDA;
* ``triton`` -- Triton kernels from :mod:`upi_fast.kernels` (CUDA tensors; CPU tensors too when
  ``TRITON_INTERPRET=1`` was set before the first kernel import);
* ``cuda``   -- the C++/CUDA extension ``upi_fast._C`` (CUDA tensors): its kernels are the ops
  ``upi_fast_cuda::<name>`` (same schemas, ``CUDA`` key only).

One Python dispatcher, registered once for the ``CPU`` and ``CUDA`` keys of every ``upi_fast::`` op,
looks the implementation up per call (:func:`implementation`); the autograd formulas (the
``Autograd`` key, ``torch.library.register_autograd``) call the ops again, so derivatives follow the
same choice. :func:`set_backend` only changes the setting: no registration is ever made, replaced or
removed after import. The dispatch rule, per call and per device of the inputs:

* ``set_backend("torch" | "triton" | "cuda")`` (or ``UPI_FAST_BACKEND``) forces a backend; asking
  for one that is unavailable raises :class:`RuntimeError` at once. CPU tensors use ``triton``
  only under the interpreter, and ``torch`` otherwise.
* ``"auto"`` (the default) uses, for CUDA tensors, ``cuda`` if the extension is built, else
  ``triton`` if Triton imports, else ``torch``; CPU tensors always use ``torch``. Each quiet
  fall-back is logged once at DEBUG level on the ``upi_fast`` logger.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import warnings
from typing import Callable

import torch

from .table import CUDA_NAMESPACE, IMPLEMENTATIONS, NAMESPACE, OPS, define_schemas, load

__all__ = ["set_backend", "get_backend", "backends", "resolve_backend", "implementation", "BACKENDS"]

BACKENDS = ("auto", "torch", "triton", "cuda")
_log = logging.getLogger("upi_fast")

_state: dict = {"backend": None, "logged": set(), "cuda_schemas": None}
# op name -> {"torch" | "triton" | "cuda": what implements it}: a callable, or the table's name of one
# ("module:function", "namespace::op"), loaded on first use (importing upi_fast compiles nothing).
_REGISTRY: dict[str, dict[str, object]] = {}


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_importable() -> bool:
    if "triton_spec" not in _state:  # find_spec walks sys.path: once per process
        _state["triton_spec"] = importlib.util.find_spec("triton") is not None
    return _state["triton_spec"]


def _cuda_ext():
    """The loaded extension module ``upi_fast._C``, or ``None`` when it is not built (or unusable).

    The extension's kernels are ops of its own namespace, ``upi_fast_cuda::<op>`` (``CUDA`` key,
    ``csrc/register.cpp``), whose schemas are defined here, from the table, before the import: a C++
    signature that disagrees with them makes the import fail (an ``ImportError``, reported by
    :func:`backends`). Importing it initialises no CUDA context and registers nothing for
    ``upi_fast::``, so when it loads does not matter.
    """
    if "ext" not in _state:
        _state["ext"] = None
        if _state["cuda_schemas"] is None:
            _state["cuda_schemas"] = define_schemas(torch.library.Library(CUDA_NAMESPACE, "DEF"))
        try:
            ext = importlib.import_module("upi_fast._C")
        except (ImportError, OSError) as exc:  # not built, built against another torch, stale schemas
            _state["ext_error"] = f"{type(exc).__name__}: {exc}"
            return None
        namespace = getattr(ext, "ops_namespace", None)
        if namespace != CUDA_NAMESPACE:  # built from the sources before the upi_fast_cuda namespace
            _state["ext_error"] = (f"upi_fast._C registers its kernels in namespace {namespace or 'upi_fast'!r}, "
                                   f"not {CUDA_NAMESPACE!r}: it was built from older sources; rebuild it with "
                                   "UPI_FAST_BUILD_CUDA=1 (csrc/README.md)")
            warnings.warn(_state["ext_error"], RuntimeWarning, stacklevel=2)
            return None
        _state["ext"] = ext
    return _state["ext"]


def _cuda_ext_missing_ops() -> list[str]:
    """Ops of the table that the loaded extension does not register (all of them without it)."""
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


def register_implementation(op: str, backend: str, impl: str | Callable) -> None:
    """The one way an implementation reaches the dispatcher: ``impl`` (a callable, or a name as in the
    table: ``module:function``, ``namespace::op``) serves ``op`` when ``backend`` is chosen."""
    if backend not in IMPLEMENTATIONS:
        raise ValueError(f"backend must be one of {IMPLEMENTATIONS}, got {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = impl


def _loaded(op: str, backend: str) -> Callable:
    entry = _REGISTRY[op]
    impl = entry[backend]
    if not callable(impl):
        impl = entry[backend] = load(impl)
    return impl


def implementation(op: str, device: torch.device | str) -> Callable:
    """The implementation of ``op`` that serves tensors on ``device`` under the current setting:
    the torch reference, the Triton launcher, or the extension's op ``upi_fast_cuda::<op>``."""
    backend = resolve_backend(device)
    # "auto" resolves to "cuda" only when it is usable; a forced one may not be (UPI_FAST_BACKEND=cuda)
    if backend == "cuda" and _state["backend"] == "cuda" and not backends()["cuda"]:
        raise RuntimeError(f"backend 'cuda' is unavailable: {_why_unavailable('cuda')}")
    return _loaded(op, backend)


def _dispatcher(op: str) -> Callable:
    """The kernel registered for ``CPU`` and ``CUDA``: forwards to :func:`implementation` for the
    device of the first tensor argument."""

    def _kernel(*args):
        dev = next(a.device for a in args if isinstance(a, torch.Tensor))
        return implementation(op, dev)(*args)

    _kernel.__name__ = _kernel.__qualname__ = f"{op}_dispatcher"
    return _kernel


# The schemas, from the table; the library also holds the kernels registered below, for the life of
# the process.
_LIB = define_schemas(torch.library.Library(NAMESPACE, "DEF"))

# The op modules: fake kernels, references, autograd formulas (they need the schemas above).
from . import saliency_dissim, softplus, sketch_update  # noqa: E402,F401

for _spec in OPS:
    for _backend in IMPLEMENTATIONS:
        register_implementation(_spec.name, _backend, _spec.implementation(_backend))
    _LIB.impl(_spec.name, _loaded(_spec.name, "torch"), "CompositeExplicitAutograd")  # the default kernel
    _LIB.impl(_spec.name, _dispatcher(_spec.name), "CPU")
    _LIB.impl(_spec.name, _dispatcher(_spec.name), "CUDA")
del _spec, _backend

_cuda_ext()  # load the extension now (no CUDA context), so that backends() and info() report on it
