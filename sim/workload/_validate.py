"""Limits of a workload and the checks behind its error messages.

Every message names the field, the value as the user wrote it, the rule and the fix:
`workload.synthetic.rate_per_s = -1: must be a finite number > 0`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, fields
from typing import Any, TypeVar

import numpy as np

from sim.errors import TraceError

MAX_TOKENS = 10_000_000  # longer than any served context: a bigger length is corrupt data
MAX_SYNTHETIC_REQUESTS = 10_000_000  # a typo like 1e12 would otherwise exhaust memory
_MAX_ID = 2**63 - 1  # ids and session ids are stored as int64
_HUGE = 1e12  # upper bound of synthetic real-valued knobs (keeps float maths finite)


def _show(value: object) -> str:
    """A value as the user wrote it (JSON spelling), cut short."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, int) and value.bit_length() > 200:
        return f"<a {value.bit_length()}-bit integer>"  # str() of it may itself fail
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _bad(path: str, value: object, rule: str, fix: str) -> TraceError:
    return TraceError("", f"{path} = {_show(value)}: {rule}", fix)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _need_number(path: str, value: Any, lo: float, *, lo_open: bool = False) -> None:
    ok = _is_real(value) and (value > lo if lo_open else value >= lo) and value <= _HUGE
    if not ok:
        rule = f"must be a finite number {'>' if lo_open else '>='} {lo:g}"
        raise _bad(path, value, rule, f"set {path.rsplit('.', 1)[-1]} to such a number")


def _need_int(path: str, value: Any, lo: int, hi: int) -> None:
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool) and lo <= value <= hi
    if not ok:
        raise _bad(
            path,
            value,
            f"must be an integer in [{lo}, {hi}]",
            f"set {path.rsplit('.', 1)[-1]} to a whole number in that range",
        )


def _need_choice(path: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise _bad(path, value, f"must be one of {', '.join(choices)}", "pick one of those")


_T = TypeVar("_T")


def _build(
    cls: type[_T],
    value: Any,
    path: str,
    nested: Mapping[str, Callable[[Any, str], Any]] | None = None,
) -> _T:
    """A spec dataclass from a mapping: unknown keys and missing required keys are errors."""
    if isinstance(value, cls):
        return value
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    if not isinstance(value, Mapping):
        raise _bad(
            path, value, f"must be a mapping with keys {', '.join(names)}", "write it as a mapping"
        )
    for key in value:
        if key not in names:
            raise TraceError("", f"{path}.{key}: unknown key", f"valid keys are {', '.join(names)}")
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name not in value and f.default is MISSING and f.default_factory is MISSING:
            raise TraceError("", f"{path}.{f.name} is missing", f"add {f.name}")
    values = dict(value)
    for key, convert in (nested or {}).items():
        if values.get(key) is not None:
            values[key] = convert(values[key], f"{path}.{key}")
    return cls(**values)
