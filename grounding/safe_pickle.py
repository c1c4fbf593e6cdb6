"""Read annotation and results pickles as plain data, never running code from them, or the same content as JSON.

RefCOCO's annotations (``refs(unc).p``, ``refs(umd).p``) and mmdetection's results files are pickles, and
``pickle.load`` runs whatever callable a pickle names (a ``__reduce__`` that calls ``os.system`` runs on load).
:func:`load_plain_pickle` resolves every global a pickle names through an allow-list before anything can
call it: builtin containers and scalars need no global at all; the allowed globals are numpy's own array and
scalar reconstructors (``numpy.ndarray``, ``numpy.dtype``, ``_reconstruct``, ``scalar``, ``_frombuffer``,
under numpy 1's ``numpy.core`` and numpy 2's ``numpy._core`` module names), ``set``/``frozenset``/
``bytearray``, and the two ways protocol-2 pickles written by Python 3 store ``bytes`` (e.g. RLE counts):
``_codecs.encode``, replaced by a function that only turns a ``str`` into latin-1 bytes, and ``bytes``,
replaced by one that only makes an empty ``bytes``. Anything else is
refused with a one-line :class:`UnsafePickleError` naming the file and the global, before it is resolved.
Python 2 pickles (the RefCOCO files) decode their byte strings as latin-1, the encoding numpy documents for
Python 2 pickles of arrays (ASCII text decodes identically).

:func:`load_plain_data` reads a file holding the same content as JSON (first non-blank byte ``[`` or ``{``)
with :mod:`json`, and anything else with :func:`load_plain_pickle`.
"""

from __future__ import annotations

import importlib
import io
import json
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

from grounding.coco_io import GroundingInputError

__all__ = ["UnsafePickleError", "load_plain_data", "load_plain_pickle", "loads_plain_pickle"]


class UnsafePickleError(GroundingInputError):
    """A pickle names a global outside the plain-data allow-list; nothing it names was resolved or run."""


def _latin1_encode(text: object, encoding: object = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``: ``(str, 'latin1')`` and nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed as (str, 'latin1'), got {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args: object) -> bytes:
    """``bytes()``, which protocol-2 pickles call for an empty ``bytes`` (e.g. the data of an empty array)."""
    if args:
        raise pickle.UnpicklingError("bytes is only allowed without arguments (an empty bytes object)")
    return b""


def _numpy_internal(name: str) -> Any:
    """A numpy-internal reconstructor, wherever this numpy keeps it (``numpy._core`` in 2.x, ``numpy.core`` in 1.x)."""
    module, attr = name.rsplit(".", 1)
    for prefix in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{prefix}.{module}"), attr)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"this numpy has no {name}")


def _allowed_globals() -> dict[tuple[str, str], Callable[[], Any]]:
    """(module, name) as written in pickles -> a thunk giving the object it stands for."""
    import numpy as np

    table: dict[tuple[str, str], Callable[[], Any]] = {
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("_codecs", "encode"): lambda: _latin1_encode,
    }
    for builtins_module in ("builtins", "__builtin__"):  # __builtin__: protocol <= 2 and Python 2 pickles
        for name, obj in (("set", set), ("frozenset", frozenset), ("bytearray", bytearray)):
            table[(builtins_module, name)] = lambda obj=obj: obj
        table[(builtins_module, "bytes")] = lambda: _empty_bytes
    for core in ("numpy.core", "numpy._core"):  # numpy 1.x writes numpy.core, numpy 2.x numpy._core
        for name in ("multiarray._reconstruct", "multiarray.scalar", "numeric._frombuffer"):
            module, attr = f"{core}.{name}".rsplit(".", 1)
            table[(module, attr)] = lambda name=name: _numpy_internal(name)
    return table


class _PlainDataUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose every global lookup goes through the allow-list."""

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        # fix_imports=False: names arrive here exactly as written; the allow-list spells the Python 2 ones.
        super().__init__(file, encoding="latin1", fix_imports=False)
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        thunk = self._allowed.get((module, name))
        if thunk is None:
            raise UnsafePickleError(
                f"{self._source}: refused to unpickle: it references {module}.{name}, which is not plain data "
                "(only builtin containers and scalars and numpy arrays are allowed; convert the file to JSON)"
            )
        return thunk()

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: refused to unpickle: it uses persistent ids")


def _unpickle(stream: io.BufferedIOBase, source: str) -> Any:
    try:
        return _PlainDataUnpickler(stream, source).load()
    except UnsafePickleError:
        raise
    except Exception as err:  # truncated or corrupt data; the pickle module's messages can span lines
        detail = str(err).splitlines()[0] if str(err) else ""
        raise GroundingInputError(
            f"{source}: not a readable pickle ({type(err).__name__}{': ' + detail if detail else ''})"
        ) from None


def loads_plain_pickle(data: bytes, source: str = "<bytes>") -> Any:
    """:func:`load_plain_pickle` on bytes in memory; ``source`` names them in errors."""
    return _unpickle(io.BytesIO(data), source)


def load_plain_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` allowing only plain data (see the module docstring); one-line errors name the file."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            return _unpickle(f, str(p))
    except FileNotFoundError:
        raise GroundingInputError(f"{p}: file not found") from None
    except IsADirectoryError:
        raise GroundingInputError(f"{p}: is a folder, expected a pickle or JSON file") from None


def load_plain_data(path: str | Path, what: str) -> Any:
    """Load ``path`` as JSON when its first non-blank byte is ``[`` or ``{``, else as a plain-data pickle.

    ``what`` names the file's role in errors (e.g. ``"RefCOCO refs"``).
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            head = f.read(64).lstrip()
    except FileNotFoundError:
        raise GroundingInputError(f"{p}: {what} file not found") from None
    except OSError as err:
        raise GroundingInputError(f"{p}: cannot read {what} file ({err.strerror or err})") from None
    if head[:1] in (b"[", b"{"):
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise GroundingInputError(f"{p}: malformed JSON in {what} file ({err})") from None
    return load_plain_pickle(p)
