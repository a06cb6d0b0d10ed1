"""The container leg of a relay: dialling a desktop's KasmVNC endpoint and carrying its frames.

KasmVNC regenerates a self-signed certificate at every start, so its certificate cannot be verified; the
leg is protected by the per-desktop Basic credentials and by only ever dialling the address the database
holds for that desktop. KasmVNC ignores pings, so none are sent. Its frames are capped at 65,535 bytes.
TLS runs in :mod:`tlsclient` over a plain TCP connection (less memory per relay than the loop's TLS).

The leg is a plain :class:`asyncio.Protocol`: the opening handshake is checked by the ``websockets``
sans-I/O client, and after it frames move in the transport callbacks, with no task in between. Whole data
frames from the desktop are passed on byte for byte (a server's frames are unmasked, exactly as the
browser must receive them), several at a time when they arrive together.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import secrets
import ssl
from collections.abc import Callable, Sequence
from typing import cast

from websockets.client import ClientProtocol
from websockets.exceptions import SecurityError
from websockets.http11 import Response
from websockets.speedups import apply_mask
from websockets.typing import Origin, Subprotocol
from websockets.uri import parse_uri

from desktop_gateway.closepolicy import MAX_HANDSHAKE_RESPONSE, Close, Code
from desktop_gateway.tlsclient import ClientTLS

MAX_FRAME = 65_535
# Messages from the container are at most one frame in practice; this only bounds a misbehaving one.
MAX_MESSAGE = 16 * 1024 * 1024
# KasmVNC upgrades only a request that names a subprotocol (without the header it answers as plain HTTP,
# with an empty one it picks "null", which no client accepts). noVNC since 1.2 names none: offer "binary".
DEFAULT_SUBPROTOCOLS = ("binary",)

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


class HandshakeTooLarge(SecurityError):
    """The container's handshake response head is larger than 8 KiB."""


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """Where a desktop's endpoint is and how to sign in to it; ``password`` never leaves the server."""

    url: str
    username: str
    password: str | None = dataclasses.field(repr=False)

    def authorization(self) -> str | None:
        if self.password is None:
            return None
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return f"Basic {token}"


@functools.cache
def unverified_tls() -> ssl.SSLContext:
    """One context for all container legs: building one per connection costs milliseconds of CPU.

    TLS 1.2 at most: with an unverifiable certificate, 1.3 adds no protection here (both have only
    forward-secret AEAD suites in this context), but a 1.3 server sends session tickets after the
    handshake, which OpenSSL 3's client keeps for the life of the connection: about 17 KiB per relay, for
    resumption the gateway never uses (every desktop has a certificate of its own).
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


@dataclasses.dataclass(frozen=True, slots=True)
class Ended:
    """How the container leg ended: its close frame (code, reason), a drop (``None``), or our verdict."""

    code: int | None = None
    reason: str = ""
    verdict: Close | None = None


def frame_header(opcode: int, length: int, mask: bytes | None) -> bytes:
    mask_bit = 0x80 if mask is not None else 0
    if length < 126:
        head = bytes((0x80 | opcode, mask_bit | length))
    elif length < 65_536:
        head = bytes((0x80 | opcode, mask_bit | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, mask_bit | 127)) + length.to_bytes(8, "big")
    return head + mask if mask is not None else head


class Upstream(asyncio.Protocol):
    """One open (or opening) container leg.

    ``forward`` receives whole server frames (header included) for the browser; ``pause_peer`` and
    ``resume_peer`` stop and restart reading from the browser while this leg's write buffer is full.
    """

    def __init__(self, handshake: ClientProtocol, tls: ClientTLS | None) -> None:
        self._handshake: ClientProtocol | None = handshake
        self._tls = tls
        self._head = bytearray()
        self._raw_handshake = False
        self._buffer = bytearray()
        self._pending = bytearray()  # frames that arrived before anyone took them (see flush)
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.ended: asyncio.Future[Ended] = loop.create_future()
        self.subprotocol: str | None = None
        self.forward: Callable[[bytes], None] | None = None
        self.pause_peer: Callable[[], None] | None = None
        self.resume_peer: Callable[[], None] | None = None

    # --- asyncio callbacks ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods.
        self.transport = cast(asyncio.Transport, transport)
        if self._tls is not None:
            self.transport.write(self._tls.start())  # the WebSocket request follows the TLS handshake
        else:
            self._send_request()

    def data_received(self, data: bytes) -> None:
        tls = self._tls
        if tls is not None:
            opening = not tls.handshake_done
            try:
                data, reply = tls.receive(data)
            except ssl.SSLError as exc:
                self._broken(exc)
                return
            if reply and self.transport is not None:
                self.transport.write(reply)
            if opening and tls.handshake_done:
                self._send_request()
            if data:
                self._plain_data(data)
            if tls.error is not None:  # a bad record: what came before it is passed on, then it ends
                self._broken(tls.error)
            elif tls.eof:  # the desktop's close_notify: as good as the end of the stream
                self._end_of_stream()
            return
        self._plain_data(data)

    def _plain_data(self, data: bytes) -> None:
        if self._handshake is not None:
            self._handshake_data(data)
        elif self.forward is None:
            self._pending += data
        elif not self.ended.done():
            self._frames(data)

    def eof_received(self) -> bool | None:
        if self._tls is not None and not self._tls.handshake_done:
            self._fail_open(ConnectionResetError("the desktop closed the connection in the TLS handshake"))
        else:
            self._end_of_stream()
        return None

    def _end_of_stream(self) -> None:
        if self._handshake is not None:
            self._handshake.receive_eof()  # a refusal's body may end with the stream
            self._handshake_events()
        if not self.opened.done():
            self._fail_open(ConnectionResetError("the desktop closed the connection"))
        elif self._tls is not None and self._tls.eof:
            self._broken(ConnectionResetError("the desktop ended the TLS session"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionResetError("the desktop closed the connection"))
        if not self.ended.done():
            self.ended.set_result(Ended())
        if self.resume_peer is not None:
            self.resume_peer()

    def pause_writing(self) -> None:
        if self.pause_peer is not None:
            self.pause_peer()

    def resume_writing(self) -> None:
        if self.resume_peer is not None:
            self.resume_peer()

    # --- opening handshake ----------------------------------------------------------------------

    def _send_request(self) -> None:
        assert self._handshake is not None
        self._send_raw(*self._handshake.data_to_send())

    def _broken(self, exc: BaseException) -> None:
        """The connection cannot go on (a TLS error, or the TLS session ended): a failed open or a drop."""
        if not self.opened.done():
            self._fail_open(exc)
            return
        self._end(Ended())
        if self.transport is not None:
            self.transport.abort()

    def _handshake_data(self, data: bytes) -> None:
        assert self._handshake is not None
        if self._raw_handshake:
            self._handshake.receive_data(data)
            self._handshake_events()
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0 or end + 4 > MAX_HANDSHAKE_RESPONSE:
            if len(self._head) > MAX_HANDSHAKE_RESPONSE:
                self._fail_open(HandshakeTooLarge(f"more than {MAX_HANDSHAKE_RESPONSE} bytes of head"))
            return
        end += 4
        if self._head.startswith(b"HTTP/1.1 101 "):
            # Feed the head alone: what follows it is frames, which this class reads itself.
            head, rest = bytes(self._head[:end]), bytes(self._head[end:])
        else:
            head, rest = bytes(self._head), b""
            self._raw_handshake = True  # a refusal may have a body: let the client read it to the end
        self._head = bytearray()
        self._handshake.receive_data(head)
        self._handshake_events()
        if rest and self._handshake is None:
            self._pending += rest

    def _handshake_events(self) -> None:
        handshake = self._handshake
        assert handshake is not None
        if handshake.handshake_exc is not None:
            self._fail_open(handshake.handshake_exc)
            return
        for event in handshake.events_received():
            if isinstance(event, Response) and not self.opened.done():
                self.subprotocol = handshake.subprotocol
                self._handshake = None
                self.opened.set_result(None)
                return

    def _fail_open(self, exc: BaseException) -> None:
        self._handshake = None
        if not self.opened.done():
            self.opened.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    # --- frames ---------------------------------------------------------------------------------

    def flush(self) -> None:
        """Pass on what arrived before :attr:`forward` was set (the RFB greeting follows the 101 closely)."""
        if self._pending and not self.ended.done():
            data, self._pending = bytes(self._pending), bytearray()
            self._frames(data)

    def _frames(self, data: bytes) -> None:
        """Pass whole data frames on; answer pings; end on a close frame or a protocol error."""
        buffer = self._buffer
        if buffer:
            buffer += data
            view: bytes | bytearray = buffer
        else:
            view = data
        size = len(view)
        start = pos = 0
        while size - pos >= 2:
            first, second = view[pos], view[pos + 1]
            length, head = second & 0x7F, 2
            if length == 126:
                if size - pos < 4:
                    break
                length, head = int.from_bytes(view[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if size - pos < 10:
                    break
                length, head = int.from_bytes(view[pos + 2 : pos + 10], "big"), 10
            if second & 0x80 or first & 0x70:
                self._end(Ended(verdict=PROTOCOL_ERROR))
                return
            if length > MAX_MESSAGE:
                self._end(Ended(verdict=TOO_BIG))
                return
            end = pos + head + length
            if end > size:
                break
            opcode = first & 0x0F
            if opcode > OP_BINARY:
                if pos > start:
                    self._pass(view, start, pos)
                payload = bytes(view[pos + head : end])
                pos = start = end
                if not self._control(opcode, payload):
                    return
                continue
            pos = end
        if pos > start:
            self._pass(view, start, pos)
        if buffer:
            del buffer[:pos]
        elif pos < size:
            self._buffer = bytearray(view[pos:])

    def _pass(self, view: bytes | bytearray, start: int, end: int) -> None:
        if self.forward is None:
            return
        if isinstance(view, bytes) and start == 0 and end == len(view):
            self.forward(view)  # the common case for small messages: no copy at all
        else:
            self.forward(bytes(memoryview(view)[start:end]))

    def _control(self, opcode: int, payload: bytes) -> bool:
        if opcode == OP_PING:
            self._write(OP_PONG, payload)
            return True
        if opcode == OP_PONG:
            return True
        if opcode == OP_CLOSE:
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else Code.NO_STATUS
            reason = payload[2:].decode(errors="replace")
            self._end(Ended(code=code, reason=reason))
            return False
        self._end(Ended(verdict=PROTOCOL_ERROR))
        return False

    def _end(self, ended: Ended) -> None:
        if not self.ended.done():
            self.ended.set_result(ended)

    # --- sending --------------------------------------------------------------------------------

    def _send_raw(self, *parts: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if self._tls is None:
            self.transport.writelines(parts)
            return
        try:
            self.transport.write(self._tls.encrypt(b"".join(parts)))
        except ssl.SSLError as exc:  # the TLS session broke: a drop, decided like any other
            self._broken(exc)

    def _write(self, opcode: int, payload: bytes | memoryview) -> None:
        mask = secrets.token_bytes(4)
        self._send_raw(frame_header(opcode, len(payload), mask), apply_mask(payload, mask))

    def send(self, data: bytes | memoryview, text: bool = False) -> None:
        """Send a browser message; RFB is a byte stream and KasmVNC drops frames over 65,535 bytes,
        so a larger one goes on as several binary frames."""
        if len(data) <= MAX_FRAME:
            self._write(OP_TEXT if text else OP_BINARY, data)
            return
        view = memoryview(data)
        for start in range(0, len(view), MAX_FRAME):
            self._write(OP_BINARY, view[start : start + MAX_FRAME])

    def close(self, code: int = Code.NORMAL, reason: str = "") -> None:
        """Send a close frame and close the connection (KasmVNC answers a close frame by dropping TCP)."""
        if self.transport is None or self.transport.is_closing():
            return
        self._write(OP_CLOSE, code.to_bytes(2, "big") + reason.encode())
        self._end(Ended(verdict=Close(code, reason)))
        if self._tls is not None:
            self.transport.write(self._tls.close())
        self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


PROTOCOL_ERROR = Close(Code.PROTOCOL_ERROR, "The desktop broke the WebSocket protocol.")
TOO_BIG = Close(Code.MESSAGE_TOO_BIG, "The desktop sent a message that is too big.")


async def dial(
    target: Target,
    *,
    subprotocols: Sequence[str],
    origin: str | None,
    client_ip: str | None,
    open_timeout: float,
) -> Upstream:
    """Open the container leg or raise why not (``InvalidHandshake`` and its kinds, ``OSError``, timeout).

    ``subprotocols`` are the browser's offers; when it made none, :data:`DEFAULT_SUBPROTOCOLS` are offered.
    Cancellation (or the timeout) aborts the half-open connection.
    """
    uri = parse_uri(target.url)
    handshake = ClientProtocol(
        uri,
        origin=None if origin is None else Origin(origin),
        subprotocols=[Subprotocol(p) for p in subprotocols or DEFAULT_SUBPROTOCOLS],
        max_size=MAX_MESSAGE,
    )
    request = handshake.connect()
    authorization = target.authorization()
    if authorization is not None:
        request.headers["Authorization"] = authorization
    if client_ip is not None:
        # KasmVNC blacklists the source address after failed sign-ins: let it see the student's address.
        request.headers["X-Forwarded-For"] = client_ip
    handshake.send_request(request)
    loop = asyncio.get_running_loop()
    protocol: Upstream | None = None
    try:
        async with asyncio.timeout(open_timeout):
            tls = ClientTLS(unverified_tls(), uri.host) if uri.secure else None
            _, protocol = await loop.create_connection(lambda: Upstream(handshake, tls), uri.host, uri.port)
            await protocol.opened
    except BaseException:
        if protocol is not None:
            protocol.abort()
        raise
    return protocol
