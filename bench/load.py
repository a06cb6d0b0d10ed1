"""The load generator: picows clients acting as noVNC in a browser tab.

picows parses frames and masks in C and calls back on every frame, so a client costs a few microseconds
per message. Every measurement reacts inside those callbacks (the next ping is sent from the callback
that received the last pong; a stream is counted there), so no event-loop wake-up or task switch of the
client is added to what is measured. How much headroom that leaves shows in the ``direct`` figures: the
client against the backend with nothing in between.

A session connects like noVNC (``Origin``, subprotocol ``binary``, the gateway's cookie or the backend's
Basic credentials), counts the payload bytes it receives (so coalesced or split messages count the same)
and fails whatever it awaits when its connection ends.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
import ssl
import time
from collections.abc import Callable, Iterable, Mapping

from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

PING_SIZE = 64
CONNECT_TIMEOUT = 60.0  # TCP, TLS and WebSocket handshakes; a burst of 1,000 may queue for seconds
ECHO_TIMEOUT = 30.0
MAX_MESSAGE = 64 * 1024 * 1024  # generous: a relay may coalesce frames into larger messages


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """One path to the backend: where to connect and what a browser (or noVNC) would send."""

    name: str
    url: str
    headers: Mapping[str, str]
    ssl: ssl.SSLContext | None = None


def unverified_tls() -> ssl.SSLContext:
    """For the direct path: the backend's certificate is self-signed, like a Kasm container's."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def browser_headers(origin: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {"Origin": origin, "Sec-WebSocket-Protocol": "binary", **(extra or {})}


class Closed(ConnectionError):
    """The connection ended while a measurement was waiting for data."""


class Session(WSListener):
    """One client connection. At most one measurement runs on it at a time."""

    def __init__(self) -> None:
        self.transport: WSTransport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting = 0  # payload bytes still expected by the running measurement
        self._on_done: Callable[[], None] | None = None  # called once they have all arrived
        self._failed: asyncio.Future[object] | None = None  # failed if the connection ends first

    # --- picows callbacks

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind is WSMsgType.BINARY or kind is WSMsgType.TEXT or kind is WSMsgType.CONTINUATION:
            self._waiting -= frame.payload_size
            if self._waiting <= 0 and self._on_done is not None:
                self._on_done()
        elif kind is WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if self._failed is not None and not self._failed.done():
            self._failed.set_exception(Closed("the connection ended during a measurement"))

    # --- measurements

    def _send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.BINARY, data)

    def send_partial(self, announced: int, sent: int) -> None:
        """Start a binary frame that announces ``announced`` bytes and send only ``sent`` of them (masked
        with a zero key, which leaves the payload as it is): a peer must hold what came, or refuse it."""
        assert self.transport is not None
        header = bytes((0x82, 0x80 | 127)) + announced.to_bytes(8, "big") + bytes(4)
        self.transport.underlying_transport.write(header + bytes(sent))

    def _arm(self, done: asyncio.Future[object]) -> None:
        if self.closed.done():
            raise Closed("the connection has ended")
        self._failed = done

    async def expect(self, nbytes: int, request: bytes) -> None:
        """Send ``request`` and return once ``nbytes`` payload bytes have come back."""
        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._arm(done)

        def finished() -> None:
            self._on_done = None
            if not done.done():
                done.set_result(None)

        self._waiting, self._on_done = nbytes, finished
        self._send(request)
        await done

    async def ping_pong(self, count: int, size: int = PING_SIZE) -> list[int]:
        """``count`` sequential round trips of a ``size``-byte message; their durations in nanoseconds."""
        message = b"p" * size
        samples: list[int] = []
        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._arm(done)
        sent_at = 0
        clock = time.perf_counter_ns

        def returned() -> None:
            nonlocal sent_at
            now = clock()
            samples.append(now - sent_at)
            if len(samples) >= count:
                self._on_done = None
                if not done.done():
                    done.set_result(None)
                return
            self._waiting += size
            sent_at = clock()
            self._send(message)

        self._waiting, self._on_done = size, returned
        sent_at = clock()
        self._send(message)
        await done
        return samples

    async def close(self, grace: float = 10.0) -> None:
        """Close like a browser tab does: a close frame, then ``grace`` seconds for the other side to end
        TCP before the connection is cut."""
        transport = self.transport
        if transport is None or self.closed.done():
            return
        transport.send_close(WSCloseCode.OK)
        try:
            await asyncio.wait_for(asyncio.shield(self.closed), grace)
        except TimeoutError:
            transport.disconnect(graceful=False)


async def connect(target: Target) -> Session:
    async with asyncio.timeout(CONNECT_TIMEOUT):
        _, listener = await ws_connect(
            Session,
            target.url,
            ssl_context=target.ssl,
            extra_headers=dict(target.headers),
            websocket_handshake_timeout=CONNECT_TIMEOUT,
            max_frame_size=MAX_MESSAGE,
            logger_name="bench.client",
        )
    assert isinstance(listener, Session)
    return listener


async def connect_all(target: Target, count: int) -> list[Session]:
    """``count`` sessions opened at once; raise if any fails (closing the others)."""
    results = await asyncio.gather(*(connect(target) for _ in range(count)), return_exceptions=True)
    sessions = [r for r in results if isinstance(r, Session)]
    failures = [r for r in results if not isinstance(r, Session)]
    if failures:
        await close_all(sessions)
        raise RuntimeError(f"{len(failures)} of {count} connections to {target.name} failed: {failures[0]!r}")
    return sessions


async def close_all(sessions: Iterable[Session], grace: float = 15.0) -> None:
    await asyncio.gather(*(s.close(grace) for s in sessions), return_exceptions=True)


def percentile(samples: list[int], pct: float) -> float:
    """Nearest-rank percentile of ``samples``."""
    ordered = sorted(samples)
    rank = min(len(ordered), max(1, math.ceil(pct / 100 * len(ordered))))
    return float(ordered[rank - 1])


# --- The measurements, each on fresh connections; the caller bounds each with asyncio.timeout ------


async def round_trips(target: Target, count: int) -> tuple[float, float]:
    """p50 and p99 of ``count`` sequential 64-byte round trips on one connection, in microseconds."""
    session = await connect(target)
    try:
        await session.ping_pong(max(10, count // 10))  # warm the path's caches first
        samples = await session.ping_pong(count)
    finally:
        await session.close()
    return percentile(samples, 50) / 1000, percentile(samples, 99) / 1000


async def stream(target: Target, nbytes: int) -> float:
    """Downstream throughput of one stream of ``nbytes``, in MB/s (10^6 bytes)."""
    session = await connect(target)
    try:
        started = time.perf_counter()
        await session.expect(nbytes, b"stream %d" % nbytes)
        elapsed = time.perf_counter() - started
    finally:
        await session.close()
    return nbytes / elapsed / 1e6


async def streams(target: Target, count: int, nbytes_each: int) -> float:
    """Aggregate downstream throughput of ``count`` concurrent streams, in MB/s.

    The connections are opened first; the clock runs from the first request to the last byte.
    """
    sessions = await connect_all(target, count)
    try:
        request = b"stream %d" % nbytes_each
        started = time.perf_counter()
        await asyncio.gather(*(s.expect(nbytes_each, request) for s in sessions))
        elapsed = time.perf_counter() - started
    finally:
        await close_all(sessions)
    return count * nbytes_each / elapsed / 1e6


class Crowd:
    """Many idle sessions opened at once, each proven live by one echo; errors are counted, not raised."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.sessions: list[Session] = []  # connected
        self.live: list[Session] = []  # connected and echoed
        self.errors: collections.Counter[str] = collections.Counter()
        self.connect_seconds = 0.0  # from the first connect until the last one is open
        self.relaying_seconds = 0.0  # ... until every open one has echoed (see echo)
        self._started = 0.0

    async def open(self, count: int, batch: int | None = None) -> None:
        """Open ``count`` sessions, all at once or ``batch`` at a time (each bounded by CONNECT_TIMEOUT)."""
        started = self._started = time.perf_counter()
        results: list[Session | BaseException] = []
        step = batch or count
        for opened in range(0, count, step):
            connects = (connect(self.target) for _ in range(min(step, count - opened)))
            results += await asyncio.gather(*connects, return_exceptions=True)
        self.connect_seconds = time.perf_counter() - started
        for result in results:
            if isinstance(result, Session):
                self.sessions.append(result)
            else:
                self.errors[f"connect: {_describe(result)}"] += 1

    async def echo(self) -> None:
        """One 64-byte round trip on every session: an accepted-then-closed connection fails here."""

        async def one(session: Session) -> None:
            async with asyncio.timeout(ECHO_TIMEOUT):
                await session.expect(PING_SIZE, b"e" * PING_SIZE)

        results = await asyncio.gather(*(one(s) for s in self.sessions), return_exceptions=True)
        self.relaying_seconds = time.perf_counter() - self._started
        for session, result in zip(self.sessions, results, strict=True):
            if isinstance(result, BaseException):
                self.errors[f"echo: {_describe(result)}"] += 1
            else:
                self.live.append(session)

    def held(self) -> int:
        """Sessions that connected, echoed and are still open now."""
        return sum(1 for s in self.live if not s.closed.done())

    def error_count(self) -> int:
        """Failed connects, failed echoes, and sessions that echoed but have ended since."""
        return sum(self.errors.values()) + len(self.live) - self.held()

    async def close(self) -> None:
        await close_all(self.sessions)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:120]
