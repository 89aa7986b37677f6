"""Workload: the requests a simulation replays, held as columns.

A `Trace` is one flat record per request stored column-wise in read-only numpy arrays
(never a list of request objects), so a 12k-request production trace loads in ~0.1 s and
slicing, scaling and merging are array operations.

Prefix-block ids follow Mooncake's semantics (kvcache-ai/Mooncake:FAST25-release/traces,
FAST'25 §5.2.1): a prompt is cut into blocks of `hash_block_tokens` tokens and block k gets
an id naming the *whole prefix* up to the end of block k, so two requests share id k exactly
when they share every token up to there. The last block may be partial; Mooncake traces have
len(hash_ids) == ceil(input_length / 512).

    request A  |  0  |  1  |  2  |  3 |      [system prompt ....][question A ......]
    request B  |  0  |  1  |  7  |           [system prompt ....][question B]
                 ^^^^^^^^^^^ same ids: the KV of these blocks can be reused

Sources: `load_mooncake` (JSONL, .gz ok), `load_azure` (Azure LLM inference 2023 CSV),
`load_trace` (either, by name or content) and `synthesize` (seeded generators).
"""

from __future__ import annotations

import gzip
import json
import math
import operator
import os
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from itertools import chain
from typing import TYPE_CHECKING, Any, NamedTuple, SupportsIndex, TypeVar

import numpy as np

from sim.errors import TraceError

if TYPE_CHECKING:
    import pandas as pd

MAX_TOKENS = 10_000_000  # longer than any served context: a bigger length is corrupt data
MAX_SYNTHETIC_REQUESTS = 10_000_000  # a typo like 1e12 would otherwise exhaust memory
MOONCAKE_BLOCK_TOKENS = 512  # block size of the Mooncake FAST'25 traces' hash_ids
_MAX_TIMESTAMP_MS = 1e15  # ~31,700 years; bounds ints before they are converted to float
_MAX_ID = 2**63 - 1  # ids and session ids are stored as int64
_HUGE = 1e12  # upper bound of synthetic real-valued knobs (keeps float maths finite)
_BLANK = " \t\r"  # JSON/CSV whitespace; a line holding only these is skipped silently
_FIX_LINE = "correct or remove the line"


# ----------------------------------------------------------------------------- Trace


@dataclass(frozen=True, eq=False)
class Trace:
    """Requests to replay, one row each. Build it with `Trace.checked`, a loader or
    `synthesize`: they check the invariants below once, so the simulator never re-checks."""

    arrival_s: np.ndarray  # float64, >= 0, non-decreasing
    input_tokens: np.ndarray  # int64 >= 1 (prompt length)
    output_tokens: np.ndarray  # int64 >= 1 (tokens to generate)
    hash_offsets: np.ndarray  # int64, n + 1 entries: row i owns hash_ids[off[i]:off[i + 1]]
    hash_ids: np.ndarray  # int64 >= 0, prefix-chained; row i holds <= ceil(input_i / block)
    hash_block_tokens: int  # tokens per hash block; 0 exactly when hash_ids is empty
    session_ids: np.ndarray  # int64, -1 outside a session
    source: str  # file path or generator description, for reports
    notes: tuple[str, ...] = ()  # data repairs made while loading: counted, never silent

    @classmethod
    def checked(
        cls,
        *,
        arrival_s: Any,
        input_tokens: Any,
        output_tokens: Any,
        hash_offsets: Any = None,
        hash_ids: Any = None,
        hash_block_tokens: int = 0,
        session_ids: Any = None,
        source: str = "trace",
        notes: Sequence[str] = (),
    ) -> Trace:
        arrival = _column(source, "arrival_s", arrival_s, np.float64, "iuf")
        n = arrival.shape[0]
        inputs = _column(source, "input_tokens", input_tokens, np.int64, "iu")
        outputs = _column(source, "output_tokens", output_tokens, np.int64, "iu")
        offsets = _column(
            source,
            "hash_offsets",
            np.zeros(n + 1, np.int64) if hash_offsets is None else hash_offsets,
            np.int64,
            "iu",
        )
        ids = _column(source, "hash_ids", [] if hash_ids is None else hash_ids, np.int64, "iu")
        sessions = _column(
            source,
            "session_ids",
            np.full(n, -1, np.int64) if session_ids is None else session_ids,
            np.int64,
            "iu",
        )
        for name, column, size in (
            ("input_tokens", inputs, n),
            ("output_tokens", outputs, n),
            ("hash_offsets", offsets, n + 1),
            ("session_ids", sessions, n),
        ):
            if column.shape[0] != size:
                raise TraceError(
                    source,
                    f"{name} has {column.shape[0]} entries, expected {size}",
                    "give every column one entry per request",
                )
        _require(source, "arrival_s", arrival, np.isfinite(arrival) & (arrival >= 0), ">= 0")
        _require(
            source,
            "arrival_s",
            arrival[1:],
            np.diff(arrival) >= 0,
            "not before the previous arrival (sort by arrival)",
            first_index=1,
        )
        _require(source, "input_tokens", inputs, inputs >= 1, ">= 1")
        _require(source, "output_tokens", outputs, outputs >= 1, ">= 1")
        _require(source, "session_ids", sessions, sessions >= -1, ">= -1")
        block_tokens = _checked_hashes(source, offsets, ids, inputs, hash_block_tokens)
        return cls(
            arrival, inputs, outputs, offsets, ids, block_tokens, sessions, source, tuple(notes)
        )

    def __len__(self) -> int:
        return int(self.arrival_s.shape[0])

    def hash_ids_of(self, i: SupportsIndex) -> np.ndarray:
        row = operator.index(i)  # numpy integers too
        return self.hash_ids[self.hash_offsets[row] : self.hash_offsets[row + 1]]

    def scaled(self, time_scale: float) -> Trace:
        """Arrival times times `time_scale`: 0.5 offers the same requests at twice the rate."""
        _need_number("time_scale", time_scale, 0, lo_open=True)
        return self._with(arrival_s=self.arrival_s * float(time_scale))

    def sliced(
        self,
        *,
        start_s: float | None = None,
        end_s: float | None = None,
        start_index: int | None = None,
        max_requests: int | None = None,
    ) -> Trace:
        """Rows arriving in [start_s, end_s), then skip `start_index` of those and keep at most
        `max_requests`. Arrivals are re-based: with `start_s` a kept request keeps its offset
        from start_s (a window that starts in a lull starts idle, as the real traffic did);
        without start_s but with start_index the first kept request arrives at 0 (there is no
        window to be relative to, and a long idle lead-in would only distort durations);
        otherwise times are kept as they are."""
        for name, value in (("start_s", start_s), ("end_s", end_s)):
            if value is not None:
                _need_number(name, value, 0)
        if start_s is not None and end_s is not None and not end_s > start_s:
            raise _bad("end_s", end_s, f"must be > start_s = {start_s}", "widen the window")
        lo = 0 if start_s is None else int(np.searchsorted(self.arrival_s, start_s, "left"))
        hi = len(self) if end_s is None else int(np.searchsorted(self.arrival_s, end_s, "left"))
        if start_index is not None:
            _need_int("start_index", start_index, 0, _MAX_ID)
            lo += int(start_index)
        if max_requests is not None:
            _need_int("max_requests", max_requests, 1, _MAX_ID)
            hi = min(hi, lo + int(max_requests))
        if lo >= hi:
            raise TraceError(
                self.source,
                f"the slice (start_s={start_s}, end_s={end_s}, "
                f"start_index={start_index}) keeps no requests",
                "choose a window and index inside the trace",
            )
        origin_s = (
            start_s if start_s is not None else 0.0 if start_index is None else self.arrival_s[lo]
        )
        kept = self._rows(np.arange(lo, hi))
        return kept._with(arrival_s=kept.arrival_s - origin_s)

    def with_output_scale(self, factor: float) -> Trace:
        """Every output length times `factor`, rounded half up, at least 1."""
        _need_number("factor", factor, 0, lo_open=True)
        scaled = np.maximum(1.0, np.floor(self.output_tokens * float(factor) + 0.5))
        if scaled.max(initial=0) > MAX_TOKENS:
            raise _bad(
                "factor",
                factor,
                f"makes outputs longer than {MAX_TOKENS} tokens",
                "use a smaller factor",
            )
        return self._with(output_tokens=scaled.astype(np.int64))

    def merged(self, other: Trace, hash_id_shift: int | None = None) -> Trace:
        """Both traces interleaved by arrival (stable: self first on ties). `other`'s hash ids
        are shifted by `hash_id_shift` (default: self's max id + 1, so no block is shared) and
        its session ids past self's, so sessions never collide."""
        blocks = {self.hash_block_tokens, other.hash_block_tokens} - {0}
        if len(blocks) > 1:
            raise TraceError(
                f"{self.source} + {other.source}",
                f"hash blocks of {sorted(blocks)} tokens cannot be merged",
                "merge traces with one block size",
            )
        if hash_id_shift is None:
            hash_id_shift = int(self.hash_ids.max()) + 1 if self.hash_ids.size else 0
        _need_int("hash_id_shift", hash_id_shift, 0, _MAX_ID - int(other.hash_ids.max(initial=0)))
        session_shift = int(self.session_ids.max(initial=-1)) + 1
        arrival_s = np.concatenate([self.arrival_s, other.arrival_s])
        order = np.argsort(arrival_s, kind="stable")  # stable: self's rows first on ties
        offsets, ids = _gather_blocks(
            np.concatenate([self.hash_offsets[:-1], other.hash_offsets + self.hash_ids.size]),
            np.concatenate([self.hash_ids, other.hash_ids + int(hash_id_shift)]),
            order,
        )
        other_sessions = np.where(other.session_ids >= 0, other.session_ids + session_shift, -1)
        return Trace.checked(
            arrival_s=arrival_s[order],
            input_tokens=np.concatenate([self.input_tokens, other.input_tokens])[order],
            output_tokens=np.concatenate([self.output_tokens, other.output_tokens])[order],
            hash_offsets=offsets,
            hash_ids=ids,
            hash_block_tokens=max(blocks, default=0),
            session_ids=np.concatenate([self.session_ids, other_sessions])[order],
            source=f"{self.source} + {other.source}",
            notes=self.notes + other.notes,
        )

    def to_frame(self) -> pd.DataFrame:
        import pandas as pd  # lazily: the simulator core does not need pandas to start

        return pd.DataFrame(
            {
                "arrival_s": self.arrival_s,
                "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens,
                "num_hash_blocks": np.diff(self.hash_offsets),
                "session_id": self.session_ids,
            }
        )

    def _rows(self, index: np.ndarray) -> Trace:
        offsets, ids = _gather_blocks(self.hash_offsets, self.hash_ids, index)
        return self._with(
            arrival_s=self.arrival_s[index],
            input_tokens=self.input_tokens[index],
            output_tokens=self.output_tokens[index],
            hash_offsets=offsets,
            hash_ids=ids,
            session_ids=self.session_ids[index],
        )

    def _with(self, **changes: Any) -> Trace:
        values = {f.name: getattr(self, f.name) for f in fields(self)} | changes
        return Trace.checked(**values)


def _column(source: str, name: str, values: Any, dtype: type, kinds: str) -> np.ndarray:
    array = np.array(values)  # a private copy: the trace's columns are read-only
    if array.ndim != 1 or (array.size and array.dtype.kind not in kinds):
        raise TraceError(
            source,
            f"{name} must be a 1-D array of kind {kinds!r}, got {array.ndim}-D {array.dtype}",
            "pass numbers of the right type",
        )
    array = array.astype(dtype)
    array.setflags(write=False)
    return array


def _require(
    source: str, name: str, values: np.ndarray, ok: np.ndarray, rule: str, first_index: int = 0
) -> None:
    if not ok.all():
        i = int(np.argmin(ok))
        raise TraceError(
            source,
            f"{name}[{i + first_index}] = {values[i]}: must be {rule}",
            "build traces with the loaders or synthesize()",
        )


def _checked_hashes(
    source: str, offsets: np.ndarray, ids: np.ndarray, inputs: np.ndarray, block_tokens: int
) -> int:
    counts = np.diff(offsets)
    if offsets[0] != 0 or offsets[-1] != ids.size or (counts < 0).any():
        raise TraceError(
            source,
            "hash_offsets must rise from 0 to len(hash_ids)",
            "build traces with the loaders or synthesize()",
        )
    _require(source, "hash_ids", ids, ids >= 0, ">= 0")
    if not ids.size:
        return 0  # "no hash ids" has one spelling, whatever the caller passed
    _need_int("hash_block_tokens", block_tokens, 1, MAX_TOKENS)
    _require(
        source,
        "number of hash ids of request",
        counts,
        counts <= -(-inputs // block_tokens),
        f"<= ceil(input_tokens / {block_tokens})",
    )
    return int(block_tokens)


def _gather_blocks(
    offsets: np.ndarray, ids: np.ndarray, index: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Hash segments of rows `index` (any order), laid end to end."""
    starts = offsets[:-1][index]
    counts = np.diff(offsets)[index] if index.size else np.zeros(0, np.int64)
    new_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    positions = np.repeat(starts - new_offsets[:-1], counts) + np.arange(new_offsets[-1])
    return new_offsets, ids[positions]


# ------------------------------------------------------------------------- file reading


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


def load_trace(path: str | os.PathLike[str], format: str = "auto") -> Trace:
    """A trace in any known format: `format` = auto, azure or mooncake. auto decides by the
    name (.jsonl[.gz]: mooncake, .csv[.gz]: azure), else by the first line."""
    if format not in ("auto", *_LOADERS):
        raise _bad(
            "format",
            format,
            f"must be one of auto, {', '.join(_LOADERS)}",
            "name a known trace format",
        )
    name, text = _read_text(path)
    if format == "auto":
        format = _guess_format(name, text)
    return _LOADERS[format](name, text)


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


# ------------------------------------------------------------------------ validation


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


# --------------------------------------------------------------------- arrival laws


def poisson_arrivals(
    rng: np.random.Generator, n: int, rate_per_s: float, *, rescale_to_rate: bool = False
) -> np.ndarray:
    """n arrival times (s) of a Poisson process: `gamma_arrivals` with burstiness 1."""
    return gamma_arrivals(rng, n, rate_per_s, 1.0, rescale_to_rate=rescale_to_rate)


def gamma_arrivals(
    rng: np.random.Generator,
    n: int,
    rate_per_s: float,
    burstiness: float,
    *,
    rescale_to_rate: bool = False,
) -> np.ndarray:
    """n arrival times (s) with Gamma gaps: mean 1/rate, CV 1/sqrt(burstiness)."""
    _need_int("n", n, 1, MAX_SYNTHETIC_REQUESTS)
    _need_number("rate_per_s", rate_per_s, 0, lo_open=True)
    _need_number("burstiness", burstiness, 0, lo_open=True)
    # The `vllm bench serve` law (vllm-project/vllm:vllm/benchmarks/serve.py @ v0.33.0,
    # get_request): gap ~ Gamma(shape=burstiness, scale=1/(rate*burstiness)), one gap before
    # every request including the first. vLLM then rescales so the last arrival is exactly
    # n/rate, which hides the run-to-run spread of offered load; here that is opt-in.
    gaps_s = rng.gamma(shape=burstiness, scale=1.0 / (rate_per_s * burstiness), size=n)
    arrival_s = np.cumsum(gaps_s)
    if rescale_to_rate and arrival_s[-1] > 0:
        arrival_s *= (n / rate_per_s) / arrival_s[-1]
    return arrival_s


# ---------------------------------------------------------------------- length laws


@dataclass(frozen=True)
class FixedLength:
    tokens: int

    def check(self, path: str) -> None:
        _need_int(f"{path}.tokens", self.tokens, 1, MAX_TOKENS)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return np.full(n, self.tokens, dtype=np.int64)


@dataclass(frozen=True)
class UniformLength:
    min_tokens: int
    max_tokens: int  # inclusive

    def check(self, path: str) -> None:
        _need_int(f"{path}.min_tokens", self.min_tokens, 1, MAX_TOKENS)
        _need_int(f"{path}.max_tokens", self.max_tokens, int(self.min_tokens), MAX_TOKENS)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.integers(self.min_tokens, self.max_tokens + 1, size=n, dtype=np.int64)


@dataclass(frozen=True)
class LognormalLength:
    mean_tokens: float  # mean before clipping: mu = ln(mean) - sigma^2 / 2
    sigma: float  # of the underlying normal
    min_tokens: int = 1
    max_tokens: int = MAX_TOKENS

    def check(self, path: str) -> None:
        _need_int(f"{path}.min_tokens", self.min_tokens, 1, MAX_TOKENS)
        _need_int(f"{path}.max_tokens", self.max_tokens, int(self.min_tokens), MAX_TOKENS)
        _need_number(f"{path}.mean_tokens", self.mean_tokens, self.min_tokens)
        if self.mean_tokens > self.max_tokens:
            raise _bad(
                f"{path}.mean_tokens",
                self.mean_tokens,
                "must be <= max_tokens",
                "raise max_tokens or lower mean_tokens",
            )
        if not (_is_real(self.sigma) and 0 <= self.sigma <= 10):
            raise _bad(
                f"{path}.sigma",
                self.sigma,
                "must be a number in [0, 10]",
                "typical request-length sigmas are 0.5-1.5",
            )

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        mu = math.log(self.mean_tokens) - self.sigma**2 / 2
        tokens = np.floor(rng.lognormal(mu, self.sigma, size=n) + 0.5)
        return np.clip(tokens, self.min_tokens, self.max_tokens).astype(np.int64)


LengthSpec = FixedLength | UniformLength | LognormalLength
LENGTH_KINDS: dict[str, type[LengthSpec]] = {
    "fixed": FixedLength,
    "uniform": UniformLength,
    "lognormal": LognormalLength,
}


def length_spec(value: Any, path: str) -> LengthSpec:
    """A length law from a spec, a bare int (fixed) or a mapping {kind: ..., ...}."""
    if isinstance(value, (FixedLength, UniformLength, LognormalLength)):
        spec: LengthSpec = value
    elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        spec = FixedLength(int(value))
    elif isinstance(value, Mapping) and value.get("kind") in LENGTH_KINDS:
        rest = {k: v for k, v in value.items() if k != "kind"}
        spec = _build(LENGTH_KINDS[value["kind"]], rest, path)
    else:
        raise _bad(
            path,
            value,
            f"must be an integer or {{kind: {'|'.join(LENGTH_KINDS)}, ...}}",
            "e.g. {kind: lognormal, mean_tokens: 500, sigma: 1.0}",
        )
    spec.check(path)
    return spec


# ------------------------------------------------------------------- synthetic spec


@dataclass(frozen=True)
class PrefixGroups:
    """Requests share one of `num_groups` prefixes (e.g. system prompts) of `prefix_tokens`."""

    num_groups: int
    prefix_tokens: int  # only its full hash blocks are shared
    distribution: str = "uniform"  # uniform | zipf (P(group g) ~ 1 / (g + 1) ** exponent)
    zipf_exponent: float | None = None  # zipf only; default 1.0

    def check(self, path: str) -> None:
        _need_int(f"{path}.num_groups", self.num_groups, 1, 1_000_000)
        _need_int(f"{path}.prefix_tokens", self.prefix_tokens, 1, MAX_TOKENS)
        _need_choice(f"{path}.distribution", self.distribution, ("uniform", "zipf"))
        if self.zipf_exponent is not None:
            if self.distribution != "zipf":
                raise _bad(
                    f"{path}.zipf_exponent",
                    self.zipf_exponent,
                    "applies only to distribution: zipf",
                    "remove it or use zipf",
                )
            _need_number(f"{path}.zipf_exponent", self.zipf_exponent, 0)

    def pick(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.distribution == "uniform":
            return rng.integers(0, self.num_groups, size=n, dtype=np.int64)
        weights = (np.arange(self.num_groups) + 1.0) ** -(self.zipf_exponent or 1.0)
        return rng.choice(self.num_groups, size=n, p=weights / weights.sum()).astype(np.int64)


@dataclass(frozen=True)
class Sessions:
    """Multi-turn chats. Turn 0's prompt is the (group prefix +) `input_tokens` draw; turn t's
    is turn t-1's prompt + its output + `user_tokens` new tokens. Turn t+1 arrives
    `think_time_s` after turn t *arrives* (not after it finishes: a trace is open-loop)."""

    num_sessions: int
    turns_per_session: int
    user_tokens: Any  # a length spec (FixedLength, ..., int or mapping)
    think_time_s: float = 0.0
    think_time_kind: str = "fixed"  # fixed | exponential (mean think_time_s)

    def check(self, path: str) -> None:
        _need_int(f"{path}.num_sessions", self.num_sessions, 1, MAX_SYNTHETIC_REQUESTS)
        _need_int(
            f"{path}.turns_per_session",
            self.turns_per_session,
            1,
            MAX_SYNTHETIC_REQUESTS // int(self.num_sessions),
        )
        length_spec(self.user_tokens, f"{path}.user_tokens")
        _need_number(f"{path}.think_time_s", self.think_time_s, 0)
        _need_choice(f"{path}.think_time_kind", self.think_time_kind, ("fixed", "exponential"))


@dataclass(frozen=True)
class SyntheticSpec:
    """A generated workload: `num_requests` requests (or, with `sessions`, sessions starting)
    at `rate_per_s` by the arrival law, lengths drawn from the length laws."""

    rate_per_s: float
    input_tokens: Any  # length spec; with `prefix`, the tokens after the shared prefix
    output_tokens: Any  # length spec
    num_requests: int | None = None  # required without sessions; forbidden with them
    arrival: str = "poisson"  # poisson | gamma
    burstiness: float = 1.0  # gamma only: < 1 burstier than Poisson, > 1 smoother
    rescale_to_rate: bool = False  # vLLM's rescale: last arrival exactly at n / rate
    prefix: PrefixGroups | None = None
    sessions: Sessions | None = None
    hash_block_tokens: int = MOONCAKE_BLOCK_TOKENS  # one block size for replayed and made-up

    @classmethod
    def from_mapping(cls, mapping: Any, path: str = "workload.synthetic") -> SyntheticSpec:
        spec = _build(
            cls,
            mapping,
            path,
            {
                "input_tokens": length_spec,
                "output_tokens": length_spec,
                "prefix": lambda v, p: _build(PrefixGroups, v, p),
                "sessions": lambda v, p: _build(Sessions, v, p, {"user_tokens": length_spec}),
            },
        )
        spec.check(path)
        return spec

    def check(self, path: str = "workload.synthetic") -> None:
        _need_number(f"{path}.rate_per_s", self.rate_per_s, 0, lo_open=True)
        length_spec(self.input_tokens, f"{path}.input_tokens")
        length_spec(self.output_tokens, f"{path}.output_tokens")
        _need_choice(f"{path}.arrival", self.arrival, ("poisson", "gamma"))
        _need_number(f"{path}.burstiness", self.burstiness, 0, lo_open=True)
        if self.arrival == "poisson" and self.burstiness != 1:
            raise _bad(
                f"{path}.burstiness",
                self.burstiness,
                "applies only to arrival: gamma",
                "set arrival: gamma or remove burstiness",
            )
        if not isinstance(self.rescale_to_rate, bool):
            raise _bad(
                f"{path}.rescale_to_rate",
                self.rescale_to_rate,
                "must be true or false",
                "write true or false",
            )
        _need_int(f"{path}.hash_block_tokens", self.hash_block_tokens, 1, MAX_TOKENS)
        if self.sessions is None:
            _need_int(f"{path}.num_requests", self.num_requests, 1, MAX_SYNTHETIC_REQUESTS)
        elif self.num_requests is not None:
            raise _bad(
                f"{path}.num_requests",
                self.num_requests,
                "is set by sessions (num_sessions x turns_per_session)",
                "remove num_requests",
            )
        for key, spec in (("prefix", self.prefix), ("sessions", self.sessions)):
            kind = PrefixGroups if key == "prefix" else Sessions
            if spec is not None and not isinstance(spec, kind):
                raise _bad(f"{path}.{key}", spec, f"must be a {kind.__name__}", "build it so")
            if spec is not None:
                spec.check(f"{path}.{key}")


# ----------------------------------------------------------------------- synthesize


class _Rows(NamedTuple):
    arrival_s: np.ndarray
    input_tokens: np.ndarray
    output_tokens: np.ndarray
    conversation: np.ndarray  # rows of one conversation: each prompt extends the previous
    group: np.ndarray  # prefix group, -1 for none
    session_ids: np.ndarray


def synthesize(spec: SyntheticSpec | Mapping[str, Any], rng: np.random.Generator) -> Trace:
    """A seeded synthetic trace: same spec and generator state, same arrays."""
    if not isinstance(spec, SyntheticSpec):
        spec = SyntheticSpec.from_mapping(spec)
    spec.check()
    rows = _session_rows(spec, rng) if spec.sessions else _independent_rows(spec, rng)
    if rows.input_tokens.max() > MAX_TOKENS:
        raise TraceError(
            "",
            f"workload.synthetic: prompts reach {rows.input_tokens.max()} tokens,"
            f" over {MAX_TOKENS}",
            "use fewer turns or shorter lengths",
        )
    shared_blocks = spec.prefix.prefix_tokens // spec.hash_block_tokens if spec.prefix else 0
    offsets, ids = _chained_hash_ids(rows, shared_blocks, spec.hash_block_tokens)
    order = np.argsort(rows.arrival_s, kind="stable")  # ties keep session, then turn order
    offsets, ids = _gather_blocks(offsets, ids, order)
    return Trace.checked(
        arrival_s=rows.arrival_s[order],
        input_tokens=rows.input_tokens[order],
        output_tokens=rows.output_tokens[order],
        hash_offsets=offsets,
        hash_ids=_renumbered_by_first_use(ids),
        hash_block_tokens=spec.hash_block_tokens,
        session_ids=rows.session_ids[order],
        source=f"synthesize({spec})",
    )


def _arrivals(spec: SyntheticSpec, rng: np.random.Generator, n: int) -> np.ndarray:
    return gamma_arrivals(
        rng, n, spec.rate_per_s, spec.burstiness, rescale_to_rate=spec.rescale_to_rate
    )


def _groups_and_prefix(
    spec: SyntheticSpec, rng: np.random.Generator, n: int
) -> tuple[np.ndarray, int]:
    if spec.prefix is None:
        return np.full(n, -1, np.int64), 0
    return spec.prefix.pick(rng, n), spec.prefix.prefix_tokens


def _independent_rows(spec: SyntheticSpec, rng: np.random.Generator) -> _Rows:
    n = int(spec.num_requests or 0)
    arrival_s = _arrivals(spec, rng, n)
    group, prefix_tokens = _groups_and_prefix(spec, rng, n)
    inputs = prefix_tokens + length_spec(spec.input_tokens, "input_tokens").sample(rng, n)
    outputs = length_spec(spec.output_tokens, "output_tokens").sample(rng, n)
    return _Rows(arrival_s, inputs, outputs, np.arange(n), group, np.full(n, -1, np.int64))


def _session_rows(spec: SyntheticSpec, rng: np.random.Generator) -> _Rows:
    sessions = spec.sessions
    assert sessions is not None
    num, turns = int(sessions.num_sessions), int(sessions.turns_per_session)
    start_s = _arrivals(spec, rng, num)
    if sessions.think_time_kind == "fixed":
        think_s = np.full((num, turns - 1), float(sessions.think_time_s))
    else:
        think_s = rng.exponential(sessions.think_time_s, size=(num, turns - 1))
    group, prefix_tokens = _groups_and_prefix(spec, rng, num)
    first = prefix_tokens + length_spec(spec.input_tokens, "input_tokens").sample(rng, num)
    user = length_spec(sessions.user_tokens, "user_tokens").sample(rng, num * (turns - 1))
    outputs = length_spec(spec.output_tokens, "output_tokens").sample(rng, num * turns)
    outputs = outputs.reshape(num, turns)
    # prompt[t] = prompt[t-1] + output[t-1] + user[t]: the chat history is resent every turn.
    inputs = first[:, None] + _cumsum_from_zero(outputs[:, :-1] + user.reshape(num, turns - 1))
    arrival_s = start_s[:, None] + _cumsum_from_zero(think_s)
    session = np.repeat(np.arange(num, dtype=np.int64), turns)
    return _Rows(
        arrival_s.ravel(),
        inputs.ravel(),
        outputs.ravel(),
        session,
        np.repeat(group, turns),
        session,
    )


def _cumsum_from_zero(steps: np.ndarray) -> np.ndarray:
    """Per row: 0, s0, s0+s1, ... (one more column than `steps`)."""
    return np.concatenate(
        [np.zeros((steps.shape[0], 1), steps.dtype), np.cumsum(steps, axis=1)], axis=1
    )


def _chained_hash_ids(
    rows: _Rows, shared_blocks: int, block_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Prefix-chained block ids. A conversation only grows, so every row holding block k in
    full holds the same tokens up to its end; likewise rows of one prefix group for
    k < shared_blocks. A partial last block is unique to its row.

        block_tokens=4, 2 shared:   turn 0  |g0 g1|c0 c1|p0 .|        g: group prefix blocks
                                    turn 1  |g0 g1|c0 c1|c2 c3|p1 |   c: conversation blocks
                                                                      p: per-row partial block
    """
    inputs, conversation, group = rows.input_tokens, rows.conversation, rows.group
    num_blocks = -(-inputs // block_tokens)
    full = inputs // block_tokens
    offsets = np.concatenate([[0], np.cumsum(num_blocks)]).astype(np.int64)
    row = np.repeat(np.arange(inputs.size), num_blocks)
    k = np.arange(offsets[-1]) - offsets[:-1][row]
    shared = np.where(group >= 0, shared_blocks, 0)
    slots = np.zeros(int(conversation.max()) + 1, np.int64)
    np.maximum.at(slots, conversation, full - shared)
    group_ids = (int(group.max()) + 1) * shared_blocks
    conversation_base = group_ids + np.concatenate([[0], np.cumsum(slots)[:-1]])
    partial_base = group_ids + int(slots.sum())
    ids = np.where(
        k < shared[row],
        group[row] * shared_blocks + k,
        np.where(
            k < full[row],
            conversation_base[conversation[row]] + k - shared[row],
            partial_base + row,
        ),
    )
    return offsets, ids.astype(np.int64)


def _renumbered_by_first_use(ids: np.ndarray) -> np.ndarray:
    """Ids 0, 1, 2, ... in order of first appearance, as in Mooncake's files."""
    unique, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    rank = np.empty(unique.size, np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(unique.size)
    return rank[inverse.ravel()]


# ---------------------------------------------------------------------- closed loop


@dataclass(frozen=True)
class ClosedLoop:
    """Keep `concurrency` requests in flight, starting the next one the moment one finishes.
    Request shapes come from the trace in order, its arrival times are ignored; the run ends
    after `num_requests` (default: the whole trace)."""

    concurrency: int
    num_requests: int | None = None

    def __post_init__(self) -> None:
        _need_int("workload.closed_loop.concurrency", self.concurrency, 1, 1_000_000)
        if self.num_requests is not None:
            _need_int("workload.closed_loop.num_requests", self.num_requests, 1, _MAX_ID)

    @classmethod
    def from_mapping(cls, mapping: Any, path: str = "workload.closed_loop") -> ClosedLoop:
        return _build(cls, mapping, path)
