"""The safe unpickler for CIFAR-10 batch files: numpy arrays and plain containers only."""
from __future__ import annotations

import os
import pickle

import numpy as np



# --------------------------------------------------------------------------------------------- CIFAR-10
def _numpy_reconstructors() -> dict:
    """The array-rebuilding callables a pickled numpy array refers to, under all their names
    (numpy 1.x ``numpy.core``, numpy 2.x ``numpy._core``), mapped to the objects themselves so
    that no module is imported while unpickling."""
    a = np.zeros(1, dtype=np.uint8)
    reconstruct = a.__reduce__()[0]        # multiarray._reconstruct (pickle protocols 0..4)
    frombuffer = a.__reduce_ex__(5)[0]     # numeric._frombuffer (pickle protocol 5)
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for pkg in ("numpy.core", "numpy._core"):
        allowed[(f"{pkg}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{pkg}.numeric", "_frombuffer")] = frombuffer
    return allowed


def _latin1_encode(obj, encoding="latin1", errors="strict"):
    """Stand-in for ``_codecs.encode``, which Python 3 pickles of bytes at protocol < 3 refer to;
    only the latin-1 codec is allowed."""
    if not isinstance(obj, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode({type(obj).__name__}, {encoding!r})")
    return obj.encode("latin-1", errors)


class UnsafePickleError(pickle.UnpicklingError, ValueError):
    """A data pickle that refers to a global outside the allowed set (or is corrupt): nothing was
    executed. Both a ``pickle.UnpicklingError`` and a ``ValueError``."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers of numbers, strings, bytes and numpy arrays, nothing else.

    ``find_class`` resolves only numpy's array reconstruction helpers (``_reconstruct``,
    ``_frombuffer``, ``ndarray``, ``dtype``, under their numpy 1 and 2 module names) and a
    latin-1-only ``_codecs.encode``; any other global raises :class:`UnsafePickleError` (a
    ``pickle.UnpicklingError`` and a ``ValueError``), so a
    pickle cannot call arbitrary code.
    """

    _ALLOWED: dict | None = None

    def find_class(self, module: str, name: str):
        if RestrictedUnpickler._ALLOWED is None:
            allowed = _numpy_reconstructors()
            allowed[("_codecs", "encode")] = _latin1_encode
            RestrictedUnpickler._ALLOWED = allowed
        try:
            return RestrictedUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"refusing to load global {module}.{name} from a data pickle") from None


def safe_pickle_load(path: str | os.PathLike, encoding: str = "bytes"):
    """Load a data pickle with :class:`RestrictedUnpickler` (Python 2 strings decoded per ``encoding``)."""
    with open(path, "rb") as f:
        return RestrictedUnpickler(f, encoding=encoding).load()
