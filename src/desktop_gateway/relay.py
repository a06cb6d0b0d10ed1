"""The two pumps between an accepted browser WebSocket (Starlette) and an open container leg (websockets).

Each direction is one task. Backpressure is end to end: a pump awaits each send, so a browser that stops
reading stops the pump that reads the desktop (and ``websockets`` then stops reading its socket), and a
desktop that stops reading stops the pump that reads the browser; the only buffers are the bounded ones
of the two WebSocket stacks. The first of three endings (the browser's close, the container's, a stop)
decides with :mod:`closepolicy` what the other side is told; :func:`relay` tells it and returns an
:class:`Outcome` for the caller to log once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.websockets import WebSocket
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, PayloadTooBig, ProtocolError

from desktop_gateway import closepolicy
from desktop_gateway.closepolicy import Close
from desktop_gateway.relayhub import RelayHandle
from desktop_gateway.rfbinput import NotViewOnly, ViewOnlyFilter
from desktop_gateway.upstream import MAX_FRAME


class EndedBy(enum.StrEnum):
    BROWSER = "browser"
    CONTAINER_CLOSE = "container closed"
    CONTAINER_DROP = "container dropped"
    STOPPED = "stopped"
    CONTAINER_ERROR = "container broke the protocol"


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    ended_by: EndedBy
    to_browser: Close | None
    to_container: Close | None


@dataclasses.dataclass(frozen=True, slots=True)
class BrowserGone:
    """The browser's side ended: the code and reason its server reported (1005 or 1006 if none came),
    or the gateway's own verdict on what it sent."""

    code: int | None
    reason: str
    verdict: Close | None = None


# RFB client messages a person causes: KeyEvent, PointerEvent, ClientCutText. noVNC sends each RFB message
# as one WebSocket message, so the first byte tells; FramebufferUpdateRequests (3) are the client's own.
_USER_INPUT = frozenset((4, 5, 6))


def is_user_input(data: bytes | bytearray | memoryview) -> bool:
    """Whether a browser message is real user input (for the idle limit), not the viewer's own traffic."""
    return len(data) > 0 and data[0] in _USER_INPUT


CLOSE_WAIT = 2.0  # seconds a browser gets to answer our close frame
# The largest message a browser may send. noVNC's own are a few bytes (keys, pointer, update requests),
# except a clipboard paste; a limit this size keeps what one relay can make the gateway hold small.
# `desktop-gateway serve` gives it to uvicorn too, which then refuses a larger one before reading it all.
MAX_BROWSER_MESSAGE = 1024 * 1024

PROTOCOL_ERROR = Close(closepolicy.Code.PROTOCOL_ERROR, "The desktop broke the WebSocket protocol.")
TOO_BIG = Close(closepolicy.Code.MESSAGE_TOO_BIG, "The desktop sent a message that is too big.")
BROWSER_TOO_BIG = Close(closepolicy.Code.MESSAGE_TOO_BIG, "The browser sent a message that is too big.")
NOT_VIEW_ONLY = Close(closepolicy.Code.POLICY_VIOLATION, "A view-only connection cannot send that.")


async def close_browser(websocket: WebSocket, close: Close) -> None:
    """Send ``close`` and wait (briefly) for the browser's answer; a browser already gone is not an error.

    Returning at once would let the server drop the connection before the closing handshake completes,
    and the browser would report the close as unclean.
    """
    with contextlib.suppress(Exception):
        await websocket.close(close.code, close.reason)
        async with asyncio.timeout(CLOSE_WAIT):
            while (await websocket.receive())["type"] != "websocket.disconnect":
                pass


async def _browser_to_container(
    websocket: WebSocket, upstream: ClientConnection, handle: RelayHandle
) -> BrowserGone:
    """Carry the browser's messages to the desktop until the browser's side ends.

    Raises ``ConnectionClosed`` when the desktop's side ended first (a send failed).
    """
    receive, send = websocket.receive, upstream.send
    while True:
        message = await receive()
        data: bytes | None = message.get("bytes")
        if data is None:
            if message["type"] == "websocket.disconnect":
                return BrowserGone(message.get("code"), message.get("reason") or "")
            text: str = message.get("text") or ""
            if len(text) <= MAX_FRAME // 4:  # at most 4 bytes a character: one frame
                await send(text)
                continue
            data = text.encode()  # RFB is bytes; a long text is passed on as binary pieces
        if len(data) > MAX_BROWSER_MESSAGE:  # a server that does not enforce it itself
            return BrowserGone(BROWSER_TOO_BIG.code, BROWSER_TOO_BIG.reason, BROWSER_TOO_BIG)
        handle.bytes_up += len(data)
        if is_user_input(data):
            handle.last_input = time.monotonic()
        if len(data) <= MAX_FRAME:
            await send(data)
        else:
            # KasmVNC rejects frames over 65,535 bytes, and RFB is a byte stream: send it on in pieces.
            view = memoryview(data)
            for start in range(0, len(view), MAX_FRAME):
                await send(view[start : start + MAX_FRAME])


async def _viewer_to_container(
    websocket: WebSocket, upstream: ClientConnection, handle: RelayHandle, view_only: ViewOnlyFilter
) -> BrowserGone:
    """Carry a view-only browser's messages to the desktop without their input (see :mod:`rfbinput`).

    A pump of its own, so that the owner's relays pay nothing for it. Raises ``ConnectionClosed`` when
    the desktop's side ended first.
    """
    receive, send = websocket.receive, upstream.send
    while True:
        message = await receive()
        data: bytes | None = message.get("bytes")
        if data is None:
            if message["type"] == "websocket.disconnect":
                return BrowserGone(message.get("code"), message.get("reason") or "")
            data = (message.get("text") or "").encode()
        if len(data) > MAX_BROWSER_MESSAGE:
            return BrowserGone(BROWSER_TOO_BIG.code, BROWSER_TOO_BIG.reason, BROWSER_TOO_BIG)
        try:
            passed = view_only.feed(data)
        except NotViewOnly:
            return BrowserGone(NOT_VIEW_ONLY.code, NOT_VIEW_ONLY.reason, NOT_VIEW_ONLY)
        handle.bytes_up += len(passed)
        view = memoryview(passed)
        for start in range(0, len(view), MAX_FRAME):
            await send(view[start : start + MAX_FRAME])


async def _container_to_browser(
    upstream: ClientConnection, websocket: WebSocket, handle: RelayHandle
) -> None:
    """Carry the desktop's messages to the browser; return when the desktop's side ends.

    Raises what the browser's server raised when a send failed (the browser is gone).
    """
    send_bytes, send_text = websocket.send_bytes, websocket.send_text
    async for message in upstream:
        if isinstance(message, bytes):
            handle.bytes_down += len(message)
            await send_bytes(message)
        else:
            await send_text(message)


async def relay(
    websocket: WebSocket,
    upstream: ClientConnection,
    handle: RelayHandle,
    still_running: Callable[[], Awaitable[bool]],
    view_only: ViewOnlyFilter | None = None,
) -> Outcome:
    """Relay until one side ends or the desktop is stopped, then close the other; return what happened.

    With ``view_only``, the browser's input is taken out on the way (a watcher's relay).
    Cancelling this coroutine (the loop shutting down) cancels both pumps and closes the container leg
    with 1001; the browser's server closes its side.
    """
    if view_only is None:
        up = asyncio.create_task(_browser_to_container(websocket, upstream, handle))
    else:
        up = asyncio.create_task(_viewer_to_container(websocket, upstream, handle, view_only))
    down = asyncio.create_task(_container_to_browser(upstream, websocket, handle))
    try:
        await asyncio.wait((up, down, handle.stopped), return_when=asyncio.FIRST_COMPLETED)
        outcome = await _decide(up, down, handle, upstream, still_running)
    except asyncio.CancelledError:
        await _cancel(up, down)
        await _close_container(upstream, closepolicy.GATEWAY_GOING_AWAY)
        raise
    except BaseException:
        await _cancel(up, down)  # a pump failed unexpectedly: the caller aborts and logs it
        raise
    await _cancel(up, down)
    if outcome.to_container is not None:
        await _close_container(upstream, outcome.to_container)
    else:
        upstream.transport.abort()  # it ended already: only the socket is left
    if outcome.to_browser is not None:
        await close_browser(websocket, outcome.to_browser)
    return outcome


async def _cancel(*tasks: asyncio.Task[Any]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _close_container(upstream: ClientConnection, close: Close) -> None:
    """Send ``close`` to the desktop; KasmVNC answers by dropping TCP, so this is quick."""
    try:
        await upstream.close(close.code, close.reason)
    except Exception:
        upstream.transport.abort()


async def _decide(
    up: asyncio.Task[BrowserGone],
    down: asyncio.Task[None],
    handle: RelayHandle,
    upstream: ClientConnection,
    still_running: Callable[[], Awaitable[bool]],
) -> Outcome:
    if handle.stopped.done():
        close = handle.stopped.result()
        return Outcome(EndedBy.STOPPED, to_browser=close, to_container=close)
    if up.done() and not isinstance(up.exception(), ConnectionClosed):
        error = up.exception()
        if error is not None:
            raise error
        gone = up.result()
        if gone.verdict is not None:
            return Outcome(EndedBy.BROWSER, to_browser=gone.verdict, to_container=gone.verdict)
        return Outcome(EndedBy.BROWSER, None, closepolicy.to_container(gone.code, gone.reason))
    if down.done():
        error = down.exception()
        if error is not None and not isinstance(error, ConnectionClosed):
            # Writing to the browser failed: it is gone (its disconnect is on its way to the other pump).
            return Outcome(EndedBy.BROWSER, None, closepolicy.to_container(None, ""))
    else:
        # A send to the desktop failed first: the receiving pump sees the end at once.
        await asyncio.wait((down,), timeout=CLOSE_WAIT)
    # The desktop's side ended: with a close frame, a protocol violation, or a drop.
    error = down.exception() if down.done() else None
    cause = error.__cause__ if error is not None else None
    if isinstance(cause, PayloadTooBig):
        return Outcome(EndedBy.CONTAINER_ERROR, to_browser=TOO_BIG, to_container=None)
    if isinstance(cause, ProtocolError):
        return Outcome(EndedBy.CONTAINER_ERROR, to_browser=PROTOCOL_ERROR, to_container=None)
    received = upstream.protocol.close_rcvd
    if received is not None:
        close = closepolicy.to_browser_after_container_close(received.code, received.reason)
        return Outcome(EndedBy.CONTAINER_CLOSE, to_browser=close, to_container=None)
    close = closepolicy.to_browser_after_drop(await still_running())
    return Outcome(EndedBy.CONTAINER_DROP, to_browser=close, to_container=None)
