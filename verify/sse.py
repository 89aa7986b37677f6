"""Reading an OpenAI-style SSE stream: which events are tokens, what ended it, and
what a malformed one looked like.

The load generator counts events that carry ``choices`` (not non-empty text: vLLM streams
empty-text events for EOS and other special tokens, shared/reference/cpu_engines.md); the
final ``choices: []`` chunk carries ``usage``; ``data: [DONE]`` ends the stream. Chunks of
compact token events take a fast path in the load generator; everything else comes here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


class Malformed(Exception):
    pass


IGNORE, TOKEN, OTHER, DONE = 0, 1, 2, 3


class StreamState:
    """One stream as read so far: its token events' times and what its events said
    beyond their count. ``feed`` takes the body bytes of each socket read."""

    __slots__ = ("done", "error", "last_s", "last_token", "n", "reason", "rem", "seen",
                 "times", "usage")

    def __init__(self, now_s: float) -> None:
        self.last_s = now_s  # when the request was sent or its last bytes came
        self.done = False
        self.error: str | None = None
        self.last_token = b""  # the last compact token event, parsed once at the end
        self.reason: str | None = None
        self.usage: Any = None
        self.times: list[float] = []  # one per token event: the time of its read
        self.n = 0  # token events
        self.seen = 0  # SSE events of any kind
        self.rem = b""  # an event cut by the read

    def feed(self, chunk: bytes, t: float) -> bool:
        """Count the events of one read at time ``t``; True once the stream is over
        (``[DONE]``, or ``error`` set).

        The usual read holds compact token events and, at the end, perhaps the usage
        chunk and [DONE]: the token part is checked with a few scans of the bytes instead
        of a Python step per event; anything else goes event by event (``slow_events``)."""
        self.last_s = t
        if self.rem:
            chunk = self.rem + chunk
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n")
        end = chunk.rfind(b"\n\n") + 2
        if end == 1:  # no complete event yet
            self.rem = chunk
            return False
        self.rem = chunk[end:]
        cut = end
        tail = chunk.find(b'"choices":[]', 0, end)
        if tail < 0:
            tail = chunk.find(b"data: [DONE]", 0, end)
        if tail >= 0:
            cut = chunk.rfind(b"\n\n", 0, tail)
            cut = cut + 2 if cut >= 0 else 0
        # m events that each start 'data: {"', end '}', hold no other newline, carry
        # choices and no usage
        m = chunk.count(b'}\n\ndata: {"', 0, cut) + 1
        if (cut > 2 and chunk.startswith(b'data: {"') and chunk.endswith(b"}\n\n", 0, cut)
                and chunk.count(b"\n", 0, cut) == 2 * m
                and chunk.count(b'"choices":[{', 0, cut) == m
                and chunk.find(b'"usage":{', 0, cut) < 0):
            k = m
            self.last_token = chunk[chunk.rfind(b"\n\n", 0, cut - 2) + 2:cut - 2]
        else:
            k = m = 0
            cut = 0
        if cut < end:
            k += slow_events(chunk[cut:end - 2].split(b"\n\n"), self.seen + m, self)
            m = chunk.count(b"\n\n", 0, end)
        self.seen += m
        if k:
            self.times += [t] * k
            self.n += k
        return self.done or self.error is not None


def slow_events(events: list[bytes], seen: int, st: StreamState) -> int:
    """Events one at a time (a chunk that is not only compact token events); the number
    of token events up to [DONE] or a malformed event (then ``st.error``)."""
    k = 0
    for i, ev in enumerate(events):
        if (ev.startswith(b'data: {"') and ev.endswith(b"}") and b'"choices":[{' in ev
                and b'"usage":{' not in ev and b"\n" not in ev):
            k += 1
            st.last_token = ev
            continue
        try:
            kind, obj = parse_event(ev)
        except Malformed as e:
            st.error = (f"malformed SSE: event {seen + i + 1}: "
                        f"{short(repr(e.args[0]), 120)}")
            return k
        if kind == TOKEN:
            k += 1
            st.last_token = b""
        if obj is not None:
            st.reason = finish_reason(obj) or st.reason
            if obj.get("usage"):
                st.usage = obj["usage"]
            if "error" in obj and kind != TOKEN:
                st.error = f"server error event: {short(json.dumps(obj))}"
                return k
        if kind == DONE:
            st.done = True
            return k
    return k


def parse_event(ev: bytes) -> tuple[int, Any]:
    """One SSE event parsed properly (field lines, JSON payload)."""
    data_lines = []
    for line in ev.split(b"\n"):
        if not line or line.startswith(b":"):
            continue  # a comment (keep-alive)
        name, sep, value = line.partition(b":")
        if not sep:
            raise Malformed(line)
        if name == b"data":
            data_lines.append(value[1:] if value.startswith(b" ") else value)
        elif name not in (b"event", b"id", b"retry"):
            raise Malformed(line)
    if not data_lines:
        return IGNORE, None
    data = b"\n".join(data_lines)
    if data.strip() == b"[DONE]":
        return DONE, None
    try:
        obj = json.loads(data)
    except ValueError:
        raise Malformed(data) from None
    if not isinstance(obj, dict):
        raise Malformed(data)
    choices = obj.get("choices")
    if not choices:
        return OTHER, obj
    # llama-server ends with an empty-text chunk carrying finish_reason and usage: not a
    # token. vLLM streams empty-text chunks for real tokens (EOS), but never with usage
    # unless continuous usage stats are asked for (we do not).
    if obj.get("usage") and all(not (c or {}).get("text") for c in choices):
        return OTHER, obj
    return TOKEN, obj


def finish_reason(obj: Mapping[str, Any]) -> str | None:
    for c in obj.get("choices") or ():
        if isinstance(c, dict) and c.get("finish_reason"):
            return str(c["finish_reason"])
    return None


def short(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."
