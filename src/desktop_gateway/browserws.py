"""The browser-side WebSocket protocol: uvicorn's sans-I/O implementation, telling a drop from a close.

uvicorn reports a browser that vanished without a close frame as 1005, the same code as a close frame
that carried no code. The close policy needs them apart (the container is told 1001 for the first and
1000 for the second), so a connection lost before any close frame arrived is reported as 1006.
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class BrowserWebSocketProtocol(WebSocketsSansIOProtocol):
    def connection_lost(self, exc: Exception | None) -> None:
        if self.handshake_complete and self.conn.close_rcvd is None:
            # Read first by the app; the 1005 that uvicorn queues after it is never read.
            self.queue.put_nowait({"type": "websocket.disconnect", "code": 1006})
        super().connection_lost(exc)
