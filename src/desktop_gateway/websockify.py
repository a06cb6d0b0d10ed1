"""``/websockify`` and ``/desktop/{name}/websockify``: authorise, look up, dial, relay, log once.

The order matters: the browser is accepted only after the container leg is open, with the subprotocol
the container chose. Every refusal is an accepted WebSocket closed at once with a code and a sentence,
because a refused handshake reaches noVNC as a bare 1006 that says nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable
from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send

from desktop_gateway import closepolicy, desktops, upstream
from desktop_gateway.browserws import EXTENSION, BrowserWebSocketProtocol
from desktop_gateway.closepolicy import Close
from desktop_gateway.db.models import DesktopState
from desktop_gateway.gateway import Gateway
from desktop_gateway.identity import Identity
from desktop_gateway.relay import EndedBy, Outcome, Relay, close_browser
from desktop_gateway.relayhub import RelayHandle

log = logging.getLogger("desktop_gateway.relay")

WEBSOCKET_ONLY = (
    "This endpoint is for WebSocket connections only. Open your desktop from the school portal instead.\n"
)


def desktop_name(scope: Scope, headers: Headers) -> str | None:
    """The desktop a connection asks for: path, else ``?desktop=``, else the Referer's ``/desktop/{name}``.

    Only a name: whoever names it, the signed-in user must own it.
    """
    name = scope.get("path_params", {}).get("name")
    if name:
        return str(name)
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if query.get("desktop"):
        return query["desktop"][0] or None
    referer = headers.get("referer")
    if referer:
        parts = urlsplit(referer).path.split("/")
        if len(parts) >= 3 and parts[1] == "desktop" and parts[2]:
            return parts[2]
    return None


def origin_allowed(scope: Scope, headers: Headers, public_origin: str | None) -> bool:
    """A browser always sends Origin; it must be the gateway's own public origin (no cross-site use)."""
    origin = headers.get("origin")
    if origin is None:
        return False
    if public_origin is not None:
        return origin.lower() == public_origin
    scheme = "https" if scope.get("scheme") == "wss" else "http"
    host = headers.get("host")
    return host is not None and origin.lower() == f"{scheme}://{host}".lower()


class Websockify:
    """The ASGI app behind the WebSocket routes (and their plain-HTTP 426 answer)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await _upgrade_required(send)
            return
        gateway: Gateway = scope["state"]["gateway"]
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        await _serve(gateway, scope, receive, send)


async def _upgrade_required(send: Send) -> None:
    body = WEBSOCKET_ONLY.encode()
    await send(
        {
            "type": "http.response.start",
            "status": 426,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
                (b"upgrade", b"websocket"),
                (b"connection", b"Upgrade"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _refuse(receive: Receive, send: Send, scope: Scope, close: Close) -> None:
    offered = scope.get("subprotocols") or []
    # A browser that offered a subprotocol fails the handshake (a bare 1006) unless one is chosen.
    await send({"type": "websocket.accept", "subprotocol": offered[0] if offered else None})
    await close_browser(receive, send, close)


async def _serve(gateway: Gateway, scope: Scope, receive: Receive, send: Send) -> None:
    headers = Headers(scope=scope)
    identity: Identity | None = scope.get("identity")
    username = identity.username if identity is not None else None
    name = desktop_name(scope, headers)
    client_ip = scope["client"][0] if scope.get("client") else None

    async def deny(close: Close, cause: str) -> None:
        log.warning(
            "denied: user=%s desktop=%s client=%s code=%d cause=%s",
            username or "-",
            name or "-",
            client_ip or "-",
            close.code,
            cause,
        )
        gateway.audit.record("deny", username, name, cause)
        await _refuse(receive, send, scope, close)

    if not origin_allowed(scope, headers, gateway.settings.public_origin):
        await deny(closepolicy.FOREIGN_ORIGIN, f"foreign origin {headers.get('origin')!r}")
        return
    if identity is None:
        await deny(closepolicy.NOT_SIGNED_IN, "no valid session cookie")
        return
    if name is None:
        await deny(closepolicy.NO_DESKTOP_NAMED, "no desktop named by path, query or referer")
        return
    found = await _find(gateway, name)
    if found is None:
        await deny(closepolicy.NO_SUCH_DESKTOP, "no desktop of that name")
        return
    if found.owner_id != identity.user_id:
        # The same sentence as for a missing desktop: names are guessable, ownership is not to be probed.
        await deny(closepolicy.NO_SUCH_DESKTOP, "desktop belongs to another user")
        return
    if found.state == DesktopState.STARTING:
        await deny(closepolicy.STILL_STARTING, "desktop is still starting")
        return
    if found.state != DesktopState.RUNNING or found.target is None:
        await deny(closepolicy.NOT_RUNNING, f"desktop is {found.state.value}")
        return

    browser = scope.get("extensions", {}).get(EXTENSION)
    if not isinstance(browser, BrowserWebSocketProtocol):
        # Served by something other than `desktop-gateway serve` (its WebSocket protocol does the splice).
        log.error(
            "cannot relay: the server does not provide %s; run the gateway with desktop-gateway serve",
            EXTENSION,
        )
        await _refuse(receive, send, scope, closepolicy.GATEWAY_ERROR)
        return

    started = time.monotonic()
    try:
        conn = await upstream.dial(
            found.target,
            subprotocols=scope.get("subprotocols") or [],
            origin=headers.get("origin"),
            client_ip=client_ip,
            open_timeout=gateway.settings.upstream_connect_timeout,
        )
    except Exception as exc:
        close = closepolicy.for_dial_error(exc)
        unexpected = close is closepolicy.GATEWAY_ERROR
        log.log(
            logging.ERROR if unexpected else logging.WARNING,
            "cannot open desktop: user=%s desktop=%s code=%d cause=%s",
            username,
            name,
            close.code,
            _describe(exc),
            exc_info=exc if unexpected else None,
        )
        gateway.audit.record("connect-failed", username, name, f"{close.code} {_describe(exc)}")
        await _refuse(receive, send, scope, close)
        return

    # The browser gets the container's choice only if it offered it (noVNC >= 1.2 offers none, and a browser
    # fails a handshake that names a subprotocol it did not offer).
    offered = scope.get("subprotocols") or []
    chosen = conn.subprotocol if conn.subprotocol in offered else None
    try:
        await send({"type": "websocket.accept", "subprotocol": chosen})
    except BaseException:
        conn.abort()
        raise
    handle = RelayHandle(
        desktop_id=found.desktop_id,
        desktop_name=found.name,
        username=identity.username,
        session_id=identity.session_id,
    )
    log.info(
        "connected: user=%s desktop=%s client=%s handshake=%.0fms",
        username,
        name,
        client_ip or "-",
        (time.monotonic() - started) * 1000,
    )
    gateway.audit.record("connect", username, name, None)
    gateway.hub.add(handle)
    desktop_id = found.desktop_id

    def still_running() -> Awaitable[bool]:
        return gateway.launcher.still_running(desktop_id)

    def ended(outcome: Outcome | None, error: BaseException | None) -> None:
        gateway.hub.discard(handle)
        if outcome is not None:
            _log_outcome(gateway, handle, outcome)
        elif error is not None:
            log.error("relay failed: user=%s desktop=%s", username, handle.desktop_name, exc_info=error)

    # From here on the relay lives in callbacks, and this request's task (and its scope) can end.
    Relay(browser, conn, handle, still_running, ended).start()


async def _find(gateway: Gateway, name: str) -> desktops.RelayTarget | None:
    # Not inline: the relay's frame lives for hours and would keep the finished session alive.
    async with gateway.sessions() as db:
        return await desktops.find_by_name(db, name)


def _log_outcome(gateway: Gateway, handle: RelayHandle, outcome: Outcome) -> None:
    close = outcome.to_browser or outcome.to_container
    code = close.code if close is not None else 0
    summary = (
        f"user={handle.username} desktop={handle.desktop_name} ended_by={outcome.ended_by.value} "
        f"code={code} reason={close.reason if close else ''!r} "
        f"duration={time.monotonic() - handle.started:.1f}s up={handle.bytes_up} down={handle.bytes_down}"
    )
    if outcome.ended_by is EndedBy.CONTAINER_ERROR:
        log.warning("desktop broke the protocol: %s", summary)
    elif outcome.ended_by is EndedBy.CONTAINER_DROP and code == closepolicy.Code.INTERNAL_ERROR:
        log.warning("connection to desktop lost: %s", summary)
    else:
        log.info("closed: %s", summary)
    gateway.audit.record("close", handle.username, handle.desktop_name, f"{outcome.ended_by.value} {code}")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None:
        text += f" ({cause})"
    return f"{type(exc).__name__}: {text}"
