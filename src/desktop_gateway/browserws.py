"""The browser-side WebSocket protocol: uvicorn's sans-I/O implementation, plus what a relay needs.

Two additions:

* uvicorn reports a browser that vanished without a close frame as 1005, the same code as a close frame
  that carried no code. The close policy needs them apart (the container is told 1001 for the first and
  1000 for the second), so a connection lost before any close frame arrived is reported as 1006.
* A splice: once a relay is set up (:meth:`BrowserWebSocketProtocol.splice`), browser messages go
  straight from the transport callback to the container leg, and the container's frames straight to
  this transport, instead of through the ASGI queue and two pump tasks. Handshake, keepalive pings and
  the closing handshake stay uvicorn's; the app still sees ``websocket.disconnect`` through ``receive``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

EXTENSION = "desktop_gateway.splice"

MessageSink = Callable[[bytes | str], None]


class BrowserWebSocketProtocol(WebSocketsSansIOProtocol):
    sink: MessageSink | None = None
    on_pause_writing: Callable[[], None] | None = None
    on_resume_writing: Callable[[], None] | None = None
    closed: asyncio.Future[tuple[int, str]] | None = None

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
        # The handshake is over: its request and response (headers and all) need not live for hours.
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
