"""The two pumps between an accepted browser WebSocket (ASGI) and an open container leg.

Each direction is one task. Backpressure is end to end: a pump awaits each send, so a slow reader on one
side stops the pump reading from the other, and the only buffers are the bounded ones of the two
WebSocket stacks. When either side ends, :func:`relay` decides with :mod:`closepolicy` what the other
side is told, tells it, and returns an :class:`Outcome` for the caller to log once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import time
from collections.abc import Awaitable, Callable

from starlette.types import Receive, Send
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from desktop_gateway import closepolicy
from desktop_gateway.closepolicy import Close
from desktop_gateway.relayhub import RelayHandle
from desktop_gateway.upstream import MAX_FRAME


class EndedBy(enum.StrEnum):
    BROWSER = "browser"
    CONTAINER_CLOSE = "container closed"
    CONTAINER_DROP = "container dropped"
    STOPPED = "stopped"
    ERROR = "error"


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    ended_by: EndedBy
    to_browser: Close | None
    to_container: Close | None
    error: BaseException | None = None


# RFB client messages a person causes: KeyEvent, PointerEvent, ClientCutText. noVNC sends each RFB message
# as one WebSocket message, so the first byte tells; FramebufferUpdateRequests (3) are the client's own.
_USER_INPUT = frozenset((4, 5, 6))


def is_user_input(data: bytes | bytearray | memoryview) -> bool:
    """Whether a browser message is real user input (for the idle limit), not the viewer's own traffic."""
    return len(data) > 0 and data[0] in _USER_INPUT


@dataclasses.dataclass(frozen=True, slots=True)
class _BrowserGone:
    code: int | None
    reason: str


async def _browser_to_container(
    receive: Receive, upstream: ClientConnection, handle: RelayHandle
) -> _BrowserGone:
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.receive":
            data = message.get("bytes")
            if data is None:
                text: str = message.get("text") or ""
                if len(text) <= MAX_FRAME // 4:
                    await upstream.send(text)
                    continue
                data = text.encode()
            handle.bytes_up += len(data)
            if is_user_input(data):
                handle.last_input = time.monotonic()
            if len(data) <= MAX_FRAME:
                await upstream.send(data)
            else:
                # RFB is a byte stream and KasmVNC drops frames over 65,535 bytes: send it on in pieces.
                view = memoryview(data)
                for start in range(0, len(view), MAX_FRAME):
                    await upstream.send(view[start : start + MAX_FRAME])
        elif kind == "websocket.disconnect":
            return _BrowserGone(message.get("code"), message.get("reason") or "")


async def _container_to_browser(upstream: ClientConnection, send: Send, handle: RelayHandle) -> None:
    """Return when the container leg ends; raise ``OSError`` if the browser cannot be written to."""
    async for message in upstream:
        if isinstance(message, bytes):
            handle.bytes_down += len(message)
            await send({"type": "websocket.send", "bytes": message})
        else:
            await send({"type": "websocket.send", "text": message})


CLOSE_WAIT = 2.0  # seconds a browser gets to answer our close frame


async def close_browser(receive: Receive, send: Send, close: Close) -> None:
    """Send ``close`` and wait (briefly) for the browser's answer; a browser already gone is not an error.

    Returning at once would let the server drop the connection before the closing handshake completes,
    and the browser would report the close as unclean.
    """
    with contextlib.suppress(Exception):
        await send({"type": "websocket.close", "code": close.code, "reason": close.reason})
        async with asyncio.timeout(CLOSE_WAIT):
            while (await receive())["type"] != "websocket.disconnect":
                pass


async def relay(
    receive: Receive,
    send: Send,
    upstream: ClientConnection,
    handle: RelayHandle,
    still_running: Callable[[], Awaitable[bool]],
) -> Outcome:
    """Relay until one side ends, then close the other; return what happened.

    Cancelling this coroutine (gateway shutdown) cancels both pumps and closes the container leg; the
    caller tells the browser.
    """
    up = asyncio.create_task(_browser_to_container(receive, upstream, handle))
    down = asyncio.create_task(_container_to_browser(upstream, send, handle))
    try:
        await asyncio.wait((up, down, handle.stopped), return_when=asyncio.FIRST_COMPLETED)
        outcome = await _decide(up, down, handle, upstream, still_running)
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
    if outcome.to_container is not None:
        await upstream.close(outcome.to_container.code, outcome.to_container.reason)
    else:
        await upstream.close()
    if outcome.to_browser is not None:
        await close_browser(receive, send, outcome.to_browser)
    return outcome


async def _decide(
    up: asyncio.Task[_BrowserGone],
    down: asyncio.Task[None],
    handle: RelayHandle,
    upstream: ClientConnection,
    still_running: Callable[[], Awaitable[bool]],
) -> Outcome:
    if handle.stopped.done():
        close = handle.stopped.result()
        return Outcome(EndedBy.STOPPED, to_browser=close, to_container=close)
    if up.done():
        error = up.exception()
        if error is None:
            gone = up.result()
            return Outcome(EndedBy.BROWSER, None, closepolicy.to_container(gone.code, gone.reason))
        if not isinstance(error, ConnectionClosed):
            return Outcome(EndedBy.ERROR, closepolicy.GATEWAY_ERROR, closepolicy.GATEWAY_ERROR, error)
        # Sending to the container failed: its leg ended; fall through.
    else:
        error = down.exception()
        if error is not None and not isinstance(error, ConnectionClosed):
            # Writing to the browser failed: it is gone (its disconnect is on its way to the up pump).
            return Outcome(EndedBy.BROWSER, None, closepolicy.to_container(None, ""))
    received = upstream.protocol.close_rcvd
    if received is not None:
        close = closepolicy.to_browser_after_container_close(received.code, received.reason)
        return Outcome(EndedBy.CONTAINER_CLOSE, to_browser=close, to_container=None)
    close = closepolicy.to_browser_after_drop(await still_running())
    return Outcome(EndedBy.CONTAINER_DROP, to_browser=close, to_container=None)
