"""The `Trace` (requests held as read-only columns) and `ClosedLoop` (requests kept in flight).

See the package docstring for the prefix-block id layout.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, SupportsIndex

import numpy as np

from sim.errors import TraceError

from ._validate import _MAX_ID, MAX_TOKENS, _bad, _build, _need_int, _need_number

if TYPE_CHECKING:
    import pandas as pd

MOONCAKE_BLOCK_TOKENS = 512  # block size of the Mooncake FAST'25 traces' hash_ids


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

    def with_input_scale(self, factor: float) -> Trace:
        """Every prompt and the hash block size times `factor`, keeping the prefix structure.

        For replaying a production trace on a small engine (a tiny model with a short
        context): 1/16 turns Mooncake's 512-token blocks into 32-token blocks and a
        12k-token prompt into a 750-token one, and two requests still share exactly the
        blocks they shared. ``hash_block_tokens * factor`` must be a whole number. A prompt
        is rounded half up, then raised where needed so that its last hash block keeps at
        least one token (a rounded-down prompt could otherwise hold fewer tokens than its
        blocks); such raises are counted in the trace's notes."""
        _need_number("factor", factor, 0, lo_open=True)
        f = float(factor)
        block = self.hash_block_tokens
        new_block = 0
        if block:
            new_block = round(block * f)
            if new_block < 1 or abs(new_block - block * f) > 1e-9 * block:
                raise _bad("factor", factor,
                           f"must turn the {block}-token hash blocks into a whole number of "
                           f"tokens (got {block * f:g})",
                           f"use a factor k/{block} such as {1 / 16:g} (= {block // 16} tokens)"
                           if block >= 16 else "use a factor of 1")
        scaled = np.maximum(1, np.floor(self.input_tokens * f + 0.5)).astype(np.int64)
        if scaled.max(initial=0) > MAX_TOKENS:
            raise _bad("factor", factor, f"makes prompts longer than {MAX_TOKENS} tokens",
                       "use a smaller factor")
        notes = self.notes
        if new_block:
            floor_ = (np.diff(self.hash_offsets) - 1) * new_block + 1
            raised = int((scaled < floor_).sum())
            scaled = np.maximum(scaled, floor_)
            if raised:
                notes = (*notes, f"input_scale {f:g}: {raised} prompts raised by up to "
                                 f"{new_block - 1} tokens to keep their last hash block")
        return self._with(input_tokens=scaled, hash_block_tokens=new_block, notes=notes)

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
