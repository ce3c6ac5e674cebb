"""Argument validators: one wording for every "must be an int >= 0" the package says.

Constructors check their arguments up front with these, so a bad value fails where it was passed with a
message naming the argument, the value and what is allowed, never later inside an epoch. numpy integers
count as ints (ids and sizes often come out of arrays); bools never do (``True`` is an ``int`` in Python,
and ``batch_size=True`` is a mistake, not 1).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["check_instance", "check_int", "check_number"]


def _describe(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool, kind: str) -> str:
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{kind} {'<' if hi_open else '<='} {hi}"
    return kind


def check_int(name: str, value: Any, lo: int | None = None, hi: int | None = None, *,
              optional: bool = False, prefix: str = "", numpy: bool = True) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an int in ``[lo, hi]`` (either bound may be
    None), or None when ``optional``. ``prefix`` names the owner (``"RemoteConfig "``). ``numpy=False``
    refuses numpy integers, for values kept and written to JSON as given (a config, training arguments)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer) if numpy else int) \
            or (lo is not None and value < lo) or (hi is not None and value > hi):
        allowed = _describe(lo, hi, False, False, "an int")
        raise ValueError(f"{prefix}`{name}` must be {'None or ' if optional else ''}{allowed}, got {value!r}")


def check_number(name: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                 lo_open: bool = False, hi_open: bool = False, optional: bool = False, prefix: str = "",
                 numpy: bool = True) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is a finite int or float within the bounds
    (``lo_open`` / ``hi_open`` exclude them), or None when ``optional``. ``numpy=False`` as for ``check_int``."""
    if optional and value is None:
        return
    kinds = (int, float, np.integer, np.floating) if numpy else (int, float)
    ok = not isinstance(value, bool) and isinstance(value, kinds) \
        and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        allowed = _describe(lo, hi, lo_open, hi_open, "a number")
        raise ValueError(f"{prefix}`{name}` must be {'None or ' if optional else ''}{allowed}, got {value!r}")


def check_instance(name: str, value: Any, kind: type | tuple[type, ...], *, optional: bool = True) -> None:
    """Raise TypeError naming ``name`` unless ``value`` is a ``kind`` (or None when ``optional``)."""
    if optional and value is None:
        return
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise TypeError(f"`{name}` must be a {names}{' or None' if optional else ''}, "
                        f"got {type(value).__name__}")


def check_fingerprint_arg(name: str, value: Any) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is None or a non-empty str (a data fingerprint)."""
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"`{name}` must be a non-empty str or None, got {value!r}")
