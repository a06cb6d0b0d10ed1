"""The browser-side WebSocket protocol: uvicorn's sans-I/O implementation, plus what a relay needs.

Three additions:

* uvicorn reports a browser that vanished without a close frame as 1005, the same code as a close frame
  that carried no code. The close policy needs them apart (the container is told 1001 for the first and
  1000 for the second), so a connection lost before any close frame arrived is reported as 1006.
* A splice: once a relay is set up (:meth:`BrowserWebSocketProtocol.splice`), browser messages go
  straight from the transport callback to the container leg, and the container's frames straight to
  this transport, instead of through the ASGI queue and two pump tasks. Handshake, keepalive pings and
  the closing handshake stay uvicorn's.
* A spliced connection outlives the app's task: the relay ends it (:mod:`relay`), so an idle relay keeps
  no coroutine chain, scope or headers alive.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from uvicorn._types import ASGIReceiveEvent
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

EXTENSION = "desktop_gateway.splice"

MessageSink = Callable[[bytes | str], None]


class BrowserWebSocketProtocol(WebSocketsSansIOProtocol):
    sink: MessageSink | None = None
    on_pause_writing: Callable[[], None] | None = None
    on_resume_writing: Callable[[], None] | None = None
    closed: asyncio.Future[tuple[int, str]] | None = None

    @property
    def relayed(self) -> bool:
        """Handed to a relay (spliced), which outlives the app's task and ends the connection itself."""
        return self.closed is not None

    # uvicorn's ASGI queue and "writable" event serve only the app's receive() and send(), which a relay
    # needs again only at its end: an idle relay keeps neither (they are made again on first use).
    _queue: asyncio.Queue[ASGIReceiveEvent] | None = None
    _writable: asyncio.Event | None = None

    @property
    def queue(self) -> asyncio.Queue[ASGIReceiveEvent]:
        if self._queue is None:
            self._queue = asyncio.Queue()
        return self._queue

    @queue.setter
    def queue(self, queue: asyncio.Queue[ASGIReceiveEvent]) -> None:
        self._queue = queue

    @property
    def writable(self) -> asyncio.Event:
        if self._writable is None:
            self._writable = asyncio.Event()
            self._writable.set()
        return self._writable

    @writable.setter
    def writable(self, event: asyncio.Event) -> None:
        self._writable = event

    async def run_asgi(self) -> None:
        """uvicorn's, except that a connection handed to a relay is not closed when the app returns."""
        try:
            result = await self.app(self.scope, self.receive, self.send)
        except ClientDisconnected:
            pass
        except BaseException:
            self.logger.exception("Exception in ASGI application\n")
            self.send_500_response()
        else:
            if not self.handshake_complete:
                self.logger.error("ASGI callable returned without completing handshake.")
                self.send_500_response()
            elif result is not None:
                self.logger.error("ASGI callable should return None, but returned '%s'.", result)
        if self.relayed and not self.close_sent:
            # The relay holds the connection now; the scope (headers, cookies, state) need not live on.
            self.scope = None  # type: ignore[assignment]
            return
        if self.close_timer is None:
            self.transport.close()

    def handle_connect(self, event: object) -> None:
        super().handle_connect(event)  # type: ignore[arg-type]
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope.setdefault("extensions", {})[EXTENSION] = self

    def connection_lost(self, exc: Exception | None) -> None:
        if self.handshake_complete and self.conn.close_rcvd is None:
            # Read first by the app; the 1005 that uvicorn queues after it is never read.
            self.queue.put_nowait({"type": "websocket.disconnect", "code": 1006})
            self._closed(1006, "")
        self.sink = None
        super().connection_lost(exc)

    def handle_close(self, event: object) -> None:
        received = self.conn.close_rcvd
        super().handle_close(event)  # type: ignore[arg-type]
        if received is not None:
            self._closed(received.code, received.reason)

    def handle_parser_exception(self) -> None:
        # The browser broke the protocol or a limit (1009 for a message over the size limit): the code
        # uvicorn closes with is what the container is told.
        sent = self.conn.close_sent
        super().handle_parser_exception()
        if sent is not None:
            self._closed(sent.code, sent.reason)

    def _closed(self, code: int, reason: str) -> None:
        if self.closed is not None and not self.closed.done():
            self.closed.set_result((code, reason))

    def send_receive_event_to_app(self) -> None:
        sink = self.sink
        if sink is None or self.close_sent:
            super().send_receive_event_to_app()
            return
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        sink(data.decode() if self.curr_msg_data_type == "text" else data)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.on_pause_writing is not None:
            self.on_pause_writing()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.on_resume_writing is not None:
            self.on_resume_writing()

    # --- the splice -----------------------------------------------------------------------------

    def splice(
        self,
        sink: MessageSink,
        on_pause_writing: Callable[[], None],
        on_resume_writing: Callable[[], None],
    ) -> asyncio.Future[tuple[int, str]]:
        """Deliver browser messages to ``sink``; return a future of the browser's close code and reason."""
        self.closed = asyncio.get_running_loop().create_future()
        if self.disconnected:
            self.closed.set_result((1006, ""))
        self.sink, self.on_pause_writing, self.on_resume_writing = sink, on_pause_writing, on_resume_writing
        # The handshake is over: its request and response (headers and all) need not live for hours. The
        # request lives on in a local of websockets' parser generator, so its headers are emptied too.
        if self.request is not None:
            self.request.headers.clear()
        self.request = self.response = None  # type: ignore[assignment]
        # Messages that arrived before the splice are in the ASGI queue: hand them on in order.
        while not self.queue.empty():
            message = self.queue.get_nowait()
            if message["type"] == "websocket.receive":
                text = message.get("text")
                sink(text if text is not None else message.get("bytes") or b"")
            else:
                self.queue.put_nowait(message)  # a disconnect: leave it for the app
                break
        if self._queue is not None and self._queue.empty():
            self._queue = None
        if self._writable is not None and self._writable.is_set():
            self._writable = None
        return self.closed

    def unsplice(self) -> None:
        self.sink = self.on_pause_writing = self.on_resume_writing = None
        # Reading may be paused for the container leg's sake; the closing handshake needs it again.
        self.resume_reading()

    def write_frames(self, frames: bytes) -> None:
        """Write whole, unmasked server frames (as the container sent them) to the browser."""
        if not self.close_sent and not self.transport.is_closing():
            self.transport.write(frames)

    def pause_reading(self) -> None:
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if not self.transport.is_closing() and not self.read_paused:
            self.transport.resume_reading()
