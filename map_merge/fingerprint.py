"""Content fingerprints: hashes of full tensor bytes, arrays, plain data and Python functions.

They key the evaluation store (a task adapter's data, a function objective, a metric given as a
plain function) and the objectives shipped to workers. Equal content gives the same fingerprint
in any process; a tensor or array is hashed by its dtype, shape and every byte, never by its
(abbreviated) repr.

A Python function is hashed by what it computes, not by its name: its bytecode, constants and
names (not its file or line numbers), its defaults, the contents of its closure and the values of
the module globals it reads, recursively for functions of the same code base. Functions, classes
and modules of installed libraries (the standard library, site-packages) are hashed by their
qualified name. So two lambdas of one module differ, a closure over other data differs, and the
same source in another process gives the same fingerprint.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import pickle
import sys
import sysconfig
import types
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["content_digest"]

log = logging.getLogger(__name__)


def content_digest(*parts: Any, size: int = 12) -> str:
    """Hex digest (``size`` bytes) of ``parts``: tensors, arrays, mappings, sequences, numbers,
    strings, bytes and paths, nested freely; an ``nn.Module`` by its state dict; a function,
    ``functools.partial`` or bound method by its content (see the module docstring); an object
    carrying a string ``fingerprint`` (a task adapter) by its type and that fingerprint; any other
    object by its type and attributes, or its pickle. ``TypeError`` for what is none of these."""
    digest = hashlib.blake2b(digest_size=size)
    feeder = _Feeder(digest)
    for part in parts:
        feeder.feed(part)
    return digest.hexdigest()


def _tag(digest: Any, tag: str, payload: bytes = b"") -> None:
    digest.update(tag.encode())
    digest.update(len(payload).to_bytes(8, "little"))
    digest.update(payload)


@functools.lru_cache(maxsize=None)
def _library_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    roots = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")} | {sys.base_prefix + os.sep + "lib"}
    return tuple(sorted(os.path.realpath(r) + os.sep for r in roots if r))


@functools.lru_cache(maxsize=4096)
def _is_library(module_name: str | None) -> bool:
    """Whether a module belongs to an installed library (hashed by name) rather than to the user's
    code (hashed by content)."""
    if not module_name or module_name == "__main__":
        return False
    if module_name in sys.builtin_module_names:
        return True
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if path is None:
        return module is not None and module_name != "__main__"
    return os.path.realpath(path).startswith(_library_roots())


def _names_read(code: types.CodeType) -> list[str]:
    """Global (and attribute) names a code object and the code nested in it read, in order, once."""
    seen: dict[str, None] = {}
    stack = [code]
    while stack:
        current = stack.pop(0)
        for name in current.co_names:
            seen.setdefault(name, None)
        stack.extend(c for c in current.co_consts if isinstance(c, types.CodeType))
    return list(seen)


class _Feeder:
    def __init__(self, digest: Any) -> None:
        self.digest = digest
        self.active: set[int] = set()  # objects being hashed (a reference back to one is a cycle)

    def feed(self, obj: Any) -> None:
        digest = self.digest
        if obj is None or isinstance(obj, (bool, int, float, str)):
            _tag(digest, "j", json.dumps(obj).encode())
        elif isinstance(obj, (bytes, bytearray, memoryview)):
            _tag(digest, "b", bytes(obj))
        elif isinstance(obj, torch.Tensor):
            flat = obj.detach().to("cpu").contiguous().reshape(-1)
            _tag(digest, "t", f"{flat.dtype}|{tuple(obj.shape)}".encode())
            _tag(digest, "tb", flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        elif isinstance(obj, np.ndarray):
            if obj.dtype == object:
                _tag(digest, "ao", str(obj.shape).encode())
                self._nested(obj, lambda: [self.feed(item) for item in obj.reshape(-1)])
            else:
                _tag(digest, "a", f"{obj.dtype.str}|{obj.shape}".encode())
                _tag(digest, "ab", np.ascontiguousarray(obj).tobytes())
        elif isinstance(obj, np.generic):
            self.feed(obj.item())
        elif isinstance(obj, (complex, np.dtype, torch.dtype, torch.device, range, slice, type(Ellipsis))):
            _tag(digest, "r:" + type(obj).__qualname__, repr(obj).encode())
        elif isinstance(obj, torch.nn.Module):
            _tag(digest, "m", type(obj).__qualname__.encode())
            self._nested(obj, lambda: self.feed(obj.state_dict()))
        elif isinstance(obj, Mapping):
            items = sorted(obj.items(), key=lambda kv: repr(kv[0]))
            _tag(digest, "d", str(len(items)).encode())

            def body() -> None:
                for key, value in items:
                    self.feed(key)
                    self.feed(value)

            self._nested(obj, body)
        elif isinstance(obj, (list, tuple)):
            _tag(digest, "l", str(len(obj)).encode())
            self._nested(obj, lambda: [self.feed(item) for item in obj])
        elif isinstance(obj, (set, frozenset)):
            _tag(digest, "s", str(len(obj)).encode())
            for item in sorted(content_digest(x) for x in obj):
                _tag(digest, "si", item.encode())
        elif isinstance(obj, os.PathLike):
            _tag(digest, "p", os.fspath(obj).encode())
        elif isinstance(obj, types.ModuleType):
            _tag(digest, "mod", obj.__name__.encode())
        elif isinstance(obj, types.CodeType):
            self._code(obj)
        elif isinstance(obj, types.FunctionType):
            self._function(obj)
        elif isinstance(obj, types.MethodType):
            _tag(digest, "method")
            self._nested(obj, lambda: (self.feed(obj.__func__), self._lenient(obj.__self__)))
        elif isinstance(obj, functools.partial):
            _tag(digest, "partial")
            self._nested(obj, lambda: (self.feed(obj.func), self._lenient(obj.args), self._lenient(obj.keywords)))
        elif isinstance(obj, (type, types.BuiltinFunctionType, types.BuiltinMethodType, np.ufunc)) or (
                callable(obj) and hasattr(obj, "__qualname__") and not hasattr(obj, "__dict__")):
            name = f"{getattr(obj, '__module__', None) or type(obj).__module__}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"
            _tag(digest, "named", name.encode())
        elif isinstance(getattr(obj, "fingerprint", None), str):  # a task adapter: its data's fingerprint
            _tag(digest, "fp:" + _type_name(obj), obj.fingerprint.encode())
        else:
            self._object(obj)

    def _nested(self, obj: Any, body: Any) -> None:
        key = id(obj)
        if key in self.active:
            _tag(self.digest, "cycle", _type_name(obj).encode())
            return
        self.active.add(key)
        try:
            body()
        finally:
            self.active.discard(key)

    def _lenient(self, obj: Any) -> None:
        """Hash ``obj``; what cannot be hashed counts by its type alone (a lock, a stream)."""
        sub = _Feeder(hashlib.blake2b(digest_size=16))
        sub.active = self.active
        try:
            sub.feed(obj)
        except TypeError:
            log.debug("fingerprint: a %s is counted by its type only", _type_name(obj))
            _tag(self.digest, "opaque", _type_name(obj).encode())
        else:
            _tag(self.digest, "sub", sub.digest.digest())

    def _code(self, code: types.CodeType) -> None:
        _tag(self.digest, "code", "|".join(map(str, (code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount,
                                                    code.co_flags))).encode())
        _tag(self.digest, "cb", code.co_code)
        self.feed(list(code.co_names))
        self.feed(list(code.co_varnames))
        self.feed(list(code.co_freevars))
        self.feed(list(code.co_cellvars))
        _tag(self.digest, "consts", str(len(code.co_consts)).encode())
        for const in code.co_consts:
            self.feed(const)

    def _function(self, fn: types.FunctionType) -> None:
        if _is_library(fn.__module__):
            _tag(self.digest, "named", f"{fn.__module__}.{fn.__qualname__}".encode())
            return

        def body() -> None:
            _tag(self.digest, "fn")
            self._code(fn.__code__)
            self._lenient(fn.__defaults__)
            self._lenient(fn.__kwdefaults__)
            cells = []
            for cell in fn.__closure__ or ():
                try:
                    cells.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    cells.append(None)
            _tag(self.digest, "closure", str(len(cells)).encode())
            for value in cells:
                self._lenient(value)
            names = [n for n in _names_read(fn.__code__) if n in fn.__globals__]
            _tag(self.digest, "globals", str(len(names)).encode())
            for name in names:
                self.feed(name)
                self._lenient(fn.__globals__[name])

        self._nested(fn, body)

    def _object(self, obj: Any) -> None:
        kind = type(obj)
        plain = (getattr(kind, "__reduce_ex__", None) is object.__reduce_ex__ and getattr(kind, "__reduce__", None) is object.__reduce__
                 and getattr(kind, "__getstate__", object.__getstate__) is object.__getstate__ and isinstance(getattr(obj, "__dict__", None), dict))
        if plain:  # a plain object: its type and its attributes, by content
            _tag(self.digest, "obj", _type_name(obj).encode())
            call = getattr(kind, "__call__", None)
            if isinstance(call, types.FunctionType):
                self._nested(obj, lambda: self.feed(call))
            self._nested(obj, lambda: self.feed(vars(obj)))
            return
        try:
            payload = pickle.dumps(obj, protocol=4)
        except Exception as error:  # noqa: BLE001 - name the object that cannot be fingerprinted
            raise TypeError(f"cannot fingerprint a {kind.__qualname__}: it is neither data nor picklable ({error})") from None
        _tag(self.digest, "o:" + kind.__qualname__, payload)


def _type_name(obj: Any) -> str:
    kind = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"
