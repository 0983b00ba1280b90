"""The one dynamic-import helper: functions named in configs (gold rewards, losses, reward functions)."""

from __future__ import annotations

import importlib
from collections.abc import Callable


def import_callable(spec: str | Callable) -> Callable:
    """A callable from ``"package.module:function"`` or ``"package.module.function"``; a callable as is.

    Raises ``ValueError`` naming the spec when the module or the attribute is missing or
    the attribute is not callable.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"expected 'module:function' or 'module.function', got {spec!r}")
    module_name, sep, attr = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"expected 'module:function' or 'module.function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"{spec!r}: cannot import module {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"{spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"{spec!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def import_path(fn: Callable) -> str:
    """The dotted path that :func:`import_callable` turns back into ``fn``."""
    return f"{fn.__module__}.{fn.__qualname__}"
