"""Limits on connections before a request reaches the app: how many, how long a request may take to
arrive, and how many header lines it may have.

uvicorn bounds none of these: its keep-alive timeout only runs between requests and is cancelled by any
byte, so a client trickling a request head holds its connection (and a file descriptor) for ever, and
enough of them stop the process from accepting anything. An ASGI middleware cannot help either: the app
sees a request only once its head is complete.

So the gateway hands uvicorn a protocol factory (its ``http`` setting takes any callable that builds the
connection's protocol) that puts a thin guard in front of uvicorn's h11 protocol. The guard passes every
event on unchanged and only adds a timer and two counts; it reads the h11 connection's state (h11's
public ``their_state``/``our_state``) to know whether the client still owes the server a request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import resource
import time
from typing import Any, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("desktop_gateway")

# Apache's LimitRequestFields default: no browser or portal comes near it.
MAX_HEADER_LINES = 100
# A refused connection is logged at most this often (seconds): an attack would flood the log otherwise.
WARN_EVERY = 60.0

_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_TOO_MANY_LINES = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
    b"content-type: text/plain; charset=utf-8\r\ncontent-length: 35\r\nconnection: close\r\n\r\n"
    b"The request has too many headers.\r\n"
)


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    """uvicorn's ``http`` setting: builds a :class:`GuardedConnection` for every accepted connection.

    A frozen dataclass rather than a class made per configuration, so that the configuration can be
    sent to spawned worker processes (a pickled class is looked up by name).
    """

    max_connections: int
    read_timeout: float
    max_header_lines: int = MAX_HEADER_LINES

    def __call__(self, **kwargs: Any) -> asyncio.Protocol:
        return GuardedConnection(self, kwargs)


_last_warning: dict[str, float] = {}


def _warn(kind: str, message: str, *args: object) -> None:
    now = time.monotonic()
    if now - _last_warning.get(kind, -WARN_EVERY) >= WARN_EVERY:
        _last_warning[kind] = now
        log.warning(message, *args)


class GuardedConnection(asyncio.Protocol):
    """uvicorn's h11 protocol for one connection, with a request deadline and a connection cap.

    The deadline runs whenever the server is waiting for the client: from connecting, or from the first
    byte of a request, until that request (head and body) has arrived; it stops while the app answers
    and for good once the connection became a WebSocket (uvicorn then gives the transport to another
    protocol). Between requests uvicorn's own keep-alive timeout applies.
    """

    def __init__(self, limits: ConnectionLimits, kwargs: dict[str, Any]) -> None:
        self.limits = limits
        self.inner = H11Protocol(**kwargs)
        self.connections: set[Any] = kwargs["server_state"].connections
        self.transport: asyncio.Transport | None = None
        self.deadline: asyncio.TimerHandle | None = None
        self.head_lines = 0
        self.head_started = False  # a byte of the next request has come
        self.refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport, but are one in all but name.
        transport = cast(asyncio.Transport, transport)
        if len(self.connections) >= self.limits.max_connections:
            # Closed before uvicorn sees it: the descriptor is freed at once, and nothing is kept.
            self.refused = True
            transport.abort()
            _warn(
                "cap",
                "refusing connections: %d are open (DESKTOP_GATEWAY_MAX_CONNECTIONS)",
                len(self.connections),
            )
            return
        self.transport = transport
        self.inner.connection_made(transport)
        self._watch()

    def data_received(self, data: bytes) -> None:
        if self.refused or self.transport is None:
            return
        if self.inner.conn.their_state is h11.IDLE:
            self.head_started = True
            end = data.find(b"\r\n\r\n")
            self.head_lines += data.count(b"\n", 0, len(data) if end < 0 else end + 2)
            if self.head_lines > self.limits.max_header_lines + 1:  # the request line is not a header
                _warn("lines", "refused a request head of more than %d lines", self.limits.max_header_lines)
                self._end(_TOO_MANY_LINES)
                return
        self.inner.data_received(data)
        if self.inner.conn.their_state is not h11.IDLE:
            self.head_lines = 0
            self.head_started = False
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if not self.refused:
            self.inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        if not self.refused:
            self.inner.eof_received()
        return None  # uvicorn keeps a half-closed connection open to answer it, and so does the guard

    def pause_writing(self) -> None:
        if not self.refused:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if not self.refused:
            self.inner.resume_writing()

    def _waiting_for_client(self) -> bool:
        """Whether the client owes the server (the rest of) a request right now."""
        assert self.transport is not None
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return False  # closed, or a WebSocket now: the relay has its own rules
        conn = self.inner.conn
        answering = conn.their_state is h11.DONE and conn.our_state is not h11.DONE
        return not answering

    def _watch(self) -> None:
        if not self._waiting_for_client():
            self._disarm()
        elif self.deadline is None:
            self.deadline = asyncio.get_running_loop().call_later(self.limits.read_timeout, self._expired)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _expired(self) -> None:
        self.deadline = None
        if not self._waiting_for_client():
            return
        conn = self.inner.conn
        # A 408 only where no answer has begun and part of a request came: an idle client gets a close.
        started = conn.their_state is not h11.IDLE or self.head_started
        self._end(_TIMEOUT if started and conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) else b"")

    def _end(self, answer: bytes) -> None:
        assert self.transport is not None
        self._disarm()
        if answer:
            self.transport.write(answer)
        self.transport.close()


def raise_open_file_limit(max_connections: int) -> None:
    """Let the process have as many open files as the system allows, and warn if that is too few.

    Each relay holds two descriptors (browser and desktop), so ``max_connections`` needs about twice as
    many, plus some for the database, Docker and logs. Many systems start processes with a soft limit of
    1024, far below what a school's relays need, while the hard limit is much higher.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 2 * max_connections + 256)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    needed = 2 * max_connections + 256
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "this process may open only %d files, but DESKTOP_GATEWAY_MAX_CONNECTIONS=%d needs about %d: "
            "raise the limit (LimitNOFILE= in a systemd unit, ulimit -n) or lower the setting",
            soft,
            max_connections,
            needed,
        )
