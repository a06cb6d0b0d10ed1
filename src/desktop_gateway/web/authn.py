"""Pure ASGI middleware that puts the signed-in browser user (or ``None``) into ``scope["identity"]``.

Pure ASGI rather than ``BaseHTTPMiddleware`` because that one passes WebSocket scopes through untouched,
and ``/websockify`` is exactly what must be guarded.
"""

from __future__ import annotations

import contextvars

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from desktop_gateway import metrics
from desktop_gateway.gateway import Gateway
from desktop_gateway.identity import Identity, cookie_from_header, identify
from desktop_gateway.web.static import PREFIX as STATIC_PREFIX

# Whether the development sign-in is on, for the pages of the request being served to show a banner.
dev_login_on: contextvars.ContextVar[bool] = contextvars.ContextVar("dev_login_on", default=False)


class BrowserIdentity:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            scope["identity"] = None
            gateway: Gateway = scope["state"]["gateway"]
            dev_login_on.set(gateway.settings.dev_login)
            cookie = cookie_from_header(Headers(scope=scope).get("cookie"), gateway.settings.secure_cookies)
            # Static files are for anyone: no database lookup for each of the viewer's many modules.
            if cookie is not None and not scope["path"].startswith(STATIC_PREFIX):
                scope["identity"] = await _identify(gateway, cookie)
        await self.app(scope, receive, send)


async def _identify(gateway: Gateway, cookie: str) -> Identity | None:
    # A function of its own so that the database session is not kept alive by the caller's frame, which
    # lives as long as the request (hours for a relay).
    with metrics.database_lookup("identify"):
        async with gateway.engine.connect() as db:
            who = await identify(db, gateway.codec, cookie)
    if who is not None and gateway.session_usage.due(who.session_id, who.last_seen_at):
        gateway.session_usage.seen([who.session_id])
    return who
