"""Dialling a desktop's KasmVNC endpoint (the container leg of a relay).

KasmVNC regenerates a self-signed certificate at every start, so its certificate cannot be verified; the
leg is protected by the per-desktop Basic credentials and by only ever dialling the address the database
holds for that desktop. KasmVNC ignores pings, so none are sent. Its frames are capped at 65,535 bytes.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import ssl
from collections.abc import Sequence

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import SecurityError
from websockets.typing import Origin, Subprotocol

from desktop_gateway.closepolicy import MAX_HANDSHAKE_RESPONSE

MAX_FRAME = 65_535
# KasmVNC upgrades only a request that names a subprotocol (without the header it answers as plain HTTP,
# with an empty one it picks "null", which no client accepts). noVNC since 1.2 names none: offer "binary".
DEFAULT_SUBPROTOCOLS = ("binary",)
# Messages from the container are at most one frame in practice; this only bounds a misbehaving one.
MAX_MESSAGE = 16 * 1024 * 1024


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
    """One context for all container legs: building one per connection costs milliseconds of CPU."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def response_head_size(connection: ClientConnection) -> int:
    response = connection.response
    if response is None:
        return 0
    size = len(b"HTTP/1.1 101 ") + len(response.reason_phrase) + 2
    return size + sum(len(k) + len(v) + 4 for k, v in response.headers.raw_items()) + 2


async def dial(
    target: Target,
    *,
    subprotocols: Sequence[str],
    origin: str | None,
    client_ip: str | None,
    open_timeout: float,
) -> ClientConnection:
    """Open the container leg or raise what ``websockets.connect`` raised (or :class:`HandshakeTooLarge`).

    ``subprotocols`` are the browser's offers; when it made none, :data:`DEFAULT_SUBPROTOCOLS` are offered.
    Cancellation during the handshake closes the half-open connection (``websockets`` does so).
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
        close_timeout=2,
        max_size=MAX_MESSAGE,
    )
    if response_head_size(connection) > MAX_HANDSHAKE_RESPONSE:
        await connection.close()
        raise HandshakeTooLarge(f"{response_head_size(connection)} bytes")
    return connection
