"""Relaying between an accepted browser WebSocket and an open container leg, and how it ends.

The bytes do not pass through this module's coroutines: :class:`Relay` splices the browser's protocol
(:mod:`browserws`) and the container leg (:mod:`upstream`) so that each side's transport callback writes
straight to the other side, and each side's full write buffer pauses reading on the other (end-to-end
backpressure, no queue of our own). The first of three endings (the browser's close, the container's, a
stop) starts a short task that decides with :mod:`closepolicy` what the other side is told, tells it,
and hands an :class:`Outcome` to the caller to log once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import time
from collections.abc import Awaitable, Callable
from typing import cast

from starlette.types import Receive, Send

from desktop_gateway import closepolicy
from desktop_gateway.browserws import BrowserWebSocketProtocol
from desktop_gateway.closepolicy import Close
from desktop_gateway.relayhub import RelayHandle
from desktop_gateway.upstream import Upstream


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


# RFB client messages a person causes: KeyEvent, PointerEvent, ClientCutText. noVNC sends each RFB message
# as one WebSocket message, so the first byte tells; FramebufferUpdateRequests (3) are the client's own.
_USER_INPUT = frozenset((4, 5, 6))


def is_user_input(data: bytes | bytearray | memoryview) -> bool:
    """Whether a browser message is real user input (for the idle limit), not the viewer's own traffic."""
    return len(data) > 0 and data[0] in _USER_INPUT


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


def _splice(
    browser: BrowserWebSocketProtocol, upstream: Upstream, handle: RelayHandle
) -> asyncio.Future[tuple[int, str]]:
    """Wire the two transports together; return the future of the browser's close code and reason."""

    def to_container(message: bytes | str) -> None:
        if isinstance(message, str):
            upstream.send(message.encode(), text=True)
            return
        handle.bytes_up += len(message)
        if is_user_input(message):
            handle.last_input = time.monotonic()
        upstream.send(message)

    def to_browser(frames: bytes) -> None:
        handle.bytes_down += len(frames)
        browser.write_frames(frames)

    upstream.forward = to_browser
    upstream.pause_peer, upstream.resume_peer = browser.pause_reading, browser.resume_reading
    assert upstream.transport is not None
    transport = upstream.transport
    closed = browser.splice(to_container, transport.pause_reading, transport.resume_reading)
    upstream.flush()
    return closed


class Relay:
    """A spliced relay. Between :meth:`start` and its end it is only callbacks: no task waits on it, so an
    idle relay costs a few small objects, not a parked coroutine chain with the request's scope in it.

    The first of the three endings (the browser's close, the container's, a stop) starts one short task
    that decides what the other side is told, tells it, and hands the :class:`Outcome` to ``on_end``
    (``None`` and the exception if ending went wrong; the connections are aborted then). Cancelling that
    task (the loop shutting down) closes the container leg with 1001.
    """

    __slots__ = ("_browser", "_handle", "_on_end", "_still_running", "_task", "_upstream")

    def __init__(
        self,
        browser: BrowserWebSocketProtocol,
        upstream: Upstream,
        handle: RelayHandle,
        still_running: Callable[[], Awaitable[bool]],
        on_end: Callable[[Outcome | None, BaseException | None], None],
    ) -> None:
        self._browser = browser
        self._upstream = upstream
        self._handle = handle
        self._still_running = still_running
        self._on_end = on_end
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        browser_closed = _splice(self._browser, self._upstream, self._handle)
        for ending in (browser_closed, self._upstream.ended, self._handle.stopped):
            ending.add_done_callback(self._ending)

    def _ending(self, _: object) -> None:
        if self._task is not None:
            return
        self._browser.unsplice()
        self._upstream.forward = None
        self._task = asyncio.get_running_loop().create_task(self._finish())
        _ENDING.add(self._task)
        self._task.add_done_callback(_ENDING.discard)

    async def _finish(self) -> None:
        browser, upstream = self._browser, self._upstream
        try:
            assert browser.closed is not None  # made by the splice
            outcome = await _decide(browser.closed, upstream, self._handle, self._still_running)
            if outcome.to_container is not None:
                upstream.close(outcome.to_container.code, outcome.to_container.reason)
            else:
                upstream.abort()
            if outcome.to_browser is not None:
                # The protocol's own ASGI callables: the request's task that had them is gone.
                receive, send = cast(Receive, browser.receive), cast(Send, browser.send)
                await close_browser(receive, send, outcome.to_browser)
        except asyncio.CancelledError:
            upstream.close(closepolicy.GATEWAY_GOING_AWAY.code, closepolicy.GATEWAY_GOING_AWAY.reason)
            browser.transport.abort()
            self._on_end(None, None)
            raise
        except Exception as exc:
            upstream.abort()
            browser.transport.abort()
            self._on_end(None, exc)
            return
        self._on_end(outcome, None)


# Relays being ended: the event loop keeps only weak references to tasks.
_ENDING: set[asyncio.Task[None]] = set()


async def _decide(
    browser_closed: asyncio.Future[tuple[int, str]],
    upstream: Upstream,
    handle: RelayHandle,
    still_running: Callable[[], Awaitable[bool]],
) -> Outcome:
    if handle.stopped.done():
        close = handle.stopped.result()
        return Outcome(EndedBy.STOPPED, to_browser=close, to_container=close)
    if browser_closed.done():
        code, reason = browser_closed.result()
        return Outcome(EndedBy.BROWSER, None, closepolicy.to_container(code, reason))
    ended = upstream.ended.result()
    if ended.verdict is not None:
        return Outcome(EndedBy.CONTAINER_ERROR, to_browser=ended.verdict, to_container=ended.verdict)
    if ended.code is not None:
        close = closepolicy.to_browser_after_container_close(ended.code, ended.reason)
        return Outcome(EndedBy.CONTAINER_CLOSE, to_browser=close, to_container=None)
    close = closepolicy.to_browser_after_drop(await still_running())
    return Outcome(EndedBy.CONTAINER_DROP, to_browser=close, to_container=None)
