"""verify.http1, the load generator's own HTTP/1.1 client: its framing against scripted
responses from a real asyncio server on loopback, and its chunked decoder against every
way a read can cut the framing."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verify import http1


class Log(http1.Exchange):
    """Records what the connection hands over; ``fut`` resolves at the end or loss."""

    def __init__(self) -> None:
        super().__init__()
        self.status: int | None = None
        self.headers: dict[bytes, bytes] = {}
        self.body = b""
        self.pieces = 0
        self.ended = False
        self.lost: str | None = None
        self.fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_head(self, status: int, headers: dict[bytes, bytes]) -> None:
        self.status, self.headers = status, headers

    def on_body(self, data: bytes) -> None:
        self.body += data
        self.pieces += 1

    def on_end(self) -> None:
        self.ended = True
        self.fut.set_result(None)

    def on_lost(self, reason: str) -> None:
        self.lost = reason
        self.fut.set_result(None)


def chunked(body: bytes, sizes: list[int], ext: bool = False, trailer: bool = False) -> bytes:
    out = b""
    pos = 0
    for n in sizes:
        piece = body[pos:pos + n]
        pos += n
        if piece:
            out += f"{len(piece):x}{';x=1' if ext else ''}\r\n".encode() + piece + b"\r\n"
    if pos < len(body):
        out += f"{len(body) - pos:X}\r\n".encode() + body[pos:] + b"\r\n"
    return out + b"0\r\n" + (b"X-Trailer: 1\r\n" if trailer else b"") + b"\r\n"


class Scripted:
    """A loopback server that answers the n-th request it reads (on any connection) with
    ``replies[n]``: a list of byte strings written with a pause between them, or
    "close" to close the connection there. Counts connections and requests."""

    def __init__(self, replies: list[list[Any]]) -> None:
        self.replies = replies
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> Scripted:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1/completions"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        await asyncio.sleep(0.02)  # the handlers see the client's connections go
        self.server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                self.requests.append(head + await reader.readexactly(length))
                for part in self.replies[len(self.requests) - 1]:
                    if part == "close":
                        writer.close()
                        return
                    writer.write(part)
                    await writer.drain()
                    await asyncio.sleep(0.005)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


async def exchange(pool: http1.Pool, target: http1.Target, body: bytes = b"{}",
                   close: bool = False) -> tuple[Log, http1.Connection]:
    conn = await pool.connect(target.key)
    log = Log()
    conn.send(log, target.post(body, "x-request-id: 7\r\n", close))
    await asyncio.wait_for(log.fut, 5)
    await asyncio.sleep(0.01)  # let a close that follows the response land
    return log, conn


OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"


def test_chunked_stream_cut_anywhere_then_the_connection_is_reused():
    body = b"data: " + b"x" * 300 + b"\n\n" + b"data: [DONE]\n\n"
    framed = chunked(body, [7, 100, 1, 50], ext=True, trailer=True)
    # the head and the framing cut at awkward places, each piece its own write
    cuts = [OK_HEAD + b"Transfer-Encoding: chunked\r\n\r", b"\n" + framed[:3],
            framed[3:12], framed[12:200], framed[200:-1], framed[-1:]]

    async def main() -> None:
        async with Scripted([cuts, [OK_HEAD + b"Content-Length: 5\r\n\r\nhello"]]) as srv:
            pool = http1.Pool(5.0)
            target = http1.Target(srv.url)
            first, c1 = await exchange(pool, target, b'{"a":1}')
            second, c2 = await exchange(pool, target)
            pool.close()  # inside: the server's handlers end with their connections
        assert first.status == 200 and first.ended and first.lost is None
        assert first.body == body and first.pieces == 3
        assert first.headers[b"content-type"] == b"text/event-stream"
        assert second.body == b"hello" and second.ended
        assert c1 is c2 and srv.connections == 1  # keep-alive: one connection, two requests
        req = srv.requests[0]
        assert req.startswith(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:")
        assert b"\r\nContent-Length: 7\r\n" in req and b"\r\nx-request-id: 7\r\n" in req
        assert req.endswith(b'\r\n\r\n{"a":1}') and b"Accept-Encoding" not in req

    asyncio.run(main())


def test_connection_close_and_a_body_framed_by_the_close_are_not_reused():
    async def main() -> None:
        replies = [[OK_HEAD + b"Connection: close\r\nContent-Length: 2\r\n\r\nok"],
                   [b"HTTP/1.0 200 OK\r\n\r\nuntil ", b"the end", "close"],
                   [OK_HEAD + b"Content-Length: 0\r\n\r\n"]]
        async with Scripted(replies) as srv:
            pool = http1.Pool(5.0)
            target = http1.Target(srv.url)
            a, ca = await exchange(pool, target)
            b, cb = await exchange(pool, target)
            c, cc = await exchange(pool, target, close=True)
            pool.close()
        assert a.ended and a.body == b"ok" and ca.closed
        assert b.ended and b.lost is None and b.body == b"until the end" and cb.closed
        assert c.ended and c.body == b"" and cc.closed  # we asked for the close
        assert b"\r\nConnection: close\r\n" in srv.requests[2]
        assert srv.connections == 3 and len({id(ca), id(cb), id(cc)}) == 3

    asyncio.run(main())


@pytest.mark.parametrize(("reply", "reason"), [
    ([OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nabc", "close"],
     "server closed the connection"),
    ([b"SPDY/3 200 OK\r\n\r\n"], "bad: response head: status line b'SPDY/3 200 OK'"),
    ([OK_HEAD + b"Content-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc"],
     "bad: response head: Content-Encoding gzip (never asked for)"),
    ([OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"],
     "bad: chunked framing: invalid literal for int() with base 16: b'zz'"),
    ([OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcXY"],
     "bad: chunked framing: no CRLF after chunk data: b'XY'"),
    (["close"], "server closed the connection"),
])
def test_a_broken_response_is_lost_with_its_reason_and_the_connection_dropped(reply, reason):
    async def main() -> None:
        async with Scripted([reply]) as srv:
            pool = http1.Pool(5.0)
            log, conn = await exchange(pool, http1.Target(srv.url))
            pool.close()
        assert log.lost == reason and not log.ended and conn.closed
        assert pool.take(http1.Target(srv.url).key) is None

    asyncio.run(main())


def test_a_refused_connection_raises_oserror():
    async def main() -> None:
        srv = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        srv.close()
        await srv.wait_closed()
        with pytest.raises(OSError):
            await http1.Pool(5.0).connect(("127.0.0.1", port, False))

    asyncio.run(main())


@pytest.mark.parametrize(("url", "key", "path", "host"), [
    ("http://h:8000/v1/completions", ("h", 8000, False), "/v1/completions", "h:8000"),
    ("https://h/v1/completions?x=1", ("h", 443, True), "/v1/completions?x=1", "h"),
    ("http://[::1]:9/", ("::1", 9, False), "/", "[::1]:9"),
])
def test_targets(url, key, path, host):
    t = http1.Target(url)
    assert (t.key, t.path, t.host_header) == (key, path, host)


def test_a_url_that_is_not_http_is_refused():
    with pytest.raises(ValueError, match="ftp://h/x: not an http"):
        http1.Target("ftp://h/x")


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=600), sizes=st.lists(st.integers(1, 80), max_size=12),
       cuts=st.lists(st.integers(0, 2000), max_size=12), ext=st.booleans(),
       trailer=st.booleans())
def test_dechunk_undoes_the_framing_however_the_reads_cut_it(body, sizes, cuts, ext, trailer):
    framed = chunked(body, sizes, ext, trailer)
    conn = http1.Connection(http1.Pool(1.0), ("h", 1, False))
    bounds = sorted({min(c, len(framed)) for c in cuts} | {0, len(framed)})
    out = b""
    done = False
    for a, b in itertools.pairwise(bounds):
        assert not done  # nothing after the last chunk
        piece, done = conn._dechunk(framed[a:b])
        out += piece
    assert done and out == body and conn._reusable


def test_a_replay_records_a_malformed_response_and_goes_on(tmp_path):
    """Through the load generator: one request answered with broken chunked framing
    after a token event (in the same read), the next one properly; the first is a record
    with the reason and its token counted, the second is ok, both on disk."""
    from verify.loadgen import PlannedRequest, Replay
    from verify.records import read_records

    token = (b'data: {"choices":[{"index":0,"text":"a","finish_reason":null}]}\n\n')
    good = (b'data: {"choices":[{"index":0,"text":"b","finish_reason":"length"}]}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n'
            b"data: [DONE]\n\n")
    head = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    replies = [[head + chunked(token, [len(token)])[:-5] + b"zz\r\n"],
               [head + chunked(token + good, [len(token), len(good)])]]

    async def main() -> None:
        async with Scripted(replies) as srv:
            plan = [PlannedRequest(0, 0.0, [1, 2, 3], 2), PlannedRequest(1, 0.05, [1, 2, 3], 2)]
            await Replay(plan, [srv.url], "m", tmp_path, stall_timeout_s=5).run()

    asyncio.run(main())
    rows = {r["request_id"]: r for r in read_records(tmp_path / "records.jsonl")}
    assert rows[0]["error"] == ("malformed response: after 1 events: chunked framing: "
                                "invalid literal for int() with base 16: b'zz'")
    assert rows[0]["num_events"] == 1
    assert rows[1]["status"] == "ok" and rows[1]["num_events"] == 2
