"""The method registry: names (a recipe's `binarize.method`) to method instances.

    register_method(MyMethod)           the class's `name` now names it; returns the class (a decorator too)
    get_method("irnet")                 a registered name
    get_method("my_module:MyMethod")    a class in an importable module (imported, registered on first use)
    method_spec(method)                 the string a file or recipe stores for a method, which get_method reads back

A method defined outside irconvert is stored as "module:Class", so a file written with it loads in a
fresh process wherever that module imports.
"""

from __future__ import annotations

import importlib
from typing import Union

from ..errors import IRConvertError
from .base import Binarizer

METHODS: dict[str, Binarizer] = {}


def register_method(cls: type, name: str | None = None) -> type:
    """Register binarization method `cls` (a Binarizer subclass, built with no arguments) under `name` or `cls.name`."""
    if not (isinstance(cls, type) and issubclass(cls, Binarizer)):
        raise TypeError(f"register_method: {cls!r} is not a Binarizer subclass")
    key = name or cls.name
    if key in METHODS and type(METHODS[key]) is not cls:
        raise ValueError(f"register_method: {key!r} already names {type(METHODS[key]).__qualname__}")
    METHODS[key] = cls()
    return cls


def get_method(method: Union[str, Binarizer]) -> Binarizer:
    """Return the method a name, a 'module:Class' spec or an instance stands for."""
    if isinstance(method, Binarizer):
        return method
    if not isinstance(method, str):
        raise IRConvertError(f"binarize.method: {method!r} is neither a method name nor a Binarizer")
    if method in METHODS:
        return METHODS[method]
    if ":" in method:
        return _import(method)
    raise IRConvertError(f"binarize.method: unknown method {method!r}; choose one of {', '.join(sorted(METHODS))}, "
                         "or name a class as module:Class")


def _import(spec: str) -> Binarizer:
    module, _, qualname = spec.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise IRConvertError(f"binarize.method: cannot import {spec!r} ({exc}); "
                             "put the module on the Python path (the working folder is)") from None
    if not (isinstance(obj, type) and issubclass(obj, Binarizer)):
        raise IRConvertError(f"binarize.method: {spec!r} is not a Binarizer subclass")
    found = [m for m in METHODS.values() if type(m) is obj]
    return found[0] if found else obj()


def method_spec(method: Union[str, Binarizer]) -> str:
    """Return the string that stands for `method` in a recipe or file: its registered name for
    irconvert's own methods, 'module:Class' for a method from another module."""
    if isinstance(method, str):
        return method
    cls = type(method)
    if cls.__module__.startswith("irconvert.") and METHODS.get(cls.name) == method:
        return cls.name
    return f"{cls.__module__}:{cls.__qualname__}"
