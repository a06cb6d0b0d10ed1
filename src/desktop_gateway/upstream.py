"""The container leg of a relay: dialling a desktop's KasmVNC endpoint with ``websockets.connect``.

KasmVNC regenerates a self-signed certificate at every start, so its certificate cannot be verified; the
leg is protected by the per-desktop Basic credentials and by only ever dialling the address the database
holds for that desktop. KasmVNC ignores pings, so none are sent, and it rejects frames over 65,535 bytes.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import ssl
from collections.abc import Sequence

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import SecurityError
from websockets.http11 import Response
from websockets.typing import Origin, Subprotocol

from desktop_gateway.closepolicy import MAX_HANDSHAKE_RESPONSE

MAX_FRAME = 65_535
# KasmVNC sends frames of at most 65,535 bytes; a larger message only comes from a misbehaving endpoint.
MAX_MESSAGE = 1024 * 1024
# Frames the connection may hold that the relay has not taken yet; past it, websockets stops reading.
MAX_QUEUE = 16
# Seconds a close frame waits for KasmVNC's answer (it answers by dropping TCP, at once).
CLOSE_TIMEOUT = 2.0
# KasmVNC upgrades only a request that names a subprotocol (without the header it answers as plain HTTP,
# with an empty one it picks "null", which no client accepts). noVNC since 1.2 names none: offer "binary".
DEFAULT_SUBPROTOCOLS = ("binary",)


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

    A bare client context, without the system's CA store: nothing is verified, and with the store
    loaded OpenSSL still searches it for every desktop's certificate (about 40 % of a handshake's CPU,
    measured). TLS 1.2 at most: with an unverifiable certificate, 1.3 adds no protection here (both have
    only forward-secret AEAD suites in this context), but a 1.3 server sends session tickets after the
    handshake, which OpenSSL 3's client keeps for the life of the connection: about 17 KiB per relay, for
    resumption the gateway cannot use (the event loop offers no way to resume a session). For the same
    reason no TLS 1.2 ticket is asked for.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_TICKET
    return context


def response_head_size(response: Response | None) -> int:
    """The size of a handshake response's head as it came on the wire (status line, headers, blank line)."""
    if response is None:
        return 0
    size = len(b"HTTP/1.1 101 \r\n") + len(response.reason_phrase)
    return size + sum(len(k) + len(v) + 4 for k, v in response.headers.raw_items()) + 2


async def dial(
    target: Target,
    *,
    subprotocols: Sequence[str],
    origin: str | None,
    client_ip: str | None,
    open_timeout: float,
) -> ClientConnection:
    """Open the container leg or raise why not: what ``websockets.connect`` raised (``InvalidHandshake``
    and its kinds, ``OSError``, ``TimeoutError``), or :class:`HandshakeTooLarge`.

    ``subprotocols`` are the browser's offers; when it made none, :data:`DEFAULT_SUBPROTOCOLS` are offered.
    Cancellation (or the timeout) closes the half-open connection (``websockets`` does so).
    """
    headers: list[tuple[str, str]] = []
    authorization = target.authorization()
    if authorization is not None:
        headers.append(("Authorization", authorization))
    if client_ip is not None:
        # KasmVNC blacklists the source address after failed sign-ins: let it see the student's address.
        headers.append(("X-Forwarded-For", client_ip))
    connection = await connect(
        target.url,
        ssl=unverified_tls() if target.url.startswith("wss://") else None,
        subprotocols=[Subprotocol(p) for p in subprotocols or DEFAULT_SUBPROTOCOLS],
        origin=None if origin is None else Origin(origin),
        additional_headers=headers,
        user_agent_header=None,
        proxy=None,
        compression=None,
        open_timeout=open_timeout,
        ping_interval=None,
        close_timeout=CLOSE_TIMEOUT,
        max_size=MAX_MESSAGE,
        max_queue=MAX_QUEUE,
    )
    size = response_head_size(connection.response)
    if size > MAX_HANDSHAKE_RESPONSE:
        connection.transport.abort()
        raise HandshakeTooLarge(f"{size} bytes of handshake response")
    return connection
