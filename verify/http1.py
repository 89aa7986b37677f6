"""A small HTTP/1.1 client on asyncio's own transports: the load generator's hot path.

Why not aiohttp here: one streamed request through ``ClientSession.post`` costs ~0.35 ms of
CPU on the CI machine (request and response objects, the connector, a stream reader woken
once per socket read), and at 2,000 req/s that alone fills a core. Here a connection is an
``asyncio.Protocol`` whose ``data_received`` parses the response head, undoes chunked
framing and hands the body bytes straight to the exchange's callback: no task wakes per
read, nothing is copied twice. aiohttp stays the load generator's other client
(``client="aiohttp"``) and serves everything else (twin server, scraper, exporter).

What it speaks: ``POST`` with a ``Content-Length`` body; responses framed by
``Transfer-Encoding: chunked``, ``Content-Length`` or the connection's end (RFC 9112 §6);
keep-alive reuse unless either side says ``Connection: close``; ``https`` through
asyncio's TLS. It never asks for compression and refuses a compressed response.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

MAX_HEAD_BYTES = 65536
CRLF = b"\r\n"
BAD = "bad:"  # starts the reason ``on_lost`` gets when the response was not HTTP/1.1


class _Framing(ValueError):
    def __init__(self, message: str, body: bytes) -> None:
        super().__init__(message)
        self.body = body


class Exchange:
    """One request and its response. The connection calls ``on_head`` once, ``on_body``
    with each piece of the (de-framed) body, then ``on_end`` when the message is complete
    or ``on_lost`` when the connection ends first or speaks nonsense. A subclass decides
    what it keeps; ``detach`` (from either side) stops the calls."""

    __slots__ = ("conn",)

    def __init__(self) -> None:
        self.conn: Connection | None = None

    def on_head(self, status: int, headers: dict[bytes, bytes]) -> None: ...
    def on_body(self, data: bytes) -> None: ...
    def on_end(self) -> None: ...
    def on_lost(self, reason: str) -> None: ...


class Connection(asyncio.Protocol):
    """One TCP (or TLS) connection; at most one exchange at a time."""

    def __init__(self, pool: Pool, key: tuple[str, int, bool]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.exchange: Exchange | None = None
        self._head = b""  # response head bytes so far (None once parsed)
        self._in_body = False
        self._chunked = False
        self._left = -1  # Content-Length bytes still to come; -1: until close
        self._need = 0  # chunked: >0 data bytes to come, 0 size line, -2 CRLF, -1 trailers
        self._carry = b""  # chunked framing bytes cut by a read
        self._reusable = True

    # ---------------------------------------------------------- asyncio side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        ex = self.exchange
        if ex is not None:
            self.exchange = None
            ex.conn = None
            if exc is None:
                ex.on_lost("server closed the connection")
            else:
                ex.on_lost(f"{type(exc).__name__}: {exc}")

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:  # bytes nobody asked for: the connection cannot be trusted
            self.abort()
            return
        if not self._in_body:
            head = self._head + data
            end = head.find(b"\r\n\r\n")
            if end < 0:
                if len(head) > MAX_HEAD_BYTES:
                    self._fail(f"{BAD} response head over {MAX_HEAD_BYTES} bytes")
                else:
                    self._head = head
                return
            self._head = b""
            try:
                status, headers = self._parse_head(head[:end])
            except ValueError as e:
                self._fail(f"{BAD} response head: {e}")
                return
            self._in_body = True
            ex.on_head(status, headers)
            if self.exchange is not ex:
                return
            data = head[end + 4:]
            if not self._chunked and self._left == 0:
                self._complete()
                return
            if not data:
                return
        if self._chunked:
            try:
                body, done = self._dechunk(data)
            except _Framing as e:  # what came before the bad framing still counts
                if e.body:
                    ex.on_body(e.body)
                self._fail(f"{BAD} chunked framing: {e.args[0]}")
                return
        elif self._left < 0:
            body, done = data, False
        else:
            body = data[:self._left]
            self._left -= len(body)
            done = self._left == 0
            if len(data) > len(body):
                self._reusable = False  # bytes past the message: do not reuse
        if body:
            ex.on_body(body)
        if done and self.exchange is ex:
            self._complete()

    def eof_received(self) -> bool | None:
        self._reusable = False
        if self._in_body and not self._chunked and self._left < 0 and self.exchange:
            self._complete()  # a body framed by the connection's end ended well
        return None

    # ------------------------------------------------------------- requests
    def send(self, exchange: Exchange, data: bytes) -> None:
        """Write one whole request; the response goes to ``exchange``."""
        assert self.exchange is None and self.transport is not None
        self.exchange = exchange
        exchange.conn = self
        self._head = b""
        self._in_body = self._chunked = False
        self._left = -1
        self._need = 0
        self._carry = b""
        self.transport.write(data)

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def detach(self, exchange: Exchange) -> None:
        """The exchange is done with the response before its end: drop the connection
        (the rest of the response would still arrive on it)."""
        if self.exchange is exchange:
            self.exchange = None
            exchange.conn = None
            self.abort()

    def abort(self) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, reason: str) -> None:
        ex = self.exchange
        self.exchange = None
        self.abort()
        if ex is not None:
            ex.conn = None
            ex.on_lost(reason)

    def _complete(self) -> None:
        ex = self.exchange
        self.exchange = None
        if ex is not None:
            ex.conn = None
        if self._reusable and not self.closed:
            self.pool.release(self)
        else:
            self.abort()
        if ex is not None:
            ex.on_end()

    def _parse_head(self, head: bytes) -> tuple[int, dict[bytes, bytes]]:
        lines = head.split(CRLF)
        version, _, rest = lines[0].partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise ValueError(f"status line {lines[0][:80]!r}")
        status = int(rest[:3])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ValueError(f"header line {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        te = headers.get(b"transfer-encoding", b"").lower()
        self._chunked = te.endswith(b"chunked")
        if b"content-length" in headers and not self._chunked:
            self._left = int(headers[b"content-length"])
            if self._left < 0:
                raise ValueError(f"Content-Length {self._left}")
        if status in (204, 304) or 100 <= status < 200:
            self._left = 0
            self._chunked = False
        enc = headers.get(b"content-encoding", b"identity").lower()
        if enc not in (b"identity", b""):
            raise ValueError(f"Content-Encoding {enc.decode('latin-1')} (never asked for)")
        conn = headers.get(b"connection", b"").lower()
        if b"close" in conn or (version == b"HTTP/1.0" and b"keep-alive" not in conn):
            self._reusable = False
        return status, headers

    def _dechunk(self, data: bytes) -> tuple[bytes, bool]:
        """The data bytes in ``data`` (chunked framing removed) and whether the last
        chunk and trailers have been read. Framing cut by the read is carried over;
        framing that is wrong raises ``_Framing`` with the data bytes before it."""
        parts: list[bytes] = []
        try:
            return self._dechunk_into(data, parts)
        except ValueError as e:
            raise _Framing(str(e), b"".join(parts)) from None

    def _dechunk_into(self, data: bytes, parts: list[bytes]) -> tuple[bytes, bool]:
        buf = self._carry + data if self._carry else data
        pos, n = 0, len(buf)
        need = self._need
        done = False
        while pos < n:
            if need > 0:
                take = min(need, n - pos)
                parts.append(buf[pos:pos + take])
                pos += take
                need -= take
                if need:
                    break
                need = -2
            elif need == -2:
                if n - pos < 2:
                    break
                if buf[pos:pos + 2] != CRLF:
                    raise ValueError(f"no CRLF after chunk data: {buf[pos:pos + 8]!r}")
                pos += 2
                need = 0
            else:
                eol = buf.find(CRLF, pos)
                if eol < 0:
                    if n - pos > 4096:
                        raise ValueError("chunk size line over 4096 bytes")
                    break
                line = buf[pos:eol]
                pos = eol + 2
                if need == -1:  # trailer section: an empty line ends the message
                    if not line:
                        done = True
                        break
                    continue
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size < 0:
                    raise ValueError(f"chunk size {line[:20]!r}")
                need = size if size else -1
        self._need = need
        self._carry = buf[pos:] if not done else b""
        if done and pos < n:
            self._reusable = False
        if len(parts) == 1:
            return parts[0], done
        return b"".join(parts), done


class Pool:
    """Idle keep-alive connections by (host, port, tls); no limit on their number (like
    aiohttp's ``TCPConnector(limit=0)``)."""

    def __init__(self, connect_timeout_s: float) -> None:
        self.connect_timeout_s = connect_timeout_s
        self._idle: dict[tuple[str, int, bool], list[Connection]] = {}
        self._all: set[Connection] = set()
        self._ssl: ssl.SSLContext | None = None

    def take(self, key: tuple[str, int, bool]) -> Connection | None:
        idle = self._idle.get(key)
        while idle:
            c = idle.pop()
            if not c.closed:
                return c
        return None

    async def connect(self, key: tuple[str, int, bool]) -> Connection:
        """An idle connection, or a new one (``OSError``/``TimeoutError`` if it fails)."""
        c = self.take(key)
        if c is not None:
            return c
        host, port, tls = key
        loop = asyncio.get_running_loop()
        if tls and self._ssl is None:
            self._ssl = ssl.create_default_context()
        async with asyncio.timeout(self.connect_timeout_s):
            _, proto = await loop.create_connection(
                lambda: Connection(self, key), host, port,
                ssl=self._ssl if tls else None, server_hostname=host if tls else None)
        self._all.add(proto)
        return proto

    def release(self, c: Connection) -> None:
        self._idle.setdefault(c.key, []).append(c)

    def forget(self, c: Connection) -> None:
        self._all.discard(c)
        idle = self._idle.get(c.key)
        if idle and c in idle:
            idle.remove(c)

    def close(self) -> None:
        for c in list(self._all):
            c.abort()
        self._idle.clear()
        self._all.clear()


class Target:
    """A URL split once: the pool key and the request line's start."""

    __slots__ = ("host_header", "key", "path", "url")

    def __init__(self, url: str) -> None:
        u = urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"{url}: not an http(s) URL")
        tls = u.scheme == "https"
        port = u.port or (443 if tls else 80)
        self.url = url
        self.key = (u.hostname, port, tls)
        self.path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
        self.host_header = host if u.port is None else f"{host}:{port}"

    def post(self, body: bytes, headers: str = "", close: bool = False) -> bytes:
        """The whole request: line, headers (``headers``: extra ``Name: value\\r\\n``
        lines) and body."""
        return (f"POST {self.path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                f"Accept: text/event-stream\r\nUser-Agent: servetwin-loadgen\r\n"
                f"{'Connection: close' + chr(13) + chr(10) if close else ''}"
                f"{headers}\r\n").encode("latin-1") + body
