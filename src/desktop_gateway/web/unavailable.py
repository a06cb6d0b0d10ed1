"""Pure ASGI middleware: a request that fails because the database cannot serve gets a 503 that says so.

Outermost of the gateway's middleware, because the database is first needed by the identity lookup
(a middleware itself), before any route runs. Without it a database outage, a locked or a damaged
SQLite file reached people as "Internal Server Error" and a traceback in the log for every request.
"""

from __future__ import annotations

import logging

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from desktop_gateway.db.engine import is_database_failure
from desktop_gateway.web.pages import message
from desktop_gateway.web.problems import problem

log = logging.getLogger("desktop_gateway")

RETRY_AFTER = "5"
SENTENCE = "The desktop gateway cannot reach its database right now. Try again in a moment."
# Said to noVNC in a close frame (at most 123 bytes).
CLOSE_REASON = "The gateway cannot reach its database. Try again in a moment."


class DatabaseFailures:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        answered = False

        async def watched_send(msg: Message) -> None:
            nonlocal answered
            answered = True
            await send(msg)

        try:
            await self.app(scope, receive, watched_send)
        except Exception as exc:
            if answered or not is_database_failure(exc):
                raise
            log.warning(
                "database unavailable: %s %s: %s",
                scope.get("method", "WebSocket"),
                scope["path"],
                _cause(exc),
            )
            await _answer(scope, receive, send)


def _cause(exc: BaseException) -> str:
    """The first line of the error, without SQLAlchemy's statement and parameters (they may hold data)."""
    cause = getattr(exc, "orig", None) or exc
    return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"


async def _answer(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "websocket":
        # Accepted first, so that noVNC is told why (a refused handshake would reach it as a bare 1006).
        offered = scope.get("subprotocols") or []
        await send({"type": "websocket.accept", "subprotocol": "binary" if "binary" in offered else None})
        await send({"type": "websocket.close", "code": 1011, "reason": CLOSE_REASON})
        return
    headers = {"Retry-After": RETRY_AFTER}
    response: Response
    if scope["path"].startswith("/api/"):
        response = problem(
            503,
            "Database unavailable",
            "the gateway cannot reach its database; try again in a moment",
            headers=headers,
        )
    else:
        response = message(503, "Try again in a moment", SENTENCE)
        response.headers.update(headers)
    await response(scope, receive, send)
