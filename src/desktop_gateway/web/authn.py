"""Pure ASGI middleware that puts the signed-in browser user (or ``None``) into ``scope["identity"]``.

Pure ASGI rather than ``BaseHTTPMiddleware`` because that one passes WebSocket scopes through untouched,
and ``/websockify`` is exactly what must be guarded.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from desktop_gateway.gateway import Gateway
from desktop_gateway.identity import cookie_from_header, identify


class BrowserIdentity:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope["identity"] = None
            cookie = cookie_from_header(Headers(scope=scope).get("cookie"))
            if cookie is not None:
                gateway: Gateway = scope["state"]["gateway"]
                async with gateway.sessions() as db:
                    scope["identity"] = await identify(db, gateway.codec, cookie)
        await self.app(scope, receive, send)
