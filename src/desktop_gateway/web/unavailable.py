"""Pure ASGI middleware: a request that fails because the database cannot serve gets an answer that says so.

Outermost of the gateway's middleware, because the database is first needed by the identity lookup
(a middleware itself), before any route runs. Without it a database outage, a locked or a damaged
SQLite file reached people as "Internal Server Error" and a traceback in the log for every request.

Two kinds of failure are answered differently (see :mod:`desktop_gateway.db.faults`): a database that
cannot be reached answers 503 with ``Retry-After``, since it may be back in a moment; a full disk or a
read-only database answers 507 Insufficient Storage without it, since only an administrator ends that
(reading still works meanwhile, so only requests that write get it). A WebSocket is closed with 1011
and a sentence either way.
"""

from __future__ import annotations

import dataclasses
import logging

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from desktop_gateway.db.faults import Fault, diagnose
from desktop_gateway.web.pages import message
from desktop_gateway.web.problems import problem

log = logging.getLogger("desktop_gateway")

RETRY_AFTER = "5"
# Said to noVNC in a close frame (at most 123 bytes), in English like every close reason.
CLOSE_REASON = "The gateway cannot reach its database. Try again in a moment."


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """What each kind of caller is told: the portal (problem document), a person (page), noVNC (close)."""

    status: int
    title: str  # the problem document's, in English
    detail: str
    heading: str  # the page's, a catalogue key
    sentence: str  # a catalogue key
    close_reason: str  # at most 123 bytes
    retry_after: str | None


REFUSALS = {
    Fault.UNAVAILABLE: Refusal(
        503,
        "Database unavailable",
        "the gateway cannot reach its database; try again in a moment",
        "database.unavailable_heading",
        "database.unavailable",
        CLOSE_REASON,
        RETRY_AFTER,
    ),
    Fault.DISK_FULL: Refusal(
        507,
        "Database disk full",
        "the gateway's database disk is full, so nothing new can be stored (reading still works); "
        "its administrator must free space, and the gateway carries on by itself once there is room",
        "database.cannot_store_heading",
        "database.disk_full",
        "The gateway's disk is full. Please tell your IT administrator.",
        None,
    ),
    Fault.READ_ONLY: Refusal(
        507,
        "Database read-only",
        "the gateway's database is read-only, so nothing new can be stored (reading still works); "
        "its administrator must make it writable again",
        "database.cannot_store_heading",
        "database.read_only",
        "The gateway's database is read-only. Please tell your IT administrator.",
        None,
    ),
}


class DatabaseFailures:
    def __init__(self, app: ASGIApp, sqlite_file: str | None = None) -> None:
        """``sqlite_file``: the embedded database's file, whose file system tells some faults apart."""
        self.app = app
        self.sqlite_file = sqlite_file

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
            diagnosis = None if answered else diagnose(exc, self.sqlite_file)
            if diagnosis is None:
                raise
            fault, explanation = diagnosis
            what = f"{scope.get('method', 'WebSocket')} {_loggable(scope['path'])}"
            if fault.cannot_store:
                log.error("database %s: refused %s: %s", fault.value, what, explanation)
            else:
                log.warning("database unavailable: %s: %s", what, _cause(exc))
            await _answer(scope, receive, send, REFUSALS[fault])


def _loggable(path: str) -> str:
    """``path`` without a launch token: a link whose use was refused still signs in for a while."""
    return "/launch/<token>" if path.startswith("/launch/") else path


def _cause(exc: BaseException) -> str:
    """The first line of the error, without SQLAlchemy's statement and parameters (they may hold data)."""
    cause = getattr(exc, "orig", None) or exc
    return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"


async def _answer(scope: Scope, receive: Receive, send: Send, refusal: Refusal) -> None:
    if scope["type"] == "websocket":
        # Accepted first, so that noVNC is told why (a refused handshake would reach it as a bare 1006).
        offered = scope.get("subprotocols") or []
        await send({"type": "websocket.accept", "subprotocol": "binary" if "binary" in offered else None})
        await send({"type": "websocket.close", "code": 1011, "reason": refusal.close_reason})
        return
    headers = {"Retry-After": refusal.retry_after} if refusal.retry_after else {}
    response: Response
    if scope["path"].startswith("/api/"):
        response = problem(refusal.status, refusal.title, refusal.detail, headers=headers)
    else:
        response = message(refusal.status, refusal.heading, refusal.sentence)
        response.headers.update(headers)
    await response(scope, receive, send)
