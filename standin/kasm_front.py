"""A stand-in for the KasmVNC endpoint on a desktop container's port 6901.

Kasm images cannot be pulled on the machines that run the tests, so the test image fronts TigerVNC
with this module, and the gateway's tests use it (and the fault stand-ins at the bottom) in-process.
It reproduces what KasmVNC's ``common/network/websocket.c`` does, quirks included, because the
gateway has to cope with exactly those quirks:

* HTTPS and WebSocket on one TLS port; HTTP Basic auth is checked before anything else.
* A request is only upgraded when it carries ``Upgrade: websocket``, ``Connection``,
  ``Sec-WebSocket-Version``, ``Sec-WebSocket-Key``, ``Origin`` (or ``Sec-WebSocket-Origin``) and
  ``Sec-WebSocket-Protocol``; anything else is answered as plain HTTP. The path is never checked.
* Ping, pong, continuation and empty frames are ignored (a ping is never answered).
* It never sends a close frame: a close frame from the client, a frame over 65,535 bytes, an
  unmasked frame or any error just ends the connection.
* It sends only unmasked binary frames of at most 65,535 bytes.

Deliberate differences: a wrong password answers ``401 Unauthorized`` with ``WWW-Authenticate``
(KasmVNC says ``401 Forbidden`` without it); text frames are taken as raw bytes (KasmVNC
base64-decodes them, a leftover of the obsolete ``base64`` subprotocol); connections end with a TLS
close_notify (KasmVNC skips it; no WebSocket client can tell the difference).

Standard library only: it must run on Debian bookworm's python3.11 with nothing installed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import functools
import hashlib
import hmac
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.parse
from asyncio import StreamReader, StreamWriter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

log = logging.getLogger("kasm_front")

MAX_FRAME = 65_535  # KasmVNC neither sends nor accepts larger frames
MAX_HEAD = 16 * 1024  # KasmVNC's handshake buffer
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
RFB_VERSION = b"RFB 003.008\n"
BLACKLIST_THRESHOLD = 5  # rfb::Blacklist defaults: 5 failures, then blocked for 10 s
BLACKLIST_TIMEOUT = 10.0
DROP_TIMEOUT = 2.0  # how long a closing connection may take to flush before it is aborted

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

# fmt: off
MIME_TYPES = {  # KasmVNC's short list; everything else is application/octet-stream
    ".html": "text/html", ".htm": "text/html", ".txt": "text/plain", ".css": "text/css",
    ".js": "application/javascript", ".gif": "image/gif", ".jpg": "image/jpeg", ".jpeg": "image/jpeg",
    ".png": "image/png", ".svg": "image/svg+xml",
}
# fmt: on
DEFAULT_PAGE = (
    b"<!DOCTYPE html><html><head><title>KasmVNC stand-in</title></head>"
    b"<body><p>KasmVNC stand-in: connect a WebSocket to any path.</p></body></html>"
)


# --- TLS ---------------------------------------------------------------------------------------


def make_self_signed_cert(directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a throwaway self-signed certificate and key (like Kasm, which makes one per start)."""
    cert, key = Path(directory) / "self.pem", Path(directory) / "self.key"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"]
    command += ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"]
    command += ["-keyout", str(key), "-out", str(cert)]
    subprocess.run(command, check=True, capture_output=True)
    return cert, key


def server_context(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> ssl.SSLContext:
    """A server-side TLS context for an existing certificate and key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def make_self_signed_context(tmpdir: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate, written to ``tmpdir`` (or a temp dir)."""
    if tmpdir is not None:
        return server_context(*make_self_signed_cert(tmpdir))
    with tempfile.TemporaryDirectory() as directory:
        return server_context(*make_self_signed_cert(directory))


@functools.cache
def shared_context() -> ssl.SSLContext:
    """One self-signed context per process, so that tests do not pay for a key per server."""
    return make_self_signed_context()


def insecure_client_context() -> ssl.SSLContext:
    """A client context that accepts the self-signed certificate, as the gateway does."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# --- HTTP --------------------------------------------------------------------------------------


class BadRequest(Exception):
    """The request head is too large or not HTTP; KasmVNC answers 400 and closes."""


@dataclass
class Request:
    """One parsed HTTP request head; header names are lower-cased, repeats joined with ', '."""

    method: str
    target: str
    headers: dict[str, str]
    peer: str

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


async def read_request(reader: StreamReader, peer: str) -> Request | None:
    """Read one request head of at most MAX_HEAD bytes; None if the client went away first."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    except asyncio.LimitOverrunError:
        raise BadRequest("too large") from None
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest("not HTTP/1.x")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return Request(parts[0], parts[1], headers, peer)


def http_response(status: str, body: bytes, content_type: str = "text/plain", extra: str = "") -> bytes:
    """A complete ``Connection: close`` response in KasmVNC's style (it closes after every answer)."""
    head = (
        f"HTTP/1.1 {status}\r\nServer: KasmVNC/4.0\r\nConnection: close\r\nContent-Type: {content_type}\r\n"
    )
    return f"{head}Content-Length: {len(body)}\r\n{extra}\r\n".encode("latin-1") + body


NOT_FOUND = http_response("404 Not Found", b"404")
FORBIDDEN = http_response("403 Forbidden", b"403 Forbidden")
UNAUTHORIZED = http_response(
    "401 Unauthorized", b"401 Unauthorized", extra='WWW-Authenticate: Basic realm="Websockify"\r\n'
)


def is_upgrade(request: Request) -> bool:
    """KasmVNC's test for a WebSocket request; note that the path plays no part."""
    h = request.headers
    needed = ("connection", "sec-websocket-version", "sec-websocket-key", "sec-websocket-protocol")
    return (
        request.method == "GET"
        and "websocket" in h.get("upgrade", "").lower()
        and all(name in h for name in needed)
        and ("origin" in h or "sec-websocket-origin" in h)
    )


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept value for a Sec-WebSocket-Key (RFC 6455 section 4.2.2)."""
    digest = hashlib.sha1((key.strip() + WS_GUID).encode(), usedforsecurity=False).digest()
    return base64.b64encode(digest).decode()


def choose_protocol(offered: str) -> str:
    """``binary`` when offered (noVNC asks for it), else the first offer; KasmVNC says null for none."""
    protocols = [p.strip() for p in offered.split(",") if p.strip()]
    if "binary" in protocols:
        return "binary"
    return protocols[0] if protocols else "null"


def upgrade_response(request: Request, extra_lines: str = "") -> bytes:
    """The 101 answer, byte for byte as KasmVNC sends it (plus optional extra header lines)."""
    h = request.headers
    return (
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Accept: {accept_key(h['sec-websocket-key'])}\r\n"
        f"Sec-WebSocket-Protocol: {choose_protocol(h['sec-websocket-protocol'])}\r\n"
        f"{extra_lines}\r\n"
    ).encode("latin-1")


def basic_auth_user(request: Request, users: Mapping[str, str]) -> str | None:
    """The user whose Basic credentials the request carries, or None if they are missing or wrong."""
    scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    expected = users.get(user)
    if not sep or expected is None or not hmac.compare_digest(password.encode(), expected.encode()):
        return None
    return user


def serve_file(web_root: Path, request: Request) -> bytes:
    """A static file below ``web_root`` as KasmVNC serves noVNC; 404 for anything else."""
    if request.method != "GET":
        return NOT_FOUND
    path = urllib.parse.unquote(request.path)
    if path.endswith("/"):
        path += "index.html"
    root = web_root.resolve()
    target = (root / path.lstrip("/")).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        return NOT_FOUND
    mime = MIME_TYPES.get(target.suffix.lower(), "application/octet-stream")
    return http_response("200 OK", target.read_bytes(), mime)


# --- WebSocket framing -------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _repeater(n: int) -> tuple[int, int]:
    """For payloads of n bytes: R such that mask_int * R repeats the 4-byte mask, and an n-byte cut."""
    return int.from_bytes(b"\x01\0\0\0" * (n // 4 + 1), "little"), (1 << (8 * n)) - 1


def unmask(payload: bytes, mask: bytes) -> bytes:
    """XOR ``payload`` with the repeated 4-byte ``mask`` as big integers: no per-byte Python loop.

    Building the repeated mask by one multiplication (instead of from bytes) makes this ~2x faster.
    """
    n = len(payload)
    if n == 0:
        return payload
    repeat, cut = _repeater(n)
    key = int.from_bytes(mask, "little") * repeat & cut
    return (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little")


def frame(payload: bytes, opcode: int = OP_BINARY) -> bytes:
    """One unmasked, final server frame; the payload must not exceed MAX_FRAME."""
    n = len(payload)
    if n > MAX_FRAME:
        raise ValueError(f"KasmVNC never sends frames over {MAX_FRAME} bytes")
    if n < 126:
        return bytes((0x80 | opcode, n)) + payload
    return bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big") + payload


def close_payload(code: int | None, reason: str = "") -> bytes:
    """The body of a close frame; ``code=None`` gives an empty body, which the peer reads as 1005."""
    if code is None:
        return b""
    body = code.to_bytes(2, "big") + reason.encode()
    if len(body) > 125:
        raise ValueError("close reason too long")
    return body


class WebSocket:
    """The server side of one upgraded connection, with KasmVNC's framing quirks."""

    def __init__(
        self, front: KasmFront, request: Request, reader: StreamReader, writer: StreamWriter
    ) -> None:
        self.front = front
        self.request = request
        self.end_reason = ""  # why recv() returned None
        self.reader = reader
        self.writer = writer

    async def recv(self) -> bytes | None:
        """The next data message's payload, or None once the connection must end."""
        read = self.reader.readexactly
        front = self.front
        try:
            while True:
                b0, b1 = await read(2)
                opcode, length, masked = b0 & 0x0F, b1 & 0x7F, b1 & 0x80
                if opcode == OP_CLOSE:
                    await self._record_close(length, masked)
                    self.end_reason = "close frame"
                    return None
                if length == 127:  # a 64-bit length: over 65,535 bytes
                    self.end_reason = "frame over 65535 bytes"
                    return None
                extra = (2 if length == 126 else 0) + (4 if masked else 0)
                ext = await read(extra) if extra else b""
                if length == 126:
                    length = int.from_bytes(ext[:2], "big")
                payload = await read(length) if length else b""
                front.received_frames += 1
                if opcode == OP_PING:
                    front.received_pings += 1
                if opcode == OP_PONG:
                    front.received_pongs += 1
                if opcode not in (OP_TEXT, OP_BINARY) or length == 0:
                    continue  # ping, pong, continuation, reserved and empty frames are ignored
                if not masked:
                    self.end_reason = "unmasked frame"
                    return None
                front.received_bytes += length
                return unmask(payload, ext[-4:])
        except (EOFError, OSError) as exc:
            self.end_reason = f"connection lost ({type(exc).__name__})"
            return None

    async def _record_close(self, length: int, masked: int) -> None:
        """Remember the client's close code and reason for tests; KasmVNC just stops reading."""
        body = b""
        if length <= 125:
            with contextlib.suppress(EOFError, OSError):
                mask = await self.reader.readexactly(4) if masked else b"\0\0\0\0"
                body = unmask(await self.reader.readexactly(length), mask)
        code = int.from_bytes(body[:2], "big") if len(body) >= 2 else None
        self.front.last_close = (code, body[2:].decode("utf-8", "replace"))
        self.front.client_closed.set()

    async def send(self, data: bytes) -> None:
        """Send bytes as binary frames of at most MAX_FRAME bytes; nothing at all for empty data."""
        for start in range(0, len(data), MAX_FRAME):
            self.writer.write(frame(data[start : start + MAX_FRAME]))
            await self.writer.drain()

    async def send_close(self, code: int | None, reason: str = "") -> None:
        """Send a close frame. KasmVNC never does; only the ClosesWithCode stand-in uses this."""
        self.writer.write(frame(close_payload(code, reason), OP_CLOSE))
        await self.writer.drain()


App = Callable[[WebSocket], Awaitable[None]]


# --- Applications behind the socket ------------------------------------------------------------


async def echo(ws: WebSocket) -> None:
    """Send every data message back."""
    while (data := await ws.recv()) is not None:
        await ws.send(data)


async def rfb_greeting(ws: WebSocket) -> None:
    """Greet like a VNC server (the RFB version string), then echo."""
    await ws.send(RFB_VERSION)
    await echo(ws)


def tcp_backend(host: str, port: int) -> App:
    """Bridge the WebSocket byte stream to a TCP server, as KasmVNC does to its VNC server."""

    async def bridge(ws: WebSocket) -> None:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as exc:
            ws.end_reason = f"backend {host}:{port} unreachable: {exc}"
            log.warning("%s", ws.end_reason)
            return

        async def upstream() -> None:
            while (data := await ws.recv()) is not None:
                writer.write(data)
                await writer.drain()

        async def downstream() -> None:
            while chunk := await reader.read(MAX_FRAME):
                await ws.send(chunk)

        pumps = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return bridge


async def stream(ws: WebSocket) -> None:
    """Benchmark helper: ``stream N`` answers with N bytes in full-size frames; anything else echoes."""
    block = bytes(range(256)) * (MAX_FRAME // 256 + 1)
    full = frame(block[:MAX_FRAME])
    writer = ws.writer
    while (data := await ws.recv()) is not None:
        word, _, count = data.partition(b" ")
        if word != b"stream" or not count.strip().isdigit():
            await ws.send(data)
            continue
        remaining = int(count)
        while remaining > 0:
            writer.write(full if remaining >= MAX_FRAME else frame(block[:remaining]))
            remaining -= MAX_FRAME
            await writer.drain()


APPS: dict[str, App] = {"echo": echo, "stream": stream, "rfb": rfb_greeting}


# --- Servers -----------------------------------------------------------------------------------


async def _drop(writer: StreamWriter) -> None:
    """End a connection the KasmVNC way: no close frame, just flush and close the socket."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), DROP_TIMEOUT)
    except (OSError, TimeoutError):
        writer.transport.abort()


class _StartStop:
    """``async with`` support for every server here: start on entry, stop on exit."""

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


class _Endpoint(_StartStop):
    """TLS listener plumbing shared by KasmFront and the fault stand-ins.

    Observability: ``requests`` (request heads read), ``last_request_headers`` (of the most
    recent request, keys lower-cased) and ``request_received`` (set on every request head).
    """

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context if ssl_context is not None else shared_context()
        self.port = 0
        self.requests = 0
        self.last_request_headers: dict[str, str] = {}
        self.request_received = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._open: dict[asyncio.Task[Any], StreamWriter] = {}

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen on host:port (0 picks a free port) and return the bound port."""
        self._server = await asyncio.start_server(
            self._accept, host, port, ssl=self.ssl_context, limit=MAX_HEAD
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        """Stop listening and cut every open connection."""
        if self._server is not None:
            self._server.close()
        for task, writer in list(self._open.items()):
            writer.transport.abort()
            task.cancel()
        await asyncio.gather(*self._open, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _accept(self, reader: StreamReader, writer: StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._open[task] = writer
        try:
            await self._converse(reader, writer)
            await _drop(writer)
        except asyncio.CancelledError:  # only stop() cancels; a cancelled task makes 3.11's streams log
            writer.transport.abort()
        finally:
            del self._open[task]

    async def _converse(self, reader: StreamReader, writer: StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            try:
                request = await read_request(reader, str(peer[0]) if peer else "-")
            except BadRequest as exc:
                writer.write(http_response("400 Bad Request", f"400 Bad Request, {exc}".encode()))
                return
            if request is None:
                return
            self.requests += 1
            self.last_request_headers = request.headers
            self.request_received.set()
            await self._respond(request, reader, writer)
        except (EOFError, OSError) as exc:
            log.debug("connection from %s ended: %r", peer, exc)
        except Exception:  # a bug in an app: log it here, the stream protocol would swallow it
            log.exception("connection from %s failed", peer)

    async def _respond(self, request: Request, reader: StreamReader, writer: StreamWriter) -> None:
        raise NotImplementedError


class KasmFront(_Endpoint):
    """KasmVNC's port-6901 endpoint: Basic auth, HTTP, and a WebSocket in front of ``app``.

    ``users`` maps user names to passwords (e.g. ``{"kasm_user": pw, "kasm_viewer": pw2}``);
    None disables auth, like KasmVNC's ``-disableBasicAuth``. ``viewer_app``, when given, serves
    ``kasm_viewer``'s connections (KasmVNC ignores that account's input: the stand-in bridges it to
    a view-only VNC server). ``blacklist=True`` blocks an IP
    after BLACKLIST_THRESHOLD failures for BLACKLIST_TIMEOUT seconds (off by default, so that
    tests on loopback are never locked out); failures are counted either way.
    """

    def __init__(
        self,
        app: App = echo,
        *,
        users: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        web_root: str | os.PathLike[str] | None = None,
        blacklist: bool = False,
        viewer_app: App | None = None,
    ) -> None:
        super().__init__(ssl_context)
        self.app = app
        self.viewer_app = viewer_app
        self.users = dict(users) if users is not None else None
        self.web_root = Path(web_root) if web_root is not None else None
        self.blacklist_enabled = blacklist
        self.auth_failures: dict[str, int] = {}  # client IP -> failed attempts
        self.blacklisted: dict[str, float] = {}  # client IP -> monotonic time of last refusal
        self.last_user: str | None = None
        self.connections = 0  # upgrades accepted
        self.active = 0  # upgraded connections still open
        self.received_frames = 0
        self.received_bytes = 0
        self.received_pings = 0
        self.received_pongs = 0
        self.last_close: tuple[int | None, str] | None = None  # the client's close code, reason
        self.client_closed = asyncio.Event()  # a close frame arrived
        self.disconnected = asyncio.Event()  # an upgraded connection ended, for any reason

    def _is_blacklisted(self, ip: str) -> bool:
        since = self.blacklisted.get(ip)
        if since is None:
            return False
        if time.monotonic() - since > BLACKLIST_TIMEOUT:
            del self.blacklisted[ip]
            self.auth_failures.pop(ip, None)
            return False
        self.blacklisted[ip] = time.monotonic()
        return True

    def _add_failure(self, ip: str) -> None:
        self.auth_failures[ip] = self.auth_failures.get(ip, 0) + 1
        if self.blacklist_enabled and self.auth_failures[ip] >= BLACKLIST_THRESHOLD:
            self.blacklisted[ip] = time.monotonic()

    def _upgrade_response(self, request: Request) -> bytes:
        return upgrade_response(request)

    async def _respond(self, request: Request, reader: StreamReader, writer: StreamWriter) -> None:
        ip = request.peer
        user = None
        if self.blacklist_enabled and self._is_blacklisted(ip):
            log.info("%s is blacklisted, dropping", ip)
            writer.write(b"HTTP/1.1 401 Forbidden\r\n\r\n")
            return
        if self.users is not None:
            user = basic_auth_user(request, self.users)
            if user is None:
                self._add_failure(ip)
                log.info("%s: authentication failed for %s %s", ip, request.method, request.target)
                writer.write(UNAUTHORIZED)
                return
            self.last_user = user
        if not is_upgrade(request):
            if self.web_root is not None:
                writer.write(serve_file(self.web_root, request))
            elif request.method == "GET":
                writer.write(http_response("200 OK", DEFAULT_PAGE, "text/html"))
            else:
                writer.write(NOT_FOUND)
            return
        writer.write(self._upgrade_response(request))
        self.connections += 1
        self.active += 1
        ws = WebSocket(self, request, reader, writer)
        log.info("%s: WebSocket %s opened", ip, request.target)
        app = self.viewer_app if user == "kasm_viewer" and self.viewer_app is not None else self.app
        try:
            await app(ws)
        finally:
            self.active -= 1
            self.disconnected.set()
            log.info("%s: WebSocket %s closed: %s", ip, request.target, ws.end_reason or "app ended")


# --- Fault stand-ins ---------------------------------------------------------------------------


class RefusesTcp(_StartStop):
    """A port on which TCP connects are refused: bound (so nothing else takes it) but not listening."""

    def __init__(self) -> None:
        self.port = 0
        self._sock: socket.socket | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind((host, port))
        self.port = int(self._sock.getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class HangsInHandshake(_Endpoint):
    """Completes TCP and TLS, reads the request head, and never answers (until the client leaves)."""

    async def _respond(self, request: Request, reader: StreamReader, writer: StreamWriter) -> None:
        while await reader.read(65536):
            pass


class Answers403(_Endpoint):
    """Answers every request, upgrade or not, with KasmVNC's 403 page."""

    async def _respond(self, request: Request, reader: StreamReader, writer: StreamWriter) -> None:
        writer.write(FORBIDDEN)


class TricklesBody(_Endpoint):
    """Answers every request with 200 and a large Content-Length, then sends the body a byte every
    ``interval`` seconds until the client leaves (``client_left`` is set then): a desktop whose web
    server is stuck or crawling."""

    def __init__(self, interval: float = 0.05, *, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(ssl_context)
        self.interval = interval
        self.client_left = asyncio.Event()

    async def _respond(self, request: Request, reader: StreamReader, writer: StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/javascript\r\nContent-Length: 1000000\r\n\r\n"
        )
        try:
            while not reader.at_eof():
                writer.write(b";")
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(reader.read(1), self.interval)
        finally:
            self.client_left.set()


OversizeMode = Literal["one_line", "many_lines"]


class OversizedHandshake(KasmFront):
    """Answers the upgrade with a valid 101 whose head exceeds 8 KiB, then echoes.

    ``mode="one_line"`` adds one header line of ``size`` bytes; ``mode="many_lines"`` adds
    ~200-byte header lines totalling ``size`` bytes (each line alone is harmless).
    """

    def __init__(
        self,
        mode: OversizeMode = "one_line",
        size: int = 10 * 1024,
        *,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(echo, ssl_context=ssl_context)
        if mode == "one_line":
            self.extra_lines = f"X-Padding: {'a' * size}\r\n"
        else:
            line = "b" * 180
            self.extra_lines = "".join(f"X-Padding-{i}: {line}\r\n" for i in range(size // 195 + 1))

    def _upgrade_response(self, request: Request) -> bytes:
        return upgrade_response(request, self.extra_lines)


class ClosesWithCode(KasmFront):
    """A well-behaved WebSocket server that closes with ``code`` and ``reason``.

    It sends the close frame after the first data message, or after ``delay`` seconds if that
    comes first (``delay=None`` waits for a message only), then waits for the client's close
    frame and closes TCP. ``code=None`` sends an empty close frame (read as 1005 by clients).
    """

    def __init__(
        self,
        code: int | None = 1000,
        reason: str = "",
        *,
        delay: float | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        close_payload(code, reason)  # fail early on a reason that does not fit
        super().__init__(self._close_app, ssl_context=ssl_context)
        self.code, self.reason, self.delay = code, reason, delay

    async def _close_app(self, ws: WebSocket) -> None:
        pending = asyncio.ensure_future(ws.recv())
        await asyncio.wait({pending}, timeout=self.delay)
        await ws.send_close(self.code, self.reason)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DROP_TIMEOUT):
                while await pending is not None:
                    pending = asyncio.ensure_future(ws.recv())
        pending.cancel()


class DropsAfter(KasmFront):
    """Echoes, and drops TCP (no close frame) once ``n_bytes`` payload bytes have been sent back."""

    def __init__(self, n_bytes: int, *, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(self._drop_app, ssl_context=ssl_context)
        self.n_bytes = n_bytes

    async def _drop_app(self, ws: WebSocket) -> None:
        budget = self.n_bytes
        while budget > 0 and (data := await ws.recv()) is not None:
            await ws.send(data[:budget])
            budget -= min(len(data), budget)
        ws.end_reason = f"dropped after {self.n_bytes} bytes"


class BreaksTLS(KasmFront):
    """Echoes the first message, then writes a forged TLS record (bad MAC) under its TLS layer.

    The client's TLS stack must reject the record: the fault of a corrupted or tampered connection.
    """

    def __init__(self, *, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(self._break_app, ssl_context=ssl_context)

    async def _break_app(self, ws: WebSocket) -> None:
        data = await ws.recv()
        if data is None:
            return
        await ws.send(data)
        # Application data, TLS 1.2, 24 bytes that no key decrypts; written to the socket itself.
        forged = bytes((0x17, 0x03, 0x03, 0x00, 24)) + bytes(24)
        os.write(ws.writer.get_extra_info("socket").fileno(), forged)
        while await ws.recv() is not None:
            pass
        ws.end_reason = "broke TLS"


# --- Command line ------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="KasmVNC port-6901 stand-in (TLS WebSocket front).")
    parser.add_argument("--host", default="0.0.0.0", help="bind address (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=6901, help="port (default 6901; 0 picks one)")
    parser.add_argument("--cert", help="PEM certificate (default: a fresh self-signed one)")
    parser.add_argument("--key", help="PEM private key (default: the one made with the certificate)")
    parser.add_argument("--user", default="kasm_user", help="owner user name (default kasm_user)")
    parser.add_argument(
        "--password", default=os.environ.get("VNC_PW"), help="owner password (default: $VNC_PW)"
    )
    parser.add_argument(
        "--viewer-password",
        default=os.environ.get("VNC_VIEW_ONLY_PW"),
        help="password of the view-only kasm_viewer (default: $VNC_VIEW_ONLY_PW)",
    )
    parser.add_argument("--no-auth", action="store_true", help="disable Basic auth")
    parser.add_argument("--blacklist", action="store_true", help="block IPs after 5 failed logins")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--backend", metavar="HOST:PORT", help="bridge to a TCP server (TigerVNC)")
    target.add_argument("--app", choices=sorted(APPS), default="echo", help="built-in app (default echo)")
    parser.add_argument(
        "--viewer-backend",
        metavar="HOST:PORT",
        help="bridge kasm_viewer's connections to this (view-only) TCP server instead",
    )
    parser.add_argument("--web-root", help="directory served over plain HTTP (noVNC)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every connection")
    args = parser.parse_args(argv)
    if not args.no_auth and not args.password:
        parser.error("give --password (or set VNC_PW), or --no-auth")
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together")
    return args


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


async def _serve(args: argparse.Namespace) -> None:
    context = server_context(args.cert, args.key) if args.cert else make_self_signed_context()
    users: dict[str, str] | None = None
    if not args.no_auth:
        users = {args.user: args.password}
        if args.viewer_password:
            users["kasm_viewer"] = args.viewer_password
    app = APPS[args.app]
    if args.backend:
        app = tcp_backend(*_host_port(args.backend))
    viewer_app = tcp_backend(*_host_port(args.viewer_backend)) if args.viewer_backend else None
    front = KasmFront(
        app,
        users=users,
        ssl_context=context,
        web_root=args.web_root,
        blacklist=args.blacklist,
        viewer_app=viewer_app,
    )
    port = await front.start(args.host, args.port)
    print(f"kasm_front listening on https://{args.host}:{port}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):  # as PID 1 in a container, SIGTERM needs a handler
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await front.stop()


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
