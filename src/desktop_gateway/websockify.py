"""``/websockify`` and ``/desktop/{name}/websockify``: authorise, look up, dial, relay, log once.

The order matters: the browser is accepted only after the container leg is open, with the subprotocol
the container chose. Every refusal is an accepted WebSocket closed at once with a code and a sentence,
because a refused handshake reaches noVNC as a bare 1006 that says nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

from starlette.datastructures import Headers
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from desktop_gateway import access, closepolicy, desktops, grants, logs, metrics, upstream, watches
from desktop_gateway.access import Decision
from desktop_gateway.closepolicy import Close
from desktop_gateway.db.models import DesktopState
from desktop_gateway.gateway import Gateway
from desktop_gateway.grants import person_of
from desktop_gateway.identity import Identity
from desktop_gateway.origins import origin_allowed
from desktop_gateway.relay import EndedBy, Outcome, close_browser, relay
from desktop_gateway.relayhub import RelayHandle
from desktop_gateway.rfbinput import ViewOnlyFilter

log = logging.getLogger("desktop_gateway.relay")

# Relays one person may hold to others' desktops on top of their own: a class's thumbnails, twice over.
WATCHES_PER_PERSON = 64
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


class Websockify:
    """The ASGI app behind the WebSocket routes (and their plain-HTTP 426 answer).

    ``watch``: the routes for watching someone else's desktop, view-only.
    """

    def __init__(self, watch: bool = False) -> None:
        self.watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await _upgrade_required(send)
            return
        websocket = WebSocket(scope, receive, send)
        if (await websocket.receive())["type"] != "websocket.connect":
            return
        await _serve(scope["state"]["gateway"], websocket, self.watch)


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


async def _refuse(websocket: WebSocket, close: Close) -> None:
    offered = websocket.scope.get("subprotocols") or []
    # Refusing the handshake itself reaches noVNC as a bare 1006: accept, then close with a sentence. A
    # browser that offered a subprotocol fails the handshake (a bare 1006 again) unless one is chosen.
    await websocket.accept(offered[0] if offered else None)
    await close_browser(websocket, close)


async def _serve(gateway: Gateway, websocket: WebSocket, watch: bool) -> None:
    scope = websocket.scope
    headers = websocket.headers
    identity: Identity | None = scope.get("identity")
    username = identity.username if identity is not None else None
    name = desktop_name(scope, headers)
    client_ip = websocket.client.host if websocket.client else None
    # Every line about this connection, from here to its close, carries its id, user and desktop.
    logs.bind_connection(secrets.token_hex(4), username, name[:100] if name else None)

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
        metrics.connect_refused(close.code)
        await _refuse(websocket, close)

    if not origin_allowed(scope, headers, gateway.settings.public_origin):
        # Attacker-chosen and up to kilobytes long: the log line keeps its start only.
        await deny(closepolicy.FOREIGN_ORIGIN, f"foreign origin {(headers.get('origin') or '')[:100]!r}")
        return
    if identity is None:
        await deny(closepolicy.NOT_SIGNED_IN, "no valid session cookie")
        return
    if name is None:
        await deny(closepolicy.NO_DESKTOP_NAMED, "no desktop named by path, query or referer")
        return
    if watch:
        await _watch(gateway, websocket, identity, name, deny)
        return
    found, decision = await _look_up(gateway, name, identity)
    if found is None:
        await deny(closepolicy.NO_SUCH_DESKTOP, "no desktop of that name")
        return
    if decision is None:
        # The same sentence as for a missing desktop: names are guessable, ownership is not to be probed.
        await deny(closepolicy.NO_SUCH_DESKTOP, "desktop belongs to another user")
        return
    if not decision.allowed:
        await deny(closepolicy.NOT_ALLOWED_TYPE, f"type {found.desktop_type} not allowed")
        return
    refusal = _not_running(found)
    if refusal is not None:
        await deny(*refusal)
        return
    if found.target is None:
        await deny(closepolicy.NOT_RUNNING, f"desktop is {found.state.value}")
        return

    handle = RelayHandle(
        desktop_id=found.desktop_id,
        desktop_name=found.name,
        username=identity.username,
        session_id=identity.session_id,
    )
    limit = gateway.settings.max_relays_per_user
    if not gateway.hub.add(handle, limit):
        # Each relay holds buffers and two sockets: one signed-in user must not be able to exhaust them.
        await deny(closepolicy.TOO_MANY_CONNECTIONS, f"already {limit} connections open")
        return
    try:
        await _dial_and_relay(gateway, websocket, found, found.target, identity, handle)
    finally:
        gateway.hub.discard(handle)


def _not_running(found: desktops.RelayTarget) -> tuple[Close, str] | None:
    """Why a desktop cannot be relayed now (still starting, or not running) and the log's cause; None
    while it runs. The owner's relays and a watcher's are refused alike."""
    if found.state == DesktopState.STARTING:
        return closepolicy.STILL_STARTING, "desktop is still starting"
    if found.state != DesktopState.RUNNING:
        return closepolicy.NOT_RUNNING, f"desktop is {found.state.value}"
    return None


async def _watch(
    gateway: Gateway,
    websocket: WebSocket,
    identity: Identity,
    name: str,
    deny: Callable[[Close, str], Awaitable[None]],
) -> None:
    """Relay a teacher (or admin) to a student's desktop through its view-only account, input removed,
    while a row says so to the student's viewer."""
    query = parse_qs(websocket.scope.get("query_string", b"").decode("latin-1"))
    group = (query.get("group") or [None])[0]
    async with gateway.sessions() as db:
        row = await desktops.find_for_watching(db, name)
    if row is None:
        # The same sentence as for a refusal: whether a desktop of that name exists is not to be probed.
        await deny(closepolicy.NOT_WATCHER, "no desktop of that name")
        return
    found, owner = row
    decision = access.may_watch(identity.person, person_of(owner), group)
    if not decision.allowed:
        await deny(closepolicy.NOT_WATCHER, f"may not watch: {decision.why}")
        return
    refusal = _not_running(found)
    if refusal is not None:
        await deny(*refusal)
        return
    if found.target is None:
        await deny(closepolicy.NOT_WATCHABLE, "desktop has no view-only account")
        return
    handle = RelayHandle(
        desktop_id=found.desktop_id,
        desktop_name=found.name,
        username=identity.username,
        session_id=identity.session_id,
        watching=True,
    )
    limit = gateway.settings.max_relays_per_user + WATCHES_PER_PERSON
    if not gateway.hub.add(handle, limit):
        await deny(closepolicy.TOO_MANY_CONNECTIONS, f"already {limit} connections open")
        return
    try:
        async with gateway.sessions() as db:
            watch_id = await watches.begin(db, found.desktop_id, identity.user_id)
            await db.commit()
    except BaseException:
        gateway.hub.discard(handle)
        raise
    gateway.audit.record("watch", identity.username, found.name, f"owner {owner.username}")
    renewing = asyncio.create_task(_renew(gateway, watch_id), name="watch renewal")
    try:
        await _dial_and_relay(gateway, websocket, found, found.target, identity, handle, ViewOnlyFilter())
    finally:
        renewing.cancel()
        gateway.hub.discard(handle)
        gateway.audit.record("watch-end", identity.username, found.name, f"owner {owner.username}")
        with contextlib.suppress(Exception):  # the database may be away: the row then ages out
            async with gateway.sessions() as db:
                await watches.end(db, watch_id)
                await db.commit()


async def _renew(gateway: Gateway, watch_id: int) -> None:
    """Renew a watch's row while its relay runs (until cancelled); a failed renewal is tried again."""
    while True:
        await asyncio.sleep(watches.RENEW)
        try:
            async with gateway.sessions() as db:
                await watches.renew(db, watch_id)
                await db.commit()
        except Exception as exc:
            log.warning("could not renew a watch: %s", type(exc).__name__)


async def _dial_and_relay(
    gateway: Gateway,
    websocket: WebSocket,
    found: desktops.RelayTarget,
    target: upstream.Target,
    identity: Identity,
    handle: RelayHandle,
    view_only: ViewOnlyFilter | None = None,
) -> None:
    """Open the container leg, accept the browser with its subprotocol, relay, and log the end once."""
    scope, headers = websocket.scope, websocket.headers
    username, name = identity.username, found.name
    client_ip = websocket.client.host if websocket.client else None
    started = time.monotonic()
    offered = scope.get("subprotocols") or []
    try:
        conn = await upstream.dial(
            target,
            subprotocols=offered,
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
        metrics.connect_refused(close.code)
        await _refuse(websocket, close)
        return

    try:
        # The browser gets the container's choice only if it offered it (noVNC >= 1.2 offers none, and a
        # browser fails a handshake that names a subprotocol it did not offer).
        await websocket.accept(conn.subprotocol if conn.subprotocol in offered else None)
    except Exception as exc:
        # The browser left while the desktop was being dialled (a tab closed): nothing to relay or tell.
        conn.transport.abort()
        log.info("browser left before the relay began: user=%s desktop=%s (%s)", username, name, exc)
        return
    except BaseException:
        conn.transport.abort()
        raise
    try:
        # Plain calls rather than a context manager: the relay's frame lives for hours, and every
        # object it holds is memory per open desktop.
        metrics.relay_opened()
        try:
            log.info(
                "connected: user=%s desktop=%s client=%s handshake=%.0fms",
                username,
                name,
                client_ip or "-",
                (time.monotonic() - started) * 1000,
            )
            gateway.audit.record("connect", username, name, None)
            desktop_id = found.desktop_id

            def still_running() -> Awaitable[bool]:
                return gateway.launcher.still_running(desktop_id)

            outcome = await relay(websocket, conn, handle, still_running, view_only)
        finally:
            metrics.relay_closed(handle.bytes_up, handle.bytes_down)
    except Exception as exc:
        # A bug, not a way for a connection to end: logged with its traceback, and the browser still
        # gets a sentence rather than the server's bare close.
        conn.transport.abort()
        log.error("relay failed: user=%s desktop=%s", username, name, exc_info=exc)
        gateway.audit.record("close", username, name, "gateway error")
        metrics.relay_ended(closepolicy.GATEWAY_ERROR.code, metrics.GATEWAY_ERROR_ENDING)
        await close_browser(websocket, closepolicy.GATEWAY_ERROR)
        return
    except BaseException:
        conn.transport.abort()
        raise
    _log_outcome(gateway, handle, outcome)


async def _look_up(
    gateway: Gateway, name: str, identity: Identity
) -> tuple[desktops.RelayTarget | None, Decision | None]:
    """The desktop called ``name``, and whether ``identity`` may use its type (``None`` when the desktop
    is not theirs): one pooled connection for both, since every connect asks.

    Not inline: the relay's frame lives for hours and would keep the finished connection alive.
    """
    async with gateway.engine.connect() as db:
        with metrics.database_lookup("find_desktop"):
            found = await desktops.find_by_name(db, name)
        if found is None or found.owner_id != identity.user_id:
            return found, None
        with metrics.database_lookup("decide_access"):
            decision = await grants.decide_by_name(
                db, identity.person, gateway.desktop_types, found.desktop_type
            )
        return found, decision


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
    metrics.relay_ended(code, outcome.ended_by.value)
    gateway.audit.record("close", handle.username, handle.desktop_name, f"{outcome.ended_by.value} {code}")


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None:
        text += f" ({cause})"
    return f"{type(exc).__name__}: {text}"
