"""Trace files: `load_mooncake` (JSONL), `load_azure` (Azure LLM inference 2023 CSV) and
`load_trace` (either, by name or content). Plain or gzip.

Each loader has an all-or-nothing fast path over whole columns; only when it fails are the
lines read one by one, to name the first bad one with its value, rule and fix.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import fields
from itertools import chain
from typing import Any, NamedTuple

import numpy as np

from sim.errors import TraceError

from ._validate import _MAX_ID, MAX_TOKENS, _bad, _need_int, _show
from .trace import MOONCAKE_BLOCK_TOKENS, Trace

_MAX_TIMESTAMP_MS = 1e15  # ~31,700 years; bounds ints before they are converted to float
_BLANK = " \t\r"  # JSON/CSV whitespace; a line holding only these is skipped silently
_FIX_LINE = "correct or remove the line"


# ------------------------------------------------------------------------- file reading


def _read_text(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(name for messages, text) of a plain or gzip file; an empty one is an error."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise TraceError(name, f"cannot be read ({e.strerror or e})", "check the path") from None
    if raw[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by the name
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise TraceError(
                name, f"is not a readable gzip file ({e})", "re-compress it or give the plain file"
            ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise TraceError(
            f"{name}:{line}", f"byte {raw[e.start]:#04x} is not UTF-8 text", _FIX_LINE
        ) from None
    text = text.removeprefix("\ufeff")  # a BOM from spreadsheet exports is not data
    if not any(line.strip(_BLANK) for line in text.split("\n")):
        raise TraceError(
            name,
            "the file is empty: it holds no requests",
            "point to a trace with at least one request",
        )
    return name, text


def _types(values: list[Any]) -> set[type]:
    return set(map(type, values))


# ---------------------------------------------------------------------- Mooncake JSONL


def load_mooncake(
    path: str | os.PathLike[str], *, hash_block_tokens: int = MOONCAKE_BLOCK_TOKENS
) -> Trace:
    """A Mooncake JSONL trace (plain or gzip): one object per line with `timestamp` (ms),
    `input_length`, `output_length`, optional `hash_ids` (absent: no blocks) and optional
    `session_id` (int >= 0; -1 or null: none). Other fields are ignored (Mooncake variants
    add some).
    Blank lines are skipped. Timestamps are kept as given, only converted to seconds."""
    _need_int("hash_block_tokens", hash_block_tokens, 1, MAX_TOKENS)
    return _mooncake_from_text(*_read_text(path), hash_block_tokens)


def _mooncake_from_text(name: str, text: str, block_tokens: int) -> Trace:
    # Measured on the 2-core dev box: scenarios/traces/mooncake_conversation.jsonl.gz (12,031
    # lines, 3.0 MB unzipped) loads in 0.10-0.115 s (first call in a fresh process 0.115 s),
    # ~60% of it json.loads; lines are diagnosed one by one only when the fast path fails.
    lines = text.split("\n")
    columns = _mooncake_columns(lines, block_tokens)
    if columns is None:
        raise _mooncake_error(name, lines, block_tokens)
    stamps_ms, inputs, outputs, counts, ids, sessions = columns
    return Trace.checked(
        arrival_s=stamps_ms / 1000.0,
        input_tokens=inputs,
        output_tokens=outputs,
        hash_offsets=np.concatenate([[0], np.cumsum(counts)]),
        hash_ids=ids,
        hash_block_tokens=block_tokens,
        session_ids=sessions,
        source=name,
    )


def _mooncake_columns(lines: list[str], block_tokens: int) -> tuple[np.ndarray, ...] | None:
    """All-or-nothing fast path: the columns, or None when any line is bad."""
    loads = json.loads
    try:
        records = [loads(line) for line in lines if line.strip(_BLANK)]
        stamps = [r["timestamp"] for r in records]
        inputs = [r["input_length"] for r in records]
        outputs = [r["output_length"] for r in records]
        hashes = [r.get("hash_ids", ()) for r in records]
        sessions = [r.get("session_id") for r in records]
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    flat = list(chain.from_iterable(hashes)) if _types(hashes) <= {list, tuple} else [None]
    if not (
        _types(stamps) <= {int, float}
        and _types(inputs) | _types(outputs) == {int}
        and _types(flat) <= {int}
        and _types(sessions) <= {int, type(None)}
    ):
        return None  # bool is its own type here: `true` is not a length
    try:
        stamps_ms = np.array(stamps, dtype=np.float64)
        arrays = [np.array(v, dtype=np.int64) for v in (inputs, outputs, flat)]
        session_ids = np.array([-1 if s is None else s for s in sessions], dtype=np.int64)
    except OverflowError:
        return None
    in_tokens, out_tokens, ids = arrays
    counts = np.fromiter(map(len, hashes), dtype=np.int64, count=len(hashes))
    ok = (
        ((stamps_ms >= 0) & (stamps_ms <= _MAX_TIMESTAMP_MS)).all()
        and (np.diff(stamps_ms) >= 0).all()
        and all(((a >= 1) & (a <= MAX_TOKENS)).all() for a in (in_tokens, out_tokens))
        and (ids >= 0).all()
        and (session_ids >= -1).all()
        and (counts <= -(-in_tokens // block_tokens)).all()
    )
    return (stamps_ms, in_tokens, out_tokens, counts, ids, session_ids) if ok else None


def _mooncake_error(name: str, lines: list[str], block_tokens: int) -> TraceError:
    """The first bad line, found the slow way, with its value, rule and fix."""
    previous: tuple[int, float] | None = None  # (line number, timestamp) of the last good line
    for number, line in enumerate(lines, 1):
        if not line.strip(_BLANK):
            continue
        where = f"{name}:{number}"
        try:
            record = json.loads(line)
        except RecursionError:
            return TraceError(where, "not valid JSON: nested too deeply", _FIX_LINE)
        except ValueError as e:
            reason = f"{e.msg} (column {e.colno})" if isinstance(e, json.JSONDecodeError) else e
            return TraceError(where, f"not valid JSON: {reason}", _FIX_LINE)
        problem = _mooncake_problem(record, block_tokens)
        if problem:
            return TraceError(where, *problem)
        stamp = record["timestamp"]
        if previous is not None and stamp < previous[1]:
            return TraceError(
                where,
                f"field 'timestamp' = {_show(stamp)} is earlier than {_show(previous[1])}"
                f" on line {previous[0]}: a trace must be sorted by timestamp",
                "sort the lines by timestamp",
            )
        previous = (number, stamp)
    return TraceError(
        name, "could not be read, yet no bad line was found", "report this file as a servetwin bug"
    )


def _mooncake_problem(record: Any, block_tokens: int) -> tuple[str, str] | None:
    if not isinstance(record, dict):
        return f"the line is a JSON {type(record).__name__}, not an object", _FIX_LINE
    for field in ("timestamp", "input_length", "output_length"):
        if field not in record:
            return f"field '{field}' is missing", f"add '{field}' or remove the line"
    stamp = record["timestamp"]
    if type(stamp) not in (int, float) or not 0 <= stamp <= _MAX_TIMESTAMP_MS:
        return f"field 'timestamp' = {_show(stamp)}: must be milliseconds in [0, 1e15]", _FIX_LINE
    for field in ("input_length", "output_length"):
        value = record[field]
        if type(value) is not int or not 1 <= value <= MAX_TOKENS:
            return (
                f"field '{field}' = {_show(value)}: must be an integer in [1, {MAX_TOKENS}]",
                _FIX_LINE,
            )
    return _hash_ids_problem(record, block_tokens) or _session_problem(record)


def _hash_ids_problem(record: dict[str, Any], block_tokens: int) -> tuple[str, str] | None:
    ids = record.get("hash_ids", [])
    if type(ids) is not list:
        return f"field 'hash_ids' = {_show(ids)}: must be a list of integers >= 0", _FIX_LINE
    for i, block_id in enumerate(ids):
        if type(block_id) is not int or not 0 <= block_id <= _MAX_ID:
            return (
                f"field 'hash_ids'[{i}] = {_show(block_id)}: must be an integer in [0, 2**63 - 1]",
                _FIX_LINE,
            )
    max_blocks = -(-record["input_length"] // block_tokens)
    if len(ids) > max_blocks:
        return (
            f"field 'hash_ids' has {len(ids)} ids but input_length "
            f"{record['input_length']} fills only {max_blocks} blocks of {block_tokens} tokens",
            "check hash_block_tokens (load_mooncake(..., hash_block_tokens=...)) or the line",
        )
    return None


def _session_problem(record: dict[str, Any]) -> tuple[str, str] | None:
    session = record.get("session_id")
    if session is not None and (type(session) is not int or not -1 <= session <= _MAX_ID):
        return (
            f"field 'session_id' = {_show(session)}: must be an integer >= -1 or null",
            _FIX_LINE,
        )
    return None


# ------------------------------------------------------------------------- Azure CSV

_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
# Years 1970-2199 only: numpy's datetime64[ns] silently wraps outside ~1678-2262.
_STAMP = re.compile(r"(?:19[7-9]\d|2[01]\d\d)-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d{1,9})?", re.ASCII)
_DIGIT_LIST = re.compile(r"\d+(?:,\d+)*", re.ASCII)
_STAMP_RULE = "must be a date-time like 2023-11-16 18:15:46.6805900 (years 1970-2199)"


class _AzureLayout(NamedTuple):
    header_line: int  # 1-based line number of the header
    width: int  # fields per row
    stamp: int  # field index of TIMESTAMP
    context: int
    generated: int


def load_azure(path: str | os.PathLike[str]) -> Trace:
    """An Azure LLM inference trace (2023 format; `TIMESTAMP,ContextTokens,GeneratedTokens`,
    column order free, extra columns ignored, no quoting; plain or gzip). Arrivals are seconds
    after the first row. GeneratedTokens = 0 is read as 1 output token (an engine always
    emits one) and counted in `Trace.notes`; the 2023 files hold no zeros (checked).
    Blank lines are skipped."""
    return _azure_from_text(*_read_text(path))


def _azure_from_text(name: str, text: str) -> Trace:
    lines = text.split("\n")
    layout = _azure_layout(name, lines)
    body = lines[layout.header_line :]
    if not any(line.strip(_BLANK) for line in body):
        raise TraceError(
            f"{name}:{layout.header_line}",
            "the header is followed by no request rows: the trace is empty",
            "add rows or use another file",
        )
    columns = _azure_columns(body, layout)
    if columns is None:
        raise _azure_error(name, body, layout)
    stamps_ns, inputs, outputs = columns
    zeros = np.flatnonzero(outputs == 0)
    notes: tuple[str, ...] = ()
    if zeros.size:
        numbers = [i for i, line in enumerate(body, layout.header_line + 1) if line.strip(_BLANK)]
        notes = (
            f"{name}: {zeros.size} request(s) with GeneratedTokens = 0 (first on line "
            f"{numbers[zeros[0]]}) are simulated with 1 output token",
        )
    return Trace.checked(
        arrival_s=(stamps_ns - stamps_ns[0]) / 1e9,
        input_tokens=inputs,
        output_tokens=np.maximum(outputs, 1),
        source=name,
        notes=notes,
    )


def _azure_layout(name: str, lines: list[str]) -> _AzureLayout:
    number = next(i for i, line in enumerate(lines, 1) if line.strip(_BLANK))
    names = [cell.strip(_BLANK) for cell in lines[number - 1].split(",")]
    missing = [column for column in _AZURE_COLUMNS if column not in names]
    if missing:
        raise TraceError(
            f"{name}:{number}",
            f"header {_show(lines[number - 1].strip(_BLANK))} lacks column(s) {', '.join(missing)}",
            "an Azure trace starts with TIMESTAMP,ContextTokens,GeneratedTokens",
        )
    return _AzureLayout(number, len(names), *(names.index(c) for c in _AZURE_COLUMNS))


def _azure_columns(body: list[str], layout: _AzureLayout) -> tuple[np.ndarray, ...] | None:
    """All-or-nothing fast path: the columns, or None when any row is bad."""
    rows = [line.split(",") for line in body if line.strip(_BLANK)]
    if any(len(row) != layout.width for row in rows):
        return None
    stamps = [row[layout.stamp].strip(_BLANK) for row in rows]
    counts = [[row[i].strip(_BLANK) for row in rows] for i in (layout.context, layout.generated)]
    if not all(map(_STAMP.fullmatch, stamps)) or not all(
        _DIGIT_LIST.fullmatch(",".join(c)) and max(map(len, c)) <= 9 for c in counts
    ):
        return None  # 9 digits: every count fits int64 and exceeds no bound unnoticed
    try:
        stamps_ns = np.array(stamps, dtype="datetime64[ns]").view(np.int64)
    except (ValueError, OverflowError):  # e.g. a 30th of February
        return None
    inputs, outputs = (np.array(list(map(int, c)), dtype=np.int64) for c in counts)
    ok = (
        (np.diff(stamps_ns) >= 0).all()
        and ((inputs >= 1) & (inputs <= MAX_TOKENS)).all()
        and (outputs <= MAX_TOKENS).all()
    )
    return (stamps_ns, inputs, outputs) if ok else None


def _azure_error(name: str, body: list[str], layout: _AzureLayout) -> TraceError:
    """The first bad row, found the slow way, with its value, rule and fix."""
    previous: tuple[int, str, np.datetime64] | None = None
    for number, line in enumerate(body, layout.header_line + 1):
        if not line.strip(_BLANK):
            continue
        where = f"{name}:{number}"
        cells = [cell.strip(_BLANK) for cell in line.split(",")]
        if len(cells) != layout.width:
            return TraceError(
                where, f"the row has {len(cells)} fields, the header {layout.width}", _FIX_LINE
            )
        stamp = _azure_stamp(cells[layout.stamp])
        if stamp is None:
            return TraceError(
                where, f"field 'TIMESTAMP' = {_show(cells[layout.stamp])}: {_STAMP_RULE}", _FIX_LINE
            )
        for column, lowest in (("ContextTokens", 1), ("GeneratedTokens", 0)):
            cell = cells[layout.context if lowest else layout.generated]
            if not (
                cell.isascii()
                and cell.isdigit()
                and len(cell) <= 9
                and lowest <= int(cell) <= MAX_TOKENS
            ):
                return TraceError(
                    where,
                    f"field '{column}' = {_show(cell)}: must be an integer"
                    f" in [{lowest}, {MAX_TOKENS}]",
                    _FIX_LINE,
                )
        if previous is not None and stamp < previous[2]:
            return TraceError(
                where,
                f"field 'TIMESTAMP' = {cells[layout.stamp]} is earlier than"
                f" {previous[1]} on line {previous[0]}: a trace must be sorted "
                "by time",
                "sort the rows by TIMESTAMP",
            )
        previous = (number, cells[layout.stamp], stamp)
    return TraceError(
        name, "could not be read, yet no bad row was found", "report this file as a servetwin bug"
    )


def _azure_stamp(text: str) -> np.datetime64 | None:
    if not _STAMP.fullmatch(text):
        return None
    try:
        return np.datetime64(text, "ns")  # the fast path's parser, so both agree
    except (ValueError, OverflowError):
        return None


# ------------------------------------------------------------------------- any format

_LOADERS: dict[str, Callable[[str, str], Trace]] = {
    "azure": _azure_from_text,
    "mooncake": lambda name, text: _mooncake_from_text(name, text, MOONCAKE_BLOCK_TOKENS),
}


# Traces this process has loaded, by (path, real path, size, mtime, format): a screening worker
# simulates config after config on one trace, and parsing it again each time cost ~0.1 s
# of a ~1.7 s config. Their arrays are read-only, so no caller can change a shared one.
_LOADED: dict[tuple[str, str, int, int, str], Trace] = {}
_LOADED_MAX = 4


def load_trace(path: str | os.PathLike[str], format: str = "auto") -> Trace:
    """A trace in any known format: `format` = auto, azure or mooncake. auto decides by the
    name (.jsonl[.gz]: mooncake, .csv[.gz]: azure), else by the first line. A file loaded
    before in this process and unchanged since (size and mtime) is not parsed again."""
    if format not in ("auto", *_LOADERS):
        raise _bad(
            "format",
            format,
            f"must be one of auto, {', '.join(_LOADERS)}",
            "name a known trace format",
        )
    try:
        st = os.stat(path)
        key: tuple[str, str, int, int, str] | None = (
            os.fspath(path), os.path.realpath(path), st.st_size, st.st_mtime_ns, format)
    except OSError:
        key = None  # _read_text says what is wrong
    if key is not None and key in _LOADED:
        return _LOADED[key]
    name, text = _read_text(path)
    if format == "auto":
        format = _guess_format(name, text)
    trace = _LOADERS[format](name, text)
    if key is not None:
        for f in fields(trace):
            value = getattr(trace, f.name)
            if isinstance(value, np.ndarray):
                value.flags.writeable = False
        while len(_LOADED) >= _LOADED_MAX:
            del _LOADED[next(iter(_LOADED))]
        _LOADED[key] = trace
    return trace


def _guess_format(name: str, text: str) -> str:
    stem = name.lower().removesuffix(".gz")
    if stem.endswith(".jsonl"):
        return "mooncake"
    if stem.endswith(".csv"):
        return "azure"
    first = text.lstrip()
    if first.startswith("{"):
        return "mooncake"
    if first.startswith(_AZURE_COLUMNS[0]):
        return "azure"
    raise TraceError(
        name,
        "the format cannot be told from the name or the first line",
        "name it .jsonl (Mooncake) or .csv (Azure), or pass format='mooncake' or format='azure'",
    )
