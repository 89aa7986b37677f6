"""The measured record: one JSON line per request, written the moment it finishes.

A replay folder holds ``records.jsonl`` (one object per finished request, in finishing
order) and ``meta.json`` (the replay's origin and inputs). Every time in a record is
seconds from the replay origin t0, read from one monotonic clock (``time.perf_counter``);
``meta.json`` ties t0 to wall-clock time.

    intended_s     when the schedule said to send (trace arrival x scale, or when a
                   closed-loop slot freed)
    send_s         when the request went out: the write of its body (an open-loop
                   request is staged before its deadline, connection and headers ready,
                   and written at it); for a request that failed before, when it failed
    first_token_s  the first SSE event with a non-empty ``choices``
    event_times_s  every such event, the first included; events that arrived in one
                   socket read share its time (that is when the client saw them)
    finish_s       the end of the stream (``data: [DONE]``) or of the failed attempt

Latency is measured from ``send_s`` as ``vllm bench serve`` does; ``intended_s`` gives
the latency a user would see including the client's own lag (coordinated omission).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sim.errors import InputError
from sim.metrics import Records

RECORD_KEYS = (
    "request_id", "endpoint", "worker_id", "intended_s", "send_s", "first_token_s", "finish_s",
    "event_times_s", "num_events", "expected_prompt_tokens", "expected_output_tokens",
    "num_prompt_tokens", "num_output_tokens", "num_cached_tokens", "finish_reason",
    "http_status", "status", "error",
)
RECORDS_FILE = "records.jsonl"
META_FILE = "meta.json"


class RecordWriter:
    """Appends one line per finished request and flushes it at once, so a crash or
    Ctrl-C loses nothing that had finished (the file is complete up to the last line)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file = self.path.open("a", encoding="utf-8")
        self.num_written = 0

    def write(self, record: Mapping[str, Any]) -> None:
        self._file.write(encode_record(record) + "\n")
        self._file.flush()
        self.num_written += 1

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_KEY_JSON: dict[str, str] = {}
_STR_JSON: dict[str, str] = {}  # strings records repeat (endpoint, status, reason)


def _float_list(v: list[float]) -> str:
    # token times come in runs (the events of one socket read share its time): each
    # value is formatted once per run
    out: list[str] = []
    prev: float | None = None
    text = ""
    for x in v:
        if x != prev:
            text = "%.6f" % x if math.isfinite(x) else "null"  # noqa: UP031
            prev = x
        out.append(text)
    return "[" + ",".join(out) + "]"


def encode_record(record: Mapping[str, Any]) -> str:
    """One record as compact JSON, floats with microsecond resolution ("%.6f": a time in
    seconds needs no more, and it costs half of ``repr``: at thousands of requests/s with
    dozens of token times each the encoder is a visible part of the client's work)."""
    parts = []
    for k, v in record.items():
        key = _KEY_JSON.get(k)
        if key is None:
            key = _KEY_JSON[k] = json.dumps(k) + ":"
        t = type(v)
        if t is float:
            text = "%.6f" % v if math.isfinite(v) else "null"  # noqa: UP031 - the fastest
        elif t is int or v is None:
            text = "null" if v is None else str(v)
        elif t is str:
            text = _STR_JSON.get(v)  # type: ignore[assignment]
            if text is None:
                text = json.dumps(v)
                if len(_STR_JSON) < 4096 and len(v) < 200:
                    _STR_JSON[v] = text
        elif t is list and v and type(v[0]) is float:
            text = _float_list(v)
        else:
            text = json.dumps(v)
        parts.append(key + text)
    return "{" + ",".join(parts) + "}"


def write_meta(path: str | os.PathLike[str], meta: Mapping[str, Any]) -> None:
    """``meta.json``: written whole through a temporary file, so it is never half there."""
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n",
                   encoding="utf-8")
    tmp.replace(path)


def read_records(path: str | os.PathLike[str],
                 warnings: list[str] | None = None) -> list[dict[str, Any]]:
    """All records of a ``records.jsonl``. A truncated last line (the writer was killed
    mid-line) is skipped and reported in ``warnings``; a bad line elsewhere is an error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(str(path), f"cannot read records ({e.strerror or e})",
                         "give the records.jsonl of a replay") from None
    lines = text.split("\n")
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            last = i == len(lines) - 1 or not any(x.strip() for x in lines[i + 1:])
            if last:
                if warnings is not None:
                    warnings.append(f"{path}:{i + 1}: truncated last line ignored "
                                    f"({len(line)} characters)")
                continue
            raise InputError(f"{path}:{i + 1}", "not a JSON record",
                             "records.jsonl holds one JSON object per line") from None
        if not isinstance(row, dict) or "request_id" not in row:
            raise InputError(f"{path}:{i + 1}", "a record must be an object with a request_id",
                             "records.jsonl holds one JSON object per line")
        rows.append(row)
    return rows


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def to_sim_records(rows: Iterable[Mapping[str, Any]], arrival: str = "send") -> Records:
    """Measured rows as ``sim.metrics.Records`` (sorted by request id), so that
    ``sim.metrics.summarize`` defines measured figures exactly as predicted ones.

    ``arrival="send"`` starts latencies at the send (vLLM's benchmark); ``"intended"``
    at the scheduled time, so client lag counts. Output tokens come from the server's
    usage, else the number of events; unknown cached tokens count as 0.
    """
    if arrival not in ("send", "intended"):
        raise ValueError(f"arrival = {arrival!r}: must be 'send' or 'intended'")
    key = "send_s" if arrival == "send" else "intended_s"
    ordered = sorted(rows, key=lambda r: int(r["request_id"]))
    n = len(ordered)
    nan = float("nan")

    def column(values: Iterable[Any], dtype: type) -> np.ndarray:
        return np.fromiter(values, dtype, n)

    cols = {
        "request_id": column((r["request_id"] for r in ordered), np.int64),
        "arrival_s": column((_or(r.get(key), nan) for r in ordered), np.float64),
        "first_token_s": column((_or(r.get("first_token_s"), nan) for r in ordered), np.float64),
        "finish_s": column((_or(r.get("finish_s"), nan) for r in ordered), np.float64),
        "num_prompt_tokens": column(
            (_or(r.get("num_prompt_tokens"), _or(r.get("expected_prompt_tokens"), 0))
             for r in ordered), np.int64),
        "num_cached_tokens": column((_or(r.get("num_cached_tokens"), 0) for r in ordered),
                                    np.int64),
        "num_output_tokens": column(
            (_or(r.get("num_output_tokens"), _or(r.get("num_events"), 0)) for r in ordered),
            np.int64),
        "worker_id": column((_or(r.get("worker_id"), -1) for r in ordered), np.int64),
        "num_preemptions": np.zeros(n, dtype=np.int64),
    }
    cols["status"] = np.array(["ok" if r.get("status") == "ok" else "error" for r in ordered],
                              dtype=object)
    counts = column((len(r.get("event_times_s") or ()) for r in ordered), np.int64)
    offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    times = np.fromiter((t for r in ordered for t in (r.get("event_times_s") or ())),
                        np.float64, int(offsets[-1]))
    reasons = {int(r["request_id"]): str(r.get("error") or "error")
               for r in ordered if r.get("status") != "ok"}
    return Records(cols, offsets, times, reasons)
